"""The InternVL key maps, both directions: transformers' `internvl` format and the original release's layout.

Canonical keys of transformers' format drop its part prefixes (`language_model.`, `lm_head.`, `vision_tower.`,
`multi_modal_projector.`); the release's keys keep their own names under the canonical prefix `chat.` (its
layout names no other key), so one rule table serves both and an export writes the rules its layout names.

The release's InternLM2 LLM packs q, k and v into one `attention.wqkv` whose output rows are grouped per KV head:
for KV head h, its `groups` query heads, then its key head, then its value head (each `head_dim` rows).
"""

from __future__ import annotations

import numpy as np

from mstar_jax.models.internvl.config import InternVLConfig
from mstar_jax.models.mapping import Layout, Rule

LAYOUTS = (
    # what transformers 5 save_pretrained writes (its legacy prefixes)
    Layout.llava("transformers", "language_model.model.", "language_model.lm_head.", "vision_tower.",
                 "multi_modal_projector."),
    # transformers' module names (the -hf hub checkpoints saved by transformers 4.52+)
    Layout.llava("transformers-state-dict", "model.language_model.", "lm_head.", "model.vision_tower.",
                 "model.multi_modal_projector."),
    # the original release (OpenGVLab/InternVL2-2B, ...): vision_model.*, mlp1.*, language_model.*
    Layout("internvl_chat", (("chat.", ""),)),
)
CHAT = "internvl_chat"


# --------------------------------------------------------------------------------- InternLM2's wqkv


def _heads(cfg: InternVLConfig) -> tuple[int, int, int]:
    t = cfg.text
    return t.num_kv_heads, t.num_heads // t.num_kv_heads, t.head_dim


def _unpack_wqkv(w: np.ndarray, cfg: InternVLConfig) -> list[np.ndarray]:
    """wqkv [(K*(G+2)*D), hidden] -> our q, k, v kernels [hidden, H*D], [hidden, K*D], [hidden, K*D]."""
    kh, g, d = _heads(cfg)
    x = w.reshape(kh, g + 2, d, -1)
    return [x[:, :g].reshape(kh * g * d, -1).T, x[:, g].reshape(kh * d, -1).T, x[:, g + 1].reshape(kh * d, -1).T]


def _pack_wqkv(arrays, cfg: InternVLConfig) -> np.ndarray:
    kh, g, d = _heads(cfg)
    q, k, v = (a.T for a in arrays)
    hidden = q.shape[-1]
    x = np.concatenate([q.reshape(kh, g, d, hidden), k.reshape(kh, 1, d, hidden), v.reshape(kh, 1, d, hidden)], 1)
    return x.reshape(kh * (g + 2) * d, hidden)


def _wqkv_shape(shapes, cfg: InternVLConfig) -> tuple[int, int]:
    return (shapes[0][1] + shapes[1][1] + shapes[2][1], shapes[0][0])


def _unpack_wqkv_bias(b: np.ndarray, cfg: InternVLConfig) -> list[np.ndarray]:
    kh, g, d = _heads(cfg)
    x = b.reshape(kh, g + 2, d)
    return [x[:, :g].reshape(-1), x[:, g].reshape(-1), x[:, g + 1].reshape(-1)]


def _pack_wqkv_bias(arrays, cfg: InternVLConfig) -> np.ndarray:
    kh, g, d = _heads(cfg)
    q, k, v = arrays
    return np.concatenate([q.reshape(kh, g, d), k.reshape(kh, 1, d), v.reshape(kh, 1, d)], 1).reshape(-1)


def _bias_shape(shapes, cfg: InternVLConfig) -> tuple[int]:
    return (sum(s[0] for s in shapes),)


WQKV = (_unpack_wqkv, _pack_wqkv, _wqkv_shape)
WQKV_BIAS = (_unpack_wqkv_bias, _pack_wqkv_bias, _bias_shape)
# InternViT's packed attn.qkv bias: q, k, v one after the other.
QKV_BIAS = (lambda b, cfg: list(np.split(b, 3)), lambda arrays, cfg: np.concatenate(list(arrays)), _bias_shape)


def _qkv_sizes(cfg: InternVLConfig):
    return [cfg.vision.hidden_size] * 3


# ------------------------------------------------------------------------------------------- tables

_L = "language_model.layers.{i}."
_V = "vision_tower.layers.{i}."


