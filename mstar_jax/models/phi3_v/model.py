"""Phi-3.5-vision in Flax NNX: CLIP tower -> HD transform with learnt separators -> 2-layer MLP -> Phi-3 decoder.

The maths follows the release's `Phi3ImageEmbedding` (image_embedding_phi3_v.py) and `Phi3VForCausalLM`. An image
arrives as the processor's crops [K, C, S, S] (crop 0 the global view, then h x w sub-image crops, zero-padded to
K) and its HD size [2]; every crop's penultimate CLIP patch features are merged 2x2 (g x g tokens of 4C), then laid
out as the release does: the sub-image rows (each followed by sub_GN), glb_GN, the global rows (each followed by
sub_GN), projected by the MLP. Placeholder tokens (`<|image|>`) take those features in order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mstar_jax.models import cache as C
from mstar_jax.models import layers as L
from mstar_jax.models.llava.model import Decoder, VisionTower, positions_from_mask, vision_layers_used
from mstar_jax.models.phi3_v.config import Phi3VConfig
from mstar_jax.sharding import constrain

Array = jax.Array


def max_image_tokens(cfg: Phi3VConfig, crops: int) -> int:
    """The most placeholder tokens an image of `crops` arrays (global + up to crops-1 sub-images) can fill: a
    column of crops-1 sub-images (each sub-image row adds a separator)."""
    return cfg.image_tokens(max(crops - 1, 1), 1)


def hd_layout(sizes: Array, cfg: Phi3VConfig, crops: int, length: int) -> tuple[Array, Array, Array]:
    """Where each of an image's `length` output tokens comes from: (source index into its [crops * g * g] merged
    crop tokens, kind 0 feature / 1 sub_GN / 2 glb_GN, tokens used) for HD sizes [N, 2] in pixels."""
    g = cfg.grid
    hc = sizes[:, 0:1] // cfg.crop_size  # [N, 1]
    wc = sizes[:, 1:2] // cfg.crop_size
    valid = (hc * wc) > 0
    j = jnp.arange(length)[None, :]
    row_len = wc * g + 1
    sub_len = hc * g * row_len
    # Sub-image part: row r of the (hc*g) x (wc*g) merged grid, column c (c == wc*g is the row's sub_GN).
    r, c = j // row_len, j % row_len
    crop = jnp.clip(1 + (r // g) * wc + jnp.minimum(c, wc * g - 1) // g, 0, crops - 1)
    sub_src = crop * g * g + (r % g) * g + jnp.minimum(c, wc * g - 1) % g
    # Global part after glb_GN: g rows of g tokens + sub_GN, from crop 0.
    k = j - sub_len - 1
    rg, cg = k // (g + 1), k % (g + 1)
    glb_src = jnp.clip(rg, 0, g - 1) * g + jnp.minimum(cg, g - 1)
    in_sub = j < sub_len
    src = jnp.where(in_sub, sub_src, glb_src)
    kind = jnp.where(in_sub, jnp.where(c == wc * g, 1, 0), jnp.where(j == sub_len, 2, jnp.where(cg == g, 1, 0)))
    used = jnp.where(valid[:, 0], (hc * wc + 1)[:, 0] * g * g + 1 + (hc[:, 0] + 1) * g, 0)
    return src, kind, used


class HDProjector(nnx.Module):
    """The release's separators (`sub_GN`, `glb_GN`) and `img_projection` (Linear -> GELU -> Linear)."""

    def __init__(self, merged: int, hidden: int, *, dtype: Any):
        self.sub_GN = L.param((merged,), ("vit_embed",), dtype)
        self.glb_GN = L.param((merged,), ("vit_embed",), dtype)
        self.linear_1 = L.Linear(merged, hidden, ("vit_embed", "embed"), bias=True, dtype=dtype)
        self.linear_2 = L.Linear(hidden, hidden, ("embed", "embed_out"), bias=True, dtype=dtype)

    def __call__(self, merged_nkd: Array, src: Array, kind: Array) -> Array:
        """Projected features [N, T, D] from merged crop tokens [N, K*g*g, 4C] and the layout (src, kind) [N, T]."""
        x = jnp.take_along_axis(merged_nkd, src[..., None], axis=1)
        sub = self.sub_GN[...].astype(x.dtype)
        glb = self.glb_GN[...].astype(x.dtype)
        x = jnp.where((kind == 1)[..., None], sub, jnp.where((kind == 2)[..., None], glb, x))
        # nn.GELU() in the release: the exact erf form.
        return self.linear_2(L.activation("gelu")(self.linear_1(x)))


