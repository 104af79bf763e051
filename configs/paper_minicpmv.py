"""M-STaR on MiniCPM-Llama3-V-2.5, the paper's main backbone (Table 4: MathVista 52.4 -> 59.5): configs/paper.py
on the converted release.

    mstar convert hf-to-flax /ckpts/MiniCPM-Llama3-V-2_5 /ckpts/minicpmv-flax
    mstar train --config paper_minicpmv --workdir gs://BUCKET/minicpmv --config.model.path=/ckpts/minicpmv-flax \
        --config.data.root=/data/mathv360k --config.data.train=... (the data flags of configs/paper.py)

Its warm-up responses (`rollouts/warmup.jsonl`) and PRM (`prm/model`) are what configs/paper_phi3_v.py and
configs/paper_internvl2.py reuse, as the paper does.
"""

from mstar_jax.config import base_config


def get_config():
    """The paper's recipe; up to 9 slices + the source image of 96 tokens each fit in 2048 prompt tokens."""
    c = base_config(__file__, "paper")
    c.data.max_prompt_tokens = 2048
    return c
