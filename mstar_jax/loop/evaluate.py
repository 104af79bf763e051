"""Greedy test accuracy of a policy, overall and per task, written once per stage (and reused on resume)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from mstar_jax.evaluation import task_of
from mstar_jax.loop import prompts as P
from mstar_jax.loop.rollouts import Query, check_samples, sample_queries
from mstar_jax.io import write_atomic


def greedy_responses(sampler, params, queries: Sequence[Query], cfg, desc: str) -> tuple[list, list[bool]]:
    """The greedy CoT sample of every query and whether it is correct (test evaluations and the dynamics)."""
    s = cfg.sampling
    samples = sample_queries(sampler, params, queries, P.cot_prompt, n=1, temperature=0.0, seed=0,
                             max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, desc=desc)
    return samples, [c[0] for c in check_samples(queries, samples)]


def greedy_eval(sampler, params, queries: Sequence[Query], cfg, desc: str) -> dict:
    """Greedy CoT accuracy (percent) overall and per task, plus the responses."""
    samples, correct = greedy_responses(sampler, params, queries, cfg, desc)
    per_task = defaultdict(list)
    for q, c in zip(queries, correct):
        per_task[task_of(q.item)].append(c)
    return {"accuracy": 100.0 * sum(correct) / max(1, len(correct)), "n": len(correct),
            "per_task": {t: 100.0 * sum(v) / len(v) for t, v in sorted(per_task.items())},
            "responses": [{"id": q.id, "response": ss[0].text, "correct": c}
                          for q, ss, c in zip(queries, samples, correct)]}


def evaluate_stage(sampler, params, splits: dict[str, Sequence[Query]], cfg, out: Path, stage: str) -> dict:
    """Evaluate on the test splits once; `out` (JSON) makes the stage resumable."""
    if out.exists():
        return json.loads(out.read_text())
    result = {"stage": stage}
    for name in ("test_id", "test_ood"):
        if splits.get(name):
            result[name] = greedy_eval(sampler, params, splits[name], cfg, f"{stage} eval {name}")
    write_atomic(out, json.dumps(result, indent=1))
    return result