class Phi3VForCausalLM(nnx.Module):
    """The whole VLM. `__call__` returns logits and the updated KV cache."""

    def __init__(self, cfg: Phi3VConfig, *, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision, vision_layers_used(cfg), dtype=dtype)
        self.multi_modal_projector = HDProjector(cfg.merged_dim, cfg.text.hidden_size, dtype=dtype)
        self.language_model = Decoder(cfg.text, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = L.Linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False,
                                    dtype=dtype)

    def merged_crops(self, pixel_values: Array) -> Array:
        """2x2-merged patch features [N, K*g*g, 4C] of crops [N, K, C, S, S] (penultimate layer, class token
        dropped: the release's `reshape_hd_patches_2x2merge` per crop)."""
        n, k = pixel_values.shape[:2]
        with jax.named_scope("vision_tower"):
            hidden = self.vision_tower(pixel_values.reshape(n * k, *pixel_values.shape[2:]))
        layer = self.cfg.vision_feature_layer
        feats = hidden[layer if layer >= 0 else self.cfg.vision.num_layers + 1 + layer][:, 1:]
        g, c = self.cfg.grid, feats.shape[-1]
        # [NK, 2g*2g, C] -> [NK, g, 2, g, 2, C] -> [NK, g, g, 2, 2, C]: each merged token holds its 2x2 patches.
        return feats.reshape(n * k, g, 2, g, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, k * g * g, 4 * c)

    def image_features(self, pixel_values: Array, image_sizes: Array) -> tuple[Array, Array]:
        """(features [N, T, hidden] of each image's placeholders in order, tokens used [N]) for crops
        [N, K, C, S, S] and HD sizes [N, 2] (an image of size 0 is padding and fills none)."""
        k = pixel_values.shape[1]
        merged = self.merged_crops(pixel_values)
        src, kind, used = hd_layout(image_sizes.astype(jnp.int32), self.cfg, k, max_image_tokens(self.cfg, k))
        with jax.named_scope("multi_modal_projector"):
            return self.multi_modal_projector(merged, src, kind), used

    def embed(self, input_ids: Array, feats: tuple[Array, Array] | None) -> Array:
        """Token embeddings with the s-th `<|image|>` placeholder (row-major over the batch) replaced by the s-th
        image token (images in order), as the release's index_put over the flattened positions."""
        x = jnp.take(self.language_model.embed_tokens[...], input_ids, axis=0)
        if feats is None:
            return constrain(x, ("batch", "seq", "act_embed"))
        values, used = feats
        b, t, d = x.shape
        is_image = (input_ids == self.cfg.image_token_id).reshape(-1)
        slot = jnp.cumsum(is_image) - 1
        ends = jnp.cumsum(used)
        image = jnp.clip(jnp.searchsorted(ends, slot, side="right"), 0, values.shape[0] - 1)
        token = jnp.clip(slot - (ends - used)[image], 0, values.shape[1] - 1)
        x = jnp.where(is_image[:, None], values[image, token].astype(x.dtype), x.reshape(-1, d)).reshape(b, t, d)
        return constrain(x, ("batch", "seq", "act_embed"))

    def token_embeddings(self) -> Array:
        """The input token-embedding table [vocab, hidden] (the PRM head starts at its mean row)."""
        return self.language_model.embed_tokens[...]

    def hidden_states(self, embeds, positions, kv_valid, cache=None):
        """Final-norm hidden states [B, T, D] of the decoder and the updated cache."""
        return self.language_model(embeds, positions, kv_valid, cache)

    def logits_from_hidden(self, h: Array) -> Array:
        """Vocabulary logits in fp32 from decoder hidden states."""
        head = None if self.cfg.tie_word_embeddings else self.lm_head.kernel[...]
        return L.vocab_logits(h, self.language_model.embed_tokens[...], head)

    def __call__(self, input_ids: Array, positions: Array | None = None, *, images: dict | None = None,
                 kv_valid: Array | None = None, cache: C.DenseCache | C.SharedPrefixCache | None = None,
                 logits_at: Array | None = None, hidden_only: bool = False):
        """Prefill, decode and the training losses, as `LlavaForConditionalGeneration.__call__`; `images`:
        {"pixel_values": [N, K, C, S, S], "image_sizes": [N, 2]} (a training batch's [rows, ...] alike: one
        image per row)."""
        if isinstance(cache, C.SharedPrefixCache):
            positions = (cache.next_pos + cache.step)[:, None]
            x = self.embed(input_ids, None)
        else:
            if kv_valid is None:
                kv_valid = jnp.ones(input_ids.shape, jnp.int32)
            if positions is None:
                positions = positions_from_mask(kv_valid)
            feats = None
            if images is not None and images.get("pixel_values") is not None:
                feats = self.image_features(images["pixel_values"], images["image_sizes"])
            x = self.embed(input_ids, feats)
        h, cache = self.hidden_states(x, positions, kv_valid, cache)
        if hidden_only:
            return h, cache
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
        return self.logits_from_hidden(h), cache

    @staticmethod
    def image_inputs(batch: dict) -> dict | None:
        """The `images` argument from a processor or SFT batch."""
        px = batch.get("pixel_values")
        return None if px is None else {"pixel_values": px, "image_sizes": batch["image_sizes"]}

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> C.DenseCache:
        """A zeroed dense KV cache for `batch` sequences of up to `max_len` tokens."""
        t = self.cfg.text
        return C.dense_cache(t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim,
                             dtype or self.language_model.embed_tokens.dtype)
