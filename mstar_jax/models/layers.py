"""Building blocks shared by model families: linear, norms, RoPE, attention with a KV cache, MLPs, ViT layers.

Parameters are created as zeros: weights always come from a checkpoint, and models are built under
`nnx.eval_shape` before loading, so no random initialisation is needed. Every parameter carries logical
axis names in its `axes` metadata; `mstar_jax.sharding` maps them onto the mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mstar_jax.models.cache import DenseLayer, KVCache, SharedLayer, shared_attention, write_dense
from mstar_jax.sharding import constrain

Array = jax.Array


def param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any) -> nnx.Param:
    """A zero-initialised parameter annotated with logical axis names."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.zeros(shape, dtype), axes=tuple(axes))


def activation(name: str):
    """The JAX function for an HF `ACT2FN` name (exact erf GELU for `gelu`, as PyTorch does)."""
    acts = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "relu": jax.nn.relu,
    }
    if name not in acts:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(acts)}")
    return acts[name]


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out] (the transpose of torch's nn.Linear)."""

    def __init__(self, din: int, dout: int, axes: tuple[str | None, str | None], *, bias: bool, dtype: Any):
        self.kernel = param((din, dout), axes, dtype)
        self.bias = param((dout,), (axes[1],), dtype) if bias else None

    def __call__(self, x: Array) -> Array:
        # A 2-D matmul over flattened rows: with [B, T, i] inputs the weight gradient contracts two axes,
        # which XLA:CPU lowers with transposing copies of the activations (~1.6x slower backward).
        rows = x.reshape(-1, x.shape[-1])
        y = jnp.dot(rows, self.kernel[...].astype(x.dtype)).reshape(*x.shape[:-1], self.kernel.shape[1])
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class RMSNorm(nnx.Module):
    """Llama-style RMSNorm: normalise in fp32, cast back, then scale (matches HF's order of casts)."""

    def __init__(self, dim: int, eps: float, *, dtype: Any):
        self.weight = param((dim,), ("norm",), dtype)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * xf.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with bias, computed in fp32 like torch's autocast-safe layer_norm."""

    def __init__(self, dim: int, eps: float, *, dtype: Any):
        self.weight = param((dim,), ("norm",), dtype)
        self.bias = param((dim,), ("norm",), dtype)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------------------------- RoPE


class Rope(NamedTuple):
    """Inverse frequencies for RoPE; `long_inv_freq` is set for `longrope` (used past `switch_len`)."""

    inv_freq: np.ndarray
    attention_factor: float
    long_inv_freq: np.ndarray | None = None
    switch_len: int = 0


def rope_frequencies(rope: dict, head_dim: int, max_position_embeddings: int) -> Rope:
    """Compute RoPE inverse frequencies for HF's rope types (default, linear, llama3, longrope, yarn)."""
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    base = float(rope.get("rope_theta", 10000.0))
    dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    inv_freq = (1.0 / (base ** exponent)).astype(np.float32)
    if rope_type == "default":
        return Rope(inv_freq, 1.0)
    if rope_type == "linear":
        return Rope((inv_freq / float(rope["factor"])).astype(np.float32), 1.0)
    if rope_type == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return Rope(np.where(medium, smoothed, scaled).astype(np.float32), 1.0)
    if rope_type == "longrope":
        orig = int(rope["original_max_position_embeddings"])
        factor = rope.get("factor") or max_position_embeddings / orig
        attn = rope.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        base_pow = (base ** exponent).astype(np.float32)
        short = (1.0 / (np.asarray(rope["short_factor"], np.float32) * base_pow)).astype(np.float32)
        long = (1.0 / (np.asarray(rope["long_factor"], np.float32) * base_pow)).astype(np.float32)
        return Rope(short, float(attn), long, orig)
    if rope_type == "yarn":
        return _yarn(rope, inv_freq, dim, base, max_position_embeddings)
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3, longrope, yarn)")


def _yarn(rope: dict, inv_freq: np.ndarray, dim: int, base: float, max_pos: int) -> Rope:
    """YaRN frequencies, following transformers' `_compute_yarn_parameters`."""
    factor = float(rope["factor"])
    orig = int(rope.get("original_max_position_embeddings") or max_pos)
    beta_fast, beta_slow = float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.get("attention_factor")
    if attn is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attn = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attn = mscale(factor)

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    interp, extrap = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    inv = interp * (1 - extrapolation) + extrap * extrapolation
    return Rope(inv.astype(np.float32), float(attn))


