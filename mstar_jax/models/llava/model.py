"""The LLaVA-family VLM in Flax NNX: CLIP/SigLIP tower, 2-layer MLP projector, Llama/Qwen2/Phi-3 decoder.

The maths follows `transformers`' `LlavaForConditionalGeneration` and its sub-models. The tower only holds
the layers the selected feature layer needs; later layers (and CLIP's post-layernorm, SigLIP's pooling
head) are not used by LLaVA and are carried beside the model for the export.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mstar_jax.models import cache as C
from mstar_jax.models import layers as L
from mstar_jax.models.llava.config import LlavaConfig, TextConfig, VisionConfig
from mstar_jax.sharding import constrain

Array = jax.Array


def vision_layers_used(cfg: LlavaConfig) -> int:
    """How many ViT layers produce the selected hidden states (hidden_states[0] is the embedding)."""
    n = cfg.vision.num_layers
    return max((i if i >= 0 else n + 1 + i) for i in cfg.feature_layers)


class VisionTower(nnx.Module):
    """CLIP or SigLIP ViT returning every hidden state up to the last one LLaVA reads."""

    def __init__(self, cfg: VisionConfig, num_layers: int, *, dtype: Any):
        patch_dim = cfg.num_channels * cfg.patch_size ** 2
        # Patch conv stored as a [C*p*p, D] matmul kernel: the same sum as torch's Conv2d with stride p.
        self.patch_embedding = L.Linear(patch_dim, cfg.hidden_size, (None, "vit_embed"),
                                        bias=cfg.family == "siglip", dtype=dtype)
        positions = cfg.num_patches + (1 if cfg.has_class_token else 0)
        self.position_embedding = L.param((positions, cfg.hidden_size), (None, "vit_embed"), dtype)
        if cfg.has_class_token:
            self.class_embedding = L.param((cfg.hidden_size,), ("vit_embed",), dtype)
            self.pre_layrnorm = L.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.layers = nnx.List([
            L.ViTLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.hidden_act,
                       cfg.layer_norm_eps, dtype=dtype)
            for _ in range(num_layers)
        ])
        self.cfg = cfg

    def __call__(self, pixel_values: Array) -> list[Array]:
        cfg = self.cfg
        n, c, h, w = pixel_values.shape
        p = cfg.patch_size
        if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values of shape {pixel_values.shape} do not match the vision config "
                             f"({cfg.num_channels}x{cfg.image_size}x{cfg.image_size})")
        dtype = self.position_embedding.dtype
        x = pixel_values.astype(dtype).reshape(n, c, h // p, p, w // p, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)
        x = self.patch_embedding(x)
        if cfg.has_class_token:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embedding[...].astype(x.dtype)[None]
        if cfg.has_class_token:
            x = self.pre_layrnorm(x)
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return hidden


class Projector(nnx.Module):
    """LLaVA's linear -> act -> linear from vision features to the LM width."""

    def __init__(self, din: int, dout: int, act: str, *, bias: bool, dtype: Any):
        self.linear_1 = L.Linear(din, dout, ("vit_embed", "embed"), bias=bias, dtype=dtype)
        self.linear_2 = L.Linear(dout, dout, ("embed", "embed_out"), bias=bias, dtype=dtype)
        self.act = act

    def __call__(self, x: Array) -> Array:
        return self.linear_2(L.activation(self.act)(self.linear_1(x)))


class DecoderLayer(nnx.Module):
    """Pre-norm decoder block shared by Llama, Qwen2 and Phi-3 (Phi-3's fused weights are split on load)."""

    def __init__(self, cfg: TextConfig, window: int | None, *, dtype: Any):
        self.input_layernorm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = L.Attention(hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                                     head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias,
                                     window=window, dtype=dtype)
        self.post_attention_layernorm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = L.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=cfg.mlp_bias,
                              dtype=dtype)

    def __call__(self, x, cos, sin, kv_valid, cache):
        with jax.named_scope("attention"):
            h, cache = self.self_attn(self.input_layernorm(x), cos, sin, kv_valid, cache)
        x = constrain(x + h, ("batch", "seq", "act_embed"))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "act_embed")), cache


