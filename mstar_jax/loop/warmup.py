"""Warm-up (paper 2.2, appendix B): unlock chain-of-thought before self-evolving.

For each warm-up query the policy samples responses with the ground-truth answer as a hint and an instruction to
reason step by step; responses whose extracted final answer is correct are kept (de-duplicated, at most M per
query, at most `max_examples` overall), and the policy is fine-tuned on them with the hint removed from the
prompt.

`warmup.rollouts` takes the responses from another run's warm-up instead (its `rollouts/warmup.jsonl`): the paper
warms Phi-3.5-vision and InternVL2 up on the data MiniCPM-V-2.5 generated (section 4.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mstar_jax.errors import DataError
from mstar_jax.loop import prompts as P
from mstar_jax.loop.rollouts import (Query, make_rollouts, read_rollouts, reusable_rollouts, sample_queries,
                                     write_rollouts)
from mstar_jax.loop.selection import select_responses


def warmup_rollouts(sampler, params, queries: Sequence[Query], cfg, path: Path):
    """Answer-hinted rollouts (reused from `path` when a previous run finished them, or `warmup.rollouts`')."""
    w, s = cfg.warmup, cfg.sampling
    if w.get("rollouts"):
        given = given_rollouts(w.rollouts, queries)
        write_rollouts(path, given)  # the workdir keeps what its warm-up trained on
        return given
    reused = reusable_rollouts(path, queries, w.temperature)
    if reused is not None:
        return reused
    samples = sample_queries(sampler, params, queries, P.hinted_prompt, n=w.num_samples, temperature=w.temperature,
                             seed=cfg.seed * 7 + 1, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                             top_p=s.top_p, top_k=s.top_k, desc="warm-up rollouts")
    rollouts = make_rollouts(queries, samples, P.hinted_prompt, temperature=w.temperature)
    write_rollouts(path, rollouts)
    return rollouts


def given_rollouts(path: str | Path, queries: Sequence[Query]):
    """Another run's warm-up rollouts for `queries`, in their order; DataError naming the file when any is missing."""
    by_id = {r.query_id: r for r in read_rollouts(path)}
    missing = [q.id for q in queries if q.id not in by_id]
    if missing:
        raise DataError(f"{path}: no warm-up rollouts for {len(missing)} of the {len(queries)} warm-up queries "
                        f"(first: {missing[0]!r}); warmup.rollouts must come from a run on the same data.warmup")
    return [by_id[q.id] for q in queries]


def warmup_examples(queries: Sequence[Query], rollouts, cfg) -> list[tuple[Query, str, str]]:
    """(query, CoT prompt without the hint, response) pairs, capped per query and overall."""
    by_id = {q.id: q for q in queries}
    out = []
    for r in rollouts:
        q = by_id[r.query_id]
        out += [(q, P.cot_prompt(q.item), r.texts[i])
                for i in select_responses(r.texts, r.correct, max_per_query=cfg.warmup.max_per_query)]
    if len(out) > cfg.warmup.max_examples:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(out), cfg.warmup.max_examples, replace=False))
        out = [out[i] for i in keep]
    return out
