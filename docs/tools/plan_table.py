"""The table of docs/plan.md: every preset on a v5e-8, a v5p-8 and an 8 x H100 node, through `mstar plan`.

    python docs/tools/plan_table.py --out runs/plan_table.json

Each cell plans the paper's SFT batch (global batch 128 of 2048 tokens, half of them the response) with fsdp
over the host's devices, one row per device per micro-batch and full remat, and, where that does not fit,
lets the planner search (at most --max-compiles train steps compiled). A persistent compilation cache (the
JAX_COMPILATION_CACHE_DIR of this process, else one under /tmp) lets the 8-device cells of v5e and H100 share
their compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from mstar_jax.memory.devices import device
from mstar_jax.memory.families import all_presets
from mstar_jax.memory.planner import Request, plan

GIB = 2 ** 30
TARGETS = (("v5e", 8, "v5e-8"), ("v5p", 4, "v5p-8"), ("h100", 8, "8 x H100"))


def main() -> int:
    """Plan every preset on every target; print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-compiles", type=int, default=3)
    parser.add_argument("--presets", default="", help="comma-separated (default: every preset)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mstar-plan-cache-"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    presets = args.presets.split(",") if args.presets else sorted(all_presets())
    rows = []
    print("| preset | target | train step / rollouts per device (GiB) | usable (GiB) | verdict |")
    print("| --- | --- | --- | --- | --- |")
    for preset in presets:
        for dev, n, label in TARGETS:
            req = Request(preset, (1, n, 1), args.global_batch, args.seq_len, device=dev, num_devices=n,
                          processes=1, micro_batch=n, remat="full", max_compiles=args.max_compiles)
            result = plan(req)
            fp = result["footprint"]
            if result["fits"]:
                verdict = "fits"
            elif result["proposal"]:
                p = result["proposal"]
                verdict = (f"does not fit; fits as {p['label']} ({p['footprint']['train_peak'] / GIB:.1f} / "
                           f"{p['footprint']['rollout_peak'] / GIB:.1f} GiB)")
            else:
                verdict = "does not fit; nothing found within the search"
            rows.append({"preset": preset, "target": label, **result})
            print(f"| {preset} | {label} (fsdp={n}, remat full, micro-batch {n}) | {fp['train_peak'] / GIB:.1f} / "
                  f"{fp['rollout_peak'] / GIB:.1f} | {result['usable_bytes'] / GIB:.1f} of "
                  f"{device(dev).hbm_bytes / GIB:.1f} | {verdict} |", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
