"""`mstar study` with the paper's settings (configs/paper.py) for its tables 2 and 3 on your checkpoint and data:
selection of correct responses, and unlabeled prompts (the other half of MathV360K, answers hidden) mixed in at
0 / 25 / 50 / 75 % of the run, with the oracle skyline.

    mstar study --config configs/study_prm_paper.py --workdir gs://BUCKET/study_prm --config.model.path=... \
        --config.data.root=... --config.data.train=... --config.data.unlabeled=... --config.data.warmup=... \
        --config.data.val=... --config.data.test_id=... --config.data.test_ood=...
"""

from ml_collections import ConfigDict

from mstar_jax.config import base_config


def get_config():
    """configs/paper.py (10K steps, continuous at 25 %, PRM from 50K questions) plus the table 2 / 3 variants."""
    c = base_config(__file__, "paper")
    c.export.enabled = False
    c.study = ConfigDict()
    c.study.variants = ("continuous@25%, continuous@25%+random2, continuous@25%+prm_top2, "
                        "continuous@25%+prm_threshold, continuous@25%+prm_top2+unlabeled@0%, "
                        "continuous@25%+prm_top2+unlabeled@25%, continuous@25%+prm_top2+unlabeled@50%, "
                        "continuous@25%+prm_top2+unlabeled@75%, continuous@25%+oracle@0%, "
                        "continuous@25%+prm_top2+oracle@0%")
    return c
