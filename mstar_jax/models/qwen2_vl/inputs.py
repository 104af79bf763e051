"""Qwen-VL input glue: the processor's flat patches + image_grid_thw <-> padded per-image arrays the model takes.

The processor emits `pixel_values` [total patches, patch_dim] (every image's patches one after the other) and
`image_grid_thw` [N, 3]. A jitted call needs fixed shapes, so images are padded: each to a bucketed patch count
P (2^e x {1, 1.25, 1.5, 1.75}, a multiple of merge^2) and their number to a power of two, padding images having
an all-zero grid. A run therefore compiles a handful of image shapes however many sizes its images come in.
Training and scoring batches carry a leading row axis: [rows, images per row, P, patch_dim] and [rows, K, 3].
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mstar_jax.errors import MstarError
from mstar_jax.models.inputs import FixedImages, Prompt


def patch_bucket(patches: int, unit: int = 4, minimum: int = 16) -> int:
    """Smallest 2^e x {1, 1.25, 1.5, 1.75} >= patches (at least `minimum`), rounded up to a multiple of `unit`
    (the 2x2 merge block of every Qwen-VL checkpoint; the config refuses other merge sizes)."""
    x = max(int(patches), minimum, 1)
    e = int(np.floor(np.log2(x)))
    step = max(1, (1 << e) // 4)
    size = -(-x // step) * step
    return -(-size // unit) * unit


def repeat_rows(batch: dict, n: int) -> dict:
    """A processor batch with every row repeated n times in place (row r -> rows r*n .. r*n+n-1), its images too:
    what `transformers` generate needs to decode n greedy rows per prompt (images follow the rows' image tokens,
    marked by the processor's mm_token_type_ids)."""
    ids = np.asarray(batch["input_ids"])
    out = {k: np.repeat(np.asarray(v), n, axis=0) for k, v in batch.items()
           if k not in ("pixel_values", "image_grid_thw") and np.ndim(v) >= 1 and np.shape(v)[0] == ids.shape[0]}
    if batch.get("image_grid_thw") is None:
        return out
    if batch.get("mm_token_type_ids") is None:
        raise MstarError("repeat_rows needs the processor's mm_token_type_ids to find each row's image tokens")
    grid, px = np.asarray(batch["image_grid_thw"]), np.asarray(batch["pixel_values"])
    per_row = (np.asarray(batch["mm_token_type_ids"]) == 1).sum(-1)
    patches = np.prod(grid, axis=1)
    tokens = patches * int(per_row.sum()) // int(patches.sum())  # patches / merge^2
    starts = np.concatenate([[0], np.cumsum(patches)])
    j, grids, pixels = 0, [], []
    for need in per_row:
        first, got = j, 0
        while got < need:
            got += tokens[j]
            j += 1
        grids += [grid[first:j]] * n
        pixels += [px[starts[first]:starts[j]]] * n
    out["image_grid_thw"], out["pixel_values"] = np.concatenate(grids), np.concatenate(pixels)
    return out


class PatchImages(FixedImages):
    """Images as flattened patches + `image_grid_thw` (see the module docstring)."""

    batch_keys = ("pixel_values", "image_grid_thw")
    # Rows carry their own padded images (no "index" into shared features).
    shares_images = False

    def tokens_per_image(self, cfg) -> int:
        """Not fixed for this family: an image's tokens follow from its grid."""
        raise MstarError("Qwen-VL images have no fixed token count; it follows from each image's grid")

    # ---------------------------------------------------------------------------------------- checks

    def _grid(self, grid, cfg, where: str) -> np.ndarray:
        """The grids [N, 3] as int64, checked: whole merge blocks, at least one frame, within max_pixels."""
        grid = np.asarray(grid, np.int64).reshape(-1, 3)
        v = cfg.vision
        for i, (t, h, w) in enumerate(grid.tolist()):
            if t < 1 or h < 1 or w < 1 or h % v.spatial_merge_size or w % v.spatial_merge_size:
                raise MstarError(f"{where}: image {i} has grid (t, h, w) = ({t}, {h}, {w}); each must be >= 1 and h, w "
                                 f"multiples of the merge size {v.spatial_merge_size}")
            pixels = h * w * v.patch_size ** 2
            if pixels > cfg.max_pixels:
                raise MstarError(
                    f"{where}: image {i} is {h * v.patch_size}x{w * v.patch_size} px after resizing ({pixels} "
                    f"pixels, {h * w} patches), more than max_pixels={cfg.max_pixels} of this checkpoint's image "
                    "processor (preprocessor_config.json); resize the image (an extreme aspect ratio cannot be "
                    "shrunk under the limit) or raise max_pixels there")
        return grid

    def _tokens(self, grid: np.ndarray, cfg) -> np.ndarray:
        return np.prod(grid, axis=1) // cfg.vision.merge_unit

    def _flat(self, batch: dict, cfg, where: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(pixel_values [total, patch_dim] float32, grid [N, 3]) of a processor batch, checked; None: no images."""
        if batch.get("pixel_values_videos") is not None or batch.get("video_grid_thw") is not None:
            raise MstarError(f"{where}: videos are not supported (pixel_values_videos / video_grid_thw)")
        px = batch.get("pixel_values")
        if px is None:
            return None
        if batch.get("image_grid_thw") is None:
            raise MstarError(f"{where}: pixel_values without image_grid_thw; pass the Qwen-VL processor's output")
        grid = self._grid(batch["image_grid_thw"], cfg, where)
        px = np.asarray(px, np.float32)
        if px.ndim != 2 or px.shape[1] != cfg.vision.patch_dim:
            raise MstarError(f"{where}: pixel_values of shape {px.shape}; expected [patches, "
                             f"{cfg.vision.patch_dim}] flattened patches")
        if px.shape[0] != int(np.prod(grid, axis=1).sum()):
            raise MstarError(f"{where}: pixel_values hold {px.shape[0]} patches but image_grid_thw describes "
                             f"{int(np.prod(grid, axis=1).sum())}")
        return px, grid

    def _per_image(self, px: np.ndarray, grid: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        ends = np.cumsum(np.prod(grid, axis=1))
        return [(px[e - int(np.prod(g)):e], g) for e, g in zip(ends, grid)]

    def _pad(self, images: list[tuple[np.ndarray, np.ndarray]], slots: int) -> tuple[np.ndarray, np.ndarray]:
        """[slots, P, patch_dim] patches and [slots, 3] grids, P bucketed; unused slots are zero (padding images)."""
        p = patch_bucket(max(len(x) for x, _ in images))
        out = np.zeros((slots, p, images[0][0].shape[1]), np.float32)
        grid = np.zeros((slots, 3), np.int32)
        for i, (x, g) in enumerate(images):
            out[i, :len(x)] = x
            grid[i] = g
        return out, grid

    # ------------------------------------------------------------------------------- the protocol

    def example_images(self, enc: dict) -> dict:
        """One encoded example's images as the processor gave them (flat patches + grids; padded per batch)."""
        return {"pixel_values": np.asarray(enc["pixel_values"], np.float32),
                "image_grid_thw": np.asarray(enc["image_grid_thw"], np.int64).reshape(-1, 3)}

    def batch_images(self, per_row: list[dict | None], where: str = "batch") -> dict | None:
        """[rows, K, P, patch_dim] patches and [rows, K, 3] grids (K: most images of a row; fewer or none are
        padded with zero grids), P bucketed over the batch's largest image."""
        if all(r is None for r in per_row):
            return None
        rows = []
        for r in per_row:
            if r is None:
                rows.append([])
                continue
            grid = np.asarray(r["image_grid_thw"], np.int64).reshape(-1, 3)
            px = np.asarray(r["pixel_values"], np.float32)
            if px.shape[0] != int(np.prod(grid, axis=1).sum()):
                raise MstarError(f"{where}: a row's pixel_values hold {px.shape[0]} patches but its image_grid_thw "
                                 f"describes {int(np.prod(grid, axis=1).sum())}")
            rows.append(self._per_image(px, grid))
        k = max(len(r) for r in rows)
        every = [im for r in rows for im in r]
        p = patch_bucket(max(len(x) for x, _ in every))
        px = np.zeros((len(rows), k, p, every[0][0].shape[1]), np.float32)
        grid = np.zeros((len(rows), k, 3), np.int32)
        for i, r in enumerate(rows):
            for j, (x, g) in enumerate(r):
                px[i, j, :len(x)] = x
                grid[i, j] = g
        return {"pixel_values": px, "image_grid_thw": grid}

    def images_of(self, batch: dict) -> dict | None:
        """The model's `images` argument from a processor batch: padded [N, P, patch_dim] + grids [N, 3]."""
        px = batch.get("pixel_values")
        if px is None:
            return None
        px, grid = np.asarray(px, np.float32), np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
        if px.ndim >= 3:  # already padded (our own batch form)
            return {"pixel_values": px, "image_grid_thw": grid.astype(np.int32)}
        padded, g = self._pad(self._per_image(px, grid), len(grid))
        return {"pixel_values": padded, "image_grid_thw": g}

    def check(self, batch: dict, cfg) -> None:
        """Refuse a batch whose placeholders, grids and patches disagree, or an image over max_pixels."""
        ids = np.asarray(batch["input_ids"])
        n_tokens = int((ids == cfg.image_token_id).sum())
        if batch.get("pixel_values") is None:
            if n_tokens:
                raise MstarError(f"input_ids hold {n_tokens} image tokens but the batch has no pixel_values")
            return
        if np.ndim(batch["pixel_values"]) == 2:
            grid = self._flat(batch, cfg, "batch")[1]
        else:  # our padded form: padding images have zero grids
            grid = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
            grid = self._grid(grid[np.prod(grid, axis=1) > 0], cfg, "batch")
        expected = int(self._tokens(grid, cfg).sum())
        if n_tokens != expected:
            raise MstarError(f"image features and image tokens do not match: {n_tokens} image tokens in input_ids "
                             f"but image_grid_thw gives {expected} ({len(grid)} image(s))")

    def split(self, batch: dict, cfg) -> list[Prompt]:
        """Per-prompt tokens (padding removed) and images (flat patches + grids) of a padded processor batch."""
        ids = np.asarray(batch["input_ids"]).astype(np.int32)
        if ids.ndim != 2:
            raise MstarError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
        flat = self._flat(batch, cfg, "batch")
        need = ((ids == cfg.image_token_id) & mask).sum(-1)
        if flat is None:
            if need.sum():
                raise MstarError(f"input_ids hold {int(need.sum())} image tokens but the batch has no pixel_values")
            return [Prompt(row[m], None) for row, m in zip(ids, mask)]
        images = self._per_image(*flat)
        tokens = self._tokens(flat[1], cfg)
        if int(tokens.sum()) != int(need.sum()):
            raise MstarError(f"image features and image tokens do not match: {int(need.sum())} image tokens in "
                             f"input_ids but image_grid_thw gives {int(tokens.sum())}")
        out, j = [], 0
        for r, (row, m, k) in enumerate(zip(ids, mask, need)):
            first, got = j, 0
            while got < k:
                got += int(tokens[j])
                j += 1
            if got != k:
                raise MstarError(f"row {r}: {int(k)} image tokens do not end on an image boundary (images of "
                                 f"{tokens.tolist()} tokens)")
            part = None if j == first else {
                "pixel_values": np.concatenate([x for x, _ in images[first:j]]),
                "image_grid_thw": np.stack([g for _, g in images[first:j]])}
            out.append(Prompt(row[m], part))
        return out

    def stack(self, prompts: list[Prompt], bucket: Callable[[int], int]) -> dict | None:
        """One call's images: every prompt's images in order, padded to a bucketed patch count and image count."""
        images = []
        for p in prompts:
            if p.images is not None:
                images += self._per_image(np.asarray(p.images["pixel_values"], np.float32),
                                          np.asarray(p.images["image_grid_thw"]).reshape(-1, 3))
        if not images:
            return None
        px, grid = self._pad(images, bucket(len(images)))
        return {"pixel_values": px, "image_grid_thw": grid}
