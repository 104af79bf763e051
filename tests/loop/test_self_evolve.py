"""Iteration slicing and the three methods' starting points."""

from __future__ import annotations

import numpy as np
import pytest

from mstar_jax.errors import ConfigError
from mstar_jax.loop.self_evolve import iteration_slice, iterations_per_pass, total_iterations


@pytest.mark.parametrize("interval,expected", [(0.0625, 16), (0.125, 8), (0.25, 4), (0.5, 2), (1.0, 1)])
def test_interval_sets_iterations_per_pass(interval, expected):
    assert iterations_per_pass(interval) == expected


def test_slices_of_one_pass_are_disjoint_and_cover_the_queries():
    n = 1000
    slices = [iteration_slice(n, 0.0625, i, seed=3) for i in range(16)]
    assert all(len(s) in (62, 63) for s in slices)
    allidx = np.concatenate(slices)
    assert len(allidx) == n and len(np.unique(allidx)) == n
    # The next pass reshuffles, and the same (seed, iteration) always gives the same slice.
    assert not np.array_equal(iteration_slice(n, 0.0625, 16, 3), slices[0])
    np.testing.assert_array_equal(iteration_slice(n, 0.0625, 5, 3), slices[5])


def test_total_iterations_and_bad_interval():
    assert total_iterations(0.25, 2.0) == 8
    with pytest.raises(ConfigError):
        iterations_per_pass(0.0)


def test_continuous_schedule_estimate_counts_the_kept_responses():
    from ml_collections import ConfigDict

    from mstar_jax.loop.self_evolve import continuous_schedule_steps

    class Steps:  # the Trainer's step count at a global batch of 32
        def num_steps(self, n, epochs):
            return -(-int(n * epochs) // 32)

    train = ConfigDict({"total_steps": 0, "interval": 0.25, "passes": 2.0, "num_samples": 8, "max_per_query": 4,
                        "rerank_top": 2, "epochs": 2})
    cfg = ConfigDict({"train": train})
    # 8 iterations of 128 queries, at most 2 kept per query (the re-ranker's top 2), 2 epochs: 16 steps each.
    assert continuous_schedule_steps(cfg, 512, Steps()) == 8 * 16
    with cfg.unlocked():
        cfg.train.rerank_top = 0  # then M=4 of K=8 bound it
    assert continuous_schedule_steps(cfg, 512, Steps()) == 8 * 32
    with cfg.unlocked():
        cfg.train.total_steps = 77
    assert continuous_schedule_steps(cfg, 512, Steps()) == 77


@pytest.mark.slow
def test_adaptive_temperature_drives_the_next_rollouts_and_survives_kill_9(smoke_run, tmp_path):
    """3 iterations, a choice after each; the start T=0.7 is off the grid {0.5, 1}, so the first choice changes
    it. The run is killed in iteration 1's rollouts (after the checkpoint that holds the choice) and resumed:
    every rollouts file records the temperature its samples were drawn at, the one chosen before it."""
    import json
    import signal

    from tests.loop.cli_helpers import copy_after_warmup, mstar

    reference, _ = smoke_run
    workdir = copy_after_warmup(reference, tmp_path / "run")
    (workdir / "config.json").unlink()  # same data, model and warm-up; other self-evolving settings
    args = ["train", "--config", "smoke", "--workdir", str(workdir), "--config.train.passes=1.5",
            "--config.train.temperature=0.7", "--config.adaptive.every=1", "--config.adaptive.window=1"]
    killed = mstar(*args, MSTAR_KILL_AT="rollouts:3")  # 2 chunks per iteration: iteration 1's first chunk
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (workdir / "rollouts" / "iter_0001.jsonl").exists()
    resumed = mstar(*args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    chosen = {r["iteration"]: r["temperature"] for r in records if r["stage"] == "temperature"}
    assert sorted(chosen) == [1, 2, 3] and chosen[1] in (0.5, 1.0)
    assert f"resuming after iteration 1 (T={chosen[1]:g})" in resumed.stdout
    used = {0: 0.7, 1: chosen[1], 2: chosen[2]}
    assert [r["temperature"] for r in records if r["stage"] == "iteration"] == [used[0], used[1], used[2]]
    for i, t in used.items():
        rollouts = [json.loads(x) for x in (workdir / "rollouts" / f"iter_{i:04d}.jsonl").read_text().splitlines()]
        assert rollouts and {r["temperature"] for r in rollouts} == {t}, i
