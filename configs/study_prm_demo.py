"""`mstar study` on CPU for the paper's tables 2 and 3: how correct responses are selected (all, random-2,
mean-logprob top-2, PRM top-2, PRM threshold) and unlabeled prompts mixed in at 0 / 25 / 50 / 75 % of the run
(pseudo-labelled by PRM-weighted voting, PRM top-2) next to the oracle, all from one warm-up and one PRM.

    mstar study --config study_prm_demo --workdir runs/study_prm_demo
"""

from mstar_jax.config import base_config


def get_config():
    """The demo (continuous at 25 %, fixed T=1) with 512 unlabeled queries and the table 2 / table 3 variants."""
    c = base_config(__file__, "study_demo")
    c.data.synth_sizes.unlabeled = 512
    c.study.variants = ("continuous@25%, continuous@25%+random2, continuous@25%+logprob_top2, "
                        "continuous@25%+prm_top2, continuous@25%+prm_threshold, "
                        "continuous@25%+prm_top2+unlabeled@0%, continuous@25%+prm_top2+unlabeled@25%, "
                        "continuous@25%+prm_top2+unlabeled@50%, continuous@25%+prm_top2+unlabeled@75%, "
                        "continuous@25%+oracle@0%, continuous@25%+prm_top2+oracle@0%")
    return c