def rope_cos_sin(rope: Rope, positions: Array) -> tuple[Array, Array]:
    """cos/sin tables [B, T, rot_dim] for integer positions [B, T], in fp32."""
    inv = jnp.asarray(rope.inv_freq)
    if rope.long_inv_freq is not None:
        # Like HF's longrope: the whole batch switches to the long factors once any position passes the
        # original context length.
        use_long = jnp.max(positions) + 1 > rope.switch_len
        inv = jnp.where(use_long, jnp.asarray(rope.long_inv_freq), inv)
    freqs = positions.astype(jnp.float32)[..., None] * inv[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * rope.attention_factor, jnp.sin(emb) * rope.attention_factor


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first rot_dim features of x [B, T, H, D] (partial rotary keeps the rest)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# ------------------------------------------------------------------------------------------ attention


def attention_mask(
    kv_valid: Array, q_len: int, write_index: Array | int, window: int | None = None
) -> Array:
    """Boolean mask [B, 1, T, S]: key slot s is visible to query t if valid, causal and inside the window.

    Query t sits in cache slot `write_index + t`; without a cache, `write_index` is 0 and S == T.
    """
    s_len = kv_valid.shape[-1]
    q_slot = jnp.asarray(write_index) + jnp.arange(q_len)[:, None]
    k_slot = jnp.arange(s_len)[None, :]
    mask = k_slot <= q_slot
    if window is not None:
        mask = mask & (q_slot - k_slot < window)
    return mask[None, None, :, :] & kv_valid[:, None, None, :].astype(bool)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float) -> Array:
    """Softmax attention with GQA; q [B,T,H,D], k/v [B,S,K,D], mask [B,1,T,S] bool; fp32 softmax."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    # [B, K, G*T, D]: the G query heads of a kv head share one plain batched matmul with it.
    qg = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, h // kh * t, d)
    # An additive mask (as HF's eager attention) has no gradient, unlike a select over the scores.
    bias = jnp.zeros((b, 1, t, k.shape[1]), jnp.float32) if mask is None else \
        jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    out = _attend(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias, scale)
    return out.reshape(b, kh, h // kh, t, -1).transpose(0, 3, 1, 2, 4).reshape(b, t, h, v.shape[-1])


def _attention_probs(qg: Array, kt: Array, bias: Array, scale: float) -> Array:
    """fp32 softmax(q k^T * scale + bias) [B, K, G*T, S] for grouped queries and a [B, 1, T, S] bias."""
    b, kh, gt, _ = qg.shape
    t, s_len = bias.shape[-2:]
    s = jnp.einsum("bkqd,bksd->bkqs", qg, kt, preferred_element_type=jnp.float32) * scale
    s = s.reshape(b, kh, gt // t, t, s_len) + bias[:, :, None]
    return jax.nn.softmax(s, axis=-1).reshape(b, kh, gt, s_len)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(qg: Array, kt: Array, vt: Array, bias: Array, scale: float) -> Array:
    """softmax(q k^T * scale + bias) v over [B, K, ., D] operands, with a hand-written backward."""
    return jnp.einsum("bkqs,bksd->bkqd", _attention_probs(qg, kt, bias, scale).astype(vt.dtype), vt)


def _attend_fwd(qg, kt, vt, bias, scale):
    p = _attention_probs(qg, kt, bias, scale)
    out = jnp.einsum("bkqs,bksd->bkqd", p.astype(vt.dtype), vt)
    return out, (qg, kt, vt, p, out)


def _attend_bwd(scale, res, dout):
    # Autodiff of the softmax reduces p * dp over the keys; sum_s p*dp == sum_d out*dout reduces over
    # head_dim instead, and the additive bias needs no gradient: ~2x faster backward on XLA:CPU.
    qg, kt, vt, p, out = res
    dv = jnp.einsum("bkqs,bkqd->bksd", p.astype(vt.dtype), dout)
    dp = jnp.einsum("bkqd,bksd->bkqs", dout, vt, preferred_element_type=jnp.float32)
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (p * (dp - delta) * scale).astype(qg.dtype)
    dq = jnp.einsum("bkqs,bksd->bkqd", ds, kt)
    dk = jnp.einsum("bkqs,bkqd->bksd", ds, qg)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


class Attention(nnx.Module):
    """Causal self-attention for decoders: GQA, optional q/k/v/o biases, RoPE and a KV cache."""

    def __init__(self, *, hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool,
                 o_bias: bool, window: int | None, dtype: Any):
        self.q_proj = Linear(hidden, heads * head_dim, ("embed", "heads"), bias=qkv_bias, dtype=dtype)
        self.k_proj = Linear(hidden, kv_heads * head_dim, ("embed", "kv_heads"), bias=qkv_bias, dtype=dtype)
        self.v_proj = Linear(hidden, kv_heads * head_dim, ("embed", "kv_heads"), bias=qkv_bias, dtype=dtype)
        self.o_proj = Linear(heads * head_dim, hidden, ("heads", "embed"), bias=o_bias, dtype=dtype)
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, head_dim, window

    def project(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """q [B, T, H, D], k and v [B, T, K, D] of `x`, RoPE applied to q and k."""
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim), cos, sin)
        return q, k, self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)

    def output(self, out: Array) -> Array:
        """The output projection of attention results [B, T, H, D]."""
        b, t = out.shape[:2]
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))

    def __call__(self, x: Array, cos: Array, sin: Array, kv_valid: Array | None = None,
                 cache: DenseLayer | SharedLayer | None = None) -> tuple[Array, KVCache | None]:
        """Attention output and this layer's new cache: none (a full forward over `kv_valid` [B, T]), a dense
        cache (write at its index, attend over `kv_valid` [B, S]) or the shared-prompt decode cache."""
        t = x.shape[1]
        q, k, v = self.project(x, cos, sin)
        scale = self.head_dim ** -0.5
        if isinstance(cache, SharedLayer):
            out, suffix = shared_attention(q, k, v, cache.prefix, cache.suffix, cache.cache, self.window, scale)
            return self.output(out), suffix
        index = 0
        if isinstance(cache, DenseLayer):
            index = cache.index
            layer = write_dense(cache.kv, k, v, index)
            k, v, cache = layer.k.astype(q.dtype), layer.v.astype(q.dtype), layer
        mask = attention_mask(kv_valid, t, index, self.window)
        return self.output(dot_product_attention(q, k, v, mask, scale)), cache


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), the Llama/Qwen2/Phi-3 MLP."""

    def __init__(self, hidden: int, inner: int, act: str, *, bias: bool, dtype: Any):
        self.gate_proj = Linear(hidden, inner, ("embed", "mlp"), bias=bias, dtype=dtype)
        self.up_proj = Linear(hidden, inner, ("embed", "mlp"), bias=bias, dtype=dtype)
        self.down_proj = Linear(inner, hidden, ("mlp", "embed"), bias=bias, dtype=dtype)
        self.act = act

    def __call__(self, x: Array) -> Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class ViTLayer(nnx.Module):
    """Pre-norm ViT encoder layer as in CLIP and SigLIP (biased q/k/v/out, fc1-act-fc2 MLP)."""

    def __init__(self, hidden: int, inner: int, heads: int, act: str, eps: float, *, dtype: Any):
        self.layer_norm1 = LayerNorm(hidden, eps, dtype=dtype)
        self.q_proj = Linear(hidden, hidden, ("vit_embed", "vit_heads"), bias=True, dtype=dtype)
        self.k_proj = Linear(hidden, hidden, ("vit_embed", "vit_heads"), bias=True, dtype=dtype)
        self.v_proj = Linear(hidden, hidden, ("vit_embed", "vit_heads"), bias=True, dtype=dtype)
        self.out_proj = Linear(hidden, hidden, ("vit_heads", "vit_embed"), bias=True, dtype=dtype)
        self.layer_norm2 = LayerNorm(hidden, eps, dtype=dtype)
        self.fc1 = Linear(hidden, inner, ("vit_embed", "vit_mlp"), bias=True, dtype=dtype)
        self.fc2 = Linear(inner, hidden, ("vit_mlp", "vit_embed"), bias=True, dtype=dtype)
        self.heads, self.act = heads, act

    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        hd = d // self.heads
        h = self.layer_norm1(x)
        q = self.q_proj(h).reshape(b, t, self.heads, hd)
        k = self.k_proj(h).reshape(b, t, self.heads, hd)
        v = self.v_proj(h).reshape(b, t, self.heads, hd)
        x = x + self.out_proj(dot_product_attention(q, k, v, None, hd ** -0.5).reshape(b, t, d))
        return x + self.fc2(activation(self.act)(self.fc1(self.layer_norm2(x))))


def vocab_logits(h: Array, embed: Array, lm_head: Array | None) -> Array:
    """fp32 vocabulary logits of decoder hidden states [..., D]: `h @ lm_head` ([D, V]), or `h @ embed.T` when
    there is no head of its own (tied to the embeddings)."""
    # One 2-D matmul over flattened rows (as Linear: keeps XLA:CPU's weight gradient transpose-free).
    rows = h.reshape(-1, h.shape[-1])
    if lm_head is None:
        logits = jax.lax.dot_general(rows, embed.astype(h.dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
    else:
        logits = jnp.dot(rows, lm_head.astype(h.dtype), preferred_element_type=jnp.float32)
    return constrain(logits.reshape(*h.shape[:-1], -1), ("batch", "seq", "act_vocab"))
