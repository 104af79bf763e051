"""Phi-3.5-vision configuration: `microsoft/Phi-3.5-vision-instruct`'s config.json (read as JSON, never executed).

The release's config.json names its parts but carries no CLIP sizes (its remote code hard-codes CLIP ViT-L/14-336).
They come from an optional top-level `vision_config` (CLIP fields; tiny test checkpoints need it), else from the
tensors' shapes with CLIP-L's head size of 64. The decoder is Phi-3 (its `su` rope scaling is `longrope`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import ClassVar

from mstar_jax.errors import CheckpointError
from mstar_jax.models.llava.config import TextConfig, VisionConfig, _text_config, _vision_config

# The release hard-codes CLIP ViT-L/14-336 (`CLIP_VIT_LARGE_PATCH14_336_CONFIG` in image_embedding_phi3_v.py).
CLIP_L336 = VisionConfig(family="clip", hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                         image_size=336, patch_size=14)
CLIP_HEAD_DIM = 64
# vLLM's phi3v.py uses this id for the image placeholder (`_IMAGE_TOKEN_ID`, the `<|image|>` token); the release's
# processor writes negative ids instead, which no embedding table can look up.
DEFAULT_IMAGE_TOKEN_ID = 32044
IMAGE_TOKEN = "<|image|>"


@dataclasses.dataclass(frozen=True)
class Phi3VConfig:
    """CLIP tower -> HD transform with learnt separators -> 2-layer MLP -> Phi-3 decoder (`Phi3VForCausalLM`)."""

    FAMILY: ClassVar[str] = "phi3_v"  # the registry entry (mstar_jax.models.phi3_v)
    vision: VisionConfig
    text: TextConfig
    image_token_id: int = DEFAULT_IMAGE_TOKEN_ID
    vision_feature_layer: int = -2  # img_processor.layer_idx: hidden_states[-2], class token dropped ("patch")
    hd_transform_order: str = "sub_glb"
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The vision hidden states read (one; the LLaVA tower helpers take a tuple)."""
        return (self.vision_feature_layer,)

    @property
    def projector_bias(self) -> bool:
        """img_projection's Linears have biases."""
        return True

    @property
    def crop_size(self) -> int:
        """Pixels of one HD crop (the tower's input size: 336 in the release)."""
        return self.vision.image_size

    @property
    def grid(self) -> int:
        """Tokens per side of a crop after the 2x2 merge (12 in the release)."""
        return self.vision.image_size // self.vision.patch_size // 2

    @property
    def merged_dim(self) -> int:
        """Width of a merged token: 4 x the tower's width (4096 in the release)."""
        return 4 * self.vision.hidden_size

    def image_tokens(self, h_crops: int, w_crops: int) -> int:
        """Placeholder tokens of an image cut into h_crops x w_crops crops: every sub-image row + sub_GN, glb_GN,
        every global row + sub_GN (the release's `(h*w + 1) * 144 + 1 + (h + 1) * 12` at 336 px)."""
        g = self.grid
        return (h_crops * w_crops + 1) * g * g + 1 + (h_crops + 1) * g

    def to_json(self) -> str:
        """Serialise to JSON (inverse of `from_json`)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Phi3VConfig":
        """Parse the JSON written by `to_json`."""
        d = json.loads(text)
        vision = VisionConfig(**d.pop("vision"))
        t = d.pop("text")
        t["rope"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in t["rope"])
        t["windows"] = tuple(t["windows"])
        return cls(vision=vision, text=TextConfig(**t), eos_token_ids=tuple(d.pop("eos_token_ids")), **d)


# ------------------------------------------------------------------------------------------ config.json


def _read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    return out if isinstance(out, dict) else {}


def token_id(hf_dir: str | Path, token: str) -> int | None:
    """The id of a token from the tokenizer files' JSON (tokenizer.json's added tokens or vocabulary, or
    tokenizer_config.json), if any."""
    d = Path(hf_dir)
    if (d / "tokenizer.json").is_file():
        tok = _read_json(d / "tokenizer.json")
        for t in tok.get("added_tokens") or []:
            if isinstance(t, dict) and t.get("content") == token:
                return int(t["id"])
        vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    if (d / "tokenizer_config.json").is_file():
        for i, t in (_read_json(d / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
            if isinstance(t, dict) and t.get("content") == token:
                return int(i)
    return None


def eos_ids(raw: dict, hf_dir: str | Path) -> tuple[int, ...]:
    """End-of-turn ids: config.json's eos_token_id and generation_config.json's (the chat turn's `<|end|>`)."""
    ids: list[int] = []
    sources = [raw.get("eos_token_id")]
    gen = Path(hf_dir) / "generation_config.json"
    if gen.is_file():
        sources.append(_read_json(gen).get("eos_token_id"))
    for s in sources:
        for i in (s if isinstance(s, (list, tuple)) else [s]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


def _vision_from_tensors(hf_dir: str | Path, where: Path) -> VisionConfig:
    """CLIP sizes from the tensors' shapes (the release's config.json has none), heads of 64 as in CLIP-L."""
    from mstar_jax.weights import SafetensorsReader

    reader = SafetensorsReader(hf_dir)
    pre = "model.vision_embed_tokens.img_processor.vision_model."
    keys = reader.keys()
    need = [pre + "embeddings.patch_embedding.weight", pre + "embeddings.position_embedding.weight",
            pre + "encoder.layers.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in keys]
    if missing:
        raise CheckpointError(f"{where}: no vision_config and no CLIP tensor {missing[0]!r} to read the tower's "
                              "sizes from")
    hidden, channels, patch, _ = reader.shape(need[0])
    positions = reader.shape(need[1])[0] - 1
    side = math.isqrt(positions)
    if side * side != positions:
        raise CheckpointError(f"{reader.file_of(need[1])}: {positions} CLIP patch positions are not a square grid")
    layers = 1 + max(int(m.group(1)) for k in keys if (m := re.match(re.escape(pre) + r"encoder\.layers\.(\d+)\.", k)))
    return VisionConfig(family="clip", hidden_size=int(hidden), intermediate_size=int(reader.shape(need[2])[0]),
                        num_layers=layers, num_heads=int(hidden) // CLIP_HEAD_DIM, image_size=side * int(patch),
                        patch_size=int(patch), num_channels=int(channels))


def _text_fields(raw: dict, where: Path) -> dict:
    """config.json's decoder fields as transformers' Phi3Config reads them (`su` scaling is `longrope`)."""
    tc = {**raw, "model_type": "phi3"}
    scaling = raw.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        kind = scaling.pop("type", None) or scaling.pop("rope_type", None)
        if kind not in ("su", "longrope"):
            raise CheckpointError(f"{where}: rope_scaling type {kind!r} is not supported for Phi-3.5-vision "
                                  "(the release uses 'su', i.e. longrope)")
        tc["rope_scaling"] = {**scaling, "rope_type": "longrope"}
    return tc


def from_config_json(raw: dict, hf_dir: str | Path) -> Phi3VConfig:
    """Our config from the release's config.json (already read into `raw`); refuses values the release's code
    does not implement, naming the file and the field."""
    where = Path(hf_dir) / "config.json"

    def bad(msg: str):
        raise CheckpointError(f"{where}: {msg}")

    if raw.get("model_type") != "phi3_v":
        bad(f"model_type {raw.get('model_type')!r} is not 'phi3_v'")
    embd = raw.get("embd_layer")
    if not isinstance(embd, dict):
        bad("no embd_layer object (the release's image embedding settings)")
    order = embd.get("hd_transform_order", "glb_sub")  # the release's default when absent
    if order != "sub_glb":
        bad(f"embd_layer.hd_transform_order {order!r} is not supported: the release implements only 'sub_glb' "
            "(sub-image rows, glb_GN, global rows)")
    for key, want in (("embedding_cls", "image"), ("projection_cls", "mlp"), ("use_hd_transform", True),
                      ("with_learnable_separator", True)):
        if embd.get(key, want) != want:
            bad(f"embd_layer.{key} {embd.get(key)!r} is not supported (expected {want!r}, as the release)")
    img = raw.get("img_processor")
    if not isinstance(img, dict) or img.get("name") != "clip_vision_model":
        bad(f"img_processor {img!r} is not supported (the release's is a CLIP vision model: name "
            "'clip_vision_model')")
    if img.get("type_feature", "patch") != "patch":
        bad(f"img_processor.type_feature {img.get('type_feature')!r} is not supported (only 'patch')")
    layer = int(img.get("layer_idx", -2))

    vc = raw.get("vision_config")
    if vc is not None:
        try:
            vision = _vision_config({"model_type": "clip_vision_model", **vc})
        except (TypeError, ValueError, CheckpointError) as err:
            bad(f"vision_config cannot be read ({err})")
    elif (Path(hf_dir) / "model.safetensors").is_file() or (Path(hf_dir) / "model.safetensors.index.json").is_file():
        vision = _vision_from_tensors(hf_dir, where)
    else:
        vision = CLIP_L336  # a converted checkpoint's hf/ side files: no weights beside them
    side = vision.image_size // vision.patch_size
    if side % 2:
        bad(f"the CLIP tower's {side}x{side} patch grid is odd; the HD transform merges 2x2 patches")
    dim_out = img.get("image_dim_out", vision.hidden_size)
    if int(dim_out) != vision.hidden_size:
        bad(f"img_processor.image_dim_out {dim_out} does not match the CLIP tower's width {vision.hidden_size}")
    n_img = img.get("num_img_tokens", (side // 2) ** 2)
    if int(n_img) != (side // 2) ** 2:
        bad(f"img_processor.num_img_tokens {n_img} does not match the tower: {side}x{side} patches merged 2x2 "
            f"give {(side // 2) ** 2} tokens per crop")
    if not -vision.num_layers <= layer < vision.num_layers:
        bad(f"img_processor.layer_idx {layer} is outside the tower's {vision.num_layers} layers")
    try:
        text = _text_config(_text_fields(raw, where))
    except (TypeError, ValueError, KeyError) as err:
        bad(f"the Phi-3 decoder's fields cannot be read ({err})")
    image_token = token_id(hf_dir, IMAGE_TOKEN)
    return Phi3VConfig(vision=vision, text=text, vision_feature_layer=layer, hd_transform_order=order,
                       image_token_id=DEFAULT_IMAGE_TOKEN_ID if image_token is None else image_token,
                       tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                       pad_token_id=raw.get("pad_token_id"), eos_token_ids=eos_ids(raw, hf_dir))


# ------------------------------------------------------------------------------------------------ presets

# Phi-3.5-vision-instruct's decoder: Phi-3.5-mini (config.json of the release; longrope factors as published).
_SHORT = (1.08, 1.1, 1.1300000000000001, 1.2800000000000002, 1.3100000000000003, 1.4500000000000004,
          1.4500000000000004, 1.9500000000000008, 2.030000000000001, 2.4299999999999926, 2.5699999999999896,
          2.9499999999999815, 3.729999999999965, 3.869999999999962, 4.189999999999955, 4.43999999999995,
          4.6399999999999455, 4.979999999999938, 5.159999999999934, 5.279999999999932, 5.759999999999922,
          5.889999999999919, 5.889999999999919, 5.969999999999917, 6.089999999999915, 6.2799999999999105,
          6.7699999999999, 6.8899999999998975, 7.109999999999893, 7.129999999999892, 7.179999999999891,
          7.289999999999889, 7.339999999999888, 7.559999999999883, 7.619999999999882, 7.69999999999988,
          7.879999999999876, 7.879999999999876, 7.879999999999876, 7.939999999999875, 7.949999999999875,
          7.979999999999874, 8.19999999999987, 8.439999999999864, 8.469999999999864, 8.589999999999861,
          8.809999999999857, 8.999999999999853)
_LONG = (1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
         1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
         4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
         17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
         32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
         50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
         62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
         63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
         64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
         64.51000213623047, 64.52999877929688, 64.83999633789062)

PRESETS: dict[str, Phi3VConfig] = {
    # microsoft/Phi-3.5-vision-instruct
    "phi-3.5-vision": Phi3VConfig(
        vision=CLIP_L336,
        text=TextConfig(family="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32,
                        num_heads=32, num_kv_heads=32, head_dim=96, rms_norm_eps=1e-5,
                        max_position_embeddings=131072,
                        rope=(("long_factor", _LONG), ("original_max_position_embeddings", 4096),
                              ("rope_theta", 10000.0), ("rope_type", "longrope"), ("short_factor", _SHORT)),
                        windows=(262144,) * 32),
        image_token_id=DEFAULT_IMAGE_TOKEN_ID, pad_token_id=32000, eos_token_ids=(2, 32000, 32001, 32007)),
}


def preset(name: str) -> Phi3VConfig:
    """A named preset; raises with the list of names when unknown."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]

