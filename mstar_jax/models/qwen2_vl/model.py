"""Qwen2-VL / Qwen2.5-VL in Flax NNX: native-resolution ViT with 2-D rotary embeddings, 2x2 patch merger, and a
Qwen2 decoder with M-RoPE. The maths follows `transformers`' `Qwen2VLForConditionalGeneration` and
`Qwen2_5_VLForConditionalGeneration`.

Images arrive padded: `pixel_values` [N, P, patch_dim] (each image's flattened patches in the processor's order,
zero-padded to a bucketed P) and `image_grid_thw` [N, 3] (an all-zero row is a padding image). Attention in the
ViT is masked per image and frame (and per window in Qwen2.5-VL's windowed layers), which is what
transformers' cu_seqlens / window reordering compute; masking leaves every patch's result unchanged, so no
reordering is needed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mstar_jax.models import cache as C
from mstar_jax.models import layers as L
from mstar_jax.models.qwen2_vl import rope as R
from mstar_jax.models.qwen2_vl.config import QwenVLConfig, TextConfig, VisionConfig
from mstar_jax.sharding import constrain

Array = jax.Array


def _rotate_fp32(x: Array, cos: Array, sin: Array) -> Array:
    """The ViT's rotary embedding, applied in fp32 as transformers does (x [N, P, H, D], cos/sin [N, P, D])."""
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class VisionAttention(nnx.Module):
    """Bidirectional attention with a fused qkv projection (rows: all q heads, then k, then v)."""

    def __init__(self, dim: int, heads: int, *, dtype: Any):
        self.qkv = L.Linear(dim, 3 * dim, ("vit_embed", "vit_heads"), bias=True, dtype=dtype)
        self.proj = L.Linear(dim, dim, ("vit_heads", "vit_embed"), bias=True, dtype=dtype)
        self.heads = heads

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        n, p, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(n, p, 3, self.heads, hd)
        q, k, v = _rotate_fp32(qkv[:, :, 0], cos, sin), _rotate_fp32(qkv[:, :, 1], cos, sin), qkv[:, :, 2]
        return self.proj(L.dot_product_attention(q, k, v, mask, hd ** -0.5).reshape(n, p, d))


class VisionMLP(nnx.Module):
    """Qwen2-VL's fc1 -> act -> fc2."""

    def __init__(self, dim: int, inner: int, act: str, *, dtype: Any):
        self.fc1 = L.Linear(dim, inner, ("vit_embed", "vit_mlp"), bias=True, dtype=dtype)
        self.fc2 = L.Linear(inner, dim, ("vit_mlp", "vit_embed"), bias=True, dtype=dtype)
        self.act = act

    def __call__(self, x: Array) -> Array:
        return self.fc2(L.activation(self.act)(self.fc1(x)))


