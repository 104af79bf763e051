"""Every stage of the loop at tiny sizes (the tests use it); about 2 minutes on 2 CPU cores."""

from mstar_jax.config import base_config


def get_config():
    """The demo with tiny data, model, and sample counts."""
    c = base_config(__file__, "demo")
    c.data.synth_sizes.update({"warmup": 24, "train": 32, "unlabeled": 8, "val": 8, "test_id": 12, "test_ood": 12})
    c.data.image_size = 28
    c.model.tiny.update({"image_size": 28, "vision_hidden": 32, "vision_layers": 2, "hidden": 64,
                         "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab_size": 400})
    c.model.pretrain.update({"queries": 64, "steps": 20, "batch_size": 8})
    c.sampling.update({"max_new_tokens": 16, "batch_size": 32})
    c.warmup.update({"num_samples": 4, "epochs": 1})
    c.train.update({"interval": 0.5, "passes": 1.0, "epochs": 1, "num_samples": 4, "global_batch": 8,
                    "micro_batch": 4})
    c.dynamics.update({"num_samples": 2, "grid_low": 0.5, "grid_high": 1.0, "grid_step": 0.5})
    # Every PRM stage (labels, training, verifier, PRM top-2, PRM Reward-Pass@2) and unlabeled prompts from the
    # second iteration on.
    c.prm.label.update({"questions": 12, "samples": 4, "per_question": 2, "pairs": 16, "completions": 2,
                        "chunk": 8, "max_rows": 64})
    c.prm.train.update({"epochs": 1.0, "global_batch": 8, "micro_batch": 4, "checkpoint_every": 1})
    c.prm.verify.update({"ns": (1, 2, 4)})
    c.unlabeled.update({"enabled": True, "start": 0.5})
    return c
