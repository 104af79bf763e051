"""Qwen2-VL / Qwen2.5-VL configuration: a frozen view of an HF `config.json` (+ the processor's pixel limits),
and presets with the shapes of the published checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from mstar_jax.errors import CheckpointError

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# transformers' Qwen2VLImageProcessor defaults (used when a checkpoint has no preprocessor_config.json).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The native-resolution ViT: Qwen2-VL (LayerNorm + fc1/fc2 MLP, full attention everywhere) or Qwen2.5-VL
    (RMSNorm + gated MLP, window attention except in `fullatt_block_indexes`)."""

    variant: str  # "qwen2_vl" | "qwen2_5_vl"
    hidden_size: int  # ViT width (Qwen2-VL's `embed_dim`)
    intermediate_size: int  # MLP width (Qwen2-VL: embed_dim * mlp_ratio)
    num_layers: int
    num_heads: int
    out_hidden_size: int  # the patch merger's output width (the LM's hidden size)
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    window_size: int = 0  # Qwen2.5-VL: window side in pixels (0: no window attention)
    fullatt_block_indexes: tuple[int, ...] = ()
    rope_theta: float = 10000.0

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch (channels x temporal x patch x patch), as the processor emits them."""
        return self.num_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LM token."""
        return self.spatial_merge_size ** 2

    @property
    def window_units(self) -> int:
        """Window side in merged units (0: none)."""
        return self.window_size // self.spatial_merge_size // self.patch_size if self.window_size else 0

    def windowed(self, layer: int) -> bool:
        """Whether layer `layer` attends within windows (Qwen2.5-VL) rather than over the whole image."""
        return self.window_units > 0 and layer not in self.fullatt_block_indexes


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with M-RoPE (names as the other families' text configs, which the sampler reads)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mrope_section: tuple[int, ...] = (16, 24, 24)
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rope: tuple[tuple[str, Any], ...] = (("rope_theta", 1000000.0), ("rope_type", "default"))
    # One entry per layer: None for full attention, an int for a sliding window.
    windows: tuple[int | None, ...] = ()

    @property
    def rope_dict(self) -> dict[str, Any]:
        """RoPE parameters as a plain dict (stored as a tuple so the config stays hashable)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.rope}


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """ViT + 2x2 patch merger + Qwen2 decoder with M-RoPE (`Qwen2VLForConditionalGeneration` and
    `Qwen2_5_VLForConditionalGeneration`)."""

    FAMILY: ClassVar[str] = "qwen2_vl"  # the registry entry (mstar_jax.models.qwen2_vl) for both model types
    model_type: str
    vision: VisionConfig
    text: TextConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The processor's pixel budget per image (preprocessor_config.json); bigger images are refused.
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def max_patches(self) -> int:
        """Most patches one image can have under max_pixels."""
        return self.max_pixels // self.vision.patch_size ** 2

    def to_json(self) -> str:
        """Serialise to JSON (inverse of `from_json`)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QwenVLConfig":
        """Parse the JSON written by `to_json`."""
        d = json.loads(text)
        v = d.pop("vision")
        v["fullatt_block_indexes"] = tuple(v["fullatt_block_indexes"])
        t = d.pop("text")
        t["rope"] = tuple((k, tuple(x) if isinstance(x, list) else x) for k, x in t["rope"])
        t["windows"] = tuple(t["windows"])
        t["mrope_section"] = tuple(t["mrope_section"])
        return cls(vision=VisionConfig(**v), text=TextConfig(**t), eos_token_ids=tuple(d.pop("eos_token_ids")), **d)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _rope(tc: Any) -> tuple[tuple[tuple[str, Any], ...], tuple[int, ...]]:
    """(rope parameters without mrope_section, mrope_section) from transformers' `rope_parameters` (v5) or
    `rope_scaling` + `rope_theta` (v4); `mrope` is the default rope with 3-D positions."""
    rope = dict(_get(tc, "rope_parameters") or {})
    scaling = _get(tc, "rope_scaling") or {}
    if not rope or scaling:
        rope = {**dict(scaling), **rope}
    rope.setdefault("rope_theta", _get(tc, "rope_theta", 1000000.0))
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    rope["rope_type"] = "default" if kind == "mrope" else kind
    section = tuple(int(s) for s in rope.pop("mrope_section", None) or (16, 24, 24))
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items())), section


