"""The paper's hyper-parameters (M-STaR, appendix C and section 4.2) for a real run on your checkpoint and data.

    mstar train --config configs/paper.py --workdir gs://BUCKET/run \
        --config.model.path=/ckpts/llava-7b-flax --config.data.root=/data/mathv360k \
        --config.data.train=/data/mathv360k/train_labeled.json --config.data.warmup=/data/mathv360k/warmup.json \
        --config.data.val=/data/mathv360k/val250.json --config.data.test_id=/data/mathv360k/test750.json \
        --config.data.test_ood=/data/mathvista/testmini.json
"""

from mstar_jax.config import base_config


def get_config():
    """lr 1e-6, global batch 128, constant LR after a 0.1 warm-up ratio, 25 % interval, K=16, T grid 0.3..1.6."""
    c = base_config(__file__, "demo")
    c.data.source = "files"
    c.data.max_prompt_tokens = 2048
    c.model.path = ""  # required: an HF LLaVA directory or a converted checkpoint
    # The loaded policy holds the master weights, so float32; the SFT step computes in bfloat16 (compute_dtype).
    c.model.dtype = "float32"
    c.sampling.update({"max_new_tokens": 512, "batch_size": 256, "dtype": "bfloat16"})
    c.warmup.update({"num_samples": 16, "temperature": 1.0, "max_examples": 100_000, "max_per_query": 16,
                     "epochs": 1, "lr": 1e-6})
    c.train.update({"method": "continuous", "interval": 0.25, "passes": 1.0, "num_samples": 16,
                    "temperature": 1.0, "max_per_query": 16, "rerank_top": 2, "lr": 1e-6,
                    "schedule": "constant", "warmup_ratio": 0.1, "global_batch": 128, "micro_batch": 8,
                    "total_steps": 10_000, "compute_dtype": "bfloat16"})
    c.dynamics.update({"num_samples": 16, "grid_low": 0.3, "grid_high": 1.6, "grid_step": 0.1, "every": 1})
    c.adaptive.update({"enabled": True, "every": 2, "window": 1})
    c.checkpoint.max_to_keep = 3
    return c
