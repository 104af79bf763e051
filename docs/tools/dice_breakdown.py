"""Per-question-type greedy accuracy and rationale-step checks of a demo workdir (docs/demo_results.md).

python docs/tools/dice_breakdown.py WORKDIR [STAGE ...]   (stages: base warmup final; default all three)
For each stage: in-domain accuracy per dice question (left / right / sum / product), and over the responses
that write "The left die shows a. The right die shows b. c op e = f.": how often the step repeats the two
readings (c = a, e = b) and how often its arithmetic is right (c op e = f).
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

STEP = re.compile(r"shows (\d+)\. The right die shows (\d+)\. (\d+) ([+*]) (\d+) = (\d+)")
KINDS = ("left", "right", "sum", "product")


def breakdown(workdir: Path, stage: str) -> dict:
    """Accuracy per question kind and the two step checks of one stage's in-domain test responses."""
    items = json.loads((workdir / "data" / "test_id.json").read_text())
    result = json.loads((workdir / "results" / f"{stage}.json").read_text())
    acc, copied, arith = collections.defaultdict(list), [], []
    for r in result["test_id"]["responses"]:
        question = items[r["id"]]["question"]
        acc[next((k for k in KINDS if k in question), "other")].append(r["correct"])
        m = STEP.search(r["response"])
        if m:
            a, b, c, op, e, f = m.groups()
            copied.append(a == c and b == e)
            arith.append((int(c) + int(e) if op == "+" else int(c) * int(e)) == int(f))
    return {"accuracy": {k: round(100 * sum(v) / len(v), 1) for k, v in acc.items()},
            "steps": len(arith), "readings_repeated": round(sum(copied) / max(1, len(copied)), 2),
            "arithmetic_right": round(sum(arith) / max(1, len(arith)), 2)}


if __name__ == "__main__":
    wd = Path(sys.argv[1])
    for st in sys.argv[2:] or ["base", "warmup", "final"]:
        print(st, json.dumps(breakdown(wd, st)))
