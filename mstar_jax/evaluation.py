"""Benchmark metrics from responses, the files that hold them, and batched generation through any model.

`evaluate_responses` needs no model: it scores given responses. `run_eval` batches prompts through any
`generate_fn(prompts) -> list[list[str]]` (the sampler plugs in there), then scores and writes the results.
Accuracies are percentages (0-100).

Metrics (results.json names the one used):
  accuracy    each item scored on its own; MathVista adds per-task (FQA, GPS, MWP, TQA, VQA) and per-skill (ALG, ARI,
              GEO, LOG, NUM, SCI, STA) tables as its calculate_score.py does (an item counts for each of its skills).
  circular    MMBench's CircularEval (VLMEvalKit `mcq_circular_eval`): the rotated copies of a question
              (metadata circular_group, i.e. index % 1e6) form one unit that counts only if every copy is right.
  first_copy  MMBench scored on the unrotated copies alone (circular_copy 0), one row per question.

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
from mstar_jax.errors import DataError

# MathVista metadata.task / metadata.skills -> the abbreviations of its paper and leaderboard.
TASK_ABBREV = {"figure question answering": "FQA", "geometry problem solving": "GPS", "math word problem": "MWP",
               "textbook question answering": "TQA", "visual question answering": "VQA"}
SKILL_ABBREV = {"algebraic reasoning": "ALG", "arithmetic reasoning": "ARI", "geometry reasoning": "GEO",
                "logical reasoning": "LOG", "numeric commonsense": "NUM", "scientific reasoning": "SCI",
                "statistical reasoning": "STA"}

# Perception sub-tasks removed for MMStar-R / MMBench-R. MMStar: its six core `category` values are coarse
# perception, fine-grained perception, instance reasoning, logical reasoning, math, science & technology.
# MMBench: its `l2-category` values are coarse_perception, finegrained_perception (instance-level),
# finegrained_perception (cross-instance), attribute_reasoning, relation_reasoning, logic_reasoning.
PERCEPTION_CATEGORIES = {
    "mmstar": ("coarse perception", "fine-grained perception"),
    "mmbench": ("coarse_perception", "finegrained_perception (instance-level)",
                "finegrained_perception (cross-instance)"),
}

METRICS = {
    "accuracy": "each item scored on its own",
    "circular": "MMBench CircularEval: a question counts only if every rotated copy (index % 1e6) is answered right",
    "first_copy": "MMBench, unrotated copies only (index < 1e6): one row per question",
}

GenerateFn = Callable[[list[dict]], list[list[str]]]


def task_of(item: dict) -> str:
    """The item's sub-task: MathVista task abbreviation, else metadata task / category, else 'all'."""
    meta = item.get("metadata") or {}
    task = meta.get("task") or meta.get("l2_category") or meta.get("category") or item.get("task")
    if not task:
        return "all"
    return TASK_ABBREV.get(str(task), str(task))


def skills_of(item: dict) -> list[str]:
    """The item's MathVista skills as their abbreviations (empty for other benchmarks)."""
    skills = (item.get("metadata") or {}).get("skills") or []
    return [SKILL_ABBREV.get(str(s), str(s)) for s in skills]


def is_perception(item: dict, benchmark: str) -> bool:
    """True if the item belongs to a perception sub-task of `benchmark` ('mmstar' or 'mmbench')."""
    meta = item.get("metadata") or {}
    key = "category" if benchmark == "mmstar" else "l2_category"
    return str(meta.get(key) or "").strip().lower() in {c.lower() for c in PERCEPTION_CATEGORIES[benchmark]}


