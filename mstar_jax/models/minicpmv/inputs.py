"""MiniCPM-Llama3-V-2.5's input glue: the unit is a slice (a patch strip [3, p, n * p] with its grid [h, w] and the
span its prompt pads to), each filling query_num placeholders: the tokens between an `<image>` and its
`</image>`. An image is 1 to max_slice_nums + 1 slices.

Processor batches and the sampler hold slices on one axis ([S, ...], in placeholder order), strips zero-padded to
a bucketed length; training and scoring batches hold each row's slices on a leading row axis ([rows, slices, ...],
padded with empty slices of grid 0 x 0, which the model skips).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mstar_jax.errors import MstarError
from mstar_jax.models.inputs import FixedImages, Prompt


def image_mask(ids: np.ndarray, cfg) -> np.ndarray:
    """Placeholder positions of token ids [..., T]: strictly between an <image> and its </image>."""
    starts = ids == cfg.im_start_id
    depth = np.cumsum(starts, -1) - np.cumsum(ids == cfg.im_end_id, -1)
    return (depth > 0) & ~starts


def _pad(strips: list[np.ndarray], width: int) -> np.ndarray:
    """Strips [3, p, n * p] zero-padded (or cut) to `width` columns, stacked."""
    out = np.zeros((len(strips),) + strips[0].shape[:2] + (width,), np.float32)
    for i, s in enumerate(strips):
        out[i, ..., :min(width, s.shape[-1])] = s[..., :width]
    return out


def _strips(images: dict) -> list[np.ndarray]:
    """Each slice's strip cut to its own patches (what padding is added later is zeros again)."""
    p = images["pixel_values"].shape[-2]
    return [px[..., :int(h * w) * p] for px, (h, w) in zip(images["pixel_values"], images["tgt_sizes"])]


class SliceImages(FixedImages):
    """`FixedImages` with slices as the unit (see the module docstring)."""

    batch_keys = ("pixel_values", "tgt_sizes", "patch_span")
    shares_images = False  # the model has no "index" input: every row carries its own slices

    def example_images(self, enc: dict) -> dict:
        """The slices of one encoded example."""
        return {"pixel_values": np.asarray(enc["pixel_values"], np.float32),
                "tgt_sizes": np.asarray(enc["tgt_sizes"], np.int32),
                "patch_span": np.asarray(enc["patch_span"], np.int32)}

    def images_of(self, batch: dict) -> dict | None:
        """The slices of a processor batch (numpy), or None without images."""
        if batch.get("pixel_values") is None:
            return None
        missing = [k for k in ("tgt_sizes", "patch_span") if batch.get(k) is None]
        if missing:
            raise MstarError(f"the batch has pixel_values but no {', '.join(missing)} (the processor writes them)")
        return {"pixel_values": np.asarray(batch["pixel_values"], np.float32),
                "tgt_sizes": np.asarray(batch["tgt_sizes"], np.int32),
                "patch_span": np.asarray(batch["patch_span"], np.int32)}

    def tokens_per_image(self, cfg) -> int:
        """Placeholders per slice."""
        return int(cfg.query_num)

    def counts(self, ids: np.ndarray, cfg) -> np.ndarray:
        """Slices each row's placeholders stand for (MstarError when a row's count is fractional)."""
        per_row = image_mask(ids, cfg).sum(-1)
        if np.any(per_row % cfg.query_num):
            raise MstarError(f"rows hold {per_row.tolist()} image tokens, not a multiple of {cfg.query_num} per slice")
        return per_row // cfg.query_num

    def check(self, batch: dict, cfg) -> None:
        """Refuse a batch whose placeholders and slices disagree (naming both counts)."""
        ids = np.asarray(batch["input_ids"])
        n_tokens = int(image_mask(ids, cfg).sum())
        images = self.images_of(batch)
        slices = 0 if images is None else int((np.prod(images["tgt_sizes"].reshape(-1, 2), -1) > 0).sum())
        if n_tokens != slices * cfg.query_num:
            raise MstarError(f"image features and image tokens do not match: {n_tokens} image tokens (between <image> "
                             f"and </image>) in input_ids but {slices} slice(s) x {cfg.query_num} tokens")

    def split(self, batch: dict, cfg) -> list[Prompt]:
        """Per-prompt tokens and slices of a processor batch."""
        self.check(batch, cfg)
        ids = np.asarray(batch["input_ids"]).astype(np.int32)
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
        images = self.images_of(batch)
        out, start = [], 0
        for row, m, k in zip(ids, mask, self.counts(ids, cfg)):
            part = None if k == 0 else {key: v[start:start + k] for key, v in images.items()}
            out.append(Prompt(row[m], part))
            start += int(k)
        return out

    @staticmethod
    def _width(strips: list[np.ndarray], bucket: Callable) -> int:
        p = strips[0].shape[-2]
        return bucket(max(s.shape[-1] // p for s in strips), 1, 4) * p

    def stack(self, prompts: list[Prompt], bucket: Callable[[int], int]) -> dict | None:
        """One call's slices in order: strips zero-padded to a bucketed length, the count padded to a bucket with
        empty slices (grid 0 x 0)."""
        parts = [p.images for p in prompts if p.images is not None]
        if not parts:
            return None
        strips = [s for part in parts for s in _strips(part)]
        n = bucket(len(strips))
        tgt = np.zeros((n, 2), np.int32)
        span = np.zeros((n,), np.int32)
        tgt[:len(strips)] = np.concatenate([p["tgt_sizes"] for p in parts])
        span[:len(strips)] = np.concatenate([p["patch_span"] for p in parts])
        px = _pad(strips, self._width(strips, bucket))
        px = np.concatenate([px, np.zeros((n - len(strips),) + px.shape[1:], np.float32)])
        return {"pixel_values": px, "tgt_sizes": tgt, "patch_span": span}

    def batch_images(self, per_row: list[dict | None], where: str = "batch") -> dict | None:
        """[rows, slices, ...]: each row's slices, padded to a power-of-two count and a bucketed strip length."""
        from mstar_jax.sampler import bucket

        if all(r is None for r in per_row):
            return None
        counts = [0 if r is None else len(r["pixel_values"]) for r in per_row]
        if min(counts) == 0:
            raise MstarError(f"{where}: rows hold {counts} slices; a batch needs an image in every row")
        most = bucket(max(counts))
        strips = [_strips(r) for r in per_row]
        width = self._width([s for row in strips for s in row], bucket)
        p = per_row[0]["pixel_values"].shape[-2]
        px = np.zeros((len(per_row), most, 3, p, width), np.float32)
        tgt = np.zeros((len(per_row), most, 2), np.int32)
        span = np.zeros((len(per_row), most), np.int32)
        for i, (r, row) in enumerate(zip(per_row, strips)):
            px[i, :len(row)] = _pad(row, width)
            tgt[i, :len(row)] = r["tgt_sizes"]
            span[i, :len(row)] = r["patch_span"]
        return {"pixel_values": px, "tgt_sizes": tgt, "patch_span": span}
