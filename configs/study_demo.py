"""`mstar study` on CPU: the paper's table-1 methods and intervals, plus adaptive temperature, from one warm-up.

    mstar study --workdir runs/study_demo          # add --config.study.variants='...' to change the set

Every variant makes 2 passes over the demo's 512 queries (so the 100 % methods are iterative too).
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location("mstar_demo_config", pathlib.Path(__file__).with_name("demo.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def get_config():
    """The demo plus `study.variants` (METHOD@PERCENT%[+adaptive], comma-separated)."""
    c = _module.get_config()
    c.train.passes = 2.0
    c.dynamics.every = 2  # monitoring every 2 iterations (the adaptive choice needs no more)
    c.export.enabled = False
    c.study = ConfigDict()
    c.study.variants = ("rest_em@100%, iterative_rft@100%, continuous@100%, continuous@50%, continuous@25%, "
                        "continuous@25%+adaptive")
    return c