def reasoning_subset(items: Sequence, benchmark: str) -> list:
    """The items (records or item dicts) of `benchmark` without its perception sub-tasks (the "-R" subset).

    DataError when no item is a perception one: the categories are not the benchmark's, so the subset would
    silently be the whole benchmark.
    """
    if benchmark not in PERCEPTION_CATEGORIES:
        raise ValueError(f"no reasoning subset defined for {benchmark!r}; known: {sorted(PERCEPTION_CATEGORIES)}")
    dicts = [x.to_item() if hasattr(x, "to_item") else x for x in items]
    kept = [x for x, d in zip(items, dicts) if not is_perception(d, benchmark)]
    if len(kept) == len(items):
        key = "category" if benchmark == "mmstar" else "l2_category"
        found = sorted({str((d.get("metadata") or {}).get(key)) for d in dicts})
        raise DataError(f"reasoning subset of {benchmark}: none of the {len(items)} items has a perception {key} "
                        f"({', '.join(PERCEPTION_CATEGORIES[benchmark])}); {key} values found: "
                        f"{', '.join(found[:12]) or 'none'}")
    return kept


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021); equals 'any correct' when k == n."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _units(items: Sequence[dict], rows: list[dict], metric: str) -> list[tuple[dict, list[dict]]]:
    """(representative item, its rows) per scored unit: one row each, or MMBench's copies of one question."""
    if metric == "accuracy":
        return [(it, [r]) for it, r in zip(items, rows)]
    copies = [(it, r, int((it.get("metadata") or {}).get("circular_copy") or 0)) for it, r in zip(items, rows)]
    if metric == "first_copy":
        return [(it, [r]) for it, r, c in copies if c == 0]
    groups: dict[str, list] = defaultdict(list)
    for it, r, c in copies:
        groups[str((it.get("metadata") or {}).get("circular_group", r["id"]))].append((c, it, r))
    return [(min(g, key=lambda t: t[0])[1], [r for _, _, r in sorted(g, key=lambda t: t[0])])
            for g in groups.values()]


