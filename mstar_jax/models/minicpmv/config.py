"""MiniCPM-Llama3-V-2.5 configuration: `openbmb/MiniCPM-Llama3-V-2_5`'s config.json (read as JSON, never executed).

Parts: an Idefics2 (SigLIP-so400m, 980 px position grid) vision tower `vpm`, a perceiver `resampler` of
`query_num` learnt queries (heads = hidden // 128) and a Llama-3 decoder `llm`. Slicing settings may sit at the
top level of config.json or in `slice_config` (the release's code reads `slice_config`); both are read and must
agree. Only version 2.5 is read: 2.0 has another tower and 2.6 a Qwen2 decoder and another placeholder schema.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

from mstar_jax.errors import CheckpointError
from mstar_jax.models.llava.config import TextConfig, VisionConfig, _text_config
from mstar_jax.models.phi3_v.config import eos_ids, token_id

IM_START, IM_END, SLICE_START, SLICE_END, UNK = "<image>", "</image>", "<slice>", "</slice>", "<unk>"
EOT = "<|eot_id|>"
# Idefics2VisionConfig's defaults (the release's vision_config lists only what differs from them).
_IDEFICS2_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_SLICE_DEFAULTS = {"max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14}


@dataclasses.dataclass(frozen=True)
class MiniCPMVConfig:
    """Idefics2 tower (variable patch grids) -> perceiver resampler -> Llama-3 decoder (`MiniCPMV`, version 2.5)."""

    FAMILY: ClassVar[str] = "minicpmv"  # the registry entry (mstar_jax.models.minicpmv)
    vision: VisionConfig
    text: TextConfig
    query_num: int = 96
    max_slice_nums: int = 9
    scale_resolution: int = 448
    slice_mode: bool = True
    image_token_id: int = 0  # <unk>: the placeholder inside <image> ... </image>
    im_start_id: int = 0
    im_end_id: int = 0
    slice_start_id: int = 0
    slice_end_id: int = 0
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Every tower layer is used (the LLaVA key-map helpers read this)."""
        return (-1,)

    @property
    def projector_bias(self) -> bool:
        """No LLaVA projector here (the LLaVA key-map helpers read this)."""
        return False

    @property
    def resampler_heads(self) -> int:
        """The release's `num_heads = embed_dim // 128`."""
        return self.text.hidden_size // 128

    @property
    def positions_per_side(self) -> int:
        """Side of the tower's position grid (70 for 980-px, 14-px patches)."""
        return self.vision.image_size // self.vision.patch_size

    def to_json(self) -> str:
        """Serialise to JSON (inverse of `from_json`)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MiniCPMVConfig":
        """Parse the JSON written by `to_json`."""
        d = json.loads(text)
        vision = VisionConfig(**d.pop("vision"))
        t = d.pop("text")
        t["rope"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in t["rope"])
        t["windows"] = tuple(t["windows"])
        return cls(vision=vision, text=TextConfig(**t), eos_token_ids=tuple(d.pop("eos_token_ids")), **d)


def slice_settings(raw: dict, where: Path) -> dict:
    """max_slice_nums / scale_resolution / patch_size from `slice_config` and the top level (they must agree)."""
    nested = raw.get("slice_config") or {}
    if not isinstance(nested, dict):
        raise CheckpointError(f"{where}: slice_config {nested!r} is not an object")
    out = {}
    for key, default in _SLICE_DEFAULTS.items():
        a, b = nested.get(key), raw.get(key)
        if a is not None and b is not None and int(a) != int(b):
            raise CheckpointError(f"{where}: slice_config.{key} {a} and the top-level {key} {b} disagree")
        value = a if a is not None else b
        out[key] = int(default if value is None else value)
        if out[key] < 1:
            raise CheckpointError(f"{where}: {key} {out[key]} must be >= 1")
    return out


def _version(raw: dict) -> str:
    v = raw.get("version")
    if v is None:  # the release's early configs had none; vLLM tells 2.0 from 2.5 by these sizes
        return "2.0" if raw.get("hidden_size") == 2304 and raw.get("query_num") == 64 else "2.5"
    return str(v)


def from_config_json(raw: dict, hf_dir: str | Path) -> MiniCPMVConfig:
    """Our config from the release's config.json (already read into `raw`) and its tokenizer's special tokens;
    refuses values this implementation (and the 2.5 release) does not have, naming the file and the field."""
    where = Path(hf_dir) / "config.json"

    def bad(msg: str):
        raise CheckpointError(f"{where}: {msg}")

    if raw.get("model_type") != "minicpmv":
        bad(f"model_type {raw.get('model_type')!r} is not 'minicpmv'")
    version = _version(raw)
    if version != "2.5":
        bad(f"version {version} is not supported: this family reads MiniCPM-Llama3-V-2.5 (2.0 has another vision "
            "tower, 2.6 a Qwen2 decoder and another placeholder schema)")
    if raw.get("batch_vision_input", True) is not True:
        # False runs each slice through the tower alone (no padded batch): other features than the release's default.
        bad(f"batch_vision_input {raw.get('batch_vision_input')!r} is not supported (the release's is true: every "
            "slice of a prompt through the tower in one padded batch)")
    vc = raw.get("vision_config")
    if not isinstance(vc, dict):
        bad("no vision_config object (the Idefics2 / SigLIP tower's sizes)")
    if vc.get("model_type", "idefics2") not in ("idefics2", "siglip_vision_model", "idefics2_vision"):
        bad(f"vision_config.model_type {vc.get('model_type')!r} is not an Idefics2 vision model")
    v = {**_IDEFICS2_DEFAULTS, **{k: vc[k] for k in _IDEFICS2_DEFAULTS if k in vc}}
    layers = int(v["num_hidden_layers"]) - (1 if raw.get("drop_vision_last_layer") else 0)
    vision = VisionConfig(family="siglip", hidden_size=int(v["hidden_size"]),
                          intermediate_size=int(v["intermediate_size"]), num_layers=layers,
                          num_heads=int(v["num_attention_heads"]), image_size=int(v["image_size"]),
                          patch_size=int(v["patch_size"]), num_channels=int(v["num_channels"]),
                          layer_norm_eps=float(v["layer_norm_eps"]), hidden_act=str(v["hidden_act"]))
    sl = slice_settings(raw, where)
    if sl["patch_size"] != vision.patch_size:
        bad(f"slice patch_size {sl['patch_size']} differs from vision_config.patch_size {vision.patch_size}")
    hidden = int(raw.get("hidden_size", 0))
    if hidden < 128 or hidden % 128:
        bad(f"hidden_size {hidden} must be a positive multiple of 128: the resampler has hidden_size // 128 heads")
    query = int(raw.get("query_num", 64))
    if query < 1:
        bad(f"query_num {query} must be >= 1")
    try:
        text = _text_config({**raw, "model_type": "llama"})
    except (TypeError, ValueError, KeyError) as err:
        bad(f"the Llama decoder's fields cannot be read ({err})")
    ids = {}
    for name in (IM_START, IM_END, SLICE_START, SLICE_END, UNK):
        ids[name] = token_id(hf_dir, name)
        if ids[name] is None:
            raise CheckpointError(f"{hf_dir}: the tokenizer files have no {name!r} token (the release's image "
                                  "placeholders need <image>, </image>, <slice>, </slice> and <unk>)")
    eot = token_id(hf_dir, EOT)
    eos = eos_ids(raw, hf_dir) + ((eot,) if eot is not None and eot not in eos_ids(raw, hf_dir) else ())
    return MiniCPMVConfig(vision=vision, text=text, query_num=query, max_slice_nums=sl["max_slice_nums"],
                          scale_resolution=sl["scale_resolution"], slice_mode=bool(raw.get("slice_mode", True)),
                          image_token_id=ids[UNK], im_start_id=ids[IM_START], im_end_id=ids[IM_END],
                          slice_start_id=ids[SLICE_START], slice_end_id=ids[SLICE_END],
                          tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                          pad_token_id=raw.get("pad_token_id"), eos_token_ids=eos)


# ------------------------------------------------------------------------------------------------ presets

PRESETS: dict[str, MiniCPMVConfig] = {
    # openbmb/MiniCPM-Llama3-V-2_5 (SigLIP-so400m-14-980 as Idefics2, 96 queries, Llama-3-8B). Shapes only: the
    # placeholder token ids come from the checkpoint's tokenizer when it is converted.
    "minicpm-llama3-v-2.5": MiniCPMVConfig(
        vision=VisionConfig(family="siglip", hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                            image_size=980, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
        text=TextConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=8192,
                        rope=(("rope_theta", 500000.0), ("rope_type", "default")), windows=(None,) * 32),
        query_num=96, eos_token_ids=(128001, 128009)),
}


def preset(name: str) -> MiniCPMVConfig:
    """A named preset; raises with the list of names when unknown."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
