"""InternVL configuration: a frozen view of either published `config.json`, plus presets of real checkpoints.

Two formats carry the same model (InternViT, pixel shuffle, MLP projector, an LLM decoder):
    internvl        transformers' `InternVLForConditionalGeneration` (read through `transformers.AutoConfig`)
    internvl_chat   the original release (OpenGVLab/InternVL2-2B, ...): `vision_config` + `llm_config`, an InternLM2,
                    Qwen2 or Llama LLM; read as plain JSON (its classes are remote code, which is never run)
InternLM2 is Llama with packed weights, so it maps onto the Llama decoder (`llm_arch` keeps the release's LLM key
map for the export back).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from mstar_jax.errors import CheckpointError
from mstar_jax.models.llava.config import TextConfig, _get, _text_config

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
LLM_ARCHS = ("internlm2", "llama", "qwen2")  # the release format's LLM key maps
# The release's `architectures` names of its LLMs.
_ARCH_OF = {"InternLM2ForCausalLM": "internlm2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT: a pre-norm ViT with a class token, layer scale and optional QK-norm."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"  # layer_norm | rms_norm
    qkv_bias: bool = True
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6  # transformers fixes 1e-6; the release uses layer_norm_eps
    use_mean_pooling: bool = True  # False: transformers applies a final LayerNorm to the last layer's output
    use_mask_token: bool = False  # a masked-image-modelling token the forward never reads

    @property
    def grid(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per tile (the class token comes on top)."""
        return self.grid ** 2


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    """InternViT + pixel shuffle + LayerNorm/MLP projector + Llama / Qwen2 decoder."""

    FAMILY: ClassVar[str] = "internvl"  # the registry entry (mstar_jax.models.internvl)
    vision: VisionConfig
    text: TextConfig
    image_token_id: int  # <IMG_CONTEXT>
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    llm_arch: str = "llama"  # the LLM key map of the release format (internlm2 | llama | qwen2)
    template: str = "internvl2_5"  # the release's conversation template (internlm2-chat | internvl2_5 | Hermes-2)

    @property
    def shuffle(self) -> int:
        """Pixel-shuffle factor: a shuffle x shuffle block of patches becomes one token."""
        return int(round(1 / self.downsample_ratio))

    @property
    def image_seq_length(self) -> int:
        """<IMG_CONTEXT> tokens per 448-px tile (256 for every released model)."""
        return (self.vision.grid // self.shuffle) ** 2

    def to_json(self) -> str:
        """Serialise to JSON (inverse of `from_json`)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "InternVLConfig":
        """Parse the JSON written by `to_json`."""
        d = json.loads(text)
        vision = VisionConfig(**d.pop("vision"))
        t = d.pop("text")
        t["rope"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in t["rope"])
        t["windows"] = tuple(t["windows"])
        return cls(vision=vision, text=TextConfig(**t), eos_token_ids=tuple(d.pop("eos_token_ids")), **d)


# ------------------------------------------------------------------------------------------- reading


def _plain_rope(text: TextConfig) -> TextConfig:
    """Dynamic NTK scaling (InternLM2's and some Qwen2 releases' `rope_scaling`) changes nothing up to
    max_position_embeddings (its base is rescaled only for longer sequences, in the release and in transformers),
    so it reads as the default rope, exact within that context."""
    rope = dict(text.rope)
    if rope.get("rope_type") != "dynamic":
        return text
    plain = (("rope_theta", rope.get("rope_theta", 10000.0)), ("rope_type", "default"))
    return dataclasses.replace(text, rope=plain)


def _check(cfg: InternVLConfig, where: str) -> InternVLConfig:
    v = cfg.vision
    if v.image_size % v.patch_size or v.grid % cfg.shuffle or abs(1 / cfg.downsample_ratio - cfg.shuffle) > 1e-9:
        raise CheckpointError(f"{where}: a {v.image_size}-px tile of {v.patch_size}-px patches cannot be pixel-"
                              f"shuffled by downsample_ratio {cfg.downsample_ratio}")
    if v.norm_type not in ("layer_norm", "rms_norm"):
        raise CheckpointError(f"{where}: vision norm_type {v.norm_type!r} is not layer_norm or rms_norm")
    if cfg.template not in TEMPLATES:
        raise CheckpointError(f"{where}: conversation template {cfg.template!r} is not supported; supported: "
                              f"{', '.join(TEMPLATES)}")
    return cfg


def _eos(tc: Any, extra: tuple[int, ...] = ()) -> tuple[int, ...]:
    eos = _get(tc, "eos_token_id", None)
    ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return tuple(dict.fromkeys(int(i) for i in ids + extra))


def _pair(x) -> int:
    """image_size / patch_size as one int (transformers stores [h, w]; tiles are square)."""
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise CheckpointError(f"non-square size {list(x)}: InternVL tiles are square")
        return int(x[0])
    return int(x)


def from_hf_config(hf: Any, where: str = "config.json", llm_arch: str | None = None,
                   template: str | None = None) -> InternVLConfig:
    """Our config from a `transformers.InternVLConfig` (or its `to_dict()`)."""
    if _get(hf, "model_type") != "internvl":
        raise CheckpointError(f"{where}: model_type {_get(hf, 'model_type')!r} is not transformers' internvl")
    layer = _get(hf, "vision_feature_layer", -1)
    if layer != -1:
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r}: only -1 (the last layer, as in every "
                              "InternVL release) is supported")
    strategy = _get(hf, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise CheckpointError(f"{where}: vision_feature_select_strategy {strategy!r}: InternVL drops the class "
                              "token ('default'); the pixel shuffle needs a square grid of patches")
    vc, tc = _get(hf, "vision_config"), _get(hf, "text_config")
    if not _get(vc, "use_absolute_position_embeddings", True):
        raise CheckpointError(f"{where}: a vision tower without absolute position embeddings is not supported")
    text = _plain_rope(_text_config(tc))
    vision = VisionConfig(
        hidden_size=int(_get(vc, "hidden_size")), intermediate_size=int(_get(vc, "intermediate_size")),
        num_layers=int(_get(vc, "num_hidden_layers")), num_heads=int(_get(vc, "num_attention_heads")),
        image_size=_pair(_get(vc, "image_size")), patch_size=_pair(_get(vc, "patch_size")),
        num_channels=int(_get(vc, "num_channels", 3)), layer_norm_eps=float(_get(vc, "layer_norm_eps", 1e-6)),
        hidden_act=_get(vc, "hidden_act", "gelu"), norm_type=_get(vc, "norm_type", "layer_norm"),
        qkv_bias=bool(_get(vc, "attention_bias", False)), qk_norm=bool(_get(vc, "use_qk_norm", False)),
        qk_norm_eps=1e-6, use_mean_pooling=bool(_get(vc, "use_mean_pooling", True)),
        use_mask_token=bool(_get(vc, "use_mask_token", False)))
    tie = _get(hf, "tie_word_embeddings")
    if tie is None:
        tie = _get(tc, "tie_word_embeddings", False)
    cfg = InternVLConfig(
        vision=vision, text=text, image_token_id=int(_get(hf, "image_token_id")),
        downsample_ratio=float(_get(hf, "downsample_ratio", 0.5)),
        projector_hidden_act=_get(hf, "projector_hidden_act", "gelu"), tie_word_embeddings=bool(tie),
        pad_token_id=_get(tc, "pad_token_id", _get(hf, "pad_token_id")), eos_token_ids=_eos(tc),
        # transformers' Llama-decoder InternVL checkpoints are converted InternLM2 releases (InternVL2/2.5-2B/8B).
        llm_arch=llm_arch or ("qwen2" if text.family == "qwen2" else "internlm2"),
        template=template or ("internvl2_5" if text.family == "qwen2" else "internlm2-chat"))
    cfg = _check(cfg, where)
    seq = _get(hf, "image_seq_length", None)
    if seq is not None and int(seq) != cfg.image_seq_length:
        raise CheckpointError(f"{where}: image_seq_length {seq} disagrees with the tiles the vision config implies "
                              f"({cfg.vision.image_size}-px tiles of {cfg.vision.patch_size}-px patches, shuffled by "
                              f"{cfg.downsample_ratio}: {cfg.image_seq_length} tokens per tile)")
    return cfg


def _llm_text(llm: dict, where: str) -> tuple[TextConfig, str]:
    """The decoder of a release's llm_config, and its key map (InternLM2 as Llama: same maths, packed weights)."""
    archs = llm.get("architectures") or []
    arch = next((_ARCH_OF[a] for a in archs if a in _ARCH_OF), None)
    if arch is None:
        raise CheckpointError(f"{where}: llm_config.architectures {archs} is not supported; supported: "
                              f"{', '.join(_ARCH_OF)}")
    if arch == "internlm2":
        bias = bool(llm.get("bias", False))
        as_llama = {k: llm[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act",
                                        "max_position_embeddings", "rope_theta", "rope_scaling", "eos_token_id",
                                        "pad_token_id", "head_dim") if k in llm}
        as_llama.update(model_type="llama", attention_bias=bias)
        return _plain_rope(_text_config(as_llama)), arch
    if llm.get("model_type") != arch:
        llm = {**llm, "model_type": arch}
    return _plain_rope(_text_config(llm)), arch


def _added_tokens(hf_dir: Path) -> dict[str, int]:
    """{token: id} of the added tokens in a checkpoint's tokenizer files (no tokenizer is built or run)."""
    out: dict[str, int] = {}
    tc = hf_dir / "tokenizer_config.json"
    if tc.is_file():
        for i, entry in (json.loads(tc.read_text()).get("added_tokens_decoder") or {}).items():
            out.setdefault(entry["content"], int(i))
    at = hf_dir / "added_tokens.json"
    if at.is_file():
        for k, v in json.loads(at.read_text()).items():
            out.setdefault(k, int(v))
    tj = hf_dir / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text())
        for entry in data.get("added_tokens") or []:
            out.setdefault(entry["content"], int(entry["id"]))
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            for k in (IMG_CONTEXT, "<|im_end|>"):
                if k in vocab:
                    out.setdefault(k, int(vocab[k]))
    return out


