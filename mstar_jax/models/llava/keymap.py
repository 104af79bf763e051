"""The LLaVA key map: one table of canonical HF keys <-> our parameter paths, used in both directions.

Canonical keys drop the layout prefixes (`language_model.`, `lm_head.`, `vision_tower.`,
`multi_modal_projector.`); `LAYOUTS` lists the prefixes found in the wild.
"""

from __future__ import annotations

import re

from mstar_jax.models.llava.config import LlavaConfig
from mstar_jax.models.mapping import Layout, Rule

LAYOUTS = (
    # llava-hf hub checkpoints (and what transformers 5.x save_pretrained writes for the LM side).
    Layout.llava("hub", "language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
           "multi_modal_projector."),
    # transformers 4.5x save_pretrained.
    Layout.llava("transformers-4.5x", "model.language_model.", "lm_head.", "model.vision_tower.vision_model.",
           "model.multi_modal_projector."),
    # transformers 5.x save_pretrained: the vision tower lost its `vision_model.` level.
    Layout.llava("transformers-5", "language_model.model.", "language_model.lm_head.", "vision_tower.",
           "multi_modal_projector."),
    # transformers 5.x in-memory state_dict names.
    Layout.llava("transformers-5-state-dict", "model.language_model.", "lm_head.", "model.vision_tower.",
           "model.multi_modal_projector."),
)
DEFAULT_LAYOUT = "hub"


def _qkv_sizes(cfg: LlavaConfig):
    t = cfg.text
    return [t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.num_kv_heads * t.head_dim]


def _gate_up_sizes(cfg: LlavaConfig):
    return [cfg.text.intermediate_size, cfg.text.intermediate_size]


_LM = r"language_model\.layers\.(\d+)\."
_VIT = r"vision_tower\.encoder\.layers\.(\d+)\."
_L = "language_model.layers.{i}."
_V = "vision_tower.layers.{i}."


def rules(cfg: LlavaConfig) -> list[Rule]:
    """The key map for this config (Phi-3 has fused q/k/v and gate/up; biases only where the config has them)."""
    t = cfg.text
    table = [
        Rule(r"language_model\.embed_tokens\.weight", ("language_model.embed_tokens",)),
        Rule(r"language_model\.norm\.weight", ("language_model.norm.weight",)),
        Rule(_LM + r"input_layernorm\.weight", (_L + "input_layernorm.weight",)),
        Rule(_LM + r"post_attention_layernorm\.weight", (_L + "post_attention_layernorm.weight",)),
        Rule(_LM + r"self_attn\.o_proj\.weight", (_L + "self_attn.o_proj.kernel",), "linear"),
        Rule(_LM + r"mlp\.down_proj\.weight", (_L + "mlp.down_proj.kernel",), "linear"),
    ]
    if t.family == "phi3":
        table += [
            Rule(_LM + r"self_attn\.qkv_proj\.weight",
                 tuple(_L + f"self_attn.{p}_proj.kernel" for p in "qkv"), "split", _qkv_sizes),
            Rule(_LM + r"mlp\.gate_up_proj\.weight", (_L + "mlp.gate_proj.kernel", _L + "mlp.up_proj.kernel"),
                 "split", _gate_up_sizes),
        ]
    else:
        table += [Rule(_LM + rf"self_attn\.{p}_proj\.weight", (_L + f"self_attn.{p}_proj.kernel",), "linear")
                  for p in "qkv"]
        table += [Rule(_LM + rf"mlp\.{p}_proj\.weight", (_L + f"mlp.{p}_proj.kernel",), "linear")
                  for p in ("gate", "up")]
    if t.qkv_bias:
        table += [Rule(_LM + rf"self_attn\.{p}_proj\.bias", (_L + f"self_attn.{p}_proj.bias",)) for p in "qkv"]
    if t.o_bias:
        table.append(Rule(_LM + r"self_attn\.o_proj\.bias", (_L + "self_attn.o_proj.bias",)))
    if t.mlp_bias:
        table += [Rule(_LM + rf"mlp\.{p}_proj\.bias", (_L + f"mlp.{p}_proj.bias",)) for p in ("gate", "up", "down")]
    if not cfg.tie_word_embeddings:
        table.append(Rule(r"lm_head\.weight", ("lm_head.kernel",), "linear"))

    v = cfg.vision
    table += [
        Rule(r"vision_tower\.embeddings\.patch_embedding\.weight", ("vision_tower.patch_embedding.kernel",), "patch"),
        Rule(r"vision_tower\.embeddings\.position_embedding\.weight", ("vision_tower.position_embedding",)),
    ]
    for norm in ("layer_norm1", "layer_norm2"):
        table += [Rule(_VIT + rf"{norm}\.{wb}", (_V + f"{norm}.{wb}",)) for wb in ("weight", "bias")]
    for hf, ours in (("self_attn.q_proj", "q_proj"), ("self_attn.k_proj", "k_proj"), ("self_attn.v_proj", "v_proj"),
                     ("self_attn.out_proj", "out_proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
        pattern = _VIT + hf.replace(".", r"\.")
        table.append(Rule(pattern + r"\.weight", (_V + ours + ".kernel",), "linear"))
        table.append(Rule(pattern + r"\.bias", (_V + ours + ".bias",)))
    for lin in ("linear_1", "linear_2"):
        table.append(Rule(rf"multi_modal_projector\.{lin}\.weight", (f"multi_modal_projector.{lin}.kernel",), "linear"))
        if cfg.projector_bias:
            table.append(Rule(rf"multi_modal_projector\.{lin}\.bias", (f"multi_modal_projector.{lin}.bias",)))
    if v.family == "siglip":
        table.append(Rule(r"vision_tower\.embeddings\.patch_embedding\.bias", ("vision_tower.patch_embedding.bias",)))
    if v.has_class_token:
        table += [
            Rule(r"vision_tower\.embeddings\.class_embedding", ("vision_tower.class_embedding",)),
            Rule(r"vision_tower\.pre_layrnorm\.weight", ("vision_tower.pre_layrnorm.weight",)),
            Rule(r"vision_tower\.pre_layrnorm\.bias", ("vision_tower.pre_layrnorm.bias",)),
        ]
    return table


def is_known_unused(canon: str, cfg: LlavaConfig) -> bool:
    """Tensors a LLaVA forward never reads but a faithful export must keep (SigLIP's pooling head, CLIP's
    post-layernorm, vision layers after the feature layer, a tied checkpoint's lm_head)."""
    from mstar_jax.models.llava.model import vision_layers_used

    if canon.startswith(("vision_tower.post_layernorm.", "vision_tower.head.")):
        return True
    m = re.match(r"vision_tower\.encoder\.layers\.(\d+)\.", canon)
    if m and int(m.group(1)) >= vision_layers_used(cfg):
        return int(m.group(1)) < cfg.vision.num_layers
    return canon == "lm_head.weight" and cfg.tie_word_embeddings


def layer_count(rule: Rule, cfg: LlavaConfig) -> int | None:
    """How many layers a per-layer rule spans (None for a rule without a layer index)."""
    from mstar_jax.models.llava.model import vision_layers_used

    if r"(\d+)" not in rule.hf:
        return None
    return cfg.text.num_layers if rule.hf.startswith("language_model") else vision_layers_used(cfg)
