"""LLaVA-family configuration: a small frozen view of an HF `config.json`, plus presets of real checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from mstar_jax.errors import CheckpointError

VISION_FAMILIES = ("clip", "siglip")
TEXT_FAMILIES = ("llama", "qwen2", "phi3")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A CLIP or SigLIP ViT."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        """Patches per image (CLIP adds one class token on top)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        """CLIP prepends a class embedding and has a pre-layernorm; SigLIP has neither."""
        return self.family == "clip"


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A Llama / Qwen2 / Phi-3 decoder."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope: tuple[tuple[str, Any], ...] = (("rope_type", "default"), ("rope_theta", 10000.0))
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # One entry per layer: None for full attention, an int for a sliding window.
    windows: tuple[int | None, ...] = ()

    @property
    def rope_dict(self) -> dict[str, Any]:
        """RoPE parameters as a plain dict (stored as a tuple so the config stays hashable)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.rope}


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """Vision tower + 2-layer MLP projector + decoder LM, as `LlavaForConditionalGeneration`."""

    FAMILY: ClassVar[str] = "llava"  # the registry entry (mstar_jax.models.llava)
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Vision hidden-state indices whose outputs are concatenated for the projector."""
        layers = self.vision_feature_layer
        return (layers,) if isinstance(layers, int) else tuple(layers)

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image after the select strategy ("default" drops the first position, as HF does: CLIP's
        class token, or SigLIP's first patch)."""
        dropped = 1 if self.vision_feature_select_strategy == "default" else 0
        return self.vision.num_patches + int(self.vision.has_class_token) - dropped

    def to_json(self) -> str:
        """Serialise to JSON (inverse of `from_json`)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LlavaConfig":
        """Parse the JSON written by `to_json`."""
        d = json.loads(text)
        vision = VisionConfig(**d.pop("vision"))
        t = d.pop("text")
        t["rope"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in t["rope"])
        t["windows"] = tuple(t["windows"])
        text = TextConfig(**t)
        layer = d.pop("vision_feature_layer")
        return cls(vision=vision, text=text, vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
                   eos_token_ids=tuple(d.pop("eos_token_ids")), **d)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


def _rope_params(tc: Any) -> tuple[tuple[str, Any], ...]:
    """Normalise transformers' `rope_parameters` (v5) or `rope_scaling` + `rope_theta` (v4) into one dict."""
    rope = dict(_get(tc, "rope_parameters") or {})
    scaling = _get(tc, "rope_scaling") or {}
    if not rope or scaling:
        rope = {**dict(scaling), **rope}
    rope.setdefault("rope_theta", _get(tc, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default")) or "default"
    rope.pop("type", None)
    prf = _get(tc, "partial_rotary_factor")
    if prf is not None and "partial_rotary_factor" not in rope:
        rope["partial_rotary_factor"] = prf
    if rope["rope_type"] == "longrope" and "original_max_position_embeddings" not in rope:
        rope["original_max_position_embeddings"] = _get(tc, "original_max_position_embeddings")
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))


def _text_config(tc: Any) -> TextConfig:
    family = _get(tc, "model_type")
    if family not in TEXT_FAMILIES:
        raise CheckpointError(f"text model_type {family!r} is not supported (supported: {', '.join(TEXT_FAMILIES)})")
    heads = int(_get(tc, "num_attention_heads"))
    hidden = int(_get(tc, "hidden_size"))
    layers = int(_get(tc, "num_hidden_layers"))
    head_dim = _get(tc, "head_dim") or hidden // heads
    attention_bias = bool(_get(tc, "attention_bias", False))
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = attention_bias
    window = _get(tc, "sliding_window")
    if family == "phi3":
        windows = tuple(window for _ in range(layers))
    elif family == "qwen2":
        types = _get(tc, "layer_types") or ["full_attention"] * layers
        use = _get(tc, "use_sliding_window", False)
        windows = tuple(window if (use and t == "sliding_attention") else None for t in types)
    else:
        windows = tuple(None for _ in range(layers))
    return TextConfig(
        family=family,
        vocab_size=int(_get(tc, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_get(tc, "intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_get(tc, "num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(_get(tc, "rms_norm_eps", 1e-6)),
        hidden_act=_get(tc, "hidden_act", "silu"),
        max_position_embeddings=int(_get(tc, "max_position_embeddings", 4096)),
        rope=_rope_params(tc),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(_get(tc, "mlp_bias", False)),
        windows=windows,
    )


def _vision_config(vc: Any) -> VisionConfig:
    model_type = _get(vc, "model_type")
    family = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "clip": "clip", "siglip": "siglip"}.get(
        model_type)
    if family is None:
        raise CheckpointError(f"vision model_type {model_type!r} is not supported (supported: CLIP, SigLIP)")
    return VisionConfig(
        family=family,
        hidden_size=int(_get(vc, "hidden_size")),
        intermediate_size=int(_get(vc, "intermediate_size")),
        num_layers=int(_get(vc, "num_hidden_layers")),
        num_heads=int(_get(vc, "num_attention_heads")),
        image_size=int(_get(vc, "image_size")),
        patch_size=int(_get(vc, "patch_size")),
        num_channels=int(_get(vc, "num_channels", 3)),
        layer_norm_eps=float(_get(vc, "layer_norm_eps", 1e-5 if family == "clip" else 1e-6)),
        hidden_act=_get(vc, "hidden_act", "quick_gelu" if family == "clip" else "gelu_pytorch_tanh"),
    )


def from_hf_config(hf: Any) -> LlavaConfig:
    """Our config from a `transformers.LlavaConfig` (or its `to_dict()`)."""
    if _get(hf, "model_type") != "llava":
        raise CheckpointError(f"model_type {_get(hf, 'model_type')!r} is not a LLaVA checkpoint")
    tc, vc = _get(hf, "text_config"), _get(hf, "vision_config")
    text = _text_config(tc)
    layer = _get(hf, "vision_feature_layer", -2)
    strategy = _get(hf, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"vision_feature_select_strategy {strategy!r} must be 'default' or 'full'")
    tie = _get(hf, "tie_word_embeddings")
    if tie is None:
        tie = _get(tc, "tie_word_embeddings", False)
    image_token = _get(hf, "image_token_id", _get(hf, "image_token_index"))
    eos = _get(tc, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return LlavaConfig(
        vision=_vision_config(vc),
        text=text,
        image_token_id=int(image_token),
        vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
        vision_feature_select_strategy=strategy,
        projector_hidden_act=_get(hf, "projector_hidden_act", "gelu"),
        projector_bias=bool(_get(hf, "multimodal_projector_bias", True)),
        tie_word_embeddings=bool(tie),
        pad_token_id=_get(tc, "pad_token_id", _get(hf, "pad_token_id")),
        eos_token_ids=eos_ids,
    )


def load_hf_config(hf_dir: str | Path) -> LlavaConfig:
    """Read `config.json` through `transformers.AutoConfig` (never with remote code) into our config."""
    from mstar_jax.models.registry import read_config_json

    return from_config_json(read_config_json(hf_dir), hf_dir)


def from_config_json(raw: dict, hf_dir: str | Path) -> LlavaConfig:
    """Our config from a checkpoint's config.json (already read into `raw`), through `transformers.AutoConfig`."""
    import transformers

    path = Path(hf_dir) / "config.json"
    model_type = raw.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not built into transformers and would need remote code "
            "(trust_remote_code), which mstar-jax never runs; use a LLaVA-format checkpoint")
    try:
        hf = transformers.AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a bad config
        raise CheckpointError(f"{path}: transformers could not read it: {err}") from err
    try:
        return from_hf_config(hf)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err


# ------------------------------------------------------------------------------------------- presets

_LLAMA2_7B = TextConfig(family="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
                        num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                        max_position_embeddings=4096, windows=(None,) * 32)
_CLIP_L336 = VisionConfig(family="clip", hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                          image_size=336, patch_size=14)
_SIGLIP_SO400M = VisionConfig(family="siglip", hidden_size=1152, intermediate_size=4304, num_layers=26,
                              num_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6,
                              hidden_act="gelu_pytorch_tanh")

def _interleave_qwen(vocab, hidden, inner, layers, heads, kv_heads, head_dim, tie) -> LlavaConfig:
    """A llava-interleave-qwen checkpoint: SigLIP-so400m, all patches of the last layer, a Qwen2 decoder."""
    text = TextConfig(family="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inner,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=32768, rope=(("rope_theta", 1000000.0), ("rope_type", "default")),
                      qkv_bias=True, windows=(None,) * layers)
    return LlavaConfig(vision=_SIGLIP_SO400M, text=text, image_token_id=151646, vision_feature_layer=-1,
                       vision_feature_select_strategy="full", tie_word_embeddings=tie, eos_token_ids=(151645,))


PRESETS: dict[str, LlavaConfig] = {
    # llava-hf/llava-1.5-7b-hf
    "llava-1.5-7b": LlavaConfig(vision=_CLIP_L336, text=_LLAMA2_7B, image_token_id=32000, pad_token_id=32001,
                                eos_token_ids=(2,)),
    # llava-hf/llava-1.5-13b-hf
    "llava-1.5-13b": LlavaConfig(
        vision=_CLIP_L336,
        text=dataclasses.replace(_LLAMA2_7B, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                                 num_kv_heads=40, windows=(None,) * 40),
        image_token_id=32000, pad_token_id=32001, eos_token_ids=(2,)),
    # llava-hf/llava-interleave-qwen-0.5b-hf
    "llava-interleave-qwen-0.5b": _interleave_qwen(152000, 896, 4864, 24, 14, 2, 64, tie=True),
    # llava-interleave-qwen-7b-hf
    "llava-interleave-qwen-7b": _interleave_qwen(152128, 3584, 18944, 28, 28, 4, 128, tie=False),
    # An 8B Llama-3 decoder with a SigLIP tower (the paper's MiniCPM-V-2.5 backbone sizes, in LLaVA form).
    "llava-llama3-8b-siglip": LlavaConfig(
        vision=_SIGLIP_SO400M,
        text=TextConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                        max_position_embeddings=8192,
                        rope=(("rope_theta", 500000.0), ("rope_type", "default")), windows=(None,) * 32),
        image_token_id=128256 - 1, vision_feature_layer=-1, vision_feature_select_strategy="full",
        eos_token_ids=(128001, 128009)),
    # Phi-3.5-mini decoder (the paper's Phi-3.5-vision LM) with CLIP ViT-L/14-336.
    "llava-phi3.5-mini": LlavaConfig(
        vision=_CLIP_L336,
        text=TextConfig(family="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32,
                        num_heads=32, num_kv_heads=32, head_dim=96, rms_norm_eps=1e-5,
                        max_position_embeddings=131072,
                        rope=(("rope_theta", 10000.0), ("rope_type", "default")), windows=(262144,) * 32),
        image_token_id=32044, eos_token_ids=(32000, 32007)),
}


def preset(name: str) -> LlavaConfig:
    """A named preset; raises with the list of names when unknown."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