def from_chat_config(raw: dict, hf_dir: str | Path) -> InternVLConfig:
    """Our config from the original release's config.json (model_type internvl_chat), read as JSON."""
    path = Path(hf_dir) / "config.json"
    where = str(path)
    vc, llm = raw.get("vision_config"), raw.get("llm_config")
    if not isinstance(vc, dict) or not isinstance(llm, dict):
        raise CheckpointError(f"{where}: an internvl_chat config needs vision_config and llm_config objects")
    if raw.get("ps_version", "v1") != "v2":
        raise CheckpointError(f"{where}: ps_version {raw.get('ps_version', 'v1')!r} (InternVL 1.5's pixel shuffle) "
                              "is not supported; InternVL2 and later use 'v2'")
    if raw.get("select_layer", -1) != -1:
        raise CheckpointError(f"{where}: select_layer {raw.get('select_layer')!r}: only -1 (the last layer, as in "
                              "every InternVL release) is supported")
    image_size = int(vc.get("image_size", 448))
    forced = raw.get("force_image_size")
    if forced is not None and int(forced) != image_size:
        raise CheckpointError(f"{where}: force_image_size {forced} differs from vision_config.image_size "
                              f"{image_size} (tiles would need resized position embeddings); not supported")
    text, arch = _llm_text(llm, where)
    eps = float(vc.get("layer_norm_eps", 1e-6))
    vision = VisionConfig(
        hidden_size=int(vc["hidden_size"]), intermediate_size=int(vc["intermediate_size"]),
        num_layers=int(vc["num_hidden_layers"]), num_heads=int(vc["num_attention_heads"]), image_size=image_size,
        patch_size=int(vc.get("patch_size", 14)), num_channels=int(vc.get("num_channels", 3)), layer_norm_eps=eps,
        hidden_act=vc.get("hidden_act", "gelu"), norm_type=vc.get("norm_type", "rms_norm"),
        qkv_bias=bool(vc.get("qkv_bias", False)), qk_norm=bool(vc.get("qk_normalization", False)),
        qk_norm_eps=eps, use_mean_pooling=True)
    tokens = _added_tokens(Path(hf_dir))
    if IMG_CONTEXT not in tokens:
        raise CheckpointError(f"{hf_dir}: the tokenizer files (tokenizer_config.json, added_tokens.json, "
                              f"tokenizer.json) do not define {IMG_CONTEXT}, the image placeholder")
    # The release stops generation at its template's separator (<|im_end|>) besides the LLM's eos.
    stop = (tokens["<|im_end|>"],) if "<|im_end|>" in tokens else ()
    tie = raw.get("tie_word_embeddings")
    if tie is None:
        tie = llm.get("tie_word_embeddings", False)
    cfg = InternVLConfig(
        vision=vision, text=text, image_token_id=tokens[IMG_CONTEXT],
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)), projector_hidden_act="gelu",
        tie_word_embeddings=bool(tie), pad_token_id=llm.get("pad_token_id"), eos_token_ids=_eos(llm, stop),
        llm_arch=arch, template=raw.get("template") or "internvl2_5")
    return _check(cfg, where)


