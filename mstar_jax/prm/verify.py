"""The PRM as a verifier (paper 3.3, figure 2a): Best-of-N, weighted and majority voting, Pass@N.

For each question, the first N of its K samples are considered:
    Best-of-N        the response with the highest PRM score (ties: the earlier sample) is correct
    weighted voting  the answer group with the largest sum of PRM scores (negative scores count 0) is correct
    majority voting  the answer group with the most responses is correct
    Pass@N           some response is correct
Answers are grouped by equivalence under the checker (`mstar_jax.answers.answer_groups`: "2", "2.0" and
"(B) 2" vote together), not by string; responses without an extractable answer do not vote, and voting with no
group at all counts as wrong. A group is correct when its first response is.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def best_of_n(correct: Sequence[bool], scores: Sequence[float]) -> bool:
    """Whether the highest-scored response (first among ties) is correct."""
    if len(correct) == 0:
        return False
    return bool(correct[int(np.argmax(np.asarray(scores, np.float64)))])


def vote_winner(groups: Sequence[int | None], weights: Sequence[float]) -> int | None:
    """Index of the first response of the answer group with the largest total weight (ties: the group that
    appeared first); None when no response has an answer."""
    totals: dict[int, float] = {}
    first: dict[int, int] = {}
    for i, (g, w) in enumerate(zip(groups, weights)):
        if g is None:
            continue
        totals[g] = totals.get(g, 0.0) + float(w)
        first.setdefault(g, i)
    if not totals:
        return None
    return first[max(totals, key=lambda g: (totals[g], -first[g]))]


def prm_weights(scores: Sequence[float]) -> list[float]:
    """Voting weights from PRM scores: negative or non-finite scores count 0."""
    return [max(0.0, float(s)) if np.isfinite(s) else 0.0 for s in scores]


def _vote(correct: Sequence[bool], groups: Sequence[int | None], weights: Sequence[float]) -> bool:
    winner = vote_winner(groups, weights)
    return winner is not None and bool(correct[winner])


def weighted_vote(correct: Sequence[bool], groups: Sequence[int | None], scores: Sequence[float]) -> bool:
    """Whether the answer group with the largest summed (non-negative) PRM score is correct."""
    return _vote(correct, groups, prm_weights(scores))


def majority_vote(correct: Sequence[bool], groups: Sequence[int | None]) -> bool:
    """Whether the most frequent answer group is correct."""
    return _vote(correct, groups, [1.0] * len(groups))


def verifier_curves(correct: Sequence[Sequence[bool]], scores: Sequence[Sequence[float]],
                    groups: Sequence[Sequence[int | None]], ns: Sequence[int]) -> dict[int, dict[str, float]]:
    """{N: {"best_of_n", "weighted_vote", "majority_vote", "pass@n"}} in percent over the questions, each using
    the first N samples of a question."""
    out = {}
    for n in ns:
        rows = {"best_of_n": [], "weighted_vote": [], "majority_vote": [], "pass@n": []}
        for c, s, g in zip(correct, scores, groups):
            if len(c) < n:
                raise ValueError(f"N={n} but a question has only {len(c)} samples")
            c, s, g = list(c[:n]), list(s[:n]), list(g[:n])
            rows["best_of_n"].append(best_of_n(c, s))
            rows["weighted_vote"].append(weighted_vote(c, g, s))
            rows["majority_vote"].append(majority_vote(c, g))
            rows["pass@n"].append(any(c))
        out[int(n)] = {k: 100.0 * float(np.mean(v)) if v else 0.0 for k, v in rows.items()}
    return out


def curves_table(curves: dict[int, dict[str, float]], greedy: float | None = None) -> str:
    """Markdown table: N | Best-of-N | weighted voting | majority voting | Pass@N (| greedy)."""
    from mstar_jax.reporting import markdown_table

    header = ["N", "Best-of-N (PRM)", "weighted voting (PRM)", "majority voting", "Pass@N"]
    body = [[n, c["best_of_n"], c["weighted_vote"], c["majority_vote"], c["pass@n"]] for n, c in sorted(curves.items())]
    if greedy is not None:
        header.append("greedy")
        for row in body:
            row.append(greedy)
    return markdown_table(header, body)


def plot_curves(curves: dict[int, dict[str, float]], path, greedy: float | None = None, title: str = "") -> None:
    """PNG of the verifier curves over N (log2 axis), with greedy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mstar_jax.workdir import publish

    ns = sorted(curves)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for key, label, style in (("best_of_n", "Best-of-N (PRM)", "o-"), ("weighted_vote", "weighted voting (PRM)", "s-"),
                              ("majority_vote", "majority voting", "^-"), ("pass@n", "Pass@N", "k:")):
        ax.plot(ns, [curves[n][key] for n in ns], style, label=label, ms=4)
    if greedy is not None:
        ax.axhline(greedy, color="gray", ls="--", lw=1, label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (samples per question)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "PRM as a verifier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    publish(path)
