"""Step splitting and the alignment of step labels to tokens (the PRM's per-token targets)."""

from __future__ import annotations

import numpy as np
import pytest

from mstar_jax.errors import ConfigError
from mstar_jax.prm.encode import response_tokens
from mstar_jax.prm.steps import end_tokens, split_steps, token_targets


def test_lines_sentences_paragraphs_and_regex():
    text = "Step one: 3.5 cm.\n\n  Step two!\nThe answer is 7."
    assert [text[a:b] for a, b in split_steps(text, "lines")] == ["Step one: 3.5 cm.", "Step two!", "The answer is 7."]
    assert [text[a:b] for a, b in split_steps(text, "sentences")] == [
        "Step one: 3.5 cm.", "Step two!", "The answer is 7."]  # "3.5" is no boundary
    assert [text[a:b] for a, b in split_steps(text, "paragraphs")] == [
        "Step one: 3.5 cm.", "Step two!\nThe answer is 7."]
    semi = "a;b;;c"
    assert [semi[a:b] for a, b in split_steps(semi, "regex:;")] == ["a;", "b;", ";", "c"]


def test_a_response_without_separator_is_one_step_and_blank_is_none():
    assert split_steps("no separator at all", "lines") == [(0, 19)]
    assert split_steps("  \n \n", "lines") == []
    with pytest.raises(ConfigError, match="step_rule"):
        split_steps("x", "words")
    with pytest.raises(ConfigError, match="regular expression"):
        split_steps("x", "regex:(")


def test_targets_follow_the_steps_end_tokens():
    # Tokens: [0,3) [3,6) [6,10) [10,12) [12,15); steps [0,5) [6,11) [11,15).
    offsets = [(0, 3), (3, 6), (6, 10), (10, 12), (12, 15)]
    spans = [(0, 5), (6, 11), (11, 15)]
    ends = end_tokens(offsets, spans)
    # Step 1 ends at char 4, inside token 1 [3,6); step 2 ends at char 10, inside token 3 [10,12), where step 3
    # also starts: the token that completes a step carries its label.
    assert ends == [1, 3, 4]
    targets, mask = token_targets(ends, [0.25, 0.5, 1.0], num_tokens=6)
    np.testing.assert_array_equal(targets, [0.25, 0.25, 0.5, 0.5, 1.0, 0.0])
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0])  # a token after the last step is not scored


def test_steps_ending_in_one_token_give_it_the_last_label():
    targets, mask = token_targets([1, 1, 2], [0.1, 0.9, 0.4], num_tokens=3)
    np.testing.assert_array_equal(targets, np.float32([0.1, 0.9, 0.4]))


def test_a_boundary_inside_a_real_token(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["clip_llama"][0])
    text = "The left die shows 3. The right die shows 5."
    spans = split_steps(text, "regex:sho")  # cuts "shows" in the middle of its token
    ids, offsets = response_tokens(tok, text)
    assert "".join(tok.decode([i]) for i in ids) == text
    ends = end_tokens(offsets, spans)
    first_end = spans[0][1] - 1  # the "o" of the first "shows"
    a, b = offsets[ends[0]]
    assert a <= first_end < b and b > spans[0][1], "the first step should end inside a token"
    targets, mask = token_targets(ends, [0.0, 1.0, 0.5], len(ids))
    assert targets[ends[0]] == 0.0 and targets[ends[0] + 1] == 1.0
    assert mask.sum() == ends[-1] + 1