def from_config_json(raw: dict, hf_dir: str | Path) -> InternVLConfig:
    """Our config from a checkpoint's config.json (already read into `raw`): either format."""
    path = Path(hf_dir) / "config.json"
    if raw.get("model_type") == "internvl_chat":
        return from_chat_config(raw, hf_dir)
    import transformers

    try:
        hf = transformers.AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a bad config
        raise CheckpointError(f"{path}: transformers could not read it: {err}") from err
    # A checkpoint we exported from the release format records its LLM key map and template for the way back.
    return from_hf_config(hf, str(path), raw.get("mstar_llm_arch"), raw.get("mstar_template"))


# ----------------------------------------------------------------------------------------- templates

# The release's conversation templates (its conversation.py, MPT style): system turn, then
# `role + message + sep` per turn, the open assistant role last. InternVL2 (InternLM2 LLMs) uses
# internlm2-chat; InternVL2.5 and 3 use internvl2_5 (a newline after each separator).
_SYS_V2 = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
           "英文名叫InternVL, 是一个有用无害的人工智能助手。")
_SYS_V25 = ("你是书生·万象，英文名是InternVL，"
            "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")
TEMPLATES: dict[str, dict[str, str]] = {
    "internlm2-chat": {"system": _SYS_V2, "sep": "<|im_end|>"},
    "Hermes-2": {"system": _SYS_V2, "sep": "<|im_end|>"},
    "internvl2_5": {"system": _SYS_V25, "sep": "<|im_end|>\n"},
}


