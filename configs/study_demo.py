"""`mstar study` on CPU: the paper's table-1 methods and intervals, plus adaptive temperature and M-STaR, from one
warm-up and one PRM.

    mstar study --workdir runs/study_demo          # add --config.study.variants='...' to change the set

Every variant makes 2 passes over the demo's 512 queries (so the 100 % methods are iterative too).
"""

from ml_collections import ConfigDict

from mstar_jax.config import base_config


def get_config():
    """The demo plus `study.variants` (METHOD@PERCENT%[+adaptive], comma-separated)."""
    c = base_config(__file__, "demo")
    c.train.passes = 2.0
    c.dynamics.every = 2  # monitoring every 2 iterations (adaptive variants also evaluate their window's)
    c.dynamics.grid_step = 0.2  # 0.3, 0.5, .., 1.5: half the validation sampling of the demo's grid
    c.export.enabled = False
    c.study = ConfigDict()
    # Table 1 rows keep every correct response (the paper's binary reward); the last row is M-STaR: continuous,
    # PRM top-2 and the adaptive temperature.
    c.study.variants = ("rest_em@100%, iterative_rft@100%, continuous@100%, continuous@50%, continuous@25%, "
                        "continuous@25%+adaptive, continuous@25%+adaptive+prm_top2")
    return c
