"""InternVL in Flax NNX: InternViT (class token, layer scale, optional QK-norm), pixel shuffle, a LayerNorm + MLP
projector and LLaVA's Llama / Qwen2 decoder (InternLM2 is loaded onto it).

The maths follows `transformers`' `InternVLForConditionalGeneration`. Images arrive as 448-px tiles (the
processor's dynamic tiling: up to max_patches tiles plus a thumbnail per image); each tile fills
`image_seq_length` <IMG_CONTEXT> placeholders, in order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mstar_jax.models import cache as C
from mstar_jax.models import layers as L
from mstar_jax.models.internvl.config import InternVLConfig, VisionConfig
from mstar_jax.models.llava.model import Decoder, positions_from_mask
from mstar_jax.sharding import constrain

Array = jax.Array


def _norm(cfg: VisionConfig, dim: int, dtype: Any):
    if cfg.norm_type == "rms_norm":
        return L.RMSNorm(dim, cfg.layer_norm_eps, dtype=dtype)
    return L.LayerNorm(dim, cfg.layer_norm_eps, dtype=dtype)


class VisionLayer(nnx.Module):
    """One InternViT block: x + l1 * attn(norm(x)), then + l2 * mlp(norm(x))."""

    def __init__(self, cfg: VisionConfig, *, dtype: Any):
        d = cfg.hidden_size
        self.layernorm_before = _norm(cfg, d, dtype)
        self.q_proj = L.Linear(d, d, ("vit_embed", "vit_heads"), bias=cfg.qkv_bias, dtype=dtype)
        self.k_proj = L.Linear(d, d, ("vit_embed", "vit_heads"), bias=cfg.qkv_bias, dtype=dtype)
        self.v_proj = L.Linear(d, d, ("vit_embed", "vit_heads"), bias=cfg.qkv_bias, dtype=dtype)
        if cfg.qk_norm:  # over the whole width, before the heads are split
            self.q_norm = L.RMSNorm(d, cfg.qk_norm_eps, dtype=dtype)
            self.k_norm = L.RMSNorm(d, cfg.qk_norm_eps, dtype=dtype)
        self.projection_layer = L.Linear(d, d, ("vit_heads", "vit_embed"), bias=True, dtype=dtype)
        self.lambda_1 = L.param((d,), ("norm",), dtype)
        self.layernorm_after = _norm(cfg, d, dtype)
        self.fc1 = L.Linear(d, cfg.intermediate_size, ("vit_embed", "vit_mlp"), bias=True, dtype=dtype)
        self.fc2 = L.Linear(cfg.intermediate_size, d, ("vit_mlp", "vit_embed"), bias=True, dtype=dtype)
        self.lambda_2 = L.param((d,), ("norm",), dtype)
        self.cfg = cfg

    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        b, t, d = x.shape
        hd = d // cfg.num_heads
        h = self.layernorm_before(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        heads = lambda a: a.reshape(b, t, cfg.num_heads, hd)  # noqa: E731
        out = L.dot_product_attention(heads(q), heads(k), heads(v), None, hd ** -0.5).reshape(b, t, d)
        x = x + self.lambda_1[...].astype(x.dtype) * self.projection_layer(out)
        h = self.fc2(L.activation(cfg.hidden_act)(self.fc1(self.layernorm_after(x))))
        return x + self.lambda_2[...].astype(x.dtype) * h


class VisionTower(nnx.Module):
    """InternViT: patch embedding, class token, absolute positions, the blocks (and transformers' final LayerNorm
    when the checkpoint has one)."""

    def __init__(self, cfg: VisionConfig, *, dtype: Any):
        d = cfg.hidden_size
        # Patch conv stored as a [C*p*p, D] matmul kernel: the same sum as torch's Conv2d with stride p.
        self.patch_embedding = L.Linear(cfg.num_channels * cfg.patch_size ** 2, d, (None, "vit_embed"), bias=True,
                                        dtype=dtype)
        self.cls_token = L.param((1, 1, d), (None, None, "vit_embed"), dtype)
        self.position_embedding = L.param((1, cfg.num_patches + 1, d), (None, None, "vit_embed"), dtype)
        self.layers = nnx.List([VisionLayer(cfg, dtype=dtype) for _ in range(cfg.num_layers)])
        if not cfg.use_mean_pooling:
            self.layernorm = L.LayerNorm(d, cfg.layer_norm_eps, dtype=dtype)
        self.cfg = cfg

    def __call__(self, pixel_values: Array) -> Array:
        """Last hidden states [N, 1 + patches, D] of tiles [N, C, H, W]."""
        cfg = self.cfg
        n, c, h, w = pixel_values.shape
        p = cfg.patch_size
        if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values of shape {pixel_values.shape} do not match the vision config "
                             f"({cfg.num_channels}x{cfg.image_size}x{cfg.image_size} tiles)")
        dtype = self.position_embedding.dtype
        x = pixel_values.astype(dtype).reshape(n, c, h // p, p, w // p, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)
        x = self.patch_embedding(x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"vit_layer_{i}"):
                x = layer(x)
        return x if cfg.use_mean_pooling else self.layernorm(x)


def pixel_shuffle(x: Array, r: int) -> Array:
    """transformers' (and the release's v2) pixel shuffle of [N, S, S, C] patch grids into [N, S/r, S/r, C*r*r]:
    r x r neighbours become one token, channels ordered as their views and permutes leave them."""
    n, s, _, c = x.shape
    x = x.reshape(n, s, s // r, c * r).transpose(0, 2, 1, 3)
    x = x.reshape(n, s // r, s // r, c * r * r).transpose(0, 2, 1, 3)
    return x


class Projector(nnx.Module):
    """LayerNorm -> linear -> act -> linear from shuffled vision features to the LM width (the release's mlp1)."""

    def __init__(self, din: int, dout: int, act: str, *, dtype: Any):
        self.layer_norm = L.LayerNorm(din, 1e-5, dtype=dtype)  # torch's nn.LayerNorm default eps, in both formats
        self.linear_1 = L.Linear(din, dout, ("vit_embed", "embed"), bias=True, dtype=dtype)
        self.linear_2 = L.Linear(dout, dout, ("embed", "embed_out"), bias=True, dtype=dtype)
        self.act = act

    def __call__(self, x: Array) -> Array:
        return self.linear_2(L.activation(self.act)(self.linear_1(self.layer_norm(x))))


class InternVLForConditionalGeneration(nnx.Module):
    """The whole VLM. `__call__` returns logits and the updated KV cache."""

    def __init__(self, cfg: InternVLConfig, *, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision, dtype=dtype)
        self.multi_modal_projector = Projector(cfg.vision.hidden_size * cfg.shuffle ** 2, cfg.text.hidden_size,
                                               cfg.projector_hidden_act, dtype=dtype)
        self.language_model = Decoder(cfg.text, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = L.Linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False,
                                    dtype=dtype)

    def image_features(self, pixel_values: Array) -> Array:
        """Projected features [tiles, image_seq_length, hidden] of tiles [tiles, C, H, W]."""
        with jax.named_scope("vision_tower"):
            h = self.vision_tower(pixel_values)[:, 1:]  # the class token is dropped
        n, _, d = h.shape
        g = self.cfg.vision.grid
        with jax.named_scope("projector"):
            x = pixel_shuffle(h.reshape(n, g, g, d), self.cfg.shuffle)
            return self.multi_modal_projector(x.reshape(n, -1, x.shape[-1]))

    def embed(self, input_ids: Array, features: Array | None, row_aligned: bool = False) -> Array:
        """Token embeddings with <IMG_CONTEXT> positions replaced by tile features in order (HF's masked_scatter).

        `features` [N, S, D] fill the placeholders of the whole batch in order, or with `row_aligned` [B, tiles,
        S, D] fill each row's placeholders from its own tiles (an SFT/PRM batch: tiles padded per row)."""
        table = self.language_model.embed_tokens[...]
        x = jnp.take(table, input_ids, axis=0)
        if features is None:
            return constrain(x, ("batch", "seq", "act_embed"))
        b, t, d = x.shape
        is_image = input_ids == self.cfg.image_token_id
        if row_aligned:
            per_row = features.shape[1] * features.shape[2]
            slot = jnp.arange(b)[:, None] * per_row + jnp.cumsum(is_image, axis=1) - 1
        else:
            slot = jnp.cumsum(is_image.reshape(-1)).reshape(b, t) - 1
        feats = features.reshape(-1, d).astype(x.dtype)
        slot = jnp.clip(slot, 0, feats.shape[0] - 1)
        x = jnp.where(is_image[..., None], feats[slot], x)
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
        """The one forward of prefill, decode and the training losses: (logits [B, T, V] fp32, or the final
        hidden states with `hidden_only`, or logits at the positions `logits_at` [B, S]; the updated cache).

        `images`: {"pixel_values": tiles [N, C, H, W]} filling the batch's placeholders in order (+ "index" [M]:
        which tiles' features fill the M tile slots, when rows share images), or [B, T, C, H, W] (each row's
        tiles, zero-padded to T: training batches). `kv_valid`: the attention mask of the keys; positions default
        to its running count. With a SharedPrefixCache the call decodes one token per row."""
        if isinstance(cache, C.SharedPrefixCache):
            positions = (cache.next_pos + cache.step)[:, None]
            x = self.embed(input_ids, None)
        else:
            if kv_valid is None:
                kv_valid = jnp.ones(input_ids.shape, jnp.int32)
            if positions is None:
                positions = positions_from_mask(kv_valid)
            feats, aligned = None, False
            px = None if images is None else images.get("pixel_values")
            if px is not None:
                aligned = px.ndim == 5
                feats = self.image_features(px.reshape(-1, *px.shape[-3:]))
                if aligned:
                    feats = feats.reshape(px.shape[0], px.shape[1], *feats.shape[1:])
                elif images.get("index") is not None:
                    feats = feats[images["index"]]
            x = self.embed(input_ids, feats, aligned)
        h, cache = self.hidden_states(x, positions, kv_valid, cache)
        if hidden_only:
            return h, cache
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
        return self.logits_from_hidden(h), cache

    @staticmethod
    def image_inputs(batch: dict) -> dict | None:
        """The `images` argument from a batch of this family's processor (or an SFT / PRM batch)."""
        px = batch.get("pixel_values")
        return None if px is None else {"pixel_values": px}

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> C.DenseCache:
        """A zeroed dense KV cache for `batch` sequences of up to `max_len` tokens."""
        t = self.cfg.text
        return C.dense_cache(t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim,
                             dtype or self.language_model.embed_tokens.dtype)
