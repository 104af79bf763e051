"""Dynamics metrics equal a hand computation; adaptive temperature is the argmax, every 2 iterations."""

from __future__ import annotations

import numpy as np
import pytest

from mstar_jax.loop.dynamics import DynamicsInput, dynamics_metrics, reward_pass_at
from mstar_jax.loop.temperature import choose_temperature, pooled_metric, temperature_grid


def test_metrics_match_hand_computation():
    # 4 queries x 3 samples.
    greedy = np.array([True, False, False, False])
    correct = np.array([[True, False, False],   # pass, top-2 by score = samples 2,0 -> has correct
                        [False, False, True],   # pass, top-2 = 0,1 -> no correct
                        [False, False, False],  # no pass
                        [False, True, False]])  # pass, top-2 = 1,2 -> correct
    scores = np.array([[0.5, 0.1, 0.9], [0.8, 0.7, 0.1], [0.0, 0.0, 0.0], [0.1, 0.6, 0.5]])
    m = dynamics_metrics(DynamicsInput(greedy, correct, scores))
    assert m["greedy"] == pytest.approx(0.25)
    assert m["pass@k"] == pytest.approx(0.75)
    assert m["pass@k-greedy"] == pytest.approx(0.5)
    assert m["reward_pass@2"] == pytest.approx(0.5)
    assert reward_pass_at(correct, scores, top=1) == pytest.approx(0.25)
    assert m["k"] == 3 and m["n"] == 4


def test_ties_keep_sample_order():
    correct = np.array([[False, False, True]])
    assert reward_pass_at(correct, np.zeros((1, 3)), top=2) == 0.0


def test_grid_is_inclusive():
    grid = temperature_grid(0.3, 1.6, 0.1)
    assert len(grid) == 14 and grid[0] == 0.3 and grid[-1] == 1.6 and 0.7 in grid


def test_choice_is_argmax_and_only_every_two_iterations():
    metric = {0.3: 0.2, 0.7: 0.5, 1.0: 0.4}
    assert choose_temperature(1, 1.0, metric, every=2).temperature == 1.0  # odd iteration: unchanged
    c = choose_temperature(2, 1.0, metric, every=2)
    assert c.temperature == 0.7 and c.changed and "0.7" in c.reason
    tie = choose_temperature(4, 1.0, {0.3: 0.5, 0.9: 0.5, 1.5: 0.1}, every=2)
    assert tie.temperature == 0.9  # tie -> closest to the current temperature


def test_pooled_metric_is_the_mean_over_the_window():
    rows = [{"stage": "dynamics", "iteration": it, "temperature": t, "reward_pass@2": v}
            for it, t, v in [(1, 0.3, 0.1), (1, 0.7, 0.9), (2, 0.3, 0.5), (2, 0.7, 0.3), (3, 0.3, 0.0), (3, 0.7, 1.0)]]
    rows.append({"stage": "iteration", "iteration": 2, "temperature": 0.3})  # not a dynamics row: ignored
    assert pooled_metric(rows, 2, window=1) == {0.3: 0.5, 0.7: 0.3}  # the paper's: the current evaluation
    assert pooled_metric(rows, 2, window=2) == pytest.approx({0.3: 0.3, 0.7: 0.6})  # (0.1+0.5)/2, (0.9+0.3)/2
    assert pooled_metric(rows, 3, window=2) == pytest.approx({0.3: 0.25, 0.7: 0.65})
    # The window flips the choice: iteration 2 alone says 0.3, iterations 1-2 together say 0.7.
    assert choose_temperature(2, 1.0, pooled_metric(rows, 2, window=1)).temperature == 0.3
    assert choose_temperature(2, 1.0, pooled_metric(rows, 2, window=2)).temperature == 0.7


def test_adaptive_window_decides_which_iterations_are_evaluated():
    from mstar_jax.loop.self_evolve import _in_choice_window

    def evaluated(every, window):
        return [i for i in range(1, 9) if _in_choice_window(i, every, window)]

    assert evaluated(2, 1) == [2, 4, 6, 8]  # the paper's: only at the choice
    assert evaluated(2, 2) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert evaluated(4, 2) == [3, 4, 7, 8]
    assert evaluated(0, 2) == []  # adaptive choice off