def _text_config(tc: Any) -> TextConfig:
    heads = int(_get(tc, "num_attention_heads"))
    hidden = int(_get(tc, "hidden_size"))
    layers = int(_get(tc, "num_hidden_layers"))
    rope, section = _rope(tc)
    head_dim = hidden // heads  # transformers' Qwen2-VL attention ignores a config head_dim
    if 2 * sum(section) != head_dim:
        raise CheckpointError(f"mrope_section {list(section)} covers {2 * sum(section)} of the head_dim {head_dim} "
                              "rotary features; it must cover all of them")
    window = _get(tc, "sliding_window")
    types = _get(tc, "layer_types") or ["full_attention"] * layers
    use = _get(tc, "use_sliding_window", False)
    windows = tuple(window if (use and window and t == "sliding_attention") else None for t in types)
    return TextConfig(vocab_size=int(_get(tc, "vocab_size")), hidden_size=hidden,
                      intermediate_size=int(_get(tc, "intermediate_size")), num_layers=layers, num_heads=heads,
                      num_kv_heads=int(_get(tc, "num_key_value_heads") or heads), head_dim=head_dim,
                      mrope_section=section, rms_norm_eps=float(_get(tc, "rms_norm_eps", 1e-6)),
                      hidden_act=_get(tc, "hidden_act", "silu"),
                      max_position_embeddings=int(_get(tc, "max_position_embeddings", 32768)), rope=rope,
                      windows=windows)


def _pair(x: Any) -> int:
    """A patch size given as an int or an (equal) pair."""
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise CheckpointError(f"non-square patch size {list(x)} is not supported")
        return int(x[0])
    return int(x)


def _vision_config(vc: Any, model_type: str, out_hidden: int) -> VisionConfig:
    rope = dict(_get(vc, "rope_parameters") or {})
    common = dict(num_layers=int(_get(vc, "depth")), num_heads=int(_get(vc, "num_heads")),
                  patch_size=_pair(_get(vc, "patch_size", 14)),
                  temporal_patch_size=_pair(_get(vc, "temporal_patch_size", 2)),
                  spatial_merge_size=int(_get(vc, "spatial_merge_size", 2)),
                  num_channels=int(_get(vc, "in_channels", _get(vc, "in_chans", 3))),
                  rope_theta=float(rope.get("rope_theta", 10000.0)))
    if common["spatial_merge_size"] != 2:
        # The input glue pads images to multiples of the 2x2 block every published checkpoint merges.
        raise CheckpointError(f"spatial_merge_size {common['spatial_merge_size']} is not supported (only 2)")
    if model_type == "qwen2_vl":
        dim = int(_get(vc, "embed_dim"))
        return VisionConfig(variant=model_type, hidden_size=dim, intermediate_size=int(dim * _get(vc, "mlp_ratio", 4)),
                            out_hidden_size=int(_get(vc, "hidden_size", out_hidden)),
                            hidden_act=_get(vc, "hidden_act", "quick_gelu"), **common)
    return VisionConfig(variant=model_type, hidden_size=int(_get(vc, "hidden_size")),
                        intermediate_size=int(_get(vc, "intermediate_size")),
                        out_hidden_size=int(_get(vc, "out_hidden_size", out_hidden)),
                        hidden_act=_get(vc, "hidden_act", "silu"), window_size=int(_get(vc, "window_size", 112)),
                        fullatt_block_indexes=tuple(int(i) for i in _get(vc, "fullatt_block_indexes", ())),
                        **common)


def _ids(x: Any) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def from_hf_config(hf: Any, pixels: tuple[int, int] = (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS),
                   generation_eos: tuple[int, ...] = ()) -> QwenVLConfig:
    """Our config from a `transformers.Qwen2VLConfig` / `Qwen2_5_VLConfig` (or its `to_dict()`), with the
    processor's (min_pixels, max_pixels) and generation_config.json's eos ids."""
    model_type = _get(hf, "model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not a Qwen2-VL / Qwen2.5-VL checkpoint")
    tc, vc = _get(hf, "text_config"), _get(hf, "vision_config")
    text = _text_config(tc)
    vision = _vision_config(vc, model_type, text.hidden_size)
    if vision.out_hidden_size != text.hidden_size:
        raise CheckpointError(f"the vision merger's output width {vision.out_hidden_size} differs from the LM's "
                              f"hidden size {text.hidden_size}")
    tie = _get(hf, "tie_word_embeddings")
    if tie is None or (not tie and _get(tc, "tie_word_embeddings", False)):
        tie = _get(tc, "tie_word_embeddings", False)
    eos = tuple(dict.fromkeys(_ids(_get(tc, "eos_token_id", _get(hf, "eos_token_id"))) + tuple(generation_eos)))
    pad = _get(tc, "pad_token_id", _get(hf, "pad_token_id"))
    return QwenVLConfig(model_type=model_type, vision=vision, text=text,
                        image_token_id=int(_get(hf, "image_token_id", 151655)),
                        video_token_id=int(_get(hf, "video_token_id", 151656) or 151656),
                        vision_start_token_id=int(_get(hf, "vision_start_token_id", 151652)),
                        vision_end_token_id=int(_get(hf, "vision_end_token_id", 151653)),
                        tie_word_embeddings=bool(tie), pad_token_id=None if pad is None else int(pad),
                        eos_token_ids=eos, min_pixels=int(pixels[0]), max_pixels=int(pixels[1]))


