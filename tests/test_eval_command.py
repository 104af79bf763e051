"""`mstar eval`: end to end on a tiny random LLaVA over a small synthetic split, numbers re-derived by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mstar_jax
from mstar_jax.cli import main
from mstar_jax import benchmark_eval
from mstar_jax.loop.prompts import DIRECT_SUFFIX

ABBREV = {"figure question answering": "FQA", "geometry problem solving": "GPS", "math word problem": "MWP",
          "textbook question answering": "TQA", "visual question answering": "VQA"}
N_ITEMS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny HF LLaVA dir, synth folder, raw test_ood rows by pid in file order)."""
    from mstar_jax.data.synth import SynthConfig, generate
    from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava

    spec = TinySpec()
    root = tmp_path_factory.mktemp("eval")
    make_tiny_llava(root / "ckpt", spec)
    generate(root / "synth", SynthConfig(seed=3, sizes={"test_ood": N_ITEMS}, image_size=spec.image_size,
                                         workers=1))
    rows = json.loads((root / "synth" / "test_ood.json").read_text())
    return root / "ckpt", root / "synth", rows


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _by_hand(lines: list[dict], rows: dict, k: int) -> dict:
    """Greedy accuracy and Pass@k (k == samples, so 'any sample correct'), overall and per task, from raw rows."""
    per_task: dict[str, list[tuple[bool, bool]]] = {}
    for line in lines:
        item = rows[line["id"]]  # MathVista fields straight from the file, not through our reader
        ok = [mstar_jax.check_answer(r, item) for r in line["responses"]]
        assert ok == line["correct"]
        per_task.setdefault(ABBREV[item["metadata"]["task"]], []).append((ok[0], any(ok[1:1 + k])))

    def pct(xs):
        return 100.0 * sum(xs) / len(xs)

    everything = [x for xs in per_task.values() for x in xs]
    out = {"greedy": pct([g for g, _ in everything]),
           "per_task": {t: {"n": len(xs), "greedy": pct([g for g, _ in xs]), "pass": pct([p for _, p in xs])}
                        for t, xs in per_task.items()}}
    if k:
        out["pass"] = pct([p for _, p in everything])
    return out