class VisionBlock(nnx.Module):
    """Pre-norm ViT block: LayerNorm + MLP (Qwen2-VL) or RMSNorm + gated MLP with biases (Qwen2.5-VL)."""

    def __init__(self, cfg: VisionConfig, *, dtype: Any):
        d = cfg.hidden_size
        if cfg.variant == "qwen2_vl":
            self.norm1 = L.LayerNorm(d, 1e-6, dtype=dtype)
            self.norm2 = L.LayerNorm(d, 1e-6, dtype=dtype)
            self.mlp = VisionMLP(d, cfg.intermediate_size, cfg.hidden_act, dtype=dtype)
        else:
            self.norm1 = L.RMSNorm(d, 1e-6, dtype=dtype)
            self.norm2 = L.RMSNorm(d, 1e-6, dtype=dtype)
            self.mlp = L.GatedMLP(d, cfg.intermediate_size, cfg.hidden_act, bias=True, dtype=dtype)
        self.attn = VisionAttention(d, cfg.num_heads, dtype=dtype)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        with jax.named_scope("attention"):
            x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Norm each patch, concatenate each merge x merge block (consecutive in the processor's order), 2-layer MLP."""

    def __init__(self, cfg: VisionConfig, *, dtype: Any):
        d, wide = cfg.hidden_size, cfg.hidden_size * cfg.merge_unit
        norm = L.LayerNorm if cfg.variant == "qwen2_vl" else L.RMSNorm
        self.ln_q = norm(d, 1e-6, dtype=dtype)
        self.linear_1 = L.Linear(wide, wide, ("vit_mlp", "vit_embed"), bias=True, dtype=dtype)
        self.linear_2 = L.Linear(wide, cfg.out_hidden_size, ("vit_embed", "embed"), bias=True, dtype=dtype)
        self.unit = cfg.merge_unit

    def __call__(self, x: Array) -> Array:
        n, p, d = x.shape
        h = self.ln_q(x).reshape(n, p // self.unit, d * self.unit)
        return self.linear_2(L.activation("gelu")(self.linear_1(h)))


class VisionTransformer(nnx.Module):
    """The ViT over padded images: [N, P, patch_dim] patches + [N, 3] grids -> patch features [N, P, D_vit]."""

    def __init__(self, cfg: VisionConfig, *, dtype: Any):
        # The Conv3d patch embedding (kernel = stride = one patch, no bias) as a [patch_dim, D] matmul kernel.
        self.patch_embed = L.Linear(cfg.patch_dim, cfg.hidden_size, (None, "vit_embed"), bias=False, dtype=dtype)
        self.layers = nnx.List([VisionBlock(cfg, dtype=dtype) for _ in range(cfg.num_layers)])
        self.cfg = cfg

    def __call__(self, pixel_values: Array, grid_thw: Array) -> Array:
        cfg = self.cfg
        n, p, pd = pixel_values.shape
        if pd != cfg.patch_dim or p % cfg.merge_unit:
            raise ValueError(f"pixel_values of shape {pixel_values.shape} do not fit the vision config (patch_dim "
                             f"{cfg.patch_dim}, patches a multiple of {cfg.merge_unit})")
        layout = R.patch_layout(grid_thw, p, cfg.spatial_merge_size, cfg.window_units)
        cos, sin = R.vision_cos_sin(layout, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        full, windowed = R.attention_masks(layout)
        x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"vision_layer_{i}"):
                x = layer(x, cos, sin, windowed if cfg.windowed(i) else full)
        return x


class DecoderLayer(nnx.Module):
    """Qwen2's pre-norm block (q/k/v biases, no o bias, gated SiLU MLP)."""

    def __init__(self, cfg: TextConfig, window: int | None, *, dtype: Any):
        self.input_layernorm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = L.Attention(hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                                     head_dim=cfg.head_dim, qkv_bias=True, o_bias=False, window=window, dtype=dtype)
        self.post_attention_layernorm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = L.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype)

    def __call__(self, x, cos, sin, kv_valid, cache):
        with jax.named_scope("attention"):
            h, cache = self.self_attn(self.input_layernorm(x), cos, sin, kv_valid, cache)
        x = constrain(x + h, ("batch", "seq", "act_embed"))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "act_embed")), cache


class Decoder(nnx.Module):
    """Token embedding, decoder layers with M-RoPE, final norm (no LM head)."""

    def __init__(self, cfg: TextConfig, *, dtype: Any):
        self.embed_tokens = L.param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, cfg.windows[i] if cfg.windows else None, dtype=dtype)
                                for i in range(cfg.num_layers)])
        self.norm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.cfg = cfg

    def __call__(self, embeds, positions_3bt, kv_valid, cache):
        rope = L.rope_frequencies(self.cfg.rope_dict, self.cfg.head_dim, self.cfg.max_position_embeddings)
        cos, sin = R.mrope_cos_sin(rope, self.cfg.mrope_section, positions_3bt)
        views = C.layer_views(cache, len(self.layers))
        x, new_layers = embeds, []
        for i, (layer, view) in enumerate(zip(self.layers, views)):
            with jax.named_scope(f"layer_{i}"):
                x, c = layer(x, cos, sin, kv_valid, view)
            new_layers.append(c)
        return self.norm(x), C.advance(cache, new_layers, positions_3bt, embeds.shape[1])


