"""`python -m mstar_jax.memory.worker`: plan the Request read as JSON from stdin; print the plan as one JSON line.

Started by `planner.plan` with simulated CPU devices and XLA:CPU flags of its own (`planner.worker_env`)."""

from __future__ import annotations

import json
import sys


def main() -> int:
    """Read the request, plan it, print the result."""
    from mstar_jax.memory.planner import Request, run_plan

    raw = json.loads(sys.stdin.read())
    raw["mesh"] = tuple(raw["mesh"])
    print(json.dumps(run_plan(Request(**raw))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
