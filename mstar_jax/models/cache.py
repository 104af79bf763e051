"""KV caches a model's attention understands: a dense one for a prefill, and the sampler's shared-prompt layout.

    DenseCache          per layer k/v [B, S, K, D]; a call writes its T tokens at `index` and attends causally
    SharedPrefixCache   decoding R = B x n rows that share B prompts: each prompt's keys/values are kept once
                        (keys [B, K, D, P] transposed, values [B, K, P, D]) and read once per prompt for all its
                        rows; each row's own tokens go to `suffix` [R, K, N, D]. Row r sees prompt slots
                        < prefix_end[r] (the whole prompt, or a step boundary of a response for Monte Carlo
                        completions), so n continuations of different prefixes share one prefill.

`share()` turns a prefill's DenseCache into the SharedPrefixCache of its rows; `shared_attention` is the decode
attention over it (one softmax across the prompt part and the row's own part).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mstar_jax import sharding as shd

Array = jax.Array

CACHE_AXES = ("cache_batch", "cache_seq", "cache_heads", "cache_dim")
# The decode caches are stored heads-major ([B, K, S, D]) so attention's batched matmuls read them in place.
CACHE_AXES_HEADS_MAJOR = ("cache_batch", "cache_heads", "cache_seq", "cache_dim")
# The prompt's keys are stored transposed ([B, K, D, P]): the score matmul then reads its weight-side operand in
# the [contract, out] layout that XLA:CPU's matmul kernels handle best (that dot ~40 % faster, docs/benchmarks.md).
CACHE_AXES_KEYS_T = ("cache_batch", "cache_heads", "cache_dim", "cache_seq")


class KVCache(NamedTuple):
    """One layer's keys and values."""

    k: Array
    v: Array


class DenseCache(NamedTuple):
    """Per-layer caches [B, S, K, D], the slot the next call writes at, and the positions written so far."""

    layers: list
    index: Array  # [] int32
    positions: Array  # [B, S] (or [3, B, S] for M-RoPE): the position ids of the cached tokens


class DenseLayer(NamedTuple):
    """What one attention layer gets of a DenseCache."""

    kv: KVCache
    index: Array


class SharedLayer(NamedTuple):
    """What one attention layer gets of a SharedPrefixCache."""

    prefix: KVCache
    suffix: KVCache
    cache: "SharedPrefixCache"


class SharedPrefixCache(NamedTuple):
    """The decode cache of R = B x n rows sharing B prompts (see the module docstring)."""

    prefix: list  # per layer KVCache(k [B, K, D, P], v [B, K, P, D])
    prefix_valid: Array  # [B, P] bool (left padding is False)
    prefix_end: Array  # [R] a row sees prompt slots < prefix_end
    suffix: list  # per layer KVCache(k, v [R, K, N, D])
    next_pos: Array  # [R] position id of each row's generated token 0
    step: Array  # [] tokens generated so far (the suffix slot the next token is written at)


def layer_views(cache, num_layers: int) -> list:
    """Per-layer views of a cache (None: no cache) for a decoder's layer loop."""
    if cache is None:
        return [None] * num_layers
    if isinstance(cache, DenseCache):
        return [DenseLayer(kv, cache.index) for kv in cache.layers]
    return [SharedLayer(p, s, cache) for p, s in zip(cache.prefix, cache.suffix)]


def advance(cache, new_layers: list, positions: Array, num_tokens: int):
    """The cache after a call that wrote `num_tokens` tokens (per-layer results `new_layers`)."""
    if cache is None:
        return None
    if isinstance(cache, DenseCache):
        at = (0,) * (cache.positions.ndim - 1) + (cache.index,)
        pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), at)
        return DenseCache(new_layers, cache.index + num_tokens, pos)
    return cache._replace(suffix=new_layers, step=cache.step + num_tokens)


def dense_cache(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype: Any,
                positions_shape: tuple[int, ...] | None = None) -> DenseCache:
    """A zeroed DenseCache for `batch` sequences of up to `length` tokens."""
    shape = (batch, length, kv_heads, head_dim)
    layers = [KVCache(shd.constrain(jnp.zeros(shape, dtype), CACHE_AXES), shd.constrain(jnp.zeros(shape, dtype),
                                                                                      CACHE_AXES))
              for _ in range(num_layers)]
    return DenseCache(layers, jnp.zeros((), jnp.int32), jnp.zeros(positions_shape or (batch, length), jnp.int32))


def write_dense(layer: KVCache, k: Array, v: Array, index: Array) -> KVCache:
    """The layer cache with k/v [B, T, K, D] written at slot `index`."""
    at = (0, index, 0, 0)
    return KVCache(shd.constrain(jax.lax.dynamic_update_slice(layer.k, k.astype(layer.k.dtype), at), CACHE_AXES),
                   shd.constrain(jax.lax.dynamic_update_slice(layer.v, v.astype(layer.v.dtype), at), CACHE_AXES))


