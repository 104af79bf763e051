"""Phi-3.5-vision's input glue: an image is its crops [num_crops + 1, 3, S, S] plus its HD size [2], and fills a
number of `<|image|>` placeholders that depends on that size (`Phi3VConfig.image_tokens`).

Processor batches and the sampler hold images on one axis ([N, ...], in placeholder order); training and scoring
batches hold one image per row ([rows, ...]), which is the same layout row by row.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mstar_jax.errors import MstarError
from mstar_jax.models.inputs import FixedImages, Prompt


class HDImages(FixedImages):
    """`FixedImages` with per-image token counts from the HD sizes (see the module docstring)."""

    batch_keys = ("pixel_values", "image_sizes")
    shares_images = False  # the model has no "index" input: every row carries its own image

    def example_images(self, enc: dict) -> dict:
        """The crops and HD sizes of one encoded example."""
        return {"pixel_values": np.asarray(enc["pixel_values"], np.float32),
                "image_sizes": np.asarray(enc["image_sizes"], np.int32)}

    def batch_images(self, per_row: list[dict | None], where: str = "batch") -> dict | None:
        """Exactly one image per row, stacked on the row axis."""
        if all(r is None for r in per_row):
            return None
        counts = [0 if r is None else len(r["pixel_values"]) for r in per_row]
        if any(c != 1 for c in counts):
            raise MstarError(f"{where}: rows hold {counts} images; a batch needs exactly one image per row")
        return {k: np.concatenate([r[k] for r in per_row], axis=0) for k in self.batch_keys}

    def images_of(self, batch: dict) -> dict | None:
        """{"pixel_values", "image_sizes"} of a processor batch (numpy), or None without images."""
        px = batch.get("pixel_values")
        if px is None:
            return None
        if batch.get("image_sizes") is None:
            raise MstarError("the batch has pixel_values but no image_sizes (the processor writes both)")
        return {"pixel_values": np.asarray(px, np.float32), "image_sizes": np.asarray(batch["image_sizes"], np.int32)}

    def tokens_per_image(self, cfg) -> int:
        """No fixed count: see `image_tokens`."""
        raise MstarError("Phi-3.5-vision images fill a number of placeholders that depends on their size")

    @staticmethod
    def image_tokens(sizes: np.ndarray, cfg) -> np.ndarray:
        """Placeholder tokens of each image [N] from its HD size [N, 2]."""
        s = cfg.crop_size
        return np.asarray([cfg.image_tokens(int(h) // s, int(w) // s) for h, w in np.asarray(sizes)], np.int64)

    def check(self, batch: dict, cfg) -> None:
        """Refuse a batch whose placeholders and images disagree (naming both counts)."""
        ids = np.asarray(batch["input_ids"])
        n_tokens = int((ids == self.image_token_id(cfg)).sum())
        images = self.images_of(batch)
        want = 0 if images is None else int(self.image_tokens(images["image_sizes"], cfg).sum())
        if n_tokens != want:
            n = 0 if images is None else len(images["pixel_values"])
            raise MstarError(f"image features and image tokens do not match: {n_tokens} image tokens (<|image|>, id "
                             f"{self.image_token_id(cfg)}) in input_ids but {n} image(s) of {want} tokens")

    def split(self, batch: dict, cfg) -> list[Prompt]:
        """Per-prompt tokens (padding removed) and images: each row takes the next images until its placeholders
        are filled."""
        self.check(batch, cfg)
        ids = np.asarray(batch["input_ids"]).astype(np.int32)
        if ids.ndim != 2:
            raise MstarError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
        images = self.images_of(batch)
        tokens = [] if images is None else self.image_tokens(images["image_sizes"], cfg).tolist()
        out, start = [], 0
        for i, (row, m) in enumerate(zip(ids, mask)):
            need, end = int((row == self.image_token_id(cfg)).sum()), start
            while need > 0 and end < len(tokens):
                need -= tokens[end]
                end += 1
            if need != 0:
                raise MstarError(f"row {i}: its image placeholders do not add up to whole images")
            part = None if end == start else {k: v[start:end] for k, v in images.items()}
            out.append(Prompt(row[m], part))
            start = end
        return out

    def stack(self, prompts: list[Prompt], bucket: Callable[[int], int]) -> dict | None:
        """One call's images in order, padded to a bucketed count with blank images of size 0 (they fill none)."""
        parts = [p.images for p in prompts if p.images is not None]
        if not parts:
            return None
        out = {k: np.concatenate([p[k] for p in parts], axis=0) for k in self.batch_keys}
        pad = bucket(len(out["pixel_values"])) - len(out["pixel_values"])
        return {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in out.items()}
