"""`mstar bench`: the sampler bench runs end to end on a tiny model and prints parseable JSON lines."""

from __future__ import annotations

import json

import pytest

SAMPLER_FIELDS = {"mode", "n", "prompts", "max_new_tokens", "ours_tok_s", "hf_tok_s", "ratio", "ours_compile_s",
                  "ours_steady_s", "ours_first_call_s", "hf_s", "ours_peak_rss_mb", "hf_peak_rss_mb",
                  "greedy_identical", "nproc", "cpu", "threads", "params_m", "device_kind", "ours_prefill_s",
                  "ours_decode_s", "decode_steps", "decode_step_ms", "decode_tok_s", "decode_min_bytes_per_step",
                  "decode_gbs", "stream_gbs", "decode_stream_frac", "peak_hbm_gbs", "decode_roofline_frac",
                  "ours_device_peak_mb"}


def test_bench_sampler_prints_json_lines(tmp_path, capsys):
    from mstar_jax.cli import main

    assert main(["bench", "sampler", "--size", "tiny", "--workdir", str(tmp_path), "--n", "2", "--prompts", "2",
                 "--max-new-tokens", "4", "--repeats", "1", "--stream-mb", "8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in lines] == ["greedy", "sample"]
    for rec in lines:
        assert SAMPLER_FIELDS <= set(rec), SAMPLER_FIELDS - set(rec)
        assert rec["ours_tok_s"] > 0 and rec["hf_tok_s"] > 0 and rec["ratio"] > 0
        assert rec["ours_prefill_calls_per_run"] == 1
        # The phases are parts of one steady call (the median of one run is that run).
        assert 0 < rec["ours_decode_s"] and rec["ours_prefill_s"] + rec["ours_decode_s"] <= rec["ours_steady_s"]
        assert 1 <= rec["decode_steps"] <= 4 and rec["decode_gbs"] > 0 and rec["stream_gbs"] > 0
        assert rec["device_kind"] == "cpu" and rec["peak_hbm_gbs"] is None and rec["decode_roofline_frac"] is None
    assert lines[0]["greedy_identical"] is True and lines[1]["greedy_identical"] is None


def test_bench_sampler_alternates_the_engines_timed_calls(tmp_path, capsys, monkeypatch):
    """Warm-up of each engine, then ours / HF / ours / HF: a slow spell of the machine hits both sides."""
    import transformers

    from mstar_jax.cli import main
    from mstar_jax.sampler import Sampler

    calls = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Sampler, "generate", recording("ours", Sampler.generate))
    hf_cls = transformers.LlavaForConditionalGeneration
    monkeypatch.setattr(hf_cls, "generate", recording("hf", hf_cls.generate))
    assert main(["bench", "sampler", "--size", "tiny", "--workdir", str(tmp_path), "--n", "2", "--modes", "greedy",
                 "--max-new-tokens", "3", "--repeats", "2", "--stream-mb", "0"]) == 0
    assert calls == ["ours", "hf"] * 3
    (rec,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rec["ratio_per_run"]) == len(rec["ours_runs_s"]) == len(rec["hf_runs_s"]) == 2
    assert all(r > 0 for r in rec["ratio_per_run"])
    assert min(rec["ratio_per_run"]) - 0.01 <= rec["ratio"] <= max(rec["ratio_per_run"]) + 0.01


def test_bench_prm_label_prints_labels_per_second_of_both_engines(tmp_path, capsys):
    from mstar_jax.cli import main

    assert main(["bench", "prm-label", "--size", "tiny", "--workdir", str(tmp_path), "--responses", "2",
                 "--completions", "2", "--max-new-tokens", "4", "--repeats", "1"]) == 0
    (rec,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rec["step_labels"] == 2 * 5  # the bench response has 6 sentences: 5 prefixes to complete
    assert rec["ours_prefill_calls_per_run"] == 1  # both responses in one prefill, all their prefixes from it
    assert rec["ours_labels_per_s"] > 0 and rec["hf_labels_per_s"] > 0
    assert rec["labels_ratio"] == pytest.approx(rec["ours_labels_per_s"] / rec["hf_labels_per_s"], rel=0.02)
    assert rec["ours_completion_tokens"] <= 2 * 5 * 2 * 4 and rec["hf_completion_tokens"] <= 2 * 5 * 2 * 4
