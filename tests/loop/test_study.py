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
    c.study = ConfigDict({{"variants": "rest_em@50%, continuous@50%+adaptive+prm_top2+unlabeled@50%"}})
    return c
''')
    proc = mstar("study", "--config", str(config), "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warm-up: reusing" in proc.stdout  # one base and warm-up for every variant
    # The smoke run is continuous@50% with PRM top-2, adaptive T and unlabeled prompts from half-way: the study's
    # variant reproduces it exactly.
    same = workdir / "variants" / "continuous_50pct_adaptive_prm_top2_unlabeled50"
    assert (same / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    study = (workdir / "study.md").read_text()
    for row in ("| base |", "| +warm-up |", "| rest_em_50pct_fixed | rest_em | 50% (16) | 2 | fixed | all | - |",
                "| continuous_50pct_adaptive_prm_top2_unlabeled50 | continuous | 50% (16) | 2 | adaptive | prm_top2 | "
                "unlabeled@50% |"):
        assert row in study, row
    assert "fewer than two of the paper's table-1 rows" in study  # neither variant is a table-1 row
    assert (workdir / "plots" / "study.png").stat().st_size > 10_000
    acc = json.loads((workdir / "study.json").read_text())["accuracy"]
    assert set(acc) == {"base", "+warm-up", "rest_em_50pct_fixed", "continuous_50pct_adaptive_prm_top2_unlabeled50"}
    assert (workdir / "variants" / "rest_em_50pct_fixed" / "report.md").is_file()

    # Adding a variant later reuses the shared stages and the finished variants.
    before = (same / "rollouts" / "iter_0000.jsonl").stat().st_mtime_ns
    proc = mstar("study", "--config", str(config), "--workdir", str(workdir),
                 "--config.study.variants=rest_em@50%, continuous@50%+adaptive, iterative_rft@50%")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (same / "rollouts" / "iter_0000.jsonl").stat().st_mtime_ns == before
    assert "| iterative_rft_50pct_fixed | iterative_rft |" in (workdir / "study.md").read_text()


def test_table_2_and_3_variants_set_selection_and_unlabeled_prompts():
    from mstar_jax.config import load_config
    from mstar_jax.loop.study import selection_notes, unlabeled_notes

    vs = parse_variants("continuous@25%, continuous@25%+random2, continuous@25%+prm_top2, "
                        "continuous@25%+prm_top2+unlabeled@25%, continuous@25%+oracle@0%")
    assert [v.name for v in vs] == ["continuous_25pct_fixed", "continuous_25pct_fixed_random2",
                                    "continuous_25pct_fixed_prm_top2", "continuous_25pct_fixed_prm_top2_unlabeled25",
                                    "continuous_25pct_fixed_oracle0"]
    cfg = load_config("demo")
    c = vs[3].config(cfg)
    assert (c.train.selection, c.train.scorer, c.train.rerank_top) == ("top_k", "prm", 2)
    assert (c.unlabeled.enabled, c.unlabeled.mode, c.unlabeled.start) == (True, "pseudo", 0.25)
    assert vs[0].config(cfg).train.selection == "all" and not vs[0].config(cfg).unlabeled.enabled
    assert vs[4].config(cfg).unlabeled.mode == "oracle" and vs[1].config(cfg).train.selection == "random_k"
    for bad in ("continuous@25%+top3", "continuous@25%+unlabeled@100%"):
        with pytest.raises(ConfigError, match="unknown option"):
            parse_variants(bad)
    rows = {v.name: result(40.0 + k, 50.0 - k) for k, v in enumerate(vs)}
    sel = "\n".join(selection_notes(vs, rows))
    # Paper table 2: PRM top-2 45.3 > all 43.1 > random-2 41.0 in-domain; ours ranks them 42 > 41 > 40.
    assert "ours prm_top2 42.0 > random2 41.0 > all 40.0" in sel and "paper prm_top2 45.3 > all 43.1 > random2 41.0" in sel
    records = {vs[3].name: [{"stage": "iteration", "pseudo_label_accuracy": 0.5},
                            {"stage": "iteration", "pseudo_label_accuracy": 1.0}]}
    unl = "\n".join(unlabeled_notes(vs, rows, records))
    assert "unlabeled@25%, prm_top2: ours 43.0 / 47.0; paper 42.4 / 57.6; pseudo labels right on 75.0%" in unl
    assert "oracle@0%, all: ours 44.0 / 46.0; paper 42.5 / 58.2" in unl
