"""The Qwen2-VL / Qwen2.5-VL key map: canonical HF keys <-> our parameter paths, used in both directions.

Canonical keys drop the layout prefixes of the LM (`language_model.`), the ViT (`visual.`) and the head
(`lm_head.`); `LAYOUTS` lists the prefixes the published checkpoints use.
"""

from __future__ import annotations

import numpy as np

from mstar_jax.models.mapping import Layout, Rule
from mstar_jax.models.qwen2_vl.config import QwenVLConfig

LAYOUTS = (
    # The published checkpoints (Qwen/Qwen2-VL-*, Qwen/Qwen2.5-VL-*), and what transformers 5 save_pretrained
    # writes: `model.layers.*`, `visual.*`, `lm_head.weight`.
    Layout("hub", (("lm_head.", "lm_head."), ("language_model.", "model."), ("visual.", "visual."))),
    # transformers 4.52-4.57 save_pretrained (and transformers 5's in-memory state_dict names).
    Layout("transformers-4.5x", (("lm_head.", "lm_head."), ("language_model.", "model.language_model."),
                                 ("visual.", "model.visual."))),
)

_LM = r"language_model\.layers\.(\d+)\."
_VIT = r"visual\.blocks\.(\d+)\."
_L = "language_model.layers.{i}."
_V = "vision_tower.layers.{i}."


def _patch_rule() -> tuple:
    """The Conv3d patch embedding [D, C, T, p, p] <-> our [C*T*p*p, D] matmul kernel (the same sum)."""

    def to_ours(t, cfg):
        return [t.reshape(t.shape[0], -1).T]

    def to_hf(arrays, cfg):
        v = cfg.vision
        return np.asarray(arrays[0]).T.reshape(-1, v.num_channels, v.temporal_patch_size, v.patch_size, v.patch_size)

    def hf_shape(shapes, cfg):
        v = cfg.vision
        return (shapes[0][1], v.num_channels, v.temporal_patch_size, v.patch_size, v.patch_size)

    return to_ours, to_hf, hf_shape


def _linear(hf: str, ours: str, bias: bool = True) -> list[Rule]:
    pattern = hf.replace(".", r"\.")
    out = [Rule(pattern + r"\.weight", (ours + ".kernel",), "linear")]
    if bias:
        out.append(Rule(pattern + r"\.bias", (ours + ".bias",)))
    return out


def rules(cfg: QwenVLConfig) -> list[Rule]:
    """The key map for this config (Qwen2-VL's LayerNorm/fc MLP or Qwen2.5-VL's RMSNorm/gated MLP in the ViT)."""
    table = [
        Rule(r"language_model\.embed_tokens\.weight", ("language_model.embed_tokens",)),
        Rule(r"language_model\.norm\.weight", ("language_model.norm.weight",)),
        Rule(_LM + r"input_layernorm\.weight", (_L + "input_layernorm.weight",)),
        Rule(_LM + r"post_attention_layernorm\.weight", (_L + "post_attention_layernorm.weight",)),
    ]
    for p in "qkv":
        table += [Rule(_LM + rf"self_attn\.{p}_proj\.weight", (_L + f"self_attn.{p}_proj.kernel",), "linear"),
                  Rule(_LM + rf"self_attn\.{p}_proj\.bias", (_L + f"self_attn.{p}_proj.bias",))]
    table.append(Rule(_LM + r"self_attn\.o_proj\.weight", (_L + "self_attn.o_proj.kernel",), "linear"))
    table += [Rule(_LM + rf"mlp\.{p}_proj\.weight", (_L + f"mlp.{p}_proj.kernel",), "linear")
              for p in ("gate", "up", "down")]
    if not cfg.tie_word_embeddings:
        table.append(Rule(r"lm_head\.weight", ("lm_head.kernel",), "linear"))

    qwen2 = cfg.vision.variant == "qwen2_vl"
    table.append(Rule(r"visual\.patch_embed\.proj\.weight", ("vision_tower.patch_embed.kernel",), "custom",
                      custom=_patch_rule()))
    norm_parts = ("weight", "bias") if qwen2 else ("weight",)
    for norm in ("norm1", "norm2"):
        table += [Rule(_VIT + rf"{norm}\.{wb}", (_V + f"{norm}.{wb}",)) for wb in norm_parts]
    mlp = ("fc1", "fc2") if qwen2 else ("gate_proj", "up_proj", "down_proj")
    for hf, ours in [("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj")] + [(f"mlp.{m}", f"mlp.{m}") for m in mlp]:
        for rule in _linear(hf, ours):
            table.append(Rule(_VIT + rule.hf, tuple(_V + o for o in rule.ours), rule.kind))
    table += [Rule(rf"visual\.merger\.ln_q\.{wb}", (f"multi_modal_projector.ln_q.{wb}",)) for wb in norm_parts]
    table += _linear("visual.merger.mlp.0", "multi_modal_projector.linear_1")
    table += _linear("visual.merger.mlp.2", "multi_modal_projector.linear_2")
    return table


def is_known_unused(canon: str, cfg: QwenVLConfig) -> bool:
    """Tensors the forward never reads but a faithful export keeps: a tied checkpoint's lm_head."""
    return canon == "lm_head.weight" and cfg.tie_word_embeddings


def layer_count(rule: Rule, cfg: QwenVLConfig) -> int | None:
    """How many layers a per-layer rule spans (None for a rule without a layer index)."""
    if r"(\d+)" not in rule.hf:
        return None
    return cfg.text.num_layers if rule.hf.startswith("language_model") else cfg.vision.num_layers
