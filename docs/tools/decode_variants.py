"""Decode-attention formulations and the LM-head product timed alone (the "tried" figures of docs/benchmarks.md).

    python docs/tools/decode_variants.py                 # XLA_FLAGS=... in front to compare XLA CPU flags

Prints ms per decode step of eight layers of the sampler's shared-prefix attention (the bench model's shapes:
one 640-token prompt, n = 16 samples, 8 heads of 64, a 128-slot generated-token cache) in a compiled loop, for
the shipped `_shared_prefix_attention` and two rewrites that were measured and not adopted; and the bench LM
head's [16, 512] x [512, 32000] product under XLA, numpy and PyTorch. Best of `--repeats`; each rewrite's
largest difference from the shipped output is printed too, so a wrong variant shows.
"""

from __future__ import annotations

import argparse
import functools
import time

B, K, N_SAMPLES, P, SLOTS, D, LAYERS, STEPS = 1, 8, 16, 640, 128, 64, 8, 16


def _prompt_keys_untransposed(q, prefix, prefix_valid, suffix, step, window, scale, suffix_by_reduction=False):
    """The attention before 2026-12-02: prompt keys [B, K, P, D], so the score matmul contracts their minor axis.

    With `suffix_by_reduction` the generated-token scores are a multiply-and-reduce over head_dim instead of a
    dot (measured and not adopted).
    """
    import jax.numpy as jnp

    r, h, d = q.shape
    b, kh, p, _ = prefix.k.shape
    n, g, slots = r // b, h // kh, suffix.k.shape[2]
    f32 = jnp.float32
    qp = q.reshape(b, n, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, n * g, d)
    s_pre = jnp.einsum("bkqd,bkpd->bkqp", qp, prefix.k, preferred_element_type=f32) * scale
    if suffix_by_reduction:
        s_suf = jnp.sum(q.reshape(r, kh, g, 1, d) * suffix.k[:, :, None], axis=-1) * scale
    else:
        s_suf = jnp.einsum("rkgd,rknd->rkgn", q.reshape(r, kh, g, d), suffix.k, preferred_element_type=f32) * scale
    neg = jnp.finfo(f32).min
    s_pre = jnp.where(prefix_valid[:, None, None, :], s_pre, neg)
    s_suf = jnp.where((jnp.arange(slots) <= step)[None, None, None, :], s_suf, neg)
    m_pre = jnp.max(s_pre, axis=-1).reshape(b, kh, n, g).transpose(0, 2, 1, 3).reshape(r, kh, g)
    m = jnp.maximum(m_pre, jnp.max(s_suf, axis=-1))
    m_pre_q = m.reshape(b, n, kh, g).transpose(0, 2, 1, 3).reshape(b, kh, n * g)
    e_pre, e_suf = jnp.exp(s_pre - m_pre_q[..., None]), jnp.exp(s_suf - m[..., None])
    o_pre = jnp.einsum("bkqp,bkpd->bkqd", e_pre, prefix.v, preferred_element_type=f32)
    o_suf = jnp.einsum("rkgn,rknd->rkgd", e_suf, suffix.v, preferred_element_type=f32)
    z_pre = jnp.sum(e_pre, axis=-1).reshape(b, kh, n, g).transpose(0, 2, 1, 3).reshape(r, kh, g)
    o_pre = o_pre.reshape(b, kh, n, g, d).transpose(0, 2, 1, 3, 4).reshape(r, kh, g, d)
    return ((o_pre + o_suf) / (z_pre + jnp.sum(e_suf, axis=-1))[..., None]).reshape(r, h, d)


def _block_diagonal(q, prefix, prefix_valid, suffix, step, window, scale):
    """All n samples' generated tokens in the prompt's batched matmul; a block-diagonal mask keeps each row's own.

    Prompt keys [B, K, P, D] (as before 2026-12-02)."""
    import jax
    import jax.numpy as jnp

    r, h, d = q.shape
    b, kh, p, _ = prefix.k.shape
    n, g, slots = r // b, h // kh, suffix.k.shape[2]

    def per_prompt(x):  # [R, K, N, D] -> [B, K, n*N, D]
        return x.reshape(b, n, kh, slots, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, n * slots, d)

    keys = jnp.concatenate([prefix.k, per_prompt(suffix.k)], axis=2)
    values = jnp.concatenate([prefix.v, per_prompt(suffix.v)], axis=2)
    qp = q.reshape(b, n, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, n * g, d)
    s = jnp.einsum("bkqd,bkpd->bkqp", qp, keys, preferred_element_type=jnp.float32) * scale
    col = jnp.arange(n * slots)
    own = (jnp.arange(n * g)[:, None] // g == col[None, :] // slots) & (col % slots <= step)[None, :]
    ok = jnp.concatenate([jnp.broadcast_to(prefix_valid[:, None, None, :], (b, 1, n * g, p)),
                          jnp.broadcast_to(own, (b, 1, n * g, n * slots))], axis=-1)
    probs = jax.nn.softmax(jnp.where(ok, s, jnp.finfo(jnp.float32).min), axis=-1)
    o = jnp.einsum("bkqp,bkpd->bkqd", probs, values, preferred_element_type=jnp.float32)
    return o.reshape(b, kh, n, g, d).transpose(0, 2, 1, 3, 4).reshape(r, h, d)


def _best_ms(fn, repeats: int, per: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) / per * 1e3)
    return best


