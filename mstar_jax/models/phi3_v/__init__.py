"""Phi-3.5-vision (`microsoft/Phi-3.5-vision-instruct`, model_type `phi3_v`): CLIP ViT-L/14-336, the HD transform
with learnt separators, a 2-layer MLP and a Phi-3.5-mini decoder, read from and written to the release's layout
without its remote code."""

from __future__ import annotations

# Crops per image the planner assumes for a training batch: num_crops 4 (+ the global view), Phi-3.5's default.
PLAN_CROPS = 5


def _plan_batch(cfg, rows: int, length: int):
    import jax.numpy as jnp

    s = cfg.crop_size
    return {"input_ids": ((rows, length), jnp.int32), "attention_mask": ((rows, length), jnp.int32),
            "loss_mask": ((rows, length), jnp.int32),
            "pixel_values": ((rows, PLAN_CROPS, cfg.vision.num_channels, s, s), jnp.float32),
            "image_sizes": ((rows, 2), jnp.int32)}


def _describe(cfg) -> str:
    t, v = cfg.text, cfg.vision
    return (f"Phi-3.5-vision: CLIP tower ({v.num_layers} layers, {v.image_size}-px crops, {PLAN_CROPS} crops per "
            f"row planned, up to {cfg.image_tokens(2, 2)} image tokens) + phi3 decoder ({t.num_layers} layers, "
            f"hidden {t.hidden_size}, vocab {t.vocab_size})")


def _family():
    from mstar_jax.memory.families import register_batch
    from mstar_jax.models.family import Family
    from mstar_jax.models.phi3_v import config, inputs, keymap, model, processing, tiny

    register_batch("phi3_v", _plan_batch, _describe)
    return Family(name="phi3_v", model_types=("phi3_v",), model_class=model.Phi3VForCausalLM,
                  from_hf=config.from_config_json, config_from_json=config.Phi3VConfig.from_json,
                  rules=keymap.rules, layouts=keymap.LAYOUTS, is_known_unused=keymap.is_known_unused,
                  layer_count=keymap.layer_count, inputs=inputs.HDImages(), presets=lambda: dict(config.PRESETS),
                  tiny=tiny.make_tiny_phi3_v, processor=processing.load_processor)


def __getattr__(name):
    # FAMILY is built on first use: importing the package (e.g. for its tiny-model helpers) stays light.
    if name == "FAMILY":
        global FAMILY
        FAMILY = _family()
        return FAMILY
    raise AttributeError(name)
