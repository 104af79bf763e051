"""Benchmark metrics from responses: greedy accuracy overall and per sub-task, Pass@K, and their files.

`evaluate_responses` needs no model: it scores given responses. `run_eval` batches prompts through any
`generate_fn(prompts) -> list[list[str]]` (the sampler plugs in there), then scores and writes the results.
Accuracies are percentages (0-100).

Reasoning subsets ("-R", paper 4.2 / Table 5: "we remove the perception sub-tasks"): the paper does not list
them; we drop the categories named perception in each benchmark's own taxonomy, see PERCEPTION_CATEGORIES.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

from mstar_jax.answers import check_answer, extract_answer
from mstar_jax.reporting import write_atomic

# MathVista metadata.task -> the abbreviations of its paper and leaderboard.
TASK_ABBREV = {"figure question answering": "FQA", "geometry problem solving": "GPS", "math word problem": "MWP",
               "textbook question answering": "TQA", "visual question answering": "VQA"}

# Perception sub-tasks removed for MMStar-R / MMBench-R. MMStar: its six core `category` values are coarse
# perception, fine-grained perception, instance reasoning, logical reasoning, math, science & technology.
# MMBench: its `l2-category` values are coarse_perception, finegrained_perception (instance-level),
# finegrained_perception (cross-instance), attribute_reasoning, relation_reasoning, logic_reasoning.
PERCEPTION_CATEGORIES = {
    "mmstar": ("coarse perception", "fine-grained perception"),
    "mmbench": ("coarse_perception", "finegrained_perception (instance-level)",
                "finegrained_perception (cross-instance)"),
}

GenerateFn = Callable[[list[dict]], list[list[str]]]


def task_of(item: dict) -> str:
    """The item's sub-task: MathVista task abbreviation, else metadata task / category, else 'all'."""
    meta = item.get("metadata") or {}
    task = meta.get("task") or meta.get("l2_category") or meta.get("category") or item.get("task")
    if not task:
        return "all"
    return TASK_ABBREV.get(str(task), str(task))


def is_perception(item: dict, benchmark: str) -> bool:
    """True if the item belongs to a perception sub-task of `benchmark` ('mmstar' or 'mmbench')."""
    meta = item.get("metadata") or {}
    cats = PERCEPTION_CATEGORIES[benchmark]
    key = "category" if benchmark == "mmstar" else "l2_category"
    return str(meta.get(key) or "").strip().lower() in {c.lower() for c in cats}


def reasoning_subset(items: Sequence, benchmark: str) -> list:
    """The items (records or item dicts) of `benchmark` without its perception sub-tasks (the "-R" subset)."""
    if benchmark not in PERCEPTION_CATEGORIES:
        raise ValueError(f"no reasoning subset defined for {benchmark!r}; known: {sorted(PERCEPTION_CATEGORIES)}")
    return [x for x in items if not is_perception(x.to_item() if hasattr(x, "to_item") else x, benchmark)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021); equals 'any correct' when k == n."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_responses(items: Sequence[dict], responses: Sequence[Sequence[str]], *, k: int | None = None,
                       check: Callable[[str, dict], bool] = check_answer) -> dict:
    """Greedy accuracy and Pass@k, overall and per sub-task.

    responses[i][0] is the greedy response of items[i]; responses[i][1:] are sampled responses, of which the
    first `k` (default: all, the same count for every item) give Pass@k. A gold answer that cannot be parsed
    raises (GoldAnswerError names the item).
    """
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} response lists")
    n_samples = {len(r) - 1 for r in responses}
    if k is None:
        k = min(n_samples) if n_samples else 0
    per_item, greedy_by_task, pass_by_task = [], defaultdict(list), defaultdict(list)
    for item, resp in zip(items, responses):
        if not resp:
            raise ValueError(f"item {item.get('pid') or item.get('id')}: no responses (need at least the greedy one)")
        correct = [bool(check(r, item)) for r in resp]
        task = task_of(item)
        greedy_by_task[task].append(correct[0])
        row = {"id": item.get("pid") or item.get("id"), "task": task, "answer": item.get("answer"),
               "greedy_correct": correct[0], "responses": list(resp), "correct": correct,
               "extracted": [extract_answer(r, item) for r in resp]}
        if k:
            samples = correct[1:1 + k] if len(correct) - 1 >= k else None
            if samples is None:
                raise ValueError(f"item {row['id']}: pass@{k} needs {k} sampled responses, got {len(resp) - 1}")
            row[f"pass@{k}"] = pass_at_k(len(samples), sum(samples), k)
            pass_by_task[task].append(row[f"pass@{k}"])
        per_item.append(row)

    def pct(xs):
        return 100.0 * sum(xs) / len(xs) if xs else 0.0

    result = {"n": len(items), "k": k, "greedy_accuracy": pct([r["greedy_correct"] for r in per_item]),
              "per_task": {}, "per_item": per_item}
    if k:
        result[f"pass@{k}"] = pct([r[f"pass@{k}"] for r in per_item])
        result[f"pass@{k}-greedy"] = result[f"pass@{k}"] - result["greedy_accuracy"]
    for task in sorted(greedy_by_task):
        entry = {"n": len(greedy_by_task[task]), "greedy_accuracy": pct(greedy_by_task[task])}
        if k:
            entry[f"pass@{k}"] = pct(pass_by_task[task])
        result["per_task"][task] = entry
    return result


