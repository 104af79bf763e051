"""Input glue between a family's HF processor and its model's `images` argument.

A processor batch ({"input_ids", "attention_mask", "pixel_values", ...}, padded, several prompts) is split into
`Prompt`s (one prompt's real tokens and its own image arrays); the sampler regroups prompts by length and
`stack`s their images into the bucketed, padded arrays of one compiled call. `FixedImages` serves families
whose every image (or tile) is one fixed-size tensor with a fixed number of placeholder tokens (LLaVA,
InternVL); families with variable patch counts (Qwen2-VL) subclass it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from mstar_jax.errors import MstarError


class Prompt(NamedTuple):
    """One prompt: its real tokens [T] and its images as {name: array} (None when text-only)."""

    ids: np.ndarray
    images: dict | None


class FixedImages:
    """Images as `pixel_values` [N, C, H, W], each filling `tokens_per_image(cfg)` placeholder tokens in order."""

    # The batch keys that carry images (processor output, SFT / PRM batches, the model's `images` argument).
    batch_keys = ("pixel_values",)
    # The model takes images["index"]: rows that share an image reuse its features (the PRM scores n responses to
    # one image with one vision-tower pass).
    shares_images = True

    def example_images(self, enc: dict) -> dict:
        """The image arrays of one encoded example (a processor output for one prompt)."""
        return {"pixel_values": np.asarray(enc["pixel_values"], np.float32)}

    def batch_images(self, per_row: list[dict | None], where: str = "batch") -> dict | None:
        """The images of a training or scoring batch, with a leading row axis: one image per row here (an SFT
        step reshapes every batch array to [micro-steps, micro-batch, ...])."""
        if all(r is None for r in per_row):
            return None
        counts = [0 if r is None else len(r["pixel_values"]) for r in per_row]
        if any(c != 1 for c in counts):
            raise MstarError(f"{where}: rows hold {counts} images; a batch needs exactly one image per row")
        return {"pixel_values": np.concatenate([r["pixel_values"] for r in per_row], axis=0)}

    def image_token_id(self, cfg) -> int:
        """The placeholder token the processor expands per image."""
        return int(cfg.image_token_id)

    def tokens_per_image(self, cfg) -> int:
        """Placeholder tokens one pixel_values entry fills."""
        return int(cfg.image_seq_length)

    def images_of(self, batch: dict) -> dict | None:
        """The model's `images` argument from a processor batch (numpy)."""
        px = batch.get("pixel_values")
        return None if px is None else {"pixel_values": np.asarray(px, np.float32)}

    def counts(self, ids: np.ndarray, cfg) -> np.ndarray:
        """Image entries each row's placeholders stand for (MstarError when a row's count is fractional)."""
        per_row = (ids == self.image_token_id(cfg)).sum(-1)
        unit = self.tokens_per_image(cfg)
        if np.any(per_row % unit):
            raise MstarError(f"rows hold {per_row.tolist()} image tokens, not a multiple of {unit} per image")
        return per_row // unit

    def check(self, batch: dict, cfg) -> None:
        """Refuse a batch whose placeholders and image arrays disagree (naming both counts)."""
        ids = np.asarray(batch["input_ids"])
        n_tokens = int((ids == self.image_token_id(cfg)).sum())
        images = self.images_of(batch)
        if images is None:
            if n_tokens:
                raise MstarError(f"input_ids hold {n_tokens} image tokens but the batch has no pixel_values")
            return
        expected = images["pixel_values"].shape[0] * self.tokens_per_image(cfg)
        if n_tokens != expected:
            raise MstarError(f"image features and image tokens do not match: {n_tokens} image tokens in input_ids "
                             f"but {images['pixel_values'].shape[0]} image(s) x {self.tokens_per_image(cfg)}")

    def split(self, batch: dict, cfg) -> list[Prompt]:
        """Per-prompt tokens (padding removed) and images of a padded processor batch."""
        ids = np.asarray(batch["input_ids"]).astype(np.int32)
        if ids.ndim != 2:
            raise MstarError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
        images = self.images_of(batch)
        counts = self.counts(ids, cfg)
        n_images = 0 if images is None else images["pixel_values"].shape[0]
        if counts.sum() != n_images:
            raise MstarError(f"input_ids hold {int(counts.sum())} images' worth of image tokens but the batch has "
                             f"{n_images} pixel_values")
        out, start = [], 0
        for row, m, k in zip(ids, mask, counts):
            part = None if k == 0 else {"pixel_values": images["pixel_values"][start:start + k]}
            out.append(Prompt(row[m], part))
            start += k
        return out

    def stack(self, prompts: list[Prompt], bucket: Callable[[int], int]) -> dict | None:
        """One call's images: the prompts' pixel_values in order, padded with blank images to a bucketed count."""
        px = [p.images["pixel_values"] for p in prompts if p.images is not None]
        if not px:
            return None
        pixels = np.concatenate(px, axis=0)
        pad = bucket(pixels.shape[0]) - pixels.shape[0]
        return {"pixel_values": np.concatenate([pixels, np.zeros((pad,) + pixels.shape[1:], np.float32)])}

    def shardings(self, images: dict) -> dict[str, tuple]:
        """Logical axes of each image array (replicated: images are few next to the rows that read them)."""
        return {k: (None,) * np.ndim(v) for k, v in images.items()}

