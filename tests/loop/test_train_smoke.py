"""`mstar train --config smoke` runs every stage, writes every output, resumes, and refuses another config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.loop.cli_helpers import mstar


@pytest.mark.slow
def test_smoke_run_writes_every_output(smoke_run):
    workdir, out = smoke_run
    for stage in ("base eval", "warm-up", "PRM labels", "PRM trained", "PRM verifier", "self-evolving",
                  "final eval", "report", "exported the PRM"):
        assert stage in out, f"no line for stage {stage!r}"
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in records}
    assert {"iteration", "dynamics", "eval/base", "eval/warmup", "eval/final", "prm/labels", "prm/train",
            "prm/verifier"} <= stages
    # The PRM ranks Reward-Pass@2 (and so picks the temperature); the mean log-probability is measured beside it.
    dynamics = [r for r in records if r["stage"] == "dynamics"]
    assert dynamics and all(r["scorer"] == "prm" and r["reward_pass@2"] == r["reward_pass@2/prm"]
                            and "reward_pass@2/mean_logprob" in r for r in dynamics)
    # Unlabeled prompts join from the second of the two iterations (unlabeled.start 0.5), with their pseudo labels.
    iters = sorted((r for r in records if r["stage"] == "iteration"), key=lambda r: r["iteration"])
    assert "unlabeled_queries" not in iters[0] and iters[1]["unlabeled_queries"] > 0
    assert (workdir / "rollouts" / "iter_0001_unlabeled.jsonl").is_file()
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    # Each plot draws its metric's dynamics records (read back from the PNG's pixels, not its size).
    from mstar_jax.reporting import DYNAMICS_METRICS, dynamics_figure
    from tests.test_reporting import assert_png_draws

    pngs = {p.stem: p for p in (workdir / "plots").glob("*.png")}
    assert "prm_verifier_val" in pngs
    for metric in DYNAMICS_METRICS:
        assert_png_draws(dynamics_figure(records, metric), pngs[metric.replace("@", "_at_").replace("-", "_minus_")])
    report = (workdir / "report.md").read_text()
    assert "| base |" in report and "+warm-up" in report and "Process reward model" in report
    assert "Reward-Pass@2 (PRM)" in report and "Best-of-N (PRM)" in report
    assert (workdir / "rollouts" / "iter_0000.jsonl").is_file()

    import transformers

    for export in (workdir / "export", workdir / "prm" / "export"):
        model, info = transformers.AutoModelForImageTextToText.from_pretrained(export, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (workdir / "prm" / "export" / "reward_head.safetensors").is_file()


@pytest.mark.slow
def test_rerun_resumes_without_redoing_work(smoke_run, tmp_path):
    # A copy: the shared run is every other test's reference (and other pytest-xdist workers read it).
    workdir = Path(shutil.copytree(smoke_run[0], tmp_path / "run", copy_function=shutil.copy2))
    before = (workdir / "metrics.jsonl").read_text()
    rollouts = (workdir / "rollouts" / "iter_0000.jsonl").stat().st_mtime_ns
    proc = mstar("train", "--config", "smoke", "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "rollouts" / "iter_0000.jsonl").stat().st_mtime_ns == rollouts
    after = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    # The final-eval lines are logged again on a rerun; everything before them is identical.
    assert [r for r in after if r["stage"] != "eval/final"] == [
        json.loads(x) for x in before.splitlines() if json.loads(x)["stage"] != "eval/final"]


@pytest.mark.slow
def test_other_config_on_same_workdir_is_refused(smoke_run, tmp_path):
    workdir = Path(shutil.copytree(smoke_run[0], tmp_path / "run"))
    proc = mstar("train", "--config", "smoke", "--workdir", str(workdir), "--config.train.lr=0.5")
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "different config" in proc.stderr


def test_unknown_key_lists_close_names(tmp_path):
    proc = mstar("train", "--config", "smoke", "--workdir", str(tmp_path), "--config.train.methd=rest_em")
    assert proc.returncode == 2 and "train.method" in proc.stderr


def test_low_precision_master_weights_are_refused_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    proc = mstar("train", "--config", "smoke", "--workdir", str(workdir), "--config.model.dtype=bfloat16")
    assert proc.returncode == 2 and "model.dtype='bfloat16'" in proc.stderr and "float32" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(workdir.rglob("*"))  # nothing made, evaluated or written


def test_missing_data_file_is_named(tmp_path):
    proc = mstar("train", "--config", "smoke", "--workdir", str(tmp_path), "--config.data.source=files",
                 "--config.model.path=/nonexistent/model", f"--config.data.train={tmp_path}/train.json",
                 f"--config.data.test_id={tmp_path}/test.json")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{tmp_path}/train.json: data file for split 'train' not found" in proc.stderr
    assert "Traceback" not in proc.stderr
