"""InternVL: InternViT + pixel shuffle + MLP projector + a Llama / Qwen2 decoder, in transformers' `internvl` format
and the original release's layout (`internvl_chat`, InternLM2 LLM: InternVL2-2B, the paper's third backbone)."""

from __future__ import annotations

# Tiles per row the planner assumes for a training batch (a 2 x 3 grid + thumbnail, padded to a power of two).
PLAN_TILES = 8


def _plan_batch(cfg, rows: int, length: int):
    import jax.numpy as jnp

    v = cfg.vision
    return {"input_ids": ((rows, length), jnp.int32), "attention_mask": ((rows, length), jnp.int32),
            "loss_mask": ((rows, length), jnp.int32),
            "pixel_values": ((rows, PLAN_TILES, v.num_channels, v.image_size, v.image_size), jnp.float32)}


def _describe(cfg) -> str:
    t, v = cfg.text, cfg.vision
    return (f"InternVL: InternViT ({v.num_layers} layers, {v.image_size}-px tiles, {cfg.image_seq_length} tokens "
            f"each, {PLAN_TILES} tiles per row planned) + {cfg.llm_arch} decoder ({t.num_layers} layers, hidden "
            f"{t.hidden_size}, vocab {t.vocab_size})")


def _family():
    from mstar_jax.memory.families import register_batch
    from mstar_jax.models.family import Family
    from mstar_jax.models.internvl import config, export, inputs, keymap, model, processing, tiny

    register_batch("internvl", _plan_batch, _describe)
    return Family(name="internvl", model_types=("internvl", "internvl_chat"),
                  model_class=model.InternVLForConditionalGeneration, from_hf=config.from_config_json,
                  config_from_json=config.InternVLConfig.from_json, rules=keymap.rules, layouts=keymap.LAYOUTS,
                  is_known_unused=keymap.is_known_unused, layer_count=keymap.layer_count,
                  inputs=inputs.TileImages(), presets=lambda: dict(config.PRESETS), tiny=tiny.make_tiny_internvl,
                  processor=processing.load_processor, export_files=export.export_files)


def __getattr__(name):
    # FAMILY is built on first use: importing the package (e.g. for its tiny-model helpers) stays light.
    if name == "FAMILY":
        global FAMILY
        FAMILY = _family()
        return FAMILY
    raise AttributeError(name)
