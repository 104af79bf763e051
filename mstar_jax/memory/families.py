"""The model families `mstar plan` knows: each names its presets and builds their abstract model.

Every family of the model registry (`mstar_jax.models.registry`) is plannable through its `presets()` and
`model_class`; what the planner needs beyond that (the rows of an SFT batch, extra presets) is registered here
per family name with `register_batch` / `register_presets`. LLaVA adds the tiny model of every config in
`configs/` that builds one (`demo`, `smoke`: their `model.tiny` section, at its full vocabulary).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mstar_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    """What the planner calls of a model family: `abstract(cfg)` -> (graphdef, {path: shape}, {path: logical
    axes}) of its fp32 parameters; `cache(cfg, rows, length, dtype)` -> (abstract KV cache pytree, a function of a
    leaf giving its logical axes); `batch(cfg, rows, length)` -> {key: (shape, dtype)} of one SFT batch;
    `describe(cfg)`: one line naming its parts and sizes."""

    name: str
    abstract: Callable[[Any], tuple[Any, dict, dict]]
    cache: Callable[[Any, int, int, Any], tuple[Any, Callable]]
    batch: Callable[[Any, int, int], dict[str, tuple[tuple[int, ...], Any]]]
    describe: Callable[[Any], str]


# family name -> batch layout / extra presets / a preset's adjustment for planning
_BATCH: dict[str, Callable] = {}
_EXTRA_PRESETS: dict[str, Callable[[], dict]] = {}
_ADJUST: dict[str, Callable] = {}


def register_batch(family: str, batch: Callable, describe: Callable | None = None,
                   adjust: Callable | None = None) -> None:
    """How a family's SFT batch looks (`batch(cfg, rows, length)`), how to describe a config, and how to adjust a
    preset before planning (e.g. an input size the model wants)."""
    _BATCH[family] = (batch, describe)
    if adjust is not None:
        _ADJUST[family] = adjust


def register_presets(family: str, presets: Callable[[], dict]) -> None:
    """Presets of a family beyond its own `presets()` (e.g. the tiny models of configs)."""
    _EXTRA_PRESETS[family] = presets


def _planner_family(fam) -> Family:
    from mstar_jax.models.base import abstract_model

    if fam.name not in _BATCH:
        raise ConfigError(f"model family {fam.name!r} has no SFT batch layout for the planner; add one with "
                          "mstar_jax.memory.families.register_batch")
    batch, describe = _BATCH[fam.name]

    def cache(cfg, rows, length, dtype):
        from flax import nnx

        model = nnx.eval_shape(lambda: fam.model_class(cfg, dtype=jnp.float32))
        return jax.eval_shape(lambda: model.init_cache(rows, length, dtype)), lambda leaf: _CACHE_AXES[:len(leaf.shape)]

    return Family(fam.name, lambda cfg: abstract_model(fam.model_class, cfg, jnp.float32), cache, batch,
                  describe or (lambda cfg: fam.name))


# A dense cache's leaves are [B, S, K, D] keys and values, [B, S] positions and a scalar index: the leading
# names of these axes fit each (mstar_jax.sharding.RULES).
_CACHE_AXES = ("cache_batch", "cache_seq", "cache_heads", "cache_dim")


def all_presets() -> dict[str, tuple[Family, Any]]:
    """{preset name: (planner family, model config)} over every registered model family."""
    from mstar_jax.models import registry

    _register_llava()
    out = {}
    for name in sorted(set(registry.MODEL_TYPES.values())):
        fam = registry.family(name.rsplit(".", 1)[-1])
        presets = {**fam.presets(), **_EXTRA_PRESETS.get(fam.name, dict)()}
        adjust = _ADJUST.get(fam.name, lambda cfg: cfg)
        for preset, cfg in presets.items():
            out[preset] = (fam, adjust(cfg))
    return out


def find_preset(name: str) -> tuple[Family, Any]:
    """(planner family, model config) of a preset; an unknown name raises with the known ones."""
    presets = all_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(presets))}")
    fam, cfg = presets[name]
    return _planner_family(fam), cfg


# ------------------------------------------------------------------------------------------------ LLaVA


class _FullVocab:
    """What `build_hf_config` reads of a tokenizer, at the config's vocab_size (the trained BPE may stop short)."""

    def __init__(self, size: int):
        from mstar_jax.models.llava.tiny import SPECIAL_TOKENS

        self.size, self.specials = size, SPECIAL_TOKENS
        self.pad_token_id, self.bos_token_id, self.eos_token_id = (SPECIAL_TOKENS.index(t) for t in
                                                                  ("<pad>", "<s>", "</s>"))

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.specials.index(token)


def tiny_config(tiny: Any):
    """The LlavaConfig a config's `model.tiny` section builds (as `loop.base_model` does, through the HF config)."""
    from mstar_jax.models.llava.config import from_hf_config
    from mstar_jax.models.llava.tiny import TinySpec, build_hf_config

    spec = TinySpec(vision=tiny.vision, text=tiny.text, image_size=tiny.image_size, patch_size=tiny.patch_size,
                    vision_hidden=tiny.vision_hidden, vision_layers=tiny.vision_layers,
                    vision_heads=tiny.vision_heads, hidden=tiny.hidden, intermediate=tiny.intermediate,
                    layers=tiny.layers, heads=tiny.heads, kv_heads=tiny.kv_heads, vocab_size=tiny.vocab_size)
    return from_hf_config(build_hf_config(spec, _FullVocab(tiny.vocab_size)))


def _config_tiny_models() -> dict[str, Any]:
    from mstar_jax.config import CONFIG_DIR, load_config

    return {name: tiny_config(load_config(name).model.tiny) for name in ("demo", "smoke")
            if (CONFIG_DIR / f"{name}.py").is_file()}


def _whole_patches(cfg):
    """SigLIP-384 towers cut 27 x 27 patches of 14 px (HF's strided conv drops the last 6 px); the model here takes
    images of whole patches, so these presets are planned at 378 px: the same patches, weights and activations."""
    v = cfg.vision
    if v.image_size % v.patch_size == 0:
        return cfg
    return dataclasses.replace(cfg, vision=dataclasses.replace(v, image_size=v.image_size // v.patch_size
                                                               * v.patch_size))


def _llava_batch(cfg, rows: int, length: int):
    v = cfg.vision
    return {"input_ids": ((rows, length), jnp.int32), "attention_mask": ((rows, length), jnp.int32),
            "loss_mask": ((rows, length), jnp.int32),
            "pixel_values": ((rows, v.num_channels, v.image_size, v.image_size), jnp.float32)}


def _llava_describe(cfg) -> str:
    t, v = cfg.text, cfg.vision
    return (f"LLaVA: {v.family} tower ({v.num_layers} layers, {v.image_size} px, {cfg.image_seq_length} image "
            f"tokens) + {t.family} decoder ({t.num_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size})")


def _register_llava() -> None:
    if "llava" not in _BATCH:
        register_batch("llava", _llava_batch, _llava_describe, _whole_patches)
        register_presets("llava", _config_tiny_models)