class Decoder(nnx.Module):
    """Token embedding, decoder layers and final norm (no LM head)."""

    def __init__(self, cfg: TextConfig, *, dtype: Any):
        self.embed_tokens = L.param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, cfg.windows[i] if cfg.windows else None, dtype=dtype)
                                for i in range(cfg.num_layers)])
        self.norm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.cfg = cfg

    def rope(self, positions: Array) -> tuple[Array, Array]:
        """RoPE cos and sin at `positions` [B, T]."""
        rope = L.rope_frequencies(self.cfg.rope_dict, self.cfg.head_dim, self.cfg.max_position_embeddings)
        return L.rope_cos_sin(rope, positions)

    def __call__(self, embeds, positions, kv_valid, cache):
        cos, sin = self.rope(positions)
        views = C.layer_views(cache, len(self.layers))
        x, new_layers = embeds, []
        for i, (layer, view) in enumerate(zip(self.layers, views)):
            with jax.named_scope(f"layer_{i}"):
                x, c = layer(x, cos, sin, kv_valid, view)
            new_layers.append(c)
        return self.norm(x), C.advance(cache, new_layers, positions, embeds.shape[1])


class LlavaForConditionalGeneration(nnx.Module):
    """The whole VLM. `__call__` returns logits and the updated KV cache."""

    def __init__(self, cfg: LlavaConfig, *, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision, vision_layers_used(cfg), dtype=dtype)
        self.multi_modal_projector = Projector(cfg.vision.hidden_size * len(cfg.feature_layers),
                                               cfg.text.hidden_size, cfg.projector_hidden_act,
                                               bias=cfg.projector_bias, dtype=dtype)
        self.language_model = Decoder(cfg.text, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = L.Linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False,
                                    dtype=dtype)

    def image_features(self, pixel_values: Array) -> Array:
        """Projected features [num_images, image_seq_length, hidden] for the processor's pixel_values."""
        hidden = self.vision_tower(pixel_values)
        n = self.cfg.vision.num_layers
        picked = [hidden[i if i >= 0 else n + 1 + i] for i in self.cfg.feature_layers]
        if self.cfg.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]
        return self.multi_modal_projector(jnp.concatenate(picked, axis=-1))

    def embed(self, input_ids: Array, image_features: Array | None) -> Array:
        """Token embeddings with image-token positions replaced by image features, in order (HF's masked_scatter)."""
        table = self.language_model.embed_tokens[...]
        x = jnp.take(table, input_ids, axis=0)
        if image_features is None:
            return constrain(x, ("batch", "seq", "act_embed"))
        b, t, d = x.shape
        feats = image_features.reshape(-1, d).astype(x.dtype)
        is_image = (input_ids == self.cfg.image_token_id).reshape(-1)
        slot = jnp.clip(jnp.cumsum(is_image) - 1, 0, feats.shape[0] - 1)
        x = jnp.where(is_image[:, None], feats[slot], x.reshape(-1, d)).reshape(b, t, d)
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

        `images`: {"pixel_values": [N, C, H, W]} (+ "index" [M]: which of the N images' features fill the M image
        placeholders, in order, when rows share images). `kv_valid`: the attention mask of the keys ([B, T], or
        [B, S] with a DenseCache); positions default to the mask's running count. With a SharedPrefixCache the
        call decodes one token per row and needs neither."""
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
                feats = self.image_features(images["pixel_values"])
                if images.get("index") is not None:
                    feats = feats[images["index"]]
            x = self.embed(input_ids, feats)
        h, cache = self.hidden_states(x, positions, kv_valid, cache)
        if hidden_only:
            return h, cache
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
        return self.logits_from_hidden(h), cache

    @staticmethod
    def image_inputs(batch: dict) -> dict | None:
        """The `images` argument from a batch of this family's processor (or an SFT batch)."""
        px = batch.get("pixel_values")
        return None if px is None else {"pixel_values": px}

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> C.DenseCache:
        """A zeroed dense KV cache for `batch` sequences of up to `max_len` tokens."""
        t = self.cfg.text
        return C.dense_cache(t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim,
                             dtype or self.language_model.embed_tokens.dtype)


def positions_from_mask(attention_mask: Array) -> Array:
    """Position ids for left- or right-padded rows: cumsum(mask) - 1, 0 on padding (as HF generate does)."""
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.where(attention_mask.astype(bool), pos, 0)
