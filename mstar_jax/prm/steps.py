"""Reasoning steps of a response: character spans by a configurable rule, and their alignment to tokens.

A step is a character span [start, end) of the response holding its content (whitespace between steps belongs
to no step). The PRM reads a step's score at its *end token*: the token that holds the step's last character.
When a step boundary falls inside a token, that token completes the step and carries its label; a token
after the previous step's end token and up to this step's end token belongs to this step.

Rules (config `prm.step_rule`):
    lines             one step per non-empty line (the paper's default)
    sentences         one step per sentence (".", "!" or "?" followed by whitespace; "3.5" is not a boundary)
    paragraphs        one step per block separated by blank lines
    regex:PATTERN     a step ends at the end of every match of PATTERN
"""

from __future__ import annotations

import bisect
import re
from typing import Sequence

import numpy as np

from mstar_jax.errors import ConfigError, DataError

RULES = ("lines", "sentences", "paragraphs", "regex:PATTERN")
_SEPARATORS = {
    "lines": re.compile(r"\n"),
    "sentences": re.compile(r"(?<=[.!?])(?=\s)"),
    "paragraphs": re.compile(r"\n\s*\n"),
}


def _separator(rule: str) -> re.Pattern:
    if rule in _SEPARATORS:
        return _SEPARATORS[rule]
    if rule.startswith("regex:") and len(rule) > len("regex:"):
        try:
            return re.compile(rule[len("regex:"):])
        except re.error as err:
            raise ConfigError(f"prm.step_rule {rule!r}: not a valid regular expression ({err})") from None
    raise ConfigError(f"prm.step_rule {rule!r} is not one of {', '.join(RULES)}")


def check_rule(rule: str) -> str:
    """`rule` if it is a known step rule (ConfigError otherwise)."""
    _separator(rule)
    return rule


def split_steps(text: str, rule: str = "lines") -> list[tuple[int, int]]:
    """Content spans [(start, end), ...] of the steps of `text`, in order; [] for an all-whitespace text.

    A response with no separator is one step."""
    sep = _separator(rule)
    cuts = [0] + [m.end() for m in sep.finditer(text) if 0 < m.end() < len(text)] + [len(text)]
    spans = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        chunk = text[a:b]
        stripped = chunk.strip()
        if not stripped:
            continue
        start = a + (len(chunk) - len(chunk.lstrip()))
        spans.append((start, start + len(stripped)))
    return spans


def end_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Index of each step's end token: the last token starting at or before the step's last character."""
    if not offsets:
        raise DataError("a response with no tokens has no steps to score")
    starts = [a for a, _ in offsets]
    out = []
    for _, end in spans:
        j = bisect.bisect_right(starts, end - 1) - 1
        out.append(max(j, 0))
    return out


def token_targets(ends: Sequence[int], labels: Sequence[float], num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(targets [T] float32, mask [T] int32) of a response's tokens from its steps' end tokens and labels.

    Tokens in (end[k-1], end[k]] take step k's label; when several steps end in one token it takes the last of
    them (its hidden state has read all their text). Tokens after the last step's end token are not scored."""
    if len(ends) != len(labels):
        raise DataError(f"{len(ends)} step end tokens but {len(labels)} labels")
    targets = np.zeros((num_tokens,), np.float32)
    mask = np.zeros((num_tokens,), np.int32)
    prev = -1
    for end, label in zip(ends, labels):
        if end < prev:
            raise DataError(f"step end tokens must not decrease, got {list(ends)}")
        targets[prev + 1:end + 1] = label
        targets[end] = label
        mask[prev + 1:end + 1] = 1
        prev = end
    return targets, mask