def test_eval_tiny_model_end_to_end_with_pass_at_3(setup, tmp_path):
    ckpt, synth, rows = setup
    out = tmp_path / "out"
    rc = main(["eval", str(ckpt), "--benchmark", "synthetic", "--data", str(synth / "test_ood.json"), "--n", "3",
               "--temperature", "1.0", "--max-new-tokens", "8", "--batch-size", str(N_ITEMS), "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    lines = _read_jsonl(out / "responses.jsonl")
    table = (out / "results.md").read_text()

    assert [line["id"] for line in lines] == list(rows)  # every item, in file order
    assert all(len(line["responses"]) == 4 for line in lines)  # greedy + 3 samples
    assert results["n"] == N_ITEMS and results["k"] == 3
    assert results["config"]["benchmark"] == "synthetic" and results["config"]["n"] == 3
    assert results["config"]["dtype"] == "float32"

    hand = _by_hand(lines, rows, k=3)
    assert results["greedy_accuracy"] == pytest.approx(hand["greedy"])
    assert results["pass@3"] == pytest.approx(hand["pass"])
    assert set(results["per_task"]) == set(hand["per_task"])
    for task, entry in hand["per_task"].items():
        got = results["per_task"][task]
        assert got["n"] == entry["n"]
        assert got["greedy_accuracy"] == pytest.approx(entry["greedy"])
        assert got["pass@3"] == pytest.approx(entry["pass"])
    assert "metric: accuracy" in table and "| task | n | greedy acc (%) | pass@3 (%) |" in table
    assert f"| **overall** | {N_ITEMS} | {hand['greedy']:.1f} | {hand['pass']:.1f} |" in table


def test_eval_scores_known_responses_into_default_out_dir(setup, monkeypatch):
    """A generator whose right/wrong pattern is known: non-trivial numbers that must match by construction."""
    ckpt, synth, rows = setup
    seen: list[dict] = []

    def fake_make_generate_fn(policy, *, n, temperature, **kw):
        assert isinstance(policy, mstar_jax.policy.Policy) and n == 2 and temperature == 0.5

        def generate(batch):
            out = []
            for b in batch:
                i = len(seen)
                seen.append(b)
                item = b["item"]
                # (MathVista's rule maps an unmatched multiple-choice answer to its nearest choice: name one.)
                other = next((c for c in item["choices"] or [] if c != item["answer"]), "-987654")
                right, wrong = f"The answer is {item['answer']}.", f"The answer is {other}."
                out.append([right if i % 2 == 0 else wrong, wrong, right if i % 3 == 0 else wrong])
            return out

        return generate

    monkeypatch.setattr(benchmark_eval, "make_generate_fn", fake_make_generate_fn)
    limit = 9
    rc = main(["eval", str(ckpt), "--benchmark", "synthetic", "--data", str(synth), "--split", "test_ood",
               "--n", "2", "--temperature", "0.5", "--prompt", "direct", "--limit", str(limit), "--batch-size", "4",
               "--dtype", "bfloat16"])
    assert rc == 0
    out = ckpt / "eval" / "synthetic"  # the default: next to the checkpoint (a writable directory)
    results = json.loads((out / "results.json").read_text())
    lines = _read_jsonl(out / "responses.jsonl")

    assert [b["id"] for b in seen] == list(rows)[:limit]
    assert results["config"]["dtype"] == "bfloat16"  # the policy was loaded as asked
    assert all(b["prompt"].endswith(DIRECT_SUFFIX) for b in seen)
    assert all(Path(p).is_absolute() and Path(p).is_file() for b in seen for p in b["images"])
    assert [line["greedy_correct"] for line in lines] == [i % 2 == 0 for i in range(limit)]
    assert results["greedy_accuracy"] == pytest.approx(100 * 5 / 9)
    assert results["pass@2"] == pytest.approx(100 * 3 / 9)
    hand = _by_hand(lines, rows, k=2)
    assert results["greedy_accuracy"] == pytest.approx(hand["greedy"])
    assert results["pass@2"] == pytest.approx(hand["pass"])
    for task, entry in hand["per_task"].items():
        assert results["per_task"][task]["greedy_accuracy"] == pytest.approx(entry["greedy"])
        assert results["per_task"][task]["pass@2"] == pytest.approx(entry["pass"])


@pytest.mark.parametrize("flags, message", [
    (["--benchmark", "mathvistaa", "--data", "{synth}/test_ood.json"], "unknown benchmark 'mathvistaa'"),
    (["--benchmark", "synthetic", "--data", "{tmp}/missing.json"], "missing.json: no such file"),
    (["--benchmark", "synthetic", "--data", "{synth}", "--split", "test_id"], "no test_id.json"),
    (["--benchmark", "synthetic", "--data", "{synth}/test_ood.json", "--reasoning-only"], "--reasoning-only"),
    (["--benchmark", "mathvista", "--data", "{synth}/test_ood.json", "--split", "testmini"], "split 'testmini'"),
    (["--benchmark", "synthetic", "--data", "{synth}/test_ood.json", "--n", "3", "--temperature", "0"],
     "temperature > 0"),
])
def test_eval_user_errors_are_one_line_exit_2(setup, tmp_path, capsys, flags, message):
    _, synth, _ = setup
    flags = [f.format(synth=synth, tmp=tmp_path) for f in flags]
    # The checkpoint does not exist: every error here must come before the model is loaded.
    rc = main(["eval", str(tmp_path / "no-ckpt"), *flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    *before, last = err.splitlines()
    assert last.startswith("mstar eval: error: ") and message in last, err  # one line, no traceback
    assert all(line.startswith("read ") for line in before), err  # at most the reader's report line before it
    assert not (tmp_path / "out").exists()


def test_default_out_dir(tmp_path):
    assert benchmark_eval.default_out_dir(tmp_path, "mmstar", reasoning_only=True) == tmp_path / "eval" / "mmstar-R"
    assert benchmark_eval.default_out_dir(tmp_path / "absent", "ai2d") == Path("runs/eval/ai2d")
    assert benchmark_eval.default_out_dir("gs://bucket/ckpt", "mathvista") == Path("runs/eval/mathvista")
    (tmp_path / "eval").write_text("a file, not a folder")
    assert benchmark_eval.default_out_dir(tmp_path, "m3cot") == Path("runs/eval/m3cot")
