"""Training-dynamics metrics (paper 4.1): Greedy, Pass@K, Pass@K - Greedy and Reward-Pass@2.

Reward-Pass@2 needs a scorer. The paper uses its process reward model; until one is plugged in, responses are
ranked by the policy's mean token log-probability and every output names the scorer it used.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np


class Scorer(Protocol):
    """Ranks sampled responses; higher is better. `name` labels Reward-Pass@2 in every output."""

    name: str

    def score(self, items: Sequence[dict], responses: Sequence[Sequence[object]]) -> list[list[float]]:
        """One score per response of each item."""


class MeanLogprobScorer:
    """Scores a response by its mean token log-probability under the policy (the stand-in for a PRM)."""

    name = "mean_logprob"

    def score(self, items, responses):
        """Mean of each sample's `logprobs` (an empty response scores -inf)."""
        return [[float(np.mean(r.logprobs)) if len(r.logprobs) else float("-inf") for r in rs] for rs in responses]


@dataclasses.dataclass
class DynamicsInput:
    """Per-item correctness of the greedy response and of K samples, and the scorer's scores."""

    greedy_correct: np.ndarray  # [N] bool
    sample_correct: np.ndarray  # [N, K] bool
    scores: np.ndarray  # [N, K] float


def reward_pass_at(correct: np.ndarray, scores: np.ndarray, top: int = 2) -> float:
    """Share of items with a correct response among the `top` highest-scored (ties keep sample order)."""
    if correct.size == 0:
        return 0.0
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return float(np.take_along_axis(correct, order, axis=1).any(axis=1).mean())


def dynamics_metrics(d: DynamicsInput, top: int = 2) -> dict[str, float]:
    """Greedy accuracy, Pass@K, their gap and Reward-Pass@top, as fractions in [0, 1]."""
    greedy = float(np.mean(d.greedy_correct)) if d.greedy_correct.size else 0.0
    pass_k = float(np.mean(d.sample_correct.any(axis=1))) if d.sample_correct.size else 0.0
    return {
        "greedy": greedy,
        "pass@k": pass_k,
        "pass@k-greedy": pass_k - greedy,
        f"reward_pass@{top}": reward_pass_at(d.sample_correct, d.scores, top),
        "k": int(d.sample_correct.shape[1]) if d.sample_correct.ndim == 2 else 0,
        "n": int(d.sample_correct.shape[0]),
    }
