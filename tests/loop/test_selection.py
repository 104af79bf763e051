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
