"""Which rollouts become training data: correct ones, de-duplicated, optionally top-N by a scorer, at most M."""

from __future__ import annotations

import re
from typing import Sequence


def normalise_response(text: str) -> str:
    """Whitespace-insensitive key for de-duplication."""
    return re.sub(r"\s+", " ", text).strip()


def select_responses(texts: Sequence[str], correct: Sequence[bool], scores: Sequence[float] | None = None,
                     top_n: int | None = None, max_per_query: int | None = None) -> list[int]:
    """Indices of the responses to train on for one query.

    Correct ones are kept, duplicates dropped (first occurrence wins), then the `top_n` best by `scores`
    (the paper keeps the PRM's top 2), then at most `max_per_query` in sample order.
    """
    seen, keep = set(), []
    for i, (t, ok) in enumerate(zip(texts, correct)):
        key = normalise_response(t)
        if ok and key and key not in seen:
            seen.add(key)
            keep.append(i)
    if scores is not None and top_n:
        keep = sorted(sorted(keep, key=lambda i: -scores[i])[:top_n])
    if max_per_query is not None and max_per_query >= 0:
        keep = keep[:max_per_query]
    return keep
