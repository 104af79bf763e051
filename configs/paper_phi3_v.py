"""M-STaR on Phi-3.5-vision (Table 4: MathVista 46.5 -> 54.5): configs/paper.py on the converted release, warmed up
on MiniCPM-V-2.5's warm-up responses and re-ranked by its PRM (paper 4.2: "we utilized both the warmup data and
multimodal PRM based on MiniCPM-V-2.5").

    mstar convert hf-to-flax /ckpts/Phi-3.5-vision-instruct /ckpts/phi35v-flax
    mstar train --config paper_phi3_v --workdir gs://BUCKET/phi35v --config.model.path=/ckpts/phi35v-flax \
        --config.warmup.rollouts=gs://BUCKET/minicpmv/rollouts/warmup.jsonl \
        --config.prm.path=gs://BUCKET/minicpmv/prm/model ... (the data flags of configs/paper.py)

Without `prm.path` the run labels and trains a PRM of its own (appendix D); without `warmup.rollouts` it samples
its own warm-up responses.
"""

from mstar_jax.config import base_config


def get_config():
    """The paper's recipe; prompts of up to 16 HD crops + the global view (144 tokens each) and the PRM of another
    backbone, which scores with its own tokenizer."""
    c = base_config(__file__, "paper")
    c.data.max_prompt_tokens = 3072
    c.prm.require_same_tokenizer = False
    return c
