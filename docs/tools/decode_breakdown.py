"""Where a decode step of the sampler goes on this machine (the figures of docs/benchmarks.md, "What limits").

    python docs/tools/decode_breakdown.py runs/bench/bench-hf      # the model `mstar bench sampler` builds

Prints ms per decode step (16 rows of one prompt, greedy) of the real sampler, of the same sampler with its
attention replaced by the identity (what the attention costs), and of the decoder's matmuls and the LM head
alone in a compiled loop with random weights of the model's shapes. Each figure is the best of `--repeats`;
run it on an otherwise idle machine (on a 2-core box the spread between runs is ~20 %).
"""

from __future__ import annotations

import argparse
import time


def sampler_ms_per_step(path: str, n: int, repeats: int, no_attention: bool) -> float:
    """Decode ms/step of `Sampler.generate` from the difference of a 16- and a 144-token call (prefill cancels)."""
    import mstar_jax
    from mstar_jax import sampler as S
    from mstar_jax.bench.sampler import prompt_batch

    policy = mstar_jax.load(path)
    batch = prompt_batch(policy.processor, 1)
    from mstar_jax.models import layers as L

    original = L.shared_attention
    if no_attention:
        L.shared_attention = lambda q, k, v, prefix, suffix, cache, window, scale: (q, suffix)
    try:
        times = {}
        for new in (16, 144):
            sampler = S.Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh, max_rows=64)
            kw = dict(n=n, max_new_tokens=new, seed=0, temperature=0.0)
            sampler.generate(policy.params, batch=batch, **kw)  # compile
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                sampler.generate(policy.params, batch=batch, **kw)
                best = min(best, time.perf_counter() - t0)
            times[new] = (best, sampler.decode_steps)
    finally:
        L.shared_attention = original
    (t_short, s_short), (t_long, s_long) = times[16], times[144]
    return (t_long - t_short) / (s_long - s_short) * 1e3


def matmul_ms_per_step(config, rows: int, repeats: int, steps: int = 64) -> tuple[float, float]:
    """(decoder layers' matmuls, LM head) ms per step for `rows` rows, random weights of the config's shapes."""
    import jax
    import jax.numpy as jnp

    t = config.text
    d, f, v = t.hidden_size, t.intermediate_size, t.vocab_size
    q_out, kv_out = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    keys = iter(jax.random.split(jax.random.key(0), 8 * t.num_layers + 2))
    layers = [[jax.random.normal(next(keys), s) * 0.02 for s in
               [(d, q_out), (d, kv_out), (d, kv_out), (q_out, d), (d, f), (d, f), (f, d)]]
              for _ in range(t.num_layers)]
    head = jax.random.normal(next(keys), (d, v)) * 0.02
    x0 = jax.random.normal(next(keys), (rows, d))

    def decoder(x, ws):
        for wq, wk, wv, wo, wg, wu, wd in ws:
            # k and v feed a scalar so that their matmuls are not removed as dead code.
            x = x + ((x @ wq) @ wo) * 0.1 + (jnp.sum(x @ wk) + jnp.sum(x @ wv)) * 1e-6
            x = x + ((jax.nn.silu(x @ wg) * (x @ wu)) @ wd) * 0.1
        return x

    def lm_head(x, w):
        return x + (x @ w)[:, :d] * 1e-3

    def best_ms(body, w):
        run = jax.jit(lambda w: jax.lax.fori_loop(0, steps, lambda i, x: body(x, w), x0))
        run(w).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(w).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        return best / steps * 1e3

    return best_ms(decoder, layers), best_ms(lm_head, head)


def main() -> None:
    """Print the breakdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF LLaVA dir or converted checkpoint")
    ap.add_argument("--n", type=int, default=16, help="samples of the one prompt (decode rows)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import mstar_jax

    full = sampler_ms_per_step(args.model, args.n, args.repeats, no_attention=False)
    without = sampler_ms_per_step(args.model, args.n, args.repeats, no_attention=True)
    layers, head = matmul_ms_per_step(mstar_jax.load(args.model).config, args.n, args.repeats)
    print(f"decode step, {args.n} rows:        {full:7.2f} ms")
    print(f"  attention (full - identity): {full - without:7.2f} ms")
    print(f"  decoder matmuls alone:       {layers:7.2f} ms")
    print(f"  LM head alone:               {head:7.2f} ms")
    print(f"  rest (norms, RoPE, sampling, cache writes, loop): {without - layers - head:7.2f} ms")


if __name__ == "__main__":
    main()