class QwenVLForConditionalGeneration(nnx.Module):
    """The whole VLM. `__call__` returns logits (or hidden states) and the updated KV cache."""

    def __init__(self, cfg: QwenVLConfig, *, dtype: Any = jnp.float32):
        self.cfg = cfg
        # transformers keeps the merger inside `visual`; here it is the projector, so that freezing the vision tower
        # and the projector (train.freeze_vision*) means what it does for the other families.
        self.vision_tower = VisionTransformer(cfg.vision, dtype=dtype)
        self.multi_modal_projector = PatchMerger(cfg.vision, dtype=dtype)
        self.language_model = Decoder(cfg.text, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = L.Linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False,
                                    dtype=dtype)

    def embed(self, input_ids: Array, feats: Array | None, slots: R.ImageSlots | None) -> Array:
        """Token embeddings with each image token replaced by its image's merged feature, in order."""
        x = jnp.take(self.language_model.embed_tokens[...], input_ids, axis=0)
        if feats is not None:
            picked = feats[slots.image, jnp.clip(slots.token, 0, feats.shape[1] - 1)].astype(x.dtype)
            x = jnp.where(slots.is_image[..., None], picked, x)
        return constrain(x, ("batch", "seq", "act_embed"))

    def token_embeddings(self) -> Array:
        """The input token-embedding table [vocab, hidden] (the PRM head starts at its mean row)."""
        return self.language_model.embed_tokens[...]

    def logits_from_hidden(self, h: Array) -> Array:
        """Vocabulary logits in fp32 from decoder hidden states."""
        head = None if self.cfg.tie_word_embeddings else self.lm_head.kernel[...]
        return L.vocab_logits(h, self.language_model.embed_tokens[...], head)

    def __call__(self, input_ids: Array, positions: Array | None = None, *, images: dict | None = None,
                 kv_valid: Array | None = None, cache: C.DenseCache | C.SharedPrefixCache | None = None,
                 logits_at: Array | None = None, hidden_only: bool = False):
        """The one forward of prefill, decode and the training losses: (logits [B, T, V] fp32, or the final hidden
        states with `hidden_only`, or logits at the positions `logits_at` [B, S]; the updated cache).

        `images`: {"pixel_values": [..., P, patch_dim], "image_grid_thw": [..., 3]} (leading axes flattened in
        order: [N] or [rows, images per row]). `positions`: [3, B, T] (or [B, T], the same for all three); by
        default M-RoPE positions from the ids, the grids and `kv_valid`, computed here under jit. With a
        SharedPrefixCache the call decodes one token per row at the cache's next position."""
        cfg = self.cfg
        if isinstance(cache, C.SharedPrefixCache):
            pos = (cache.next_pos + cache.step)[:, None]
            positions = jnp.broadcast_to(pos[None], (3,) + pos.shape)  # text positions: three equal components
            x = self.embed(input_ids, None, None)
        else:
            t = input_ids.shape[1]
            if kv_valid is None:
                kv_valid = jnp.ones(input_ids.shape, jnp.int32)
            grid = feats = None
            if images is not None and images.get("pixel_values") is not None:
                px = images["pixel_values"]
                grid = images["image_grid_thw"].reshape(-1, 3).astype(jnp.int32)
                with jax.named_scope("vision"):
                    feats = self.vision_tower(px.reshape(-1, *px.shape[-2:]), grid)
                with jax.named_scope("merger"):
                    feats = self.multi_modal_projector(feats)
            if positions is None and kv_valid.shape[1] != t:
                raise ValueError("positions are needed when writing after the start of a dense cache")
            valid = kv_valid[:, :t]
            slots = R.image_slots(input_ids, valid, grid, cfg.image_token_id, cfg.vision.spatial_merge_size)
            if positions is None:
                positions = R.positions_from_slots(valid.astype(bool), slots)
            elif positions.ndim == 2:
                positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
            x = self.embed(input_ids, feats, slots)
        h, cache = self.language_model(x, positions, kv_valid, cache)
        if hidden_only:
            return h, cache
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
        return self.logits_from_hidden(h), cache

    @staticmethod
    def image_inputs(batch: dict) -> dict | None:
        """The `images` argument from a batch of this family's arrays (processor glue or an SFT / PRM batch)."""
        px = batch.get("pixel_values")
        return None if px is None else {"pixel_values": px, "image_grid_thw": batch["image_grid_thw"]}

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> C.DenseCache:
        """A zeroed dense KV cache for `batch` sequences of up to `max_len` tokens (3-D M-RoPE positions)."""
        t = self.cfg.text
        return C.dense_cache(t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim,
                             dtype or self.language_model.embed_tokens.dtype, positions_shape=(3, batch, max_len))
