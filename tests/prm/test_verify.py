"""The PRM as a verifier: Best-of-N, weighted and majority voting, Pass@N against hand computations."""

from __future__ import annotations

import pytest

from mstar_jax.answers import answer_groups, check_answer
from mstar_jax.prm.verify import best_of_n, majority_vote, verifier_curves, vote_winner, weighted_vote

MC = {"question_type": "multi_choice", "answer_type": "text", "choices": ["1", "2", "3"], "answer": "2"}
INT = {"question_type": "free_form", "answer_type": "integer", "answer": "2"}


def test_equivalent_answers_share_a_group():
    texts = ["The answer is 2.", "The answer is 2.0", "The answer is (B) 2", "The answer is 3.",
             "nothing to extract here, just words words words words"]
    assert answer_groups(texts, MC) == [0, 0, 0, 1, None]
    assert answer_groups(texts[:2] + ["The answer is 3", "The answer is 2.7"], INT) == [0, 0, 1, 0]  # int() truncates


# One MC question: three ways of saying (B) 2, which is right, against three wrong "3"s.
TEXTS = ["The answer is 2.", "The answer is 3.", "The answer is 2.0", "The answer is 3.", "The answer is (B) 2",
         "The answer is 3."]
SCORES = [0.4, 0.5, 0.4, 0.3, 0.4, 0.2]


def test_voting_and_best_of_n_by_hand():
    groups = answer_groups(TEXTS, MC)
    correct = [check_answer(t, MC) for t in TEXTS]
    assert groups == [0, 1, 0, 1, 0, 1] and correct == [True, False, True, False, True, False]
    assert best_of_n(correct, SCORES) is False  # 0.5 is the "3" at index 1
    # Weighted: "2" = 0.4 * 3 = 1.2 > "3" = 1.0; had "2.0" and "(B) 2" counted apart, "3" would win.
    assert weighted_vote(correct, groups, SCORES) is True
    assert majority_vote(correct, groups) is True  # 3 vs 3: the group seen first
    assert majority_vote(correct[1:], groups[1:]) is False  # 3 vs 2 without the first "2"
    assert weighted_vote(correct, groups, [0.4, 2.0, 0.4, -5.0, 0.4, 0.0]) is False  # negatives count 0
    assert vote_winner([None, None], [1.0, 1.0]) is None


def test_curves_over_n_by_hand():
    groups = [answer_groups(TEXTS, MC), answer_groups(TEXTS, MC)]
    correct = [[check_answer(t, MC) for t in TEXTS]] * 2
    scores = [SCORES, [0.9, 0.1, 0.1, 0.1, 0.1, 0.8]]
    curves = verifier_curves(correct, scores, groups, [1, 2, 4, 6])
    # N=1: only the first sample ("2", right) for both questions.
    assert curves[1] == {"best_of_n": 100.0, "weighted_vote": 100.0, "majority_vote": 100.0, "pass@n": 100.0}
    # N=2: q1 BoN picks "3" (0.5), q2 picks "2" (0.9); votes: q1 1-1 tie by weight 0.4 vs 0.5 -> "3",
    # q2 0.9 vs 0.1 -> "2"; majority 1-1 -> the first group ("2") in both.
    assert curves[2] == {"best_of_n": 50.0, "weighted_vote": 50.0, "majority_vote": 100.0, "pass@n": 100.0}
    # N=6: q1 as in test_voting_and_best_of_n_by_hand; q2 BoN 0.9 ("2") right, weighted 1.1 vs 1.0 right.
    assert curves[6] == {"best_of_n": 50.0, "weighted_vote": 100.0, "majority_vote": 100.0, "pass@n": 100.0}
    with pytest.raises(ValueError, match="only 6 samples"):
        verifier_curves(correct, scores, groups, [8])
