"""MiniCPM-Llama3-V-2.5 in Flax NNX: Idefics2 tower over variable patch grids -> perceiver resampler -> Llama-3.

The maths follows the release (modeling_minicpmv.py `get_vllm_embedding`, resampler.py) and transformers'
Idefics2VisionTransformer, which the release calls. A slice arrives as the processor's [3, p, n * p] strip of its
n = h x w patches (row-major), zero-padded to the call's longest strip.

The release builds the tower's patch mask as `patch_attn_mask[i, :n] = True` on a [B, 1, L] tensor, which sets the
whole row: every slice attends to all L patches of its batch (padding included) and its position ids are those of
a 1 x L strip (bucketize(k / L) on the 70-wide grid). The weights were trained that way, so it is reproduced: each
slice carries `patch_span`, the L of the processor call it came from (the longest slice of its prompt), and
attends to / positions over exactly that span whatever padding a batch adds. The resampler then attends to the
slice's own n patches, whose keys carry the 2-D sin-cos embedding of (row, column) on the slice's h x w grid.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mstar_jax.models import cache as C
from mstar_jax.models import layers as L
from mstar_jax.models.llava.model import Decoder, positions_from_mask
from mstar_jax.models.minicpmv.config import MiniCPMVConfig
from mstar_jax.sharding import constrain

Array = jax.Array


class MaskedViTLayer(L.ViTLayer):
    """A SigLIP encoder layer whose attention skips padded keys (`key_ok` [B, T] bool)."""

    def __call__(self, x: Array, key_ok: Array) -> Array:
        b, t, d = x.shape
        hd = d // self.heads
        h = self.layer_norm1(x)
        q = self.q_proj(h).reshape(b, t, self.heads, hd)
        k = self.k_proj(h).reshape(b, t, self.heads, hd)
        v = self.v_proj(h).reshape(b, t, self.heads, hd)
        mask = jnp.broadcast_to(key_ok[:, None, None, :], (b, 1, t, t))
        x = x + self.out_proj(L.dot_product_attention(q, k, v, mask, hd ** -0.5).reshape(b, t, d))
        return x + self.fc2(L.activation(self.act)(self.fc1(self.layer_norm2(x))))


def strip_position_ids(span: Array, length: int, per_side: int) -> Array:
    """Position ids [S, L] of the release's 1 x span strips: bucketize(k / span) on a per_side grid (as
    Idefics2VisionEmbeddings computes them in float32), 0 past the span."""
    boundaries = jnp.asarray(np.arange(1 / per_side, 1.0, 1 / per_side).astype(np.float32))
    k = jnp.arange(length, dtype=jnp.float32)[None, :]
    step = jnp.float32(1.0) / jnp.maximum(span, 1).astype(jnp.float32)[:, None]
    frac = jnp.minimum(k * step, jnp.float32(1.0 - 1e-6))
    bucket = jnp.sum(frac[..., None] >= boundaries, axis=-1)
    return jnp.where(jnp.arange(length)[None, :] < span[:, None], bucket, 0)


class Idefics2Tower(nnx.Module):
    """Patch embedding, position table, SigLIP layers and the post-layernorm (transformers' names)."""

    def __init__(self, cfg, *, dtype: Any):
        v = cfg.vision
        self.patch_embedding = L.Linear(v.num_channels * v.patch_size ** 2, v.hidden_size, (None, "vit_embed"),
                                        bias=True, dtype=dtype)
        self.position_embedding = L.param((v.num_patches, v.hidden_size), (None, "vit_embed"), dtype)
        self.layers = nnx.List([MaskedViTLayer(v.hidden_size, v.intermediate_size, v.num_heads, v.hidden_act,
                                               v.layer_norm_eps, dtype=dtype) for _ in range(v.num_layers)])
        self.post_layernorm = L.LayerNorm(v.hidden_size, v.layer_norm_eps, dtype=dtype)
        self.cfg = cfg

    def __call__(self, pixel_values: Array, span: Array) -> Array:
        """Features [S, L, D] of strips [S, C, p, L*p] attending over their `span` [S] first patches."""
        s, c, p, width = pixel_values.shape
        n = width // p
        x = pixel_values.astype(self.position_embedding.dtype).reshape(s, c, p, n, p).transpose(0, 3, 1, 2, 4)
        x = self.patch_embedding(x.reshape(s, n, c * p * p))
        pos = strip_position_ids(span, n, self.cfg.positions_per_side)
        x = x + jnp.take(self.position_embedding[...], pos, axis=0).astype(x.dtype)
        key_ok = jnp.arange(n)[None, :] < jnp.maximum(span, 1)[:, None]
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x = layer(x, key_ok)
        return self.post_layernorm(x)


def sincos_2d(tgt: Array, length: int, dim: int) -> Array:
    """[S, L, dim] 2-D sin-cos embedding of patch k = (row k // w, column k % w) of each slice's h x w grid
    (tgt [S, 2] = (h, w)): [sin, cos](column * omega) then [sin, cos](row * omega), as the release's
    get_2d_sincos_pos_embed (version 2.5) for a w-first meshgrid."""
    quarter = dim // 4
    omega = np.arange(quarter, dtype=np.float32)
    omega /= np.float32(quarter)
    omega = (1.0 / np.float32(10000) ** omega).astype(np.float32)
    w = jnp.maximum(tgt[:, 1:2], 1)
    k = jnp.arange(length)[None, :]
    col, row = (k % w).astype(jnp.float32), (k // w).astype(jnp.float32)

    def emb(x):
        out = x[..., None] * jnp.asarray(omega)
        return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)

    return jnp.concatenate([emb(col), emb(row)], axis=-1)


class Resampler(nnx.Module):
    """The release's 2.5 Resampler: learnt queries cross-attend (one nn.MultiheadAttention) to the slice's
    patches, keys + 2-D sin-cos positions; ln_q / ln_kv / ln_post and the output matrix `proj`."""

    def __init__(self, cfg: MiniCPMVConfig, *, dtype: Any):
        d, dv = cfg.text.hidden_size, cfg.vision.hidden_size
        self.query = L.param((cfg.query_num, d), (None, "embed"), dtype)
        if dv != d:
            self.kv_proj = L.Linear(dv, d, ("vit_embed", "embed"), bias=False, dtype=dtype)
        self.q_proj = L.Linear(d, d, ("embed", "heads"), bias=True, dtype=dtype)
        self.k_proj = L.Linear(d, d, ("embed", "heads"), bias=True, dtype=dtype)
        self.v_proj = L.Linear(d, d, ("embed", "heads"), bias=True, dtype=dtype)
        self.out_proj = L.Linear(d, d, ("heads", "embed"), bias=True, dtype=dtype)
        self.ln_q = L.LayerNorm(d, 1e-6, dtype=dtype)
        self.ln_kv = L.LayerNorm(d, 1e-6, dtype=dtype)
        self.ln_post = L.LayerNorm(d, 1e-6, dtype=dtype)
        self.proj = L.param((d, d), ("embed", "embed_out"), dtype)
        self.heads, self.has_kv_proj = cfg.resampler_heads, dv != d

    def __call__(self, x: Array, tgt: Array) -> Array:
        """[S, Q, D] for tower features [S, L, Dv] of slices with patch grids tgt [S, 2]."""
        s, length, _ = x.shape
        kv = self.ln_kv(self.kv_proj(x) if self.has_kv_proj else x)
        d = kv.shape[-1]
        hd = d // self.heads
        pos = sincos_2d(tgt, length, d).astype(kv.dtype)
        q = self.q_proj(self.ln_q(self.query[...].astype(kv.dtype)))  # [Q, D]
        q = jnp.broadcast_to(q[None], (s,) + q.shape).reshape(s, -1, self.heads, hd)
        k = self.k_proj(kv + pos).reshape(s, length, self.heads, hd)
        v = self.v_proj(kv).reshape(s, length, self.heads, hd)
        n = tgt[:, 0] * tgt[:, 1]
        key_ok = jnp.arange(length)[None, :] < jnp.maximum(n, 1)[:, None]
        mask = jnp.broadcast_to(key_ok[:, None, None, :], (s, 1, q.shape[1], length))
        out = self.out_proj(L.dot_product_attention(q, k, v, mask, hd ** -0.5).reshape(s, -1, d))
        out = self.ln_post(out)
        return jnp.dot(out, self.proj[...].astype(out.dtype))


def image_mask(input_ids: Array, cfg: MiniCPMVConfig) -> Array:
    """Placeholder positions: every token strictly between an <image> and its </image> (the release's
    image_bound)."""
    starts = input_ids == cfg.im_start_id
    depth = jnp.cumsum(starts.astype(jnp.int32), -1) - jnp.cumsum((input_ids == cfg.im_end_id).astype(jnp.int32), -1)
    return (depth > 0) & ~starts


class MiniCPMV(nnx.Module):
    """The whole VLM. `__call__` returns logits and the updated KV cache."""

    def __init__(self, cfg: MiniCPMVConfig, *, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.vision_tower = Idefics2Tower(cfg, dtype=dtype)
        self.multi_modal_projector = Resampler(cfg, dtype=dtype)
        self.language_model = Decoder(cfg.text, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = L.Linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False,
                                    dtype=dtype)

    def image_features(self, images: dict) -> tuple[Array, Array]:
        """(resampled features [S, Q, hidden] of every slice, slice order [S]: the real slices (h * w > 0) first,
        in order) for {"pixel_values": [S, C, p, L*p], "tgt_sizes": [S, 2], "patch_span": [S]} (or the same
        with a leading row axis, [rows, slices, ...], whose padding slices have size 0)."""
        px, tgt, span = images["pixel_values"], images["tgt_sizes"], images["patch_span"]
        if px.ndim == 5:
            px, tgt, span = px.reshape(-1, *px.shape[2:]), tgt.reshape(-1, 2), span.reshape(-1)
        tgt, span = tgt.astype(jnp.int32), span.astype(jnp.int32)
        with jax.named_scope("vision_tower"):
            feats = self.vision_tower(px, span)
        with jax.named_scope("multi_modal_projector"):
            out = self.multi_modal_projector(feats, tgt)
        order = jnp.argsort((tgt[:, 0] * tgt[:, 1] == 0).astype(jnp.int32), stable=True)
        return out, order

    def embed(self, input_ids: Array, feats: tuple[Array, Array] | None) -> Array:
        """Token embeddings with the placeholders (row-major over the batch) replaced by the slices' query outputs
        in order: placeholder s takes token s % Q of the (s // Q)-th slice (the release's scatter by image_bound)."""
        x = jnp.take(self.language_model.embed_tokens[...], input_ids, axis=0)
        if feats is None:
            return constrain(x, ("batch", "seq", "act_embed"))
        values, order = feats
        b, t, d = x.shape
        q = values.shape[1]
        is_image = image_mask(input_ids, self.cfg).reshape(-1)
        slot = jnp.maximum(jnp.cumsum(is_image) - 1, 0)
        piece = order[jnp.clip(slot // q, 0, order.shape[0] - 1)]
        x = jnp.where(is_image[:, None], values[piece, slot % q].astype(x.dtype), x.reshape(-1, d)).reshape(b, t, d)
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
        """Prefill, decode and the training losses, as `LlavaForConditionalGeneration.__call__`; `images`: see
        `image_features`."""
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
                feats = self.image_features(images)
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
        return None if px is None else {"pixel_values": px, "tgt_sizes": batch["tgt_sizes"],
                                        "patch_span": batch["patch_span"]}

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> C.DenseCache:
        """A zeroed dense KV cache for `batch` sequences of up to `max_len` tokens."""
        t = self.cfg.text
        return C.dense_cache(t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim,
                             dtype or self.language_model.embed_tokens.dtype)
