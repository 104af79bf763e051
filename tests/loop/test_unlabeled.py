"""Unlabeled prompts: PRM-weighted pseudo labels, when they join the run, and the accuracy monitored against them."""

from __future__ import annotations

from mstar_jax.loop.rollouts import Rollout
from mstar_jax.loop.unlabeled import pseudo_label, pseudo_label_metrics, start_iteration

MC = {"question_type": "multi_choice", "answer_type": "text", "choices": ["1", "2", "3"]}  # no answer: unlabeled


def test_pseudo_label_is_the_prm_weighted_vote_over_equivalent_answers():
    no_answer = "a long line without any answer marker, which therefore votes for nothing"
    texts = ["The answer is 3.", "The answer is 2.", "The answer is (B) 2", "The answer is 3.", no_answer]
    # "3" has two votes but weight 0.3 + 0.2; "2" and "(B) 2" are one answer with weight 0.4 + 0.4.
    agree, answer = pseudo_label(texts, [0.3, 0.4, 0.4, 0.2, 0.9], MC)
    assert agree == [False, True, True, False, False] and answer == "2"
    agree, answer = pseudo_label(texts, [0.9, 0.1, 0.1, 0.9, 0.0], MC)
    assert agree == [True, False, False, True, False] and answer == "3"
    assert pseudo_label([no_answer, no_answer + " again"], [1.0, 1.0], MC) == ([False, False], None)


def test_start_iteration_and_pseudo_label_accuracy():
    assert [start_iteration(s, 8) for s in (0.0, 0.25, 0.5, 0.75)] == [0, 2, 4, 6]
    rollouts = [Rollout("a", "p", ["x", "y"], [False, True], [[0.0]] * 2, kind="unlabeled", pseudo_answer="2",
                        true_correct=[False, True]),
                Rollout("b", "p", ["x", "y"], [True, True], [[0.0]] * 2, kind="unlabeled", pseudo_answer="3",
                        true_correct=[False, False]),
                Rollout("c", "p", ["x"], [False], [[0.0]], kind="unlabeled", pseudo_answer=None, true_correct=[True])]
    m = pseudo_label_metrics(rollouts)
    assert m == {"unlabeled_queries": 3, "unlabeled_voted": 2, "pseudo_label_accuracy": 0.5,
                 "unlabeled_queries_with_agreeing": 2}
