"""Warm-up data: another run's warm-up rollouts (warmup.rollouts) in place of sampling, and the examples from them."""

from __future__ import annotations

import pytest
from ml_collections import ConfigDict

from mstar_jax.errors import DataError
from mstar_jax.loop import prompts as P
from mstar_jax.loop.rollouts import Query, Rollout, read_rollouts, write_rollouts
from mstar_jax.loop.warmup import warmup_examples, warmup_rollouts


def _cfg(rollouts: str = "") -> ConfigDict:
    return ConfigDict({"seed": 0, "warmup": {"num_samples": 2, "temperature": 1.0, "max_examples": 100,
                                             "max_per_query": 1, "rollouts": rollouts},
                       "sampling": {"max_new_tokens": 8, "batch_size": 4, "top_p": 1.0, "top_k": 0}})


def _rollout(qid: str, texts, correct) -> Rollout:
    return Rollout(qid, "hinted prompt", list(texts), list(correct), [[0.0]] * len(texts), temperature=1.0)


class NoSampler:
    """Fails the test if the warm-up samples although it was given rollouts."""

    def __getattr__(self, name):
        raise AssertionError(f"the warm-up sampled ({name}) although warmup.rollouts was given")


def test_given_rollouts_are_used_in_this_runs_query_order_and_kept_in_the_workdir(tmp_path):
    other = tmp_path / "other" / "warmup.jsonl"
    # Another backbone's run: its own order, and a query this run does not warm up on.
    write_rollouts(other, [_rollout("b", ["B wrong", "B right"], [False, True]),
                           _rollout("x", ["X right"], [True]),
                           _rollout("a", ["A right", "A also right"], [True, True])])
    queries = [Query(q, (), {"question": f"question {q}?", "answer": "1"}) for q in ("a", "b")]
    mine = tmp_path / "run" / "rollouts" / "warmup.jsonl"
    got = warmup_rollouts(NoSampler(), None, queries, _cfg(str(other)), mine)
    assert [r.query_id for r in got] == ["a", "b"]
    assert [r.query_id for r in read_rollouts(mine)] == ["a", "b"]
    examples = warmup_examples(queries, got, _cfg(str(other)))
    assert [(q.id, response) for q, _, response in examples] == [("a", "A right"), ("b", "B right")]
    assert [prompt for _, prompt, _ in examples] == [P.cot_prompt(q.item) for q in queries]  # the hint removed


def test_given_rollouts_missing_a_query_are_refused_naming_the_file_and_query(tmp_path):
    other = tmp_path / "warmup.jsonl"
    write_rollouts(other, [_rollout("a", ["A right"], [True])])
    queries = [Query(q, (), {"question": "?", "answer": "1"}) for q in ("a", "c")]
    mine = tmp_path / "run" / "warmup.jsonl"
    with pytest.raises(DataError, match=r"warmup\.jsonl: no warm-up rollouts for 1 of the 2 .*'c'"):
        warmup_rollouts(NoSampler(), None, queries, _cfg(str(other)), mine)
    assert not mine.exists()
