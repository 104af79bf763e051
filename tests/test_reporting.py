"""metrics.jsonl, TensorBoard events and dynamics plots."""

from __future__ import annotations

import json

from mstar_jax.reporting import MetricsLog, markdown_table, plot_dynamics


def test_metrics_log_writes_jsonl_and_tensorboard(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"stage": "train", "loss": 1.25}, step=3)
    log.log({"stage": "dynamics", "iteration": 1, "temperature": 0.7, "greedy": 0.5}, step=3)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"stage": "train", "loss": 1.25, "step": 3}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "dynamics/greedy/T=0.7" in acc.Tags()["scalars"]
    assert acc.Scalars("train/loss")[0].value == 1.25


def test_resume_rewrites_metrics_from_checkpointed_records(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log({"stage": "train", "loss": 1.0}, step=1)
    log.log({"stage": "train", "loss": 0.5}, step=2)  # written after the last checkpoint
    kept = log.records[:1]
    MetricsLog(tmp_path, records=kept, tensorboard=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_plots_one_png_per_metric(tmp_path):
    records = [{"stage": "dynamics", "iteration": i, "temperature": t, "greedy": 0.1 * i, "pass@k": 0.5,
                "pass@k-greedy": 0.5 - 0.1 * i, "reward_pass@2": 0.3} for i in range(3) for t in (0.5, 1.0)]
    paths = plot_dynamics(records, tmp_path)
    assert len(paths) == 4 and all(p.stat().st_size > 1000 for p in paths)


def test_markdown_table():
    assert markdown_table(["a", "b"], [["x", 1.25]]) == "| a | b |\n|---|---|\n| x | 1.2 |\n"
