"""Which rollouts become training data (paper 3.2-3.3): correct ones, de-duplicated, then one of

    all        every correct response (the binary exact-match reward of the paper's table 1)
    top_k      the k best by a scorer (the paper's PRM top-2)
    threshold  those whose score is at least alpha (alpha chosen on the validation set, `choose_threshold`)
    random_k   k chosen at random (the paper's random-selection baseline)

and at most `max_per_query` of what is left, in sample order.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

SELECTIONS = ("all", "top_k", "threshold", "random_k")


def normalise_response(text: str) -> str:
    """Whitespace-insensitive key for de-duplication."""
    return re.sub(r"\s+", " ", text).strip()


def select_responses(texts: Sequence[str], correct: Sequence[bool], scores: Sequence[float] | None = None,
                     top_n: int | None = None, max_per_query: int | None = None, *, mode: str | None = None,
                     threshold: float | None = None, rng: np.random.Generator | None = None) -> list[int]:
    """Indices of the responses to train on for one query, in sample order.

    Correct ones are kept and duplicates dropped (first occurrence wins); then `mode` (default: `top_k` when
    `scores` and `top_n` are given, else `all`); then at most `max_per_query`. Score ties keep sample order."""
    seen, keep = set(), []
    for i, (t, ok) in enumerate(zip(texts, correct)):
        key = normalise_response(t)
        if ok and key and key not in seen:
            seen.add(key)
            keep.append(i)
    mode = mode or ("top_k" if scores is not None and top_n else "all")
    if mode not in SELECTIONS:
        raise ValueError(f"selection {mode!r} is not one of {', '.join(SELECTIONS)}")
    if mode in ("top_k", "threshold") and scores is None:
        raise ValueError(f"selection {mode!r} needs scores")
    if mode == "top_k" and top_n:
        keep = sorted(sorted(keep, key=lambda i: -scores[i])[:top_n])
    elif mode == "threshold":
        keep = [i for i in keep if scores[i] >= threshold]
    elif mode == "random_k" and top_n and len(keep) > top_n:
        rng = rng if rng is not None else np.random.default_rng(0)
        keep = sorted(rng.choice(keep, size=top_n, replace=False).tolist())
    if max_per_query is not None and max_per_query >= 0:
        keep = keep[:max_per_query]
    return keep


def threshold_grid(step: float = 0.1, low: float = 0.0, high: float = 1.0) -> list[float]:
    """The thresholds tried on the validation set: low..high in `step`s (the paper enumerates 0.1 steps)."""
    n = int(round((high - low) / step)) + 1
    return [round(low + i * step, 6) for i in range(n)]


def choose_threshold(correct: np.ndarray, scores: np.ndarray, grid: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The alpha of `grid` whose filter "score >= alpha" best separates correct from wrong validation samples
    (balanced accuracy: the mean of the shares of correct ones kept and of wrong ones dropped; ties -> the
    smallest alpha, which keeps the most data). Returns (alpha, {alpha: balanced accuracy})."""
    c = np.asarray(correct, bool).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(-1)
    table = {}
    for a in grid:
        kept = s >= a
        tpr = kept[c].mean() if c.any() else 0.0
        tnr = (~kept[~c]).mean() if (~c).any() else 0.0
        table[float(a)] = float(0.5 * (tpr + tnr))
    best = max(table.values())
    return min(a for a, v in table.items() if v == best), table
