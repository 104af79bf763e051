"""MiniCPM-Llama3-V-2.5 (`openbmb/MiniCPM-Llama3-V-2_5`, model_type `minicpmv`, version 2.5): an Idefics2 /
SigLIP-so400m tower over variable patch grids, a perceiver resampler of 96 queries and a Llama-3-8B decoder, with
adaptive slicing, read from and written to the release's layout without its remote code."""

from __future__ import annotations

# Slices and patches per slice the planner assumes for a training batch: a 3 x 3 grid + the source image, padded
# to a power of two, of 32 x 32 patches (448 px) rounded up to the strip bucket.
PLAN_SLICES = 16
PLAN_PATCHES = 1024


def _plan_batch(cfg, rows: int, length: int):
    import jax.numpy as jnp

    p = cfg.vision.patch_size
    return {"input_ids": ((rows, length), jnp.int32), "attention_mask": ((rows, length), jnp.int32),
            "loss_mask": ((rows, length), jnp.int32),
            "pixel_values": ((rows, PLAN_SLICES, cfg.vision.num_channels, p, PLAN_PATCHES * p), jnp.float32),
            "tgt_sizes": ((rows, PLAN_SLICES, 2), jnp.int32), "patch_span": ((rows, PLAN_SLICES), jnp.int32)}


def _describe(cfg) -> str:
    t, v = cfg.text, cfg.vision
    return (f"MiniCPM-Llama3-V-2.5: Idefics2 tower ({v.num_layers} layers, {PLAN_SLICES} slices of {PLAN_PATCHES} "
            f"patches per row planned) + resampler ({cfg.query_num} queries per slice) + llama decoder "
            f"({t.num_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size})")


def _family():
    from mstar_jax.memory.families import register_batch
    from mstar_jax.models.family import Family
    from mstar_jax.models.minicpmv import config, inputs, keymap, model, processing, tiny

    register_batch("minicpmv", _plan_batch, _describe)
    return Family(name="minicpmv", model_types=("minicpmv",), model_class=model.MiniCPMV,
                  from_hf=config.from_config_json, config_from_json=config.MiniCPMVConfig.from_json,
                  rules=keymap.rules, layouts=keymap.LAYOUTS, is_known_unused=keymap.is_known_unused,
                  layer_count=keymap.layer_count, inputs=inputs.SliceImages(), presets=lambda: dict(config.PRESETS),
                  tiny=tiny.make_tiny_minicpmv, processor=processing.load_processor)


def __getattr__(name):
    # FAMILY is built on first use: importing the package (e.g. for its tiny-model helpers) stays light.
    if name == "FAMILY":
        global FAMILY
        FAMILY = _family()
        return FAMILY
    raise AttributeError(name)
