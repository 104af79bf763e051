"""`mstar prm label|train|score` through the CLI: exact resume after kill -9, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.loop.cli_helpers import mstar

# Small labelling and training runs on the smoke workdir's warm-up model and training questions.
LABEL = ["--config", "smoke", "--config.prm.label.questions=8", "--config.prm.label.pairs=8",
         "--config.prm.label.chunk=2"]
TRAIN = ["--config", "smoke", "--config.prm.train.checkpoint_every=1", "--config.prm.train.heldout=0.0",
         "--config.prm.train.epochs=3", "--config.prm.train.global_batch=4", "--config.prm.train.micro_batch=2"]


def _label(workdir, out, **env):
    return mstar("prm", "label", "--policy", str(workdir / "warmup_ckpt"), "--data", str(workdir / "data" / "train.json"),
                 "--out", str(out), *LABEL, **env)


@pytest.mark.slow
def test_kill_9_during_labelling_and_training_then_rerun_gives_identical_labels_and_prm(smoke_run, tmp_path):
    import mstar_jax
    from mstar_jax.prm.labels import read_labels

    workdir, _ = smoke_run
    ref = _label(workdir, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _label(workdir, tmp_path / "run", MSTAR_KILL_AT="prm_label_chunk:2")
    assert killed.returncode == -9
    partial = (tmp_path / "run" / "prm_labels.jsonl").read_text()
    resumed = _label(workdir, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    labels = (tmp_path / "run" / "prm_labels.jsonl").read_text()
    assert labels == (tmp_path / "ref" / "prm_labels.jsonl").read_text()
    assert len(partial.splitlines()) < len(labels.splitlines()) == len(read_labels(tmp_path / "ref" / "prm_labels.jsonl"))

    labels_path = str(tmp_path / "ref" / "prm_labels.jsonl")
    init = str(workdir / "warmup_ckpt")
    ref = mstar("prm", "train", "--labels", labels_path, "--init", init, "--out", str(tmp_path / "m_ref"), *TRAIN)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = mstar("prm", "train", "--labels", labels_path, "--init", init, "--out", str(tmp_path / "m"), *TRAIN,
                   MSTAR_KILL_AT="train_step:4")
    assert killed.returncode == -9 and not (tmp_path / "m").exists()
    resumed = mstar("prm", "train", "--labels", labels_path, "--init", init, "--out", str(tmp_path / "m"), *TRAIN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after" in resumed.stdout
    a, b = mstar_jax.load_prm(tmp_path / "m_ref"), mstar_jax.load_prm(tmp_path / "m")
    for p, x in a.params.items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(b.params[p]), err_msg=str(p))
    assert not np.array_equal(np.asarray(a.params[("reward_head", "kernel")]),
                              np.asarray(mstar_jax.load(init).params[("language_model", "embed_tokens")]).mean(0))


@pytest.mark.slow
def test_prm_score_prints_step_scores_and_refuses_an_empty_response(smoke_run):
    workdir, _ = smoke_run
    image = next((workdir / "data" / "images" / "val").glob("*.png"))
    args = ["prm", "score", str(workdir / "prm" / "model"), "--image", str(image), "--prompt", "What is the sum?"]
    proc = mstar(*args, "--response", "The left die shows 2. The right die shows 3. The answer is 5.", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [s["text"] for s in out["steps"]] == ["The left die shows 2.", "The right die shows 3.",
                                                 "The answer is 5."]
    assert out["score"] == min(s["score"] for s in out["steps"]) and out["aggregation"] == "min"
    proc = mstar(*args, "--response", "  ")
    assert proc.returncode == 2 and "empty response" in proc.stderr


def test_unlabeled_prompts_with_selection_all_are_refused_before_any_work(tmp_path):
    proc = mstar("train", "--config", "smoke", "--workdir", str(tmp_path / "w"), "--config.train.selection=all")
    assert proc.returncode == 2
    assert "unlabeled prompts with train.selection=all" in proc.stderr
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_a_prm_with_another_tokenizer_is_refused(tmp_path, tiny_models):
    """prm.path naming a PRM trained for another backbone: a clear error (unless explicitly allowed)."""
    import mstar_jax
    from mstar_jax.config import load_config
    from mstar_jax.errors import ConfigError
    from mstar_jax.loop.run import Prepared
    from mstar_jax.models.llava.tiny import make_tiny_llava
    from mstar_jax.prm import model as M
    from mstar_jax.prm.score import ProcessRewardModel
    from mstar_jax.prm.stage import prm_stage
    from mstar_jax.workdir import Workdir
    from tests.conftest import SPECS

    make_tiny_llava(tmp_path / "other", SPECS["clip_llama"], corpus=["zebra quartz jukebox vexed " * 30])
    other = mstar_jax.load(tmp_path / "other")
    ProcessRewardModel(other.loaded, M.init_head(other.graphdef, other.params), other.processor).save(tmp_path / "prm")
    policy = mstar_jax.load(tiny_models["clip_llama"][0])
    prep = Prepared(policy, None, {}, None, {})
    cfg = load_config("smoke", [f"--config.prm.path={tmp_path / 'prm'}"])
    with pytest.raises(ConfigError, match="tokenizer does not match the policy's"):
        prm_stage(cfg, Workdir.open(tmp_path / "w"), prep, print)
    cfg = load_config("smoke", [f"--config.prm.path={tmp_path / 'prm'}", "--config.prm.require_same_tokenizer=False"])
    assert prm_stage(cfg, Workdir.open(tmp_path / "w"), prep, print) is not None


@pytest.mark.slow
def test_eval_with_a_prm_verifier_writes_curves_over_n(smoke_run, tmp_path):
    workdir, _ = smoke_run
    out = tmp_path / "eval"
    proc = mstar("eval", str(workdir / "export"), "--benchmark", "synthetic", "--data",
                 str(workdir / "data" / "test_ood.json"), "--n", "1,2,4", "--verifier", str(workdir / "prm" / "model"),
                 "--out", str(out), "--max-new-tokens", "8", "--limit", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads((out / "verifier.json").read_text())
    assert sorted(verdict["curves"], key=int) == ["1", "2", "4"] and verdict["rows"] == 6
    # Pass@N of the verifier table is the share of rows with a correct one among their first N samples.
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    for n in (1, 2, 4):
        expect = 100 * sum(any(r["correct"][1:1 + n]) for r in rows) / len(rows)
        assert verdict["curves"][str(n)]["pass@n"] == pytest.approx(expect)
    assert (out / "verifier.png").stat().st_size > 0 and "Best-of-N (PRM)" in (out / "verifier.md").read_text()
    proc = mstar("eval", str(workdir / "export"), "--benchmark", "synthetic", "--data",
                 str(workdir / "data" / "test_ood.json"), "--n", "2,4", "--out", str(tmp_path / "e2"))
    assert proc.returncode == 2 and "needs --verifier" in proc.stderr
