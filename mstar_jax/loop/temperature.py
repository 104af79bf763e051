"""Adaptive temperature (paper 4.2): every `every` iterations pick the grid temperature with the best
validation Reward-Pass@2 for the next rollouts."""

from __future__ import annotations

import dataclasses

import numpy as np


def temperature_grid(low: float = 0.3, high: float = 1.6, step: float = 0.1) -> list[float]:
    """The inclusive grid low..high (rounded to avoid 0.30000000000000004-style keys)."""
    n = int(round((high - low) / step)) + 1
    return [round(low + i * step, 6) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class TemperatureChoice:
    """The temperature to use next, and why."""

    temperature: float
    changed: bool
    reason: str


def pooled_metric(records: list[dict], iteration: int, window: int = 1,
                  metric_name: str = "reward_pass@2") -> dict[float, float]:
    """Mean of the metric per temperature over the dynamics records of iterations (iteration - window, iteration].

    A window of 2 with dynamics every iteration doubles the validation samples behind each choice, which a
    small validation set needs: one 64-query evaluation moves by 2-3 queries between neighbouring
    temperatures, enough to pick the top of the grid on noise.
    """
    values: dict[float, list[float]] = {}
    for r in records:
        if r.get("stage") == "dynamics" and iteration - max(1, window) < r.get("iteration", -1) <= iteration:
            values.setdefault(float(r["temperature"]), []).append(float(r[metric_name]))
    return {t: float(np.mean(v)) for t, v in values.items()}


def choose_temperature(iteration: int, current: float, metric_by_temperature: dict[float, float],
                       every: int = 2, metric_name: str = "reward_pass@2") -> TemperatureChoice:
    """Argmax of the metric over the grid at iterations divisible by `every`; otherwise keep `current`.

    Ties go to the temperature closest to the current one, so a flat metric never makes the choice jump.
    """
    if every <= 0 or iteration % every != 0 or not metric_by_temperature:
        return TemperatureChoice(current, False, f"iteration {iteration}: kept T={current} (adjusted every {every})")
    temps = sorted(metric_by_temperature)
    values = np.array([metric_by_temperature[t] for t in temps])
    best = values.max()
    candidates = [t for t, v in zip(temps, values) if v == best]
    pick = min(candidates, key=lambda t: (abs(t - current), t))
    table = ", ".join(f"{t:g}:{metric_by_temperature[t]:.3f}" for t in temps)
    reason = (f"iteration {iteration}: validation {metric_name} is highest ({best:.3f}) at T={pick:g} "
              f"(was T={current:g}); grid {table}")
    return TemperatureChoice(float(pick), pick != current, reason)
