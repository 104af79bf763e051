"""The demo's M-STaR run next to its ablations, from one base model, warm-up and PRM (docs/demo_results.md):

    mstar study --config study_mstar_demo --workdir runs/mstar_s0 --config.seed=0

continuous@25% (all correct responses, T=1), + adaptive temperature, and M-STaR (+ PRM top-2 re-ranking); the
M-STaR variant runs exactly what `mstar train` runs (configs/demo.py).
"""

from ml_collections import ConfigDict

from mstar_jax.config import base_config


def get_config():
    """configs/demo.py plus the three variants."""
    c = base_config(__file__, "demo")
    c.export.enabled = False
    c.study = ConfigDict()
    c.study.variants = "continuous@25%, continuous@25%+adaptive, continuous@25%+adaptive+prm_top2"
    return c
