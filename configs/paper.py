"""The paper's hyper-parameters (M-STaR: appendix C, sections 3.3 and 4.2, appendix D) for a real run on your
checkpoint and data.

    mstar train --config configs/paper.py --workdir gs://BUCKET/run \
        --config.model.path=/ckpts/llava-7b-flax --config.data.root=/data/mathv360k \
        --config.data.train=/data/mathv360k/train_labeled.json --config.data.warmup=/data/mathv360k/warmup.json \
        --config.data.val=/data/mathv360k/val250.json --config.data.test_id=/data/mathv360k/test750.json \
        --config.data.test_ood=/data/mathvista/testmini.json

Run length: the paper trains 10K steps at a global batch of 128 (appendix C / section 3.1). Here the run is sized
by that budget (train.passes = 0): iterations of 25 % of the queries follow each other until the one LR schedule
of train.total_steps is spent, one epoch over each iteration's examples; with K=16 and the PRM's top-2 that is
about 14 iterations on 180K queries, so the adaptive temperature (every 2 iterations) acts about 7 times.
"""

from mstar_jax.config import base_config


def get_config():
    """lr 1e-6, global batch 128, constant LR after a 0.1 warm-up ratio, 25 % interval, K=16, T grid 0.3..1.6,
    PRM top-2 from 16 samples / <= 4 per question / 8 completions on 50K questions, 10K steps."""
    c = base_config(__file__, "demo")
    c.data.source = "files"
    c.data.max_prompt_tokens = 2048
    c.model.path = ""  # required: an HF LLaVA directory or a converted checkpoint
    # The loaded policy holds the master weights, so float32; the SFT step computes in bfloat16 (compute_dtype).
    c.model.dtype = "float32"
    c.sampling.update({"max_new_tokens": 512, "batch_size": 256, "dtype": "bfloat16"})
    c.warmup.update({"num_samples": 16, "temperature": 1.0, "max_examples": 100_000, "max_per_query": 16,
                     "epochs": 1, "lr": 1e-6})
    c.train.update({"method": "continuous", "interval": 0.25, "passes": 0.0, "epochs": 1, "num_samples": 16,
                    "temperature": 1.0, "max_per_query": 16, "selection": "top_k", "rerank_top": 2, "scorer": "prm",
                    "lr": 1e-6, "schedule": "constant", "warmup_ratio": 0.1, "global_batch": 128, "micro_batch": 8,
                    "total_steps": 10_000, "compute_dtype": "bfloat16"})
    c.dynamics.update({"num_samples": 16, "grid_low": 0.3, "grid_high": 1.6, "grid_step": 0.1, "every": 1,
                       "scorer": "prm"})
    c.adaptive.update({"enabled": True, "every": 2, "window": 1})
    # Appendix D: 50K questions, 16 samples each, de-duplicated, <= 4 per question, 50K balanced pairs, each step
    # completed 8 times; the PRM starts from the labelling policy (prm.label.policy: the paper trains a separate
    # checkpoint further on the CoT data; "" uses the warm-up model), vision tower frozen.
    c.prm.step_rule = "lines"
    c.prm.label.update({"questions": 50_000, "samples": 16, "per_question": 4, "pairs": 50_000, "completions": 8,
                        "temperature": 1.0, "chunk": 256, "max_rows": 1024})
    c.prm.train.update({"lr": 1e-6, "epochs": 1.0, "global_batch": 128, "micro_batch": 8, "freeze_vision": True,
                        "compute_dtype": "bfloat16", "heldout": 0.02, "checkpoint_every": 200})
    c.prm.verify.update({"splits": ("val",), "ns": (2, 4, 8, 16), "temperature": 1.0})
    c.checkpoint.max_to_keep = 3
    return c