# ------------------------------------------------------------------------------------------- presets

_VIT_300M = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=448,
                         patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu", norm_type="layer_norm",
                         qkv_bias=True, qk_norm=False)
# internlm2-chat-1_8b / internlm2_5-1_8b-chat as the release's llm_config gives them (92553 tokens with
# InternVL's <img>, </img>, <IMG_CONTEXT>, ... added).
_INTERNLM2_1_8B = TextConfig(family="llama", vocab_size=92553, hidden_size=2048, intermediate_size=8192,
                             num_layers=24, num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                             max_position_embeddings=32768,
                             rope=(("rope_theta", 1000000.0), ("rope_type", "default")), windows=(None,) * 24)
# Qwen2.5-1.5B-Instruct with InternVL's added tokens (151674).
_QWEN25_1_5B = TextConfig(family="qwen2", vocab_size=151674, hidden_size=1536, intermediate_size=8960,
                          num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
                          max_position_embeddings=32768,
                          rope=(("rope_theta", 1000000.0), ("rope_type", "default")), qkv_bias=True,
                          windows=(None,) * 28)

PRESETS: dict[str, InternVLConfig] = {
    # OpenGVLab/InternVL2-2B: InternViT-300M-448px + internlm2-chat-1_8b (the paper's third backbone).
    "internvl2-2b": InternVLConfig(vision=_VIT_300M, text=_INTERNLM2_1_8B, image_token_id=92546, pad_token_id=2,
                                   eos_token_ids=(2, 92542), llm_arch="internlm2", template="internlm2-chat"),
    # OpenGVLab/InternVL2_5-2B: InternViT-300M-448px-V2_5 + internlm2_5-1_8b-chat.
    "internvl2.5-2b": InternVLConfig(vision=_VIT_300M, text=_INTERNLM2_1_8B, image_token_id=92546,
                                     pad_token_id=2, eos_token_ids=(2, 92542), llm_arch="internlm2",
                                     template="internvl2_5"),
    # OpenGVLab/InternVL3-2B: InternViT-300M-448px-V2_5 + Qwen2.5-1.5B.
    "internvl3-2b": InternVLConfig(vision=_VIT_300M, text=_QWEN25_1_5B, image_token_id=151667,
                                   eos_token_ids=(151645, 151643), llm_arch="qwen2", template="internvl2_5"),
}
