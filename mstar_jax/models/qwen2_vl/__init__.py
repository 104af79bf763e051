"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT (2-D rotary, Qwen2.5's window attention), 2x2 patch merger and a
Qwen2 decoder with M-RoPE (`transformers.Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`)."""

from __future__ import annotations

# Image tokens per row the planner assumes for a training batch: transformers' default max_pixels (28*28*1280),
# or the checkpoint's own limit when smaller.
PLAN_IMAGE_TOKENS = 1280


def _plan_patches(cfg) -> int:
    from mstar_jax.models.qwen2_vl.inputs import patch_bucket

    return patch_bucket(min(cfg.max_patches, PLAN_IMAGE_TOKENS * cfg.vision.merge_unit))


def _plan_batch(cfg, rows: int, length: int):
    import jax.numpy as jnp

    return {"input_ids": ((rows, length), jnp.int32), "attention_mask": ((rows, length), jnp.int32),
            "loss_mask": ((rows, length), jnp.int32),
            "pixel_values": ((rows, 1, _plan_patches(cfg), cfg.vision.patch_dim), jnp.float32),
            "image_grid_thw": ((rows, 1, 3), jnp.int32)}


def _describe(cfg) -> str:
    t, v = cfg.text, cfg.vision
    attn = (f"window {v.window_size} px, full attention in layers {list(v.fullatt_block_indexes)}"
            if v.window_units else "full attention")
    return (f"{cfg.model_type}: ViT ({v.num_layers} layers, {attn}, one image of {_plan_patches(cfg)} patches per "
            f"row planned) + Qwen2 decoder with M-RoPE ({t.num_layers} layers, hidden {t.hidden_size}, vocab "
            f"{t.vocab_size})")


def _family():
    from mstar_jax.memory.families import register_batch
    from mstar_jax.models.family import Family
    from mstar_jax.models.qwen2_vl import config, inputs, keymap, model, processor, tiny

    register_batch("qwen2_vl", _plan_batch, _describe)
    return Family(name="qwen2_vl", model_types=config.MODEL_TYPES, model_class=model.QwenVLForConditionalGeneration,
                  from_hf=config.from_config_json, config_from_json=config.QwenVLConfig.from_json,
                  rules=keymap.rules, layouts=keymap.LAYOUTS, is_known_unused=keymap.is_known_unused,
                  layer_count=keymap.layer_count, inputs=inputs.PatchImages(),
                  presets=lambda: dict(config.PRESETS), tiny=tiny.make_tiny_qwen_vl,
                  processor=processor.load_processor)


def __getattr__(name):
    # FAMILY is built on first use: importing the package (e.g. for its tiny-model helpers) stays light.
    if name == "FAMILY":
        global FAMILY
        FAMILY = _family()
        return FAMILY
    raise AttributeError(name)
