"""Per-op profile of the sampler's decode loop on this machine: which XLA thunks a decode step spends its time in.

    python docs/tools/decode_profile.py runs/bench/bench-hf        # the model `mstar bench sampler` builds

Runs one greedy `Sampler.generate` (16 rows of one prompt, `--new` tokens) under `jax.profiler` with an HLO dump,
joins every thunk of the trace to its instruction in the optimised decode module, and prints ms per decode step
summed by (output shape, op): the matmuls of the layers, the LM head, the prompt and generated-token attention
dots, and the small fusions around them. Thunks that run concurrently on XLA's thread pool are each counted in
full, so the column can add up to more than the step's wall time. This is how the [B, K, P, D] prompt-key layout
was found to cost the attention's score matmul (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF LLaVA dir or converted checkpoint")
    ap.add_argument("--n", type=int, default=16, help="samples of the one prompt (rows)")
    ap.add_argument("--new", type=int, default=64, help="new tokens (decode steps)")
    ap.add_argument("--top", type=int, default=25, help="rows to print")
    args = ap.parse_args()

    out = tempfile.mkdtemp(prefix="mstar-decode-profile-")
    # The dump flag must be set before JAX starts its backend.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={out}/hlo --xla_dump_hlo_as_text"
    import jax

    import mstar_jax
    from mstar_jax import sampler as S
    from mstar_jax.bench.sampler import prompt_batch

    policy = mstar_jax.load(args.model)
    batch = prompt_batch(policy.processor, 1)
    sampler = S.Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh, max_rows=64)
    kw = dict(n=args.n, max_new_tokens=args.new, seed=0, temperature=0.0)
    sampler.generate(policy.params, batch=batch, **kw)  # compile outside the trace
    jax.profiler.start_trace(f"{out}/trace", create_perfetto_trace=True)
    sampler.generate(policy.params, batch=batch, **kw)
    jax.profiler.stop_trace()
    steps = sampler.decode_steps

    hlo = open(sorted(glob.glob(f"{out}/hlo/*jit__decode.cpu_after_optimizations.txt"))[-1]).read()
    ops = {}
    # Tuple-shaped outputs ("(f32[16]{0}, s32[16]{0})", e.g. a variadic argmax reduce) hold spaces.
    for m in re.finditer(r"^\s+(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\((.*)$", hlo, re.M):
        name, shape, op, rest = m.groups()
        meta = re.search(r'op_name="([^"]+)"', rest)
        ops[name] = (re.sub(r"\{[^}]*\}", "", shape), meta.group(1).split("/")[-1] if meta else op)
    trace = json.load(gzip.open(sorted(glob.glob(f"{out}/trace/**/*.json.gz", recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            by_op[ops[e["name"]]] += e.get("dur", 0) / 1e3 / steps
    print(f"decode ms per step by (output shape, op), {steps} steps of {args.n} rows; thunks total "
          f"{sum(by_op.values()):.2f} ms (concurrent thunks each counted)")
    for (shape, op), ms in by_op.most_common(args.top):
        shape = shape if len(shape) <= 40 else shape[:36] + " ..."
        print(f"  {ms:7.3f}  {shape:24s} {op}")


if __name__ == "__main__":
    main()
