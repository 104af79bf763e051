"""M-STaR on InternVL2-2B (Table 4: MathVista 46.4 -> 50.3): configs/paper.py on the converted release, warmed up
on MiniCPM-V-2.5's warm-up responses and re-ranked by its PRM (paper 4.2).

    mstar convert hf-to-flax /ckpts/InternVL2-2B /ckpts/internvl2-flax
    mstar train --config paper_internvl2 --workdir gs://BUCKET/internvl2 --config.model.path=/ckpts/internvl2-flax \
        --config.warmup.rollouts=gs://BUCKET/minicpmv/rollouts/warmup.jsonl \
        --config.prm.path=gs://BUCKET/minicpmv/prm/model ... (the data flags of configs/paper.py)

Without `prm.path` the run labels and trains a PRM of its own (appendix D); without `warmup.rollouts` it samples
its own warm-up responses.
"""

from mstar_jax.config import base_config


def get_config():
    """The paper's recipe; prompts of up to 12 448-px tiles + a thumbnail (256 tokens each) and the PRM of another
    backbone, which scores with its own tokenizer."""
    c = base_config(__file__, "paper")
    c.data.max_prompt_tokens = 4096
    c.prm.require_same_tokenizer = False
    return c
