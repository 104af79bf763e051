"""Rollout selection: correct, de-duplicated, top-N by score, capped."""

from mstar_jax.loop.prompts import cot_prompt, hinted_prompt
from mstar_jax.loop.selection import select_responses


def test_keeps_correct_unique_responses():
    texts = ["a  b", "a b", "c", "d", ""]
    assert select_responses(texts, [True, True, False, True, True]) == [0, 3]


def test_top_n_by_score_then_cap():
    texts = ["w", "x", "y", "z"]
    correct = [True, True, True, False]
    assert select_responses(texts, correct, scores=[0.1, 0.9, 0.5, 5.0], top_n=2) == [1, 2]
    assert select_responses(texts, correct, max_per_query=1) == [0]
    assert select_responses(texts, [False] * 4) == []


def test_hint_prompt_contains_answer_and_cot_prompt_does_not():
    item = {"question": "How many circles?", "answer": "3", "choices": None}
    assert "3" in hinted_prompt(item) and "3" not in cot_prompt(item)
    mc = cot_prompt({"question": "Which?", "choices": ["red", "blue"]})
    assert "(A) red" in mc and "(B) blue" in mc


# One query's 6 samples: which are correct, and their aggregated PRM scores (a fixed table).
TEXTS = ["s0", "s1", "s2", "s3", "s4", "s1 "]  # s5 duplicates s1
CORRECT = [True, True, False, True, True, True]
SCORES = [0.35, 0.8, 0.99, 0.6, 0.6, 0.9]


def test_the_four_selections_by_hand():
    import numpy as np
    import pytest

    assert select_responses(TEXTS, CORRECT, SCORES, mode="all") == [0, 1, 3, 4]
    assert select_responses(TEXTS, CORRECT, SCORES, 2, mode="top_k") == [1, 3]  # 0.8, then 0.6 (first of the tie)
    assert select_responses(TEXTS, CORRECT, SCORES, mode="threshold", threshold=0.6) == [1, 3, 4]
    assert select_responses(TEXTS, CORRECT, SCORES, mode="threshold", threshold=0.9) == []
    picks = {tuple(select_responses(TEXTS, CORRECT, None, 2, mode="random_k", rng=np.random.default_rng(s)))
             for s in range(20)}
    assert all(len(p) == 2 and set(p) <= {0, 1, 3, 4} for p in picks) and len(picks) > 1
    assert select_responses(TEXTS, CORRECT, SCORES, 2, max_per_query=1, mode="top_k") == [1]
    with pytest.raises(ValueError, match="needs scores"):
        select_responses(TEXTS, CORRECT, None, 2, mode="top_k")


def test_threshold_is_chosen_by_balanced_accuracy_on_validation():
    from mstar_jax.loop.selection import choose_threshold, threshold_grid

    correct = [[True, True, False, False], [True, False, False, False]]
    scores = [[0.9, 0.55, 0.5, 0.1], [0.7, 0.65, 0.2, 0.0]]
    alpha, table = choose_threshold(correct, scores, threshold_grid(0.1))
    # alpha 0.6: keeps 2 of 3 correct and drops 4 of 5 wrong -> (2/3 + 4/5) / 2; alpha 0.7: 2/3 and 5/5.
    assert table[0.7] == 0.5 * (2 / 3 + 1.0) and alpha == 0.7
    assert table[0.0] == 0.5 and len(table) == 11
