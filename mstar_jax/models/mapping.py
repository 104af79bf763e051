"""Machinery for two-way key maps between HF tensors and our parameter paths.

A family's key map is a list of `Rule`s. A rule matches canonical HF keys with a regex (layer index as a group)
and names one or more of our parameter paths; its transform turns the HF tensor into ours and back. The same
rule drives reading (HF -> ours, also slice by slice for sharded loading) and writing (ours -> HF).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

Path = tuple  # our parameter path, e.g. ("language_model", "layers", 3, "self_attn", "q_proj", "kernel")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF key pattern <-> our parameter path(s).

    kind: "copy" (same layout), "linear" (torch [out, in] <-> our [in, out]), "split" (a fused torch Linear
    whose output rows are several of our kernels; `sizes(cfg)` gives their row counts), "patch" (a conv
    [D, C, p, p] <-> our [C*p*p, D] matmul kernel) or "custom": `custom` = (to_ours(tensor, cfg) -> [arrays],
    to_hf(arrays, cfg) -> tensor, hf_shape(our shapes, cfg) -> shape), a family's own transform (e.g. a packed
    qkv grouped per kv head).
    """

    hf: str
    ours: tuple[str, ...]
    kind: str = "copy"
    sizes: Callable | None = None
    custom: tuple[Callable, Callable, Callable] | None = None

    def match(self, key: str) -> re.Match | None:
        """Match a canonical HF key against this rule."""
        return re.fullmatch(self.hf, key)

    def paths(self, m: re.Match) -> list[Path]:
        """Our parameter paths for a match (group 1, if any, is the layer index)."""
        out = []
        for template in self.ours:
            parts = template.split(".")
            out.append(tuple(int(m.group(1)) if p == "{i}" else p for p in parts))
        return out

    def hf_key(self, layer: int | None) -> str:
        """The canonical HF key for a layer index (inverse of `match`)."""
        key = self.hf.replace(r"(\d+)", str(layer)) if layer is not None else self.hf
        return key.replace("\\.", ".")

    def to_ours(self, tensor: np.ndarray, cfg) -> list[np.ndarray]:
        """HF tensor -> our arrays (one per path)."""
        if self.kind == "copy":
            return [tensor]
        if self.kind == "linear":
            return [tensor.T]
        if self.kind == "patch":
            return [tensor.reshape(tensor.shape[0], -1).T]
        if self.kind == "split":
            bounds = np.cumsum(self.sizes(cfg))[:-1]
            return [part.T for part in np.split(tensor, bounds, axis=0)]
        if self.kind == "custom":
            return list(self.custom[0](tensor, cfg))
        raise ValueError(self.kind)

    def to_hf(self, arrays: Sequence[np.ndarray], cfg) -> np.ndarray:
        """Our arrays -> the HF tensor."""
        if self.kind == "copy":
            return arrays[0]
        if self.kind == "linear":
            return arrays[0].T
        if self.kind == "patch":
            v = cfg.vision
            return arrays[0].T.reshape(-1, v.num_channels, v.patch_size, v.patch_size)
        if self.kind == "split":
            return np.concatenate([a.T for a in arrays], axis=0)
        if self.kind == "custom":
            return self.custom[1](arrays, cfg)
        raise ValueError(self.kind)

    def hf_shape(self, our_shapes: Sequence[tuple[int, ...]], cfg) -> tuple[int, ...]:
        """The HF tensor shape implied by our parameter shapes (to check checkpoints against the config)."""
        if self.kind == "copy":
            return tuple(our_shapes[0])
        if self.kind == "linear":
            return tuple(our_shapes[0][::-1])
        if self.kind == "patch":
            v = cfg.vision
            return (our_shapes[0][1], v.num_channels, v.patch_size, v.patch_size)
        if self.kind == "custom":
            return tuple(self.custom[2](our_shapes, cfg))
        return (sum(s[1] for s in our_shapes), our_shapes[0][0])

    def read_slice(self, reader, part: int, index: tuple[slice, ...], cfg) -> np.ndarray:
        """Read only `index` of our part `part` from a lazy HF tensor (`reader[...]` slices the file)."""
        if self.kind == "copy":
            return np.asarray(reader[index])
        if self.kind == "linear":
            return np.asarray(reader[index[1], index[0]]).T
        if self.kind == "split":
            sizes = self.sizes(cfg)
            start = int(sum(sizes[:part]))
            rows = index[1]
            lo, hi, _ = rows.indices(sizes[part])
            return np.asarray(reader[start + lo:start + hi, index[0]]).T
        return self.to_ours(np.asarray(reader[:]), cfg)[part][index]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a published checkpoint prefixes the parts of a model: (canonical prefix, this layout's prefix) pairs,
    tried in order (put a more specific prefix, such as the LM head's, before the one it extends)."""

    name: str
    prefixes: tuple[tuple[str, str], ...]

    @classmethod
    def llava(cls, name: str, lm: str, head: str, vision: str, projector: str) -> "Layout":
        """The four parts of a LLaVA-style checkpoint: LM, its head, vision tower, projector."""
        return cls(name, (("lm_head.", head), ("language_model.", lm), ("vision_tower.", vision),
                          ("multi_modal_projector.", projector)))

    def to_canonical(self, key: str) -> str | None:
        """Strip this layout's prefixes; None if the key does not belong to it."""
        for canon, prefix in self.prefixes:
            if key.startswith(prefix):
                return canon + key[len(prefix):]
        return None

    def from_canonical(self, key: str) -> str:
        """Add this layout's prefixes to a canonical key."""
        for canon, prefix in self.prefixes:
            if key.startswith(canon):
                return prefix + key[len(canon):]
        raise KeyError(key)

    def names(self, key: str) -> bool:
        """Whether this layout names a canonical key (a family published in formats with different key maps keeps
        each format's rules under its own canonical prefix, named by that format's layouts only)."""
        return any(key.startswith(canon) for canon, _ in self.prefixes)
