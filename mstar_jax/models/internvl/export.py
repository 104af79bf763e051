"""The side files of an export in the other InternVL format (Family.export_files).

The key maps convert the tensors; a checkpoint also needs the config.json (and processor files) of its format:
    release -> transformers: InternVLConfig's config.json, the tokenizer with InternVL's named image tokens,
                             GotOcr2's preprocessor_config.json (the release's tiling numbers, ImageNet statistics),
                             processor_config.json and the release's chat template;
    transformers -> release: an internvl_chat config.json (llm_config / vision_config as the release writes them).
No remote code is written: the release's modeling files come only from a release source directory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mstar_jax.errors import CheckpointError
from mstar_jax.models.internvl.config import IMG_CONTEXT, IMG_END, IMG_START, InternVLConfig
from mstar_jax.models.internvl.keymap import CHAT
from mstar_jax.models.internvl.processing import IMAGENET_MEAN, IMAGENET_STD, chat_template, load_tokenizer

_ARCH_NAME = {"internlm2": "InternLM2ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _raw(src: Path) -> dict:
    return json.loads((src / "config.json").read_text())


def _check_exportable(cfg: InternVLConfig, layout: str) -> None:
    v = cfg.vision
    if layout == CHAT and not v.use_mean_pooling:
        raise CheckpointError("this checkpoint's vision tower ends in a LayerNorm (use_mean_pooling false), which "
                              "the original release's InternViT does not have; export it in transformers' format")
    if v.qk_norm and v.qk_norm_eps != v.layer_norm_eps:
        raise CheckpointError(f"QK-norm eps {v.qk_norm_eps} differs from layer_norm_eps {v.layer_norm_eps}: the "
                              "release and transformers would compute different models")


def _text_dict(cfg: InternVLConfig, rope_scaling) -> dict:
    t = cfg.text
    rope = dict(t.rope)
    d = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
             num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
             head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, hidden_act=t.hidden_act,
             max_position_embeddings=t.max_position_embeddings, rope_theta=rope.get("rope_theta", 10000.0),
             tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=cfg.pad_token_id,
             eos_token_id=list(cfg.eos_token_ids) or None)
    if rope_scaling:
        d["rope_scaling"] = rope_scaling
    if t.family == "llama":
        d["attention_bias"] = t.qkv_bias
    return d


def _rope_scaling(text: dict) -> dict | None:
    """The source's rope scaling as the release writes it ({"type", "factor"}), e.g. InternLM2's dynamic NTK (our
    config reads it as the default rope, exact within max_position_embeddings; the export keeps it)."""
    rs = text.get("rope_scaling") or text.get("rope_parameters") or {}
    kind = rs.get("rope_type") or rs.get("type")
    if not kind or kind == "default":
        return None
    return {"type": kind, **{k: v for k, v in rs.items() if k not in ("type", "rope_type", "rope_theta")}}


def hf_config_json(cfg: InternVLConfig, llm: dict | None = None) -> dict:
    """transformers' InternVLConfig (as config.json) of our config; `llm`: the release's llm_config, if any."""
    import transformers as T

    v = cfg.vision
    vision = T.InternVLVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
        norm_type=v.norm_type, attention_bias=v.qkv_bias, use_qk_norm=v.qk_norm,
        use_mean_pooling=v.use_mean_pooling, use_mask_token=v.use_mask_token)
    text_cls = T.Qwen2Config if cfg.text.family == "qwen2" else T.LlamaConfig
    text = text_cls(**_text_dict(cfg, _rope_scaling(llm or {})))
    hf = T.InternVLConfig(vision_config=vision, text_config=text, image_token_id=cfg.image_token_id,
                          image_seq_length=cfg.image_seq_length, downsample_ratio=cfg.downsample_ratio,
                          projector_hidden_act=cfg.projector_hidden_act, tie_word_embeddings=cfg.tie_word_embeddings,
                          vision_feature_layer=-1, vision_feature_select_strategy="default")
    out = hf.to_dict()
    out["architectures"] = ["InternVLForConditionalGeneration"]
    # The way back to the release format (ignored by transformers).
    out.update(mstar_llm_arch=cfg.llm_arch, mstar_template=cfg.template)
    return out


def chat_config_json(cfg: InternVLConfig, tiling: dict, text_raw: dict | None = None) -> dict:
    """The release's internvl_chat config.json of our config (`tiling`: min/max tiles, thumbnail)."""
    v, t = cfg.vision, cfg.text
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
              "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
              "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
              "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
              "norm_type": v.norm_type, "qkv_bias": v.qkv_bias, "qk_normalization": v.qk_norm,
              "drop_path_rate": 0.0, "dropout": 0.0, "attention_dropout": 0.0, "use_flash_attn": False}
    rope_scaling = _rope_scaling(text_raw or {})
    if cfg.llm_arch == "internlm2":
        d = _text_dict(cfg, rope_scaling)
        llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": t.qkv_bias,
               **{k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act",
                                    "max_position_embeddings", "rope_theta", "tie_word_embeddings", "pad_token_id")},
               "rope_scaling": rope_scaling}
        if t.head_dim * t.num_heads != t.hidden_size:
            raise CheckpointError(f"InternLM2 has no head_dim setting: head_dim {t.head_dim} x {t.num_heads} heads "
                                  f"!= hidden_size {t.hidden_size}; export with --layout transformers")
        eos = [i for i in cfg.eos_token_ids]
        if eos:
            llm["eos_token_id"] = eos[0]
    else:
        llm = dict(text_raw) if text_raw else _text_dict(cfg, rope_scaling)
        llm.update(architectures=[_ARCH_NAME[cfg.llm_arch]], model_type=cfg.llm_arch)
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "downsample_ratio": cfg.downsample_ratio, "dynamic_image_size": True,
            "force_image_size": v.image_size, "min_dynamic_patch": int(tiling.get("min_patches", 1)),
            "max_dynamic_patch": int(tiling.get("max_patches", 12)),
            "use_thumbnail": bool(tiling.get("use_thumbnail", True)), "ps_version": "v2", "select_layer": -1,
            "template": cfg.template, "system_message": tiling.get("system_message"),
            "tie_word_embeddings": cfg.tie_word_embeddings, "llm_config": llm, "vision_config": vision}


