"""The table of docs/plan.md: every preset on a v5e-8, a v5p-8 and an 8 x H100 node, through `mstar plan`.

    python docs/tools/plan_table.py --out runs/plan_table.json
    python docs/tools/plan_table.py --from runs/plan_table.json    # the table again, nothing planned

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

from mstar_jax.memory.families import all_presets
from mstar_jax.memory.planner import Request, plan

GIB = 2 ** 30
TARGETS = (("v5e", 8, "v5e-8"), ("v5p", 4, "v5p-8"), ("h100", 8, "8 x H100"))


HEADER = ("| preset | target | state per device (GiB) | train step / rollouts per device (GiB) | usable (GiB) "
          "| verdict |\n| --- | --- | --- | --- | --- | --- |")


def row_markdown(row: dict) -> str:
    """One table row from a plan: the state (fp32 weights, Adam moments, fp32 gradients: exact, whatever the
    schedule), the compiled peaks, the device's usable memory and the verdict."""
    fp, req = row["footprint"], row["request"]
    state = fp["params"] + fp["opt_state"] + fp["gradients"]
    if row["fits"]:
        verdict = "fits"
    elif row["proposal"]:
        p = row["proposal"]
        verdict = (f"does not fit; fits as {p['label']} ({p['footprint']['train_peak'] / GIB:.1f} / "
                   f"{p['footprint']['rollout_peak'] / GIB:.1f} GiB)")
    elif state > row["usable_bytes"]:
        verdict = "does not fit: the state alone is more than the usable memory; needs more devices"
    else:
        verdict = f"does not fit; nothing found within {req['max_compiles']} compile(s)"
    return (f"| {row['preset']} | {row['target']} (fsdp={req['mesh'][1]}, remat {req['remat']}, "
            f"micro-batch {req['micro_batch']}) | {state / GIB:.1f} | {fp['train_peak'] / GIB:.1f} / {fp['rollout_peak'] / GIB:.1f} | "
            f"{row['usable_bytes'] / GIB:.1f} of {row['hbm_bytes'] / GIB:.1f} | {verdict} |")


def main() -> int:
    """Plan every preset on every target (or reread a saved --out); print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-compiles", type=int, default=3)
    parser.add_argument("--presets", default="", help="comma-separated (default: every preset)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--from", dest="source", default=None, help="print the table of a saved --out, plan nothing")
    args = parser.parse_args()
    print(HEADER)
    if args.source:
        with open(args.source) as f:
            for row in json.load(f):
                print(row_markdown(row))
        return 0
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mstar-plan-cache-"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    presets = args.presets.split(",") if args.presets else sorted(all_presets())
    rows = []
    for preset in presets:
        for dev, n, label in TARGETS:
            req = Request(preset, (1, n, 1), args.global_batch, args.seq_len, device=dev, num_devices=n,
                          processes=1, micro_batch=n, remat="full", max_compiles=args.max_compiles)
            rows.append({"preset": preset, "target": label, **plan(req)})
            print(row_markdown(rows[-1]), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
