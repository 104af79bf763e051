"""Phi-3.5-vision's key map: the release's keys (`model.layers.*`, `lm_head.*`,
`model.vision_embed_tokens.img_processor.vision_model.*`, `model.vision_embed_tokens.img_projection.*`,
`model.vision_embed_tokens.sub_GN` / `glb_GN`) <-> our parameters, both ways.

The decoder and CLIP rules are LLaVA's (same canonical keys); the projector's are this family's own.
"""

from __future__ import annotations

import numpy as np

from mstar_jax.models.llava import keymap as llava_keymap
from mstar_jax.models.mapping import Layout, Rule

LAYOUTS = (
    # microsoft/Phi-3.5-vision-instruct (and Phi-3-vision-128k-instruct): the more specific prefixes first.
    Layout("release", (("lm_head.", "lm_head."),
                       ("vision_tower.", "model.vision_embed_tokens.img_processor.vision_model."),
                       ("multi_modal_projector.", "model.vision_embed_tokens."),
                       ("language_model.", "model."))),
)


def _separator(hf_shape: tuple[int, ...]) -> tuple:
    """A learnt separator stored [1, 1, (1,) 4C] in the release, [4C] here."""
    lead = hf_shape[:-1]
    return (lambda t, cfg: [np.asarray(t).reshape(-1)],
            lambda arrays, cfg: np.asarray(arrays[0]).reshape(*lead, -1),
            lambda shapes, cfg: (*lead, shapes[0][0]))


def rules(cfg) -> list[Rule]:
    """Decoder and CLIP rules (LLaVA's), the 2-layer img_projection and the two separators."""
    table = [r for r in llava_keymap.rules(cfg) if not r.hf.startswith("multi_modal_projector")]
    for hf, ours in (("0", "linear_1"), ("2", "linear_2")):
        table.append(Rule(rf"multi_modal_projector\.img_projection\.{hf}\.weight",
                          (f"multi_modal_projector.{ours}.kernel",), "linear"))
        table.append(Rule(rf"multi_modal_projector\.img_projection\.{hf}\.bias", (f"multi_modal_projector.{ours}.bias",)))
    table.append(Rule(r"multi_modal_projector\.sub_GN", ("multi_modal_projector.sub_GN",), "custom",
                      custom=_separator((1, 1, 1, 0))))
    table.append(Rule(r"multi_modal_projector\.glb_GN", ("multi_modal_projector.glb_GN",), "custom",
                      custom=_separator((1, 1, 0))))
    return table


def is_known_unused(canon: str, cfg) -> bool:
    """CLIP's post-layernorm and the layers after the feature layer (the release keeps them in its checkpoint)."""
    return llava_keymap.is_known_unused(canon, cfg)


def layer_count(rule: Rule, cfg) -> int | None:
    """Layers a per-layer rule spans (decoder or the used CLIP layers)."""
    return llava_keymap.layer_count(rule, cfg)
