"""MiniCPM-Llama3-V-2.5's key map: the release's `llm.model.*`, `llm.lm_head.*`, `vpm.*` and `resampler.*` <->
our parameters, both ways. Decoder and tower rules are LLaVA's (same canonical keys, all tower layers used, the
post-layernorm used); the resampler's are this family's own (nn.MultiheadAttention's packed in_proj split into
q / k / v)."""

from __future__ import annotations

import numpy as np

from mstar_jax.models.llava import keymap as llava_keymap
from mstar_jax.models.mapping import Layout, Rule

LAYOUTS = (
    Layout("release", (("lm_head.", "llm.lm_head."), ("language_model.", "llm.model."), ("vision_tower.", "vpm."),
                       ("multi_modal_projector.", "resampler."))),
)
_R = "multi_modal_projector."


def _in_proj_bias(cfg) -> tuple:
    """in_proj_bias [3D] <-> q / k / v biases [D] each."""
    return (lambda t, c: list(np.split(np.asarray(t), 3)),
            lambda arrays, c: np.concatenate([np.asarray(a) for a in arrays]),
            lambda shapes, c: (sum(s[0] for s in shapes),))


def rules(cfg) -> list[Rule]:
    """Decoder + tower (LLaVA's), the tower's post-layernorm, and the resampler."""
    table = [r for r in llava_keymap.rules(cfg) if not r.hf.startswith("multi_modal_projector")]
    table += [Rule(rf"vision_tower\.post_layernorm\.{wb}", (f"vision_tower.post_layernorm.{wb}",))
              for wb in ("weight", "bias")]
    d = cfg.text.hidden_size
    table += [
        Rule(r"multi_modal_projector\.query", (_R + "query",)),
        Rule(r"multi_modal_projector\.proj", (_R + "proj",)),  # used as x @ proj: already [in, out]
        Rule(r"multi_modal_projector\.attn\.in_proj_weight", tuple(_R + f"{p}_proj.kernel" for p in "qkv"), "split",
             lambda c: [d, d, d]),
        Rule(r"multi_modal_projector\.attn\.in_proj_bias", tuple(_R + f"{p}_proj.bias" for p in "qkv"), "custom",
             custom=_in_proj_bias(cfg)),
        Rule(r"multi_modal_projector\.attn\.out_proj\.weight", (_R + "out_proj.kernel",), "linear"),
        Rule(r"multi_modal_projector\.attn\.out_proj\.bias", (_R + "out_proj.bias",)),
    ]
    table += [Rule(rf"multi_modal_projector\.{ln}\.{wb}", (_R + f"{ln}.{wb}",))
              for ln in ("ln_q", "ln_kv", "ln_post") for wb in ("weight", "bias")]
    if cfg.vision.hidden_size != d:  # the release's kv_proj is an Identity when the widths agree
        table.append(Rule(r"multi_modal_projector\.kv_proj\.weight", (_R + "kv_proj.kernel",), "linear"))
    return table


def is_known_unused(canon: str, cfg) -> bool:
    """Only a tied checkpoint's lm_head: every other tensor of the release is used."""
    return canon == "lm_head.weight" and cfg.tie_word_embeddings


def layer_count(rule: Rule, cfg) -> int | None:
    """Layers a per-layer rule spans."""
    if r"(\d+)" not in rule.hf:
        return None
    return cfg.text.num_layers if rule.hf.startswith("language_model") else cfg.vision.num_layers
