"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT (2-D rotary, Qwen2.5's window attention), 2x2 patch merger and a
Qwen2 decoder with M-RoPE (`transformers.Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`)."""

from __future__ import annotations


def _family():
    from mstar_jax.models.family import Family
    from mstar_jax.models.qwen2_vl import config, inputs, keymap, model, processor, tiny

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