def evaluate_responses(items: Sequence[dict], responses: Sequence[Sequence[str]], *, k: int | None = None,
                       check: Callable[[str, dict], bool] = check_answer, metric: str = "accuracy",
                       prompts: Sequence[str] | None = None) -> dict:
    """Greedy accuracy and Pass@k, overall, per sub-task and (MathVista) per skill, under `metric`.

    responses[i][0] is the greedy response of items[i]; responses[i][1:] are sampled responses, of which the
    first `k` (default: all, the same count for every item) give Pass@k. Under "circular" a question's Pass@k is
    the product of its copies' (their samples are independent). prompts[i], when given, is recorded per item. A
    gold answer that cannot be parsed raises (GoldAnswerError names the item).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    if len(items) != len(responses) or (prompts is not None and len(prompts) != len(items)):
        raise ValueError(f"{len(items)} items but {len(responses)} response lists"
                         + (f" and {len(prompts)} prompts" if prompts is not None else ""))
    n_samples = {len(r) - 1 for r in responses}
    if k is None:
        k = min(n_samples) if n_samples else 0
    rows = []
    for i, (item, resp) in enumerate(zip(items, responses)):
        rid = item.get("pid") or item.get("id")
        if not resp:
            raise ValueError(f"item {rid}: no responses (need at least the greedy one)")
        correct = [bool(check(r, item)) for r in resp]
        row = {"id": rid, "task": task_of(item), "answer": item.get("answer"), "choices": item.get("choices"),
               "greedy_correct": correct[0], "responses": list(resp), "correct": correct,
               "extracted": [extract_answer(r, item) for r in resp]}
        if prompts is not None:
            row["prompt"] = prompts[i]
        if k:
            if len(correct) - 1 < k:
                raise ValueError(f"item {rid}: pass@{k} needs {k} sampled responses, got {len(resp) - 1}")
            row[f"pass@{k}"] = pass_at_k(k, sum(correct[1:1 + k]), k)
        rows.append(row)

    scored = []  # (unit item, greedy right, pass@k)
    for item, unit_rows in _units(items, rows, metric):
        greedy = all(r["greedy_correct"] for r in unit_rows)
        passed = math.prod(r[f"pass@{k}"] for r in unit_rows) if k else None
        scored.append((item, greedy, passed))

    def table(key_fn) -> dict:
        groups: dict[str, list] = defaultdict(list)
        for item, greedy, passed in scored:
            for key in key_fn(item):
                groups[key].append((greedy, passed))
        return {key: _entry(groups[key], k) for key in sorted(groups)}

    result = {"metric": metric, "metric_description": METRICS[metric], "rows": len(items),
              **_entry([(g, p) for _, g, p in scored], k), "k": k, "per_task": table(lambda it: [task_of(it)])}
    if k:
        result[f"pass@{k}-greedy"] = result[f"pass@{k}"] - result["greedy_accuracy"]
    if any(skills_of(it) for it, _, _ in scored):
        result["per_skill"] = table(skills_of)
    result["per_item"] = rows
    return result


def _entry(units: list[tuple[bool, float | None]], k: int) -> dict:
    """{"n", "greedy_accuracy" (%), "pass@k" (%)} of (greedy right, pass@k) pairs."""
    def pct(xs):
        return 100.0 * sum(xs) / len(xs) if xs else 0.0

    entry = {"n": len(units), "greedy_accuracy": pct([g for g, _ in units])}
    if k:
        entry[f"pass@{k}"] = pct([p for _, p in units])
    return entry


def results_markdown(result: dict, title: str = "") -> str:
    """Markdown tables: one row per sub-task plus 'overall', then one per MathVista skill when there are skills."""
    from mstar_jax.reporting import markdown_table

    k = result.get("k") or 0
    cols = ["n", "greedy acc (%)"] + ([f"pass@{k} (%)"] if k else [])

    def cells(name, entry):
        return [name, entry["n"], float(entry["greedy_accuracy"])] + ([float(entry[f"pass@{k}"])] if k else [])

    lines = [f"### {title}", ""] if title else []
    lines.append(f"metric: {result.get('metric', 'accuracy')} ({result.get('metric_description', '')})\n")
    body = [cells(t, e) for t, e in result["per_task"].items()] + [cells("**overall**", result)]
    lines.append(markdown_table(["task"] + cols, body))
    if result.get("per_skill"):
        lines.append(markdown_table(["skill"] + cols, [cells(s, e) for s, e in result["per_skill"].items()]))
    return "\n".join(lines)


def write_results(result: dict, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Write results.json (metrics), results.md (tables) and responses.jsonl (every prompt and response)."""
    from mstar_jax.io import write_atomic, write_lines_atomic

    out = Path(out_dir)
    metrics = {k: v for k, v in result.items() if k != "per_item"}
    paths = {"json": out / "results.json", "markdown": out / "results.md", "responses": out / "responses.jsonl"}
    write_atomic(paths["json"], json.dumps(metrics, indent=1, sort_keys=True))
    write_atomic(paths["markdown"], results_markdown(result, title))
    write_lines_atomic(paths["responses"], [json.dumps(r, sort_keys=True) for r in result["per_item"]])
    return paths


def run_eval(generate_fn: GenerateFn, records: Sequence, *, root: str | Path, prompt_builder: Callable[[dict], str],
             batch_size: int = 32, k: int | None = None, benchmark: str | None = None, reasoning_only: bool = False,
             metric: str = "accuracy", out_dir: str | Path | None = None, title: str = "") -> dict:
    """Generate responses for records in batches with `generate_fn`, score them, and optionally write them.

    generate_fn receives a list of {"id", "prompt", "images" (absolute paths), "item"} and returns, per prompt,
    a list of responses: the greedy one first, then the samples used for Pass@k.
    """
    if reasoning_only:
        records = reasoning_subset(records, benchmark or "")
    items = [r.to_item() for r in records]
    prompts = [prompt_builder(it) for it in items]
    responses: list[list[str]] = []
    for start in range(0, len(items), batch_size):
        batch = [{"id": it["pid"], "prompt": prompt, "item": it,
                  "images": [str(Path(root) / rel) for rel in it["images"]]}
                 for it, prompt in zip(items[start:start + batch_size], prompts[start:start + batch_size])]
        out = generate_fn(batch)
        if len(out) != len(batch):
            raise ValueError(f"generate_fn returned {len(out)} response lists for {len(batch)} prompts")
        responses.extend([list(r) for r in out])
    result = evaluate_responses(items, responses, k=k, metric=metric, prompts=prompts)
    if out_dir is not None:
        write_results(result, out_dir, title)
    return result
