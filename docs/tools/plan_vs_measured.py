"""`mstar plan`'s train-step peak beside the peak the same step really takes, on this machine's CPU or GPU.

    python docs/tools/plan_vs_measured.py --backend cpu                 # the demo cases (docs/plan.md)
    python docs/tools/plan_vs_measured.py --backend cpu --large --skip-demo   # llava-interleave-qwen-0.5b

Each case is planned as `mstar plan --mesh data=1,fsdp=1,tensor=1` plans it (simulated CPU device, compiled
memory analysis), then run for real in a fresh process (`python -m mstar_jax.memory.measured`): on a GPU its
peak is `memory_stats()["peak_bytes_in_use"]` (autotuning off, so that its scratch buffers are not counted);
on CPU the process's peak resident memory over the step. Prints a markdown table; --out also writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

from mstar_jax.memory.measured import CPU_ENV
from mstar_jax.memory.planner import Request, plan, worker_env

GIB = 2 ** 30
CASES = [("demo", 16, 1024, 8, "none", False), ("demo", 16, 1024, 8, "full", False)]
LARGE = [("llava-interleave-qwen-0.5b", 1, 512, 1, "full", True)]  # tower frozen: ~14 GB of host memory


def measured(req: Request, backend: str) -> dict:
    """The real peak of the request's step in a fresh process on `backend`."""
    if backend == "cpu":
        env = {**worker_env(1), **CPU_ENV}
    else:
        env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    proc = subprocess.run([sys.executable, "-m", "mstar_jax.memory.measured", json.dumps(dataclasses.asdict(req))],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> int:
    """Plan and measure every case; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--large", action="store_true", help="also the 0.5B preset (~14 GB of memory)")
    parser.add_argument("--skip-demo", action="store_true", help="only the 0.5B cases")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    print("| preset | rows x tokens (micro-batch) | remat | planned (GiB) | measured (GiB) | measured / planned |")
    print("| --- | --- | --- | --- | --- | --- |")
    for preset, batch, seq, micro, remat, freeze in ([] if args.skip_demo else CASES) + (LARGE if args.large else []):
        req = Request(preset, (1, 1, 1), batch, seq, micro_batch=micro, remat=remat, freeze_vision=freeze,
                      search=False)
        planned = plan(req)["footprint"]["train_peak"]
        real = measured(req, args.backend)
        ratio = real["measured_peak"] / planned
        rows.append({"preset": preset, "batch": batch, "seq_len": seq, "micro_batch": micro, "remat": remat,
                     "freeze_vision": freeze, "planned": planned, **real, "ratio": ratio})
        name = preset + (" (tower frozen)" if freeze else "")
        print(f"| {name} | {batch} x {seq} ({micro}) | {remat} | {planned / GIB:.2f} | "
              f"{real['measured_peak'] / GIB:.2f} ({real['device_kind']}) | {ratio:.3f} |", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