def markdown_table(result: dict, title: str = "") -> str:
    """A markdown table: one row per sub-task plus 'overall'."""
    k = result.get("k") or 0
    header = ["task", "n", "greedy acc (%)"] + ([f"pass@{k} (%)"] if k else [])
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(header) + " |",
                                                       "|" + "---|" * len(header)]

    def row(name, entry):
        cells = [name, str(entry["n"]), f"{entry['greedy_accuracy']:.1f}"]
        if k:
            cells.append(f"{entry[f'pass@{k}']:.1f}")
        return "| " + " | ".join(cells) + " |"

    for task, entry in result["per_task"].items():
        lines.append(row(task, entry))
    lines.append(row("**overall**", result))
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Write results.json (metrics), results.md (table) and responses.jsonl (every response); return paths."""
    out = Path(out_dir)
    metrics = {k: v for k, v in result.items() if k != "per_item"}
    paths = {"json": out / "results.json", "markdown": out / "results.md", "responses": out / "responses.jsonl"}
    write_atomic(paths["json"], json.dumps(metrics, indent=1, sort_keys=True))
    write_atomic(paths["markdown"], markdown_table(result, title))
    write_atomic(paths["responses"], "".join(json.dumps(r, sort_keys=True) + "\n" for r in result["per_item"]))
    return paths


def run_eval(generate_fn: GenerateFn, records: Sequence, *, root: str | Path, prompt_builder: Callable[[dict], str],
             batch_size: int = 32, k: int | None = None, benchmark: str | None = None, reasoning_only: bool = False,
             out_dir: str | Path | None = None, title: str = "") -> dict:
    """Generate responses for records in batches with `generate_fn`, score them, and optionally write them.

    generate_fn receives a list of {"id", "prompt", "images" (absolute paths), "item"} and returns, per prompt,
    a list of responses: the greedy one first, then the samples used for Pass@k.
    """
    if reasoning_only:
        records = reasoning_subset(records, benchmark or "")
    items = [r.to_item() for r in records]
    responses: list[list[str]] = []
    for start in range(0, len(items), batch_size):
        part = items[start:start + batch_size]
        batch = [{"id": it["pid"], "prompt": prompt_builder(it), "item": it,
                  "images": [str(Path(root) / rel) for rel in it["images"]]} for it in part]
        out = generate_fn(batch)
        if len(out) != len(batch):
            raise ValueError(f"generate_fn returned {len(out)} response lists for {len(batch)} prompts")
        responses.extend([list(r) for r in out])
    result = evaluate_responses(items, responses, k=k)
    if out_dir is not None:
        write_results(result, out_dir, title)
    return result
