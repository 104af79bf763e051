"""What the PRM's top-2 keeps of the correct responses (paper 3.3, figure 2b), on a demo study workdir.

    python docs/tools/prm_selection.py runs/mstar_s0 [runs/mstar_s1 ...]

For every iteration of the PRM top-2 variant, the correct responses of each query are split into the two the
PRM ranked highest and the rest, and each response is checked against the synthetic item it answers (the
generator re-creates the item from its id): a response is *sound* when every die reading it states is the die's
true face and its equation combines those faces correctly, i.e. its right answer was not reached through a wrong
step. Also printed: how many training examples each variant trained on, and, from the study's
prm/prm_labels.jsonl, the mean Monte Carlo label of sound and of unsound steps (how well the labels can teach the
PRM to tell them apart). The synthetic demo only (the generator knows the true intermediate steps).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

READING = re.compile(r"The (left|right) die shows (\d+)\.")
EQUATION = re.compile(r"(\d+) ([+*]) (\d+) = (\d+)\.")


def _truth(item: dict) -> dict[str, int]:
    return {side: int(v) for side, v in READING.findall(item["rationale"])}


def _step_sound(step: str, truth: dict[str, int]) -> bool | None:
    """True/False for a die reading or an equation step (readings right; the equation on the true faces,
    computed right); None for any other step."""
    m = READING.fullmatch(step.strip())
    if m:
        return truth.get(m.group(1)) == int(m.group(2))
    m = EQUATION.fullmatch(step.strip())
    if m:
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        faces = (truth.get("left"), truth.get("right"))
        return (a, b) == faces and c == (a + b if op == "+" else a * b)
    return None


def _faithful(text: str, truth: dict[str, int]) -> bool:
    from mstar_jax.prm.steps import split_steps

    return all(_step_sound(text[a:b], truth) is not False for a, b in split_steps(text, "sentences"))


def analyse(study: Path) -> dict:
    """Faithfulness of PRM top-2 vs the other correct responses, and training examples per variant."""
    from mstar_jax.data.synth import SynthConfig, make_item
    from mstar_jax.loop.selection import select_responses

    cfg = json.loads((study / "config.json").read_text())
    d = cfg["data"]
    synth = SynthConfig(seed=d["seed"] if d["seed"] >= 0 else cfg["seed"], sizes=d["synth_sizes"],
                        image_size=d["image_size"], difficulty=d["difficulty"], mc_fraction=d["mc_fraction"],
                        families=d["families"])
    items: dict[str, dict] = {}

    def item(qid: str) -> dict:
        if qid not in items:
            split, index = qid.rsplit("-", 1)
            items[qid] = make_item(synth.seed, split, int(index), synth)
        return items[qid]

    out = {"examples": {}}
    for variant in sorted((study / "variants").iterdir()):
        metrics = [json.loads(x) for x in (variant / "metrics.jsonl").read_text().splitlines()]
        out["examples"][variant.name] = sum(r["examples"] for r in metrics if r.get("stage") == "iteration")
    top = {"faithful": 0, "n": 0, "steps": 0}
    rest = {"faithful": 0, "n": 0, "steps": 0}
    for path in sorted((study / "variants").glob("*prm_top2*/rollouts/iter_*.jsonl")):
        if "unlabeled" in path.name:
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            keep = set(select_responses(r["texts"], r["correct"], r["scores"], 2, mode="top_k"))
            every = select_responses(r["texts"], r["correct"], mode="all")
            truth = _truth(item(r["query_id"]))
            for i in every:
                side = top if i in keep else rest
                side["n"] += 1
                side["faithful"] += _faithful(r["texts"][i], truth)
                side["steps"] += len(re.findall(r"[.!?](?:\s|$)", r["texts"][i]))
    for side, name in ((top, "prm_top2"), (rest, "other_correct")):
        out[name] = {"responses": side["n"], "sound_pct": round(100 * side["faithful"] / max(1, side["n"]), 1),
                     "mean_steps": round(side["steps"] / max(1, side["n"]), 2)}
    labels = study / "prm" / "prm_labels.jsonl"
    if labels.exists():
        by_kind: dict[str, list[float]] = {"sound": [], "unsound": []}
        for line in labels.read_text().splitlines():
            rec = json.loads(line)
            truth = _truth(item(rec["query_id"]))
            for st in rec["steps"][:-1]:  # the last step's label is the response's own correctness
                ok = _step_sound(st["text"], truth)
                if ok is not None:
                    by_kind["sound" if ok else "unsound"].append(st["label"])
        out["mc_labels"] = {k: {"steps": len(v), "mean_label": round(sum(v) / max(1, len(v)), 3)}
                            for k, v in by_kind.items()}
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps({"study": arg, **analyse(Path(arg))}))
