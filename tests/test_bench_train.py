"""`mstar bench train` runs end to end on a tiny model and prints parseable JSON lines (no speed checks)."""

from __future__ import annotations

import argparse
import json

import pytest

from mstar_jax.bench.train import add_train_args, bench_train

FIELDS = ("bench", "params_m", "nproc", "cpu", "threads", "global_batch", "micro_batch", "seq_len",
          "tokens_per_step", "loss_tokens_per_step", "dtype", "ours_first_call_s", "ours_compile_s",
          "ours_steady_s", "ours_tok_s", "ours_peak_rss_mb", "ours_loss", "hf_steady_s", "hf_tok_s",
          "hf_peak_rss_mb", "hf_loss", "ratio", "loss_rel_diff", "ours_model_gflop_s", "peak_tflops", "mfu")


def test_bench_train_prints_json_lines(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args(["--size", "tiny", "--workdir", str(tmp_path), "--global-batch", "4", "--micro-batch", "2",
                         "--response-words", "4", "--steps", "1", "--threads", "1"])
    assert bench_train(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    rec = lines[0]
    for field in FIELDS:
        assert field in rec, field
    assert rec["bench"] == "train" and rec["dtype"] == "float32" and rec["global_batch"] == 4
    assert rec["ours_tok_s"] > 0 and rec["hf_tok_s"] > 0 and rec["ratio"] > 0
    assert rec["loss_rel_diff"] < 1e-4  # same weights, same batch: the same first-step loss
    assert rec["peak_tflops"] is None and rec["mfu"] is None  # CPUs have no datasheet peak


def test_mfu_uses_the_given_peak(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args(["--size", "tiny", "--workdir", str(tmp_path), "--global-batch", "2", "--micro-batch", "2",
                         "--response-words", "4", "--steps", "1", "--threads", "1", "--skip-hf",
                         "--peak-tflops", "0.5"])
    assert bench_train(args) == 0
    rec = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][0])
    # 6 N FLOPs per token: the model GFLOP/s over a 0.5 TFLOP/s peak.
    assert rec["peak_tflops"] == 0.5
    assert rec["mfu"] == pytest.approx(rec["ours_model_gflop_s"] / 500, rel=1e-2, abs=1e-6)
