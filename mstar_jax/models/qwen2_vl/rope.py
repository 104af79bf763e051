"""Qwen-VL positions, computed inside jit: the LM's 3-D M-RoPE positions and the ViT's 2-D rotary embedding.

M-RoPE (transformers' `get_rope_index`): a text token's three components are its running position; the tokens of
an image of llm grid (t, h, w) sit at start + (t_i, h_i, w_i), where start is the running position before the
image, and the running position then advances by max(h, w) rather than by the image's token count. Padding gets
0. Everything here is array maths over [B, T] (a cumsum and a searchsorted), so the positions of any batch --
left or right padding, text-only rows, several images of different sizes -- are computed on device under jit;
the existing JAX ports compute them on the host per request.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mstar_jax.models import layers as L

Array = jax.Array


class ImageSlots(NamedTuple):
    """Where each image token of a batch reads its feature: image `image` [B, T], merged token `token` [B, T]."""

    is_image: Array  # [B, T] bool (valid image tokens)
    image: Array  # [B, T] int32 index into the flattened image list
    token: Array  # [B, T] int32 index of the merged token within that image
    last: Array  # [B, T] bool: the image's last token
    grid_h: Array  # [B, T] int32 llm grid height (merged units) of the token's image
    grid_w: Array  # [B, T] int32 llm grid width


def image_slots(input_ids: Array, valid: Array, grid_thw: Array | None, image_token_id: int, merge: int) -> ImageSlots:
    """The image each placeholder token belongs to, in order: image tokens of the batch (row-major) are the
    images' merged tokens one after the other, as the processor expanded them (`grid_thw` [N, 3]; an all-zero row
    is a padding image with no tokens)."""
    b, t = input_ids.shape
    is_image = (input_ids == image_token_id) & valid.astype(bool)
    if grid_thw is None:
        zeros = jnp.zeros((b, t), jnp.int32)
        return ImageSlots(is_image & False, zeros, zeros, is_image & False, zeros + 1, zeros + 1)
    grid = grid_thw.astype(jnp.int32)
    gt, gh, gw = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge
    counts = gt * gh * gw  # [N] merged tokens per image
    ends = jnp.cumsum(counts)
    g = (jnp.cumsum(is_image.reshape(-1).astype(jnp.int32)) - 1).reshape(b, t)  # global image-token index
    image = jnp.clip(jnp.searchsorted(ends, g, side="right"), 0, grid.shape[0] - 1).astype(jnp.int32)
    token = g - (ends - counts)[image]
    last = is_image & (token == counts[image] - 1)
    return ImageSlots(is_image, image, token, last, jnp.maximum(gh[image], 1), jnp.maximum(gw[image], 1))


def mrope_positions(input_ids: Array, attention_mask: Array, grid_thw: Array | None, image_token_id: int,
                    merge: int) -> Array:
    """3-D positions [3, B, T] (temporal, height, width) of `get_rope_index`, for ids/mask [B, T] and the batch's
    image grids [N, 3] (None: text only)."""
    valid = attention_mask.astype(bool)
    s = image_slots(input_ids, valid, grid_thw, image_token_id, merge)
    return positions_from_slots(valid, s)


def positions_from_slots(valid: Array, s: ImageSlots) -> Array:
    """M-RoPE positions [3, B, T] from the validity mask and the image slots of a batch."""
    # A text token advances the running position by 1, an image by max(h, w) at its last token; the running
    # position before a token is the exclusive cumsum, which for every token of an image is the image's start.
    advance = jnp.where(valid & ~s.is_image, 1, 0) + jnp.where(s.last, jnp.maximum(s.grid_h, s.grid_w), 0)
    start = jnp.cumsum(advance, axis=-1) - advance
    per_frame = s.grid_h * s.grid_w
    t_off = jnp.where(s.is_image, s.token // per_frame, 0)
    h_off = jnp.where(s.is_image, (s.token // s.grid_w) % s.grid_h, 0)
    w_off = jnp.where(s.is_image, s.token % s.grid_w, 0)
    pos = jnp.stack([start + t_off, start + h_off, start + w_off])
    return jnp.where(valid[None], pos, 0).astype(jnp.int32)


def mrope_cos_sin(rope: L.Rope, section: tuple[int, ...], positions_3bt: Array) -> tuple[Array, Array]:
    """cos/sin [B, T, head_dim] for 3-D positions: frequency band i of `mrope_section` rotates by component
    i % 3 (temporal, height, width), the bands laid out as in transformers' recomposition."""
    inv = jnp.asarray(rope.inv_freq)
    freqs = positions_3bt.astype(jnp.float32)[..., None] * inv  # [3, B, T, head_dim/2]
    bounds = np.cumsum((0,) + tuple(section))
    picked = jnp.concatenate([freqs[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(len(section))], axis=-1)
    emb = jnp.concatenate([picked, picked], axis=-1)
    return jnp.cos(emb) * rope.attention_factor, jnp.sin(emb) * rope.attention_factor


# --------------------------------------------------------------------------------------------- vision


class PatchLayout(NamedTuple):
    """Per-patch facts of a padded image batch [N, P]: validity, frame, 2-D position and window."""

    valid: Array  # [N, P] bool
    frame: Array  # [N, P] int32
    h: Array  # [N, P] int32 patch row
    w: Array  # [N, P] int32 patch column
    window: Array  # [N, P] int32 window id within the image (0 without window attention)


def patch_layout(grid_thw: Array, num_patches: int, merge: int, window_units: int) -> PatchLayout:
    """Where each of `num_patches` padded patch slots of every image sits. The processor emits patches frame by
    frame, each frame in merge x merge blocks (row-major over blocks, then within a block), so slot k decodes
    arithmetically; images with a zero grid are padding."""
    grid = grid_thw.astype(jnp.int32)
    t, h, w = grid[:, 0:1], grid[:, 1:2], grid[:, 2:3]
    k = jnp.arange(num_patches, dtype=jnp.int32)[None, :]
    per_frame = jnp.maximum(h * w, 1)
    valid = k < t * h * w
    frame, kk = k // per_frame, k % per_frame
    unit, inner = kk // (merge * merge), kk % (merge * merge)
    units_w = jnp.maximum(w // merge, 1)
    bh, bw = unit // units_w, unit % units_w
    ph, pw = bh * merge + inner // merge, bw * merge + inner % merge
    if window_units:
        wins_w = -(-units_w // window_units)
        window = (bh // window_units) * wins_w + bw // window_units
    else:
        window = jnp.zeros_like(k)
    return PatchLayout(valid, frame, ph, pw, jnp.broadcast_to(window, valid.shape))


def vision_cos_sin(layout: PatchLayout, head_dim: int, theta: float) -> tuple[Array, Array]:
    """2-D rotary cos/sin [N, P, head_dim] (fp32): the first half of the rotated features turn with the patch
    row, the second with the column, both at the frequencies of a head_dim/2 rope."""
    dim = head_dim // 2
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    fh = layout.h.astype(jnp.float32)[..., None] * inv
    fw = layout.w.astype(jnp.float32)[..., None] * inv
    f = jnp.concatenate([fh, fw], axis=-1)
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def attention_masks(layout: PatchLayout) -> tuple[Array, Array]:
    """(full, windowed) masks [N, 1, P, P]: a patch sees the valid patches of its own frame (and window)."""
    same = layout.valid[:, :, None] & layout.valid[:, None, :] & (layout.frame[:, :, None] == layout.frame[:, None, :])
    # Padding slots see themselves, so their (unused) rows stay finite.
    eye = jnp.eye(layout.valid.shape[1], dtype=bool)[None]
    full = same | eye
    windowed = (same & (layout.window[:, :, None] == layout.window[:, None, :])) | eye
    return full[:, None], windowed[:, None]
