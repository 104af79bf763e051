"""Dynamics metrics equal a hand computation; adaptive temperature is the argmax, every 2 iterations."""

from __future__ import annotations

import numpy as np
import pytest

from mstar_jax.loop.dynamics import DynamicsInput, dynamics_metrics, reward_pass_at
from mstar_jax.loop.temperature import choose_temperature, temperature_grid


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