def _text_rules(cfg: InternVLConfig, lm: str, head: str) -> list[Rule]:
    """Llama / Qwen2 decoder keys under `lm` (model.*) and the head key `head`."""
    t = cfg.text
    layer = lm + r"layers\.(\d+)\."
    out = [Rule(lm + r"embed_tokens\.weight", ("language_model.embed_tokens",)),
           Rule(lm + r"norm\.weight", ("language_model.norm.weight",)),
           Rule(layer + r"input_layernorm\.weight", (_L + "input_layernorm.weight",)),
           Rule(layer + r"post_attention_layernorm\.weight", (_L + "post_attention_layernorm.weight",))]
    out += [Rule(layer + rf"self_attn\.{p}_proj\.weight", (_L + f"self_attn.{p}_proj.kernel",), "linear")
            for p in "qkvo"]
    out += [Rule(layer + rf"mlp\.{p}_proj\.weight", (_L + f"mlp.{p}_proj.kernel",), "linear")
            for p in ("gate", "up", "down")]
    if t.qkv_bias:
        out += [Rule(layer + rf"self_attn\.{p}_proj\.bias", (_L + f"self_attn.{p}_proj.bias",)) for p in "qkv"]
    if t.o_bias:
        out.append(Rule(layer + r"self_attn\.o_proj\.bias", (_L + "self_attn.o_proj.bias",)))
    if t.mlp_bias:
        out += [Rule(layer + rf"mlp\.{p}_proj\.bias", (_L + f"mlp.{p}_proj.bias",)) for p in ("gate", "up", "down")]
    if not cfg.tie_word_embeddings:
        out.append(Rule(head, ("lm_head.kernel",), "linear"))
    return out


def _internlm2_rules(cfg: InternVLConfig) -> list[Rule]:
    """The release's InternLM2: tok_embeddings, packed attention.wqkv, wo, feed_forward.w1/w3/w2, output."""
    lm = r"chat\.language_model\.model\."
    layer = lm + r"layers\.(\d+)\."
    qkv = tuple(_L + f"self_attn.{p}_proj.kernel" for p in "qkv")
    out = [Rule(lm + r"tok_embeddings\.weight", ("language_model.embed_tokens",)),
           Rule(lm + r"norm\.weight", ("language_model.norm.weight",)),
           Rule(layer + r"attention_norm\.weight", (_L + "input_layernorm.weight",)),
           Rule(layer + r"ffn_norm\.weight", (_L + "post_attention_layernorm.weight",)),
           Rule(layer + r"attention\.wqkv\.weight", qkv, "custom", custom=WQKV),
           Rule(layer + r"attention\.wo\.weight", (_L + "self_attn.o_proj.kernel",), "linear"),
           Rule(layer + r"feed_forward\.w1\.weight", (_L + "mlp.gate_proj.kernel",), "linear"),
           Rule(layer + r"feed_forward\.w3\.weight", (_L + "mlp.up_proj.kernel",), "linear"),
           Rule(layer + r"feed_forward\.w2\.weight", (_L + "mlp.down_proj.kernel",), "linear")]
    if cfg.text.qkv_bias:  # InternLM2's `bias` puts biases on wqkv and wo together
        out += [Rule(layer + r"attention\.wqkv\.bias", tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"),
                     "custom", custom=WQKV_BIAS),
                Rule(layer + r"attention\.wo\.bias", (_L + "self_attn.o_proj.bias",))]
    if not cfg.tie_word_embeddings:
        out.append(Rule(r"chat\.language_model\.output\.weight", ("lm_head.kernel",), "linear"))
    return out


def _vision_rules(cfg: InternVLConfig) -> list[Rule]:
    """transformers' InternVLVisionModel keys."""
    v = cfg.vision
    vl = r"vision_tower\.encoder\.layer\.(\d+)\."
    out = [Rule(r"vision_tower\.embeddings\.cls_token", ("vision_tower.cls_token",)),
           Rule(r"vision_tower\.embeddings\.position_embeddings", ("vision_tower.position_embedding",)),
           Rule(r"vision_tower\.embeddings\.patch_embeddings\.projection\.weight",
                ("vision_tower.patch_embedding.kernel",), "patch"),
           Rule(r"vision_tower\.embeddings\.patch_embeddings\.projection\.bias",
                ("vision_tower.patch_embedding.bias",)),
           Rule(vl + r"lambda_1", (_V + "lambda_1",)), Rule(vl + r"lambda_2", (_V + "lambda_2",))]
    for hf, ours, bias in (("attention.q_proj", "q_proj", v.qkv_bias), ("attention.k_proj", "k_proj", v.qkv_bias),
                           ("attention.v_proj", "v_proj", v.qkv_bias),
                           ("attention.projection_layer", "projection_layer", True), ("mlp.fc1", "fc1", True),
                           ("mlp.fc2", "fc2", True)):
        pattern = vl + hf.replace(".", r"\.")
        out.append(Rule(pattern + r"\.weight", (_V + ours + ".kernel",), "linear"))
        if bias:
            out.append(Rule(pattern + r"\.bias", (_V + ours + ".bias",)))
    norms = ("weight",) if v.norm_type == "rms_norm" else ("weight", "bias")
    for norm in ("layernorm_before", "layernorm_after"):
        out += [Rule(vl + rf"{norm}\.{wb}", (_V + f"{norm}.{wb}",)) for wb in norms]
    if v.qk_norm:
        out += [Rule(vl + rf"attention\.{n}\.weight", (_V + f"{n}.weight",)) for n in ("q_norm", "k_norm")]
    if not v.use_mean_pooling:
        out += [Rule(rf"vision_tower\.layernorm\.{wb}", (f"vision_tower.layernorm.{wb}",)) for wb in ("weight", "bias")]
    out.append(Rule(r"multi_modal_projector\.layer_norm\.weight", ("multi_modal_projector.layer_norm.weight",)))
    for part in ("layer_norm", "linear_1", "linear_2"):
        out.append(Rule(rf"multi_modal_projector\.{part}\.bias", (f"multi_modal_projector.{part}.bias",)))
    for part in ("linear_1", "linear_2"):
        out.append(Rule(rf"multi_modal_projector\.{part}\.weight", (f"multi_modal_projector.{part}.kernel",),
                        "linear"))
    return out