def attention_variants(repeats: int) -> None:
    """ms per step of eight layers of each formulation, in one compiled loop of STEPS steps."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mstar_jax.models.cache import KVCache, SharedPrefixCache, shared_attention

    def _shared_prefix_attention(q, prefix, valid, suffix, step, window, scale):
        """The shipped decode attention with the variants' signature (this step's key already in `suffix`)."""
        r, kh, d = q.shape
        cache = SharedPrefixCache([prefix], valid, jnp.full((r,), valid.shape[1]), [suffix], jnp.zeros((r,), jnp.int32),
                                  step)
        out, _ = shared_attention(q.reshape(r, 1, kh, d), suffix.k[:, :, step][:, None], suffix.v[:, :, step][:, None],
                                  prefix, suffix, cache, window, scale)
        return out.reshape(r, kh, d)

    rng = np.random.default_rng(0)
    rand = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    r = B * N_SAMPLES
    prefix = [KVCache(rand(B, K, P, D), rand(B, K, P, D)) for _ in range(LAYERS)]
    # The sampler stores the prompt's keys transposed ([B, K, D, P]); the older variants take them as [B, K, P, D].
    prefix_t = [KVCache(c.k.transpose(0, 1, 3, 2), c.v) for c in prefix]
    suffix = [KVCache(rand(r, K, SLOTS, D), rand(r, K, SLOTS, D)) for _ in range(LAYERS)]
    valid, q0, step = jnp.ones((B, P), bool), rand(r, K, D), jnp.int32(SLOTS // 2)

    def compiled(attn, prompt):
        @jax.jit
        def run(q):
            def body(_, q):
                for layer in range(LAYERS):
                    q = attn(q, prompt[layer], valid, suffix[layer], step, None, D ** -0.5) + 0.5 * q
                return q
            return jax.lax.fori_loop(0, STEPS, body, q)
        return lambda: jax.block_until_ready(run(q0))

    variants = {"shipped": (_shared_prefix_attention, prefix_t),
                "prompt keys [B, K, P, D] (old)": (_prompt_keys_untransposed, prefix),
                "old + suffix scores by reduce": (functools.partial(_prompt_keys_untransposed,
                                                                    suffix_by_reduction=True), prefix),
                "old + block-diagonal suffix": (_block_diagonal, prefix)}
    reference = np.asarray(compiled(_shared_prefix_attention, prefix_t)())
    for name, (attn, prompt) in variants.items():
        run = compiled(attn, prompt)
        diff = float(np.abs(np.asarray(run()) - reference).max())
        print(f"attention, {LAYERS} layers, {name:30s} {_best_ms(run, repeats, STEPS):7.2f} ms/step"
              f"   max |diff| {diff:.1e}")


def lm_head(repeats: int, threads: int) -> None:
    """The bench LM head's product for 16 rows under XLA ([D, V] and [V, D] weights), numpy and PyTorch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((16, 512), np.float32), rng.standard_normal((512, 32000), np.float32)
    wt = np.ascontiguousarray(w.T)
    xj, wj, wtj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(wt)
    dv, vd = jax.jit(lambda a, b: a @ b), jax.jit(lambda a, b: a @ b.T)
    xt, w_t, wt_t = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(wt)
    rows = {"XLA, [D, V] weight": lambda: jax.block_until_ready(dv(xj, wj)),
            "XLA, [V, D] weight": lambda: jax.block_until_ready(vd(xj, wtj)),
            "numpy": lambda: x @ w,
            "PyTorch, [D, V]": lambda: xt @ w_t,
            "PyTorch, [V, D] (F.linear)": lambda: torch.nn.functional.linear(xt, wt_t)}
    for name, fn in rows.items():
        print(f"LM head [16, 512] x [512, 32000], {name:28s} {_best_ms(fn, repeats):7.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    args = ap.parse_args()
    attention_variants(args.repeats)
    lm_head(args.repeats, args.threads)


if __name__ == "__main__":
    main()