def processor_pixels(hf_dir: str | Path) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a checkpoint's image processor (preprocessor_config.json), else the defaults."""
    path = Path(hf_dir) / "preprocessor_config.json"
    if not path.is_file():
        return DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    size = raw.get("size") or {}
    lo = raw.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or DEFAULT_MIN_PIXELS
    hi = raw.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or DEFAULT_MAX_PIXELS
    if not 0 < int(lo) <= int(hi):
        raise CheckpointError(f"{path}: min_pixels {lo} and max_pixels {hi} must satisfy 0 < min <= max")
    return int(lo), int(hi)


def _generation_eos(hf_dir: Path) -> tuple[int, ...]:
    path = hf_dir / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        return _ids(json.loads(path.read_text()).get("eos_token_id"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable eos_token_id ({err})") from err


def from_config_json(raw: dict, hf_dir: str | Path) -> QwenVLConfig:
    """Our config from a checkpoint's config.json (already read into `raw`), through `transformers.AutoConfig`
    (which also reads the flat layout of the original Qwen2-VL releases); never runs remote code."""
    import transformers

    hf_dir = Path(hf_dir)
    path = hf_dir / "config.json"
    if raw.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {raw.get('model_type')!r} is not one of {', '.join(MODEL_TYPES)}")
    try:
        hf = transformers.AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a bad config
        raise CheckpointError(f"{path}: transformers could not read it: {err}") from err
    try:
        return from_hf_config(hf, processor_pixels(hf_dir), _generation_eos(hf_dir))
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err


# ------------------------------------------------------------------------------------------- presets

_QWEN2_VL_VIT = VisionConfig(variant="qwen2_vl", hidden_size=1280, intermediate_size=1280 * 4, num_layers=32,
                             num_heads=16, out_hidden_size=1536, hidden_act="quick_gelu")
_QWEN2_5_VL_VIT = VisionConfig(variant="qwen2_5_vl", hidden_size=1280, intermediate_size=3420, num_layers=32,
                               num_heads=16, out_hidden_size=2048, hidden_act="silu", window_size=112,
                               fullatt_block_indexes=(7, 15, 23, 31))
_ROPE = (("rope_theta", 1000000.0), ("rope_type", "default"))
_HUB_PIXELS = dict(min_pixels=3136, max_pixels=12845056)  # the published preprocessor_config.json


def _text(vocab, hidden, inner, layers, heads, kv_heads, max_pos) -> TextConfig:
    return TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, max_position_embeddings=max_pos,
                      rope=_ROPE, windows=(None,) * layers)


PRESETS: dict[str, QwenVLConfig] = {
    # Qwen/Qwen2-VL-2B-Instruct
    "qwen2-vl-2b": QwenVLConfig(model_type="qwen2_vl", vision=_QWEN2_VL_VIT,
                                text=_text(151936, 1536, 8960, 28, 12, 2, 32768), tie_word_embeddings=True,
                                pad_token_id=151643, eos_token_ids=(151645, 151643), **_HUB_PIXELS),
    # Qwen/Qwen2.5-VL-3B-Instruct
    "qwen2.5-vl-3b": QwenVLConfig(model_type="qwen2_5_vl", vision=_QWEN2_5_VL_VIT,
                                  text=_text(151936, 2048, 11008, 36, 16, 2, 128000), tie_word_embeddings=True,
                                  pad_token_id=151643, eos_token_ids=(151645, 151643), **_HUB_PIXELS),
    # Qwen/Qwen2.5-VL-7B-Instruct
    "qwen2.5-vl-7b": QwenVLConfig(model_type="qwen2_5_vl",
                                  vision=dataclasses.replace(_QWEN2_5_VL_VIT, out_hidden_size=3584),
                                  text=_text(152064, 3584, 18944, 28, 28, 4, 128000), tie_word_embeddings=False,
                                  pad_token_id=151643, eos_token_ids=(151645, 151643), **_HUB_PIXELS),
}


def preset(name: str) -> QwenVLConfig:
    """A named preset; raises with the list of names when unknown."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
