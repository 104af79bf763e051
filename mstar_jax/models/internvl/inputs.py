"""InternVL's input glue: each 448-px tile is one fixed-size pixel_values entry filling `image_seq_length`
<IMG_CONTEXT> placeholders, and an image is however many tiles the processor cut (1..max_patches, + thumbnail).

Processor batches and the sampler use `FixedImages` as it is (tiles in placeholder order, counted per row).
Training and scoring batches hold a row's tiles on a leading row axis: [rows, tiles, C, H, W], zero-padded to a
power-of-two tile count (few compiled shapes); the model fills each row's placeholders from its own tiles.
"""

from __future__ import annotations

import numpy as np

from mstar_jax.errors import MstarError
from mstar_jax.models.inputs import FixedImages


class TileImages(FixedImages):
    """`FixedImages` with tiles as the unit (see the module docstring)."""

    def batch_images(self, per_row: list[dict | None], where: str = "batch") -> dict | None:
        """{"pixel_values": [rows, T, C, H, W]}: each row's tiles, zero-padded to T (a power of two)."""
        if all(r is None for r in per_row):
            return None
        counts = [0 if r is None else len(r["pixel_values"]) for r in per_row]
        if min(counts) == 0:
            raise MstarError(f"{where}: rows hold {counts} tiles; a batch needs an image in every row")
        most = 1 << (max(counts) - 1).bit_length()
        first = per_row[0]["pixel_values"]
        out = np.zeros((len(per_row), most) + first.shape[1:], np.float32)
        for i, r in enumerate(per_row):
            out[i, :counts[i]] = r["pixel_values"]
        return {"pixel_values": out}

    def check(self, batch: dict, cfg) -> None:
        """Refuse a batch whose <IMG_CONTEXT> placeholders and tiles disagree (naming both counts)."""
        ids = np.asarray(batch["input_ids"])
        per_row = (ids == self.image_token_id(cfg)).sum(-1)
        unit = self.tokens_per_image(cfg)
        images = self.images_of(batch)
        tiles = 0 if images is None else images["pixel_values"].shape[0]
        if np.any(per_row % unit) or int(per_row.sum()) != tiles * unit:
            raise MstarError(f"InternVL tiles and image placeholders do not match: rows hold {per_row.tolist()} "
                             f"image tokens (<IMG_CONTEXT>, id {self.image_token_id(cfg)}) but pixel_values has "
                             f"{tiles} tile(s) x {unit} tokens per tile = {tiles * unit}")

    def split(self, batch: dict, cfg) -> list:
        """Per-prompt tokens and tiles of a processor batch (after `check`, so a mismatch names tiles)."""
        self.check(batch, cfg)
        return super().split(batch, cfg)
