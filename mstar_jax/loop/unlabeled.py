"""Unlabeled prompts in the self-evolving loop (paper 3.4, table 3).

From iteration ceil(start x iterations) on, each iteration also samples K responses for its slice of the
unlabeled queries. Their answers are never read for training:

    pseudo   the answer groups (`answer_groups`: equivalent answers together) are weighted-voted with the PRM
             scores; the winner is the pseudo label, and the responses in its group count as "correct"
    oracle   the hidden true answers decide correctness (the paper's skyline)

The responses that count as correct then go through the run's selection (PRM top-2 in the paper) and join
the labeled examples. When the records do carry answers, the pseudo labels' accuracy against them is logged
every iteration (monitoring only).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from mstar_jax.loop import prompts as P
from mstar_jax.loop.rollouts import Query, Rollout, reusable_rollouts, sample_queries, scoring_items, write_rollouts


def start_iteration(start: float, num_iterations: int) -> int:
    """The first iteration that mixes unlabeled prompts in (start = fraction of the run)."""
    return int(math.ceil(float(start) * num_iterations - 1e-9))


def _has_answer(q: Query) -> bool:
    return q.item.get("answer") not in (None, "")


def pseudo_label(texts: Sequence[str], scores: Sequence[float], item: dict) -> tuple[list[bool], str | None]:
    """(agreement with the PRM-weighted vote per response, the voted answer) for one unlabeled query."""
    from mstar_jax.answers import answer_groups, extract_answer
    from mstar_jax.prm.verify import prm_weights, vote_winner

    groups = answer_groups(texts, item)
    winner = vote_winner(groups, prm_weights(scores))
    if winner is None:
        return [False] * len(texts), None
    return [g == groups[winner] for g in groups], extract_answer(texts[winner], item)


def unlabeled_rollouts(sampler, params, queries: Sequence[Query], cfg, scorer, vote_scorer, path: Path,
                       temperature: float, seed: int) -> list[Rollout]:
    """Sample, pseudo-label (or oracle-check) and score one iteration's unlabeled queries (reused on resume).

    `scorer` gives the selection's scores (None for `all` / `random_k`); `vote_scorer` (the PRM) the voting
    weights of the pseudo labels."""
    from mstar_jax.loop.rollouts import check_samples

    reused = reusable_rollouts(path, queries, temperature)
    if reused is not None:
        return reused
    s = cfg.sampling
    samples = sample_queries(sampler, params, queries, P.cot_prompt, n=cfg.train.num_samples, temperature=temperature,
                             seed=seed, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, top_p=s.top_p,
                             top_k=s.top_k, desc=f"unlabeled rollouts T={temperature:g}", kill_point_name="rollouts")
    items = scoring_items(queries)
    scores = scorer.score(items, samples) if scorer is not None else [None] * len(queries)
    votes = scores if vote_scorer is scorer else (
        vote_scorer.score(items, samples) if vote_scorer is not None and cfg.unlabeled.mode == "pseudo" else scores)
    with_answer = [q for q in queries if _has_answer(q)]
    truth = dict(zip([q.id for q in with_answer], check_samples(with_answer, [samples[queries.index(q)]
                                                                              for q in with_answer])))
    out = []
    for q, ss, sc, vs in zip(queries, samples, scores, votes):
        texts = [x.text for x in ss]
        if cfg.unlabeled.mode == "oracle":
            correct, answer = truth[q.id], None
        else:
            correct, answer = pseudo_label(texts, vs, q.item)
        out.append(Rollout(q.id, P.cot_prompt(q.item), texts, correct, [list(map(float, x.logprobs)) for x in ss],
                           None if sc is None else list(map(float, sc)), temperature, kind="unlabeled",
                           pseudo_answer=answer, true_correct=truth.get(q.id)))
    write_rollouts(path, out)
    return out


def pseudo_label_metrics(rollouts: Sequence[Rollout]) -> dict:
    """How many unlabeled queries got a pseudo label, and how often it matches the hidden answer (the winning
    group's responses all carry it, so the first of them tells)."""
    voted = [r for r in rollouts if r.pseudo_answer is not None]
    hits = [r.true_correct[r.correct.index(True)] for r in voted if r.true_correct is not None and any(r.correct)]
    return {"unlabeled_queries": len(rollouts), "unlabeled_voted": len(voted),
            "pseudo_label_accuracy": float(np.mean(hits)) if hits else float("nan"),
            "unlabeled_queries_with_agreeing": sum(any(r.correct) for r in rollouts)}