def _tokenizer_files(src: Path) -> dict[str, bytes]:
    """The release tokenizer saved by transformers, with InternVL's image tokens named for InternVLProcessor."""
    tok = load_tokenizer(src)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    tc = json.loads(files["tokenizer_config.json"])
    tc.pop("auto_map", None)  # the release's tokenizer classes are remote code
    tc.update(start_image_token=IMG_START, end_image_token=IMG_END, context_image_token=IMG_CONTEXT,
              video_token="<video>", processor_class="InternVLProcessor")
    files["tokenizer_config.json"] = json.dumps(tc, indent=2).encode()
    return files


def export_files(cfg: InternVLConfig, layout: str, src: Path) -> dict[str, bytes]:
    """Files that make an export in `layout` a checkpoint of that layout's format (none when the source is of
    the same format)."""
    _check_exportable(cfg, layout)
    raw = _raw(src)
    source_chat = raw.get("model_type") == "internvl_chat"
    if (layout == CHAT) == source_chat:
        return {}
    if layout == CHAT:  # transformers -> release
        tiling = {}
        if (src / "preprocessor_config.json").is_file():
            tiling = json.loads((src / "preprocessor_config.json").read_text())
        tiling["system_message"] = raw.get("mstar_system_message")
        out = chat_config_json(cfg, tiling, raw.get("text_config"))
        return {"config.json": (json.dumps(out, indent=2) + "\n").encode()}
    # release -> transformers
    llm = raw.get("llm_config") or {}
    files = _tokenizer_files(src)
    hf = hf_config_json(cfg, llm)
    hf["mstar_system_message"] = raw.get("system_message")
    files["config.json"] = (json.dumps(hf, indent=2) + "\n").encode()
    s = cfg.vision.image_size
    pre = {"image_processor_type": "GotOcr2ImageProcessor", "processor_class": "InternVLProcessor",
           "crop_to_patches": True, "min_patches": int(raw.get("min_dynamic_patch", 1)),
           "max_patches": int(raw.get("max_dynamic_patch", 12)), "size": {"height": s, "width": s},
           "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_convert_rgb": True,
           "resample": 3}
    files["preprocessor_config.json"] = (json.dumps(pre, indent=2) + "\n").encode()
    files["processor_config.json"] = (json.dumps({"processor_class": "InternVLProcessor",
                                                  "image_seq_length": cfg.image_seq_length}, indent=2) + "\n").encode()
    files["chat_template.jinja"] = chat_template(cfg.template, IMG_CONTEXT, raw.get("system_message")).encode()
    return files