def _chat_vision_rules(cfg: InternVLConfig) -> list[Rule]:
    """The release's InternVisionModel (packed attn.qkv, ls1/ls2, norm1/norm2) and mlp1 (0: LayerNorm, 1 and 3:
    the linears)."""
    v = cfg.vision
    vm = r"chat\.vision_model\."
    vl = vm + r"encoder\.layers\.(\d+)\."
    out = [Rule(vm + r"embeddings\.class_embedding", ("vision_tower.cls_token",)),
           Rule(vm + r"embeddings\.position_embedding", ("vision_tower.position_embedding",)),
           Rule(vm + r"embeddings\.patch_embedding\.weight", ("vision_tower.patch_embedding.kernel",), "patch"),
           Rule(vm + r"embeddings\.patch_embedding\.bias", ("vision_tower.patch_embedding.bias",)),
           Rule(vl + r"ls1", (_V + "lambda_1",)), Rule(vl + r"ls2", (_V + "lambda_2",)),
           Rule(vl + r"attn\.qkv\.weight", tuple(_V + f"{p}_proj.kernel" for p in "qkv"), "split", _qkv_sizes),
           Rule(vl + r"attn\.proj\.weight", (_V + "projection_layer.kernel",), "linear"),
           Rule(vl + r"attn\.proj\.bias", (_V + "projection_layer.bias",))]
    if v.qkv_bias:
        out.append(Rule(vl + r"attn\.qkv\.bias", tuple(_V + f"{p}_proj.bias" for p in "qkv"), "custom",
                        custom=QKV_BIAS))
    for fc in ("fc1", "fc2"):
        out += [Rule(vl + rf"mlp\.{fc}\.weight", (_V + f"{fc}.kernel",), "linear"),
                Rule(vl + rf"mlp\.{fc}\.bias", (_V + f"{fc}.bias",))]
    norms = ("weight",) if v.norm_type == "rms_norm" else ("weight", "bias")
    for norm, ours in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
        out += [Rule(vl + rf"{norm}\.{wb}", (_V + f"{ours}.{wb}",)) for wb in norms]
    if v.qk_norm:
        out += [Rule(vl + rf"attn\.{n}\.weight", (_V + f"{n}.weight",)) for n in ("q_norm", "k_norm")]
    out += [Rule(r"chat\.mlp1\.0\.weight", ("multi_modal_projector.layer_norm.weight",)),
            Rule(r"chat\.mlp1\.0\.bias", ("multi_modal_projector.layer_norm.bias",)),
            Rule(r"chat\.mlp1\.1\.weight", ("multi_modal_projector.linear_1.kernel",), "linear"),
            Rule(r"chat\.mlp1\.1\.bias", ("multi_modal_projector.linear_1.bias",)),
            Rule(r"chat\.mlp1\.3\.weight", ("multi_modal_projector.linear_2.kernel",), "linear"),
            Rule(r"chat\.mlp1\.3\.bias", ("multi_modal_projector.linear_2.bias",))]
    return out


def rules(cfg: InternVLConfig) -> list[Rule]:
    """Both formats' key maps for this config (the release's LLM part as its `llm_arch`)."""
    table = _text_rules(cfg, r"language_model\.", r"lm_head\.weight") + _vision_rules(cfg)
    if cfg.llm_arch == "internlm2":
        table += _internlm2_rules(cfg)
    else:
        table += _text_rules(cfg, r"chat\.language_model\.model\.", r"chat\.language_model\.lm_head\.weight")
    if cfg.vision.use_mean_pooling:  # the release has no final vision norm
        table += _chat_vision_rules(cfg)
    return table


def is_known_unused(canon: str, cfg: InternVLConfig) -> bool:
    """Tensors the forward never reads but an export keeps: a tied checkpoint's head, transformers' mask token."""
    if canon == "vision_tower.embeddings.mask_token":
        return True
    if cfg.tie_word_embeddings:
        return canon in ("lm_head.weight", "chat.language_model.output.weight", "chat.language_model.lm_head.weight")
    return False


def layer_count(rule: Rule, cfg: InternVLConfig) -> int | None:
    """How many layers a per-layer rule spans (None for a rule without a layer index)."""
    if r"(\d+)" not in rule.hf:
        return None
    return cfg.text.num_layers if "language_model" in rule.hf else cfg.vision.num_layers
