"""`mstar study`: variant parsing, the comparison against the paper, and an end-to-end study on the smoke run."""

from __future__ import annotations

import json

import pytest

from mstar_jax.errors import ConfigError
from mstar_jax.loop.study import Variant, ordering_notes, parse_variants, standard_error
from tests.loop.cli_helpers import ROOT, copy_after_warmup, mstar


def test_parse_variants():
    vs = parse_variants(" rest_em@100%, continuous@6.25%+adaptive ,continuous@25%")
    assert vs == [Variant("rest_em", 1.0, False), Variant("continuous", 0.0625, True),
                  Variant("continuous", 0.25, False)]
    assert [v.name for v in vs] == ["rest_em_100pct_fixed", "continuous_6.25pct_adaptive", "continuous_25pct_fixed"]
    for bad, msg in [("continuous@25", "METHOD@PERCENT%"), ("online@25%", "method must be one of"),
                     ("continuous@0%", "train.interval"), ("rest_em@100%,rest_em@100%", "twice"), (" , ", "empty")]:
        with pytest.raises(ConfigError, match=msg):
            parse_variants(bad)


def result(acc_id, acc_ood, n=100):
    return {"test_id": {"accuracy": acc_id, "n": n, "per_task": {}}, "test_ood": {"accuracy": acc_ood, "n": n,
                                                                                 "per_task": {}}}


def test_ordering_notes_compare_with_the_paper_and_state_the_noise():
    vs = parse_variants("rest_em@100%, continuous@25%, continuous@25%+adaptive")
    rows = {"rest_em_100pct_fixed": result(30.0, 20.0), "continuous_25pct_fixed": result(40.0, 10.0),
            "continuous_25pct_adaptive": result(99.0, 99.0)}
    ind, ood = ordering_notes(vs, rows)
    # Paper: continuous@25% 43.1 / 57.2 beats rest_em@100% 42.3 / 55.1; the adaptive row is not in table 1.
    assert "ours continuous@25% 40.0 > rest_em@100% 30.0" in ind and "is the same as the paper's" in ind
    assert "ours rest_em@100% 20.0 > continuous@25% 10.0" in ood and "is different from the paper's" in ood
    se = standard_error(35.0, 100)  # mean of 40 and 30 on 100 questions
    assert abs(se - 4.77) < 0.01 and f"one standard error is {se:.1f} points" in ind
    assert "span 10.0 points on 100 questions" in ind


@pytest.mark.slow
def test_study_on_the_smoke_warm_up(smoke_run, tmp_path):
    reference, _ = smoke_run
    workdir = copy_after_warmup(reference, tmp_path / "study")
    config = tmp_path / "study_smoke.py"
    config.write_text(f'''
import importlib.util
from ml_collections import ConfigDict
spec = importlib.util.spec_from_file_location("smoke", "{ROOT / 'configs' / 'smoke.py'}")
smoke = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smoke)

def get_config():
    c = smoke.get_config()
    c.study = ConfigDict({{"variants": "rest_em@50%, continuous@50%+adaptive"}})
    return c
''')
    proc = mstar("study", "--config", str(config), "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warm-up: reusing" in proc.stdout  # one base and warm-up for every variant
    # The smoke run is continuous@50% with adaptive T: the study's variant reproduces it exactly.
    same = workdir / "variants" / "continuous_50pct_adaptive"
    assert (same / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    study = (workdir / "study.md").read_text()
    for row in ("| base |", "| +warm-up |", "| rest_em_50pct_fixed | rest_em | 50% (16) | 2 | fixed |",
                "| continuous_50pct_adaptive | continuous | 50% (16) | 2 | adaptive |"):
        assert row in study, row
    assert "fewer than two of the paper's table-1 rows" in study  # neither variant is a table-1 row
    assert (workdir / "plots" / "study.png").stat().st_size > 10_000
    acc = json.loads((workdir / "study.json").read_text())["accuracy"]
    assert set(acc) == {"base", "+warm-up", "rest_em_50pct_fixed", "continuous_50pct_adaptive"}
    assert (workdir / "variants" / "rest_em_50pct_fixed" / "report.md").is_file()

    # Adding a variant later reuses the shared stages and the finished variants.
    before = (same / "rollouts" / "iter_0000.jsonl").stat().st_mtime_ns
    proc = mstar("study", "--config", str(config), "--workdir", str(workdir),
                 "--config.study.variants=rest_em@50%, continuous@50%+adaptive, iterative_rft@50%")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (same / "rollouts" / "iter_0000.jsonl").stat().st_mtime_ns == before
    assert "| iterative_rft_50pct_fixed | iterative_rft |" in (workdir / "study.md").read_text()
