"""LLaVA: a CLIP or SigLIP tower, a 2-layer MLP projector and a Llama / Qwen2 / Phi-3 decoder
(`transformers.LlavaForConditionalGeneration`)."""

from __future__ import annotations


def _family():
    from mstar_jax.models.family import Family
    from mstar_jax.models.inputs import FixedImages
    from mstar_jax.models.llava import config, keymap, model, tiny

    return Family(name="llava", model_types=("llava",), model_class=model.LlavaForConditionalGeneration,
                  from_hf=config.from_config_json, config_from_json=config.LlavaConfig.from_json,
                  rules=keymap.rules, layouts=keymap.LAYOUTS, is_known_unused=keymap.is_known_unused,
                  layer_count=keymap.layer_count,
                  inputs=FixedImages(), presets=lambda: dict(config.PRESETS), tiny=tiny.make_tiny_llava)


def __getattr__(name):
    # FAMILY is built on first use: importing the package (e.g. for its tiny-model helpers) stays light.
    if name == "FAMILY":
        global FAMILY
        FAMILY = _family()
        return FAMILY
    raise AttributeError(name)