def share(cache: DenseCache, prefix_valid: Array, ends: Array, n: int, new_len: int) -> SharedPrefixCache:
    """The decode cache of a prefill: B prompts continued from S `ends` [B, S] each, n rows per end (rows ordered
    (prompt, end, sample)); each row's own tokens get `new_len` slots."""
    b, s_ends = ends.shape
    r = b * s_ends * n
    prefix = [KVCache(shd.constrain(c.k.transpose(0, 2, 3, 1), CACHE_AXES_KEYS_T),
                      shd.constrain(c.v.transpose(0, 2, 1, 3), CACHE_AXES_HEADS_MAJOR)) for c in cache.layers]
    _, _, kh, d = cache.layers[0].k.shape
    zeros = jnp.zeros((r, kh, new_len, d), cache.layers[0].k.dtype)
    suffix = [KVCache(shd.constrain(zeros, CACHE_AXES_HEADS_MAJOR), shd.constrain(zeros, CACHE_AXES_HEADS_MAJOR))
              for _ in cache.layers]
    # The token at slot end-1 is the last one a row sees; its position + 1 is where generation continues (for
    # M-RoPE the three components of text positions agree, the first is taken).
    pos = cache.positions if cache.positions.ndim == 2 else cache.positions[0]
    last = jnp.take_along_axis(pos, ends - 1, axis=1)  # [B, S]
    rows = lambda x: shd.constrain(jnp.repeat(x.reshape(-1), n, axis=0), ("batch",))  # noqa: E731
    return SharedPrefixCache(prefix, shd.constrain(prefix_valid.astype(bool), ("batch", None)), rows(ends), suffix,
                             rows(last + 1), jnp.zeros((), jnp.int32))


def shared_attention(q: Array, k_new: Array, v_new: Array, layer_prefix: KVCache, layer_suffix: KVCache,
                     cache: SharedPrefixCache, window: int | None, scale: float) -> tuple[Array, KVCache]:
    """Attention of one new token per row over its prompt (shared by the rows of a prompt) and its own tokens.

    q [R, 1, H, D], k_new/v_new [R, 1, K, D] (this step's key and value, written at suffix slot `cache.step`).
    The rows of a prompt query its keys together as one [rows*G, P] matmul, so the prompt's cache is read once
    per prompt instead of once per row; one softmax spans both parts. Returns (out [R, 1, H, D], new suffix).
    """
    step = cache.step
    at = (0, 0, step, 0)
    suffix = KVCache(
        jax.lax.dynamic_update_slice(layer_suffix.k, k_new.transpose(0, 2, 1, 3).astype(layer_suffix.k.dtype), at),
        jax.lax.dynamic_update_slice(layer_suffix.v, v_new.transpose(0, 2, 1, 3).astype(layer_suffix.v.dtype), at))
    suffix = KVCache(shd.constrain(suffix.k, CACHE_AXES_HEADS_MAJOR), shd.constrain(suffix.v, CACHE_AXES_HEADS_MAJOR))
    q_rhd = q[:, 0]
    r, h, d = q_rhd.shape
    b, kh, _, p = layer_prefix.k.shape
    n, g, slots = r // b, h // kh, suffix.k.shape[2]
    f32 = jnp.float32
    # The queries of a prompt's n rows side by side: [B, K, n*G, D].
    q_bkqd = q_rhd.reshape(b, n, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, n * g, d)
    s_prefix = jnp.einsum("bkqd,bkdp->bkqp", q_bkqd, layer_prefix.k, preferred_element_type=f32) * scale
    s_suffix = jnp.einsum("rkgd,rknd->rkgn", q_rhd.reshape(r, kh, g, d), suffix.k, preferred_element_type=f32) * scale
    slot_p = jnp.arange(p)[None, None, None, :]
    end_q = jnp.repeat(cache.prefix_end.reshape(b, n), g, axis=1)[:, None, :, None]  # [B, 1, n*G, 1]
    prefix_ok = cache.prefix_valid[:, None, None, :] & (slot_p < end_q)
    suffix_ok = (jnp.arange(slots) <= step)[None, None, None, :]
    if window is not None:
        # The query sits `step` slots after its row's prefix end, so its distance to prompt slot i is end+step-i.
        prefix_ok = prefix_ok & (end_q + step - slot_p < window)
        suffix_ok = suffix_ok & (step - jnp.arange(slots) < window)[None, None, None, :]
    neg = jnp.finfo(f32).min
    s_prefix = jnp.where(prefix_ok, s_prefix, neg)
    s_suffix = jnp.where(suffix_ok, s_suffix, neg)
    # One softmax over prompt + own keys from per-part maxima and sums.
    max_prefix_rkg = jnp.max(s_prefix, axis=-1).reshape(b, kh, n, g).transpose(0, 2, 1, 3).reshape(r, kh, g)
    max_rkg = jnp.maximum(max_prefix_rkg, jnp.max(s_suffix, axis=-1))
    max_bkq = max_rkg.reshape(b, n, kh, g).transpose(0, 2, 1, 3).reshape(b, kh, n * g)
    e_prefix = jnp.exp(s_prefix - max_bkq[..., None])
    e_suffix = jnp.exp(s_suffix - max_rkg[..., None])
    o_prefix = jnp.einsum("bkqp,bkpd->bkqd", e_prefix.astype(layer_prefix.v.dtype), layer_prefix.v,
                          preferred_element_type=f32)
    o_suffix = jnp.einsum("rkgn,rknd->rkgd", e_suffix.astype(suffix.v.dtype), suffix.v, preferred_element_type=f32)
    z_prefix = jnp.sum(e_prefix, axis=-1).reshape(b, kh, n, g).transpose(0, 2, 1, 3).reshape(r, kh, g)
    o_prefix = o_prefix.reshape(b, kh, n, g, d).transpose(0, 2, 1, 3, 4).reshape(r, kh, g, d)
    out = (o_prefix + o_suffix) / (z_prefix + jnp.sum(e_suffix, axis=-1))[..., None]
    return out.reshape(r, 1, h, d).astype(q.dtype), suffix
