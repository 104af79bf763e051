"""`mstar eval --benchmark X` through the CLI for every benchmark reader, on files in the published layouts.

The policy is an oracle keyed by the exact prompt each benchmark must be asked with (written out here from the
official layouts), so a reader that changes the question text scores zero on it and is listed as unexpected.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import mstar_jax
from mstar_jax.cli import main
from mstar_jax.loop.prompts import COT_SUFFIX
from tests.data import benchmark_fixtures as F

LETTERS = "ABCD"


class OraclePolicy:
    """Answers each known prompt with a fixed response; records prompts it was not told about."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.asked, self.unexpected = answers, [], []
        self.params = {"w": np.zeros(1, np.float32)}

    def generate(self, images, prompts, n=1, **kw):
        assert all(len(ims) == 1 and ims[0].size == (20, 16) for ims in images)  # the decoded fixture PNGs
        self.asked += prompts
        self.unexpected += [p for p in prompts if p not in self.answers]
        return [[SimpleNamespace(text=self.answers.get(p, "I cannot tell."))] * n for p in prompts]


def _run(monkeypatch, tmp_path, answers, *flags):
    policy = OraclePolicy(answers)
    monkeypatch.setattr(mstar_jax, "load", lambda ckpt, dtype="float32": policy)
    out = tmp_path / "out"
    rc = main(["eval", str(tmp_path / "ckpt"), *flags, "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    lines = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    return results, lines, policy


def _mcq_prompt(question, options, hint=None):
    head = f"Hint: {hint}\n" if hint else ""
    return head + f"Question: {question}\nOptions:\n" + "\n".join(
        f"{LETTERS[i]}. {o}" for i, o in enumerate(options)) + "\n" + COT_SUFFIX


@pytest.mark.parametrize("layout", ["github_json_folder", "hf_parquet"])
def test_mathvista(monkeypatch, tmp_path, layout):
    data = (F.write_mathvista_json(tmp_path / "data").parent if layout == "github_json_folder"
            else F.write_mathvista_parquet(tmp_path / "hf"))
    prompts = {pid: q + "\n" + COT_SUFFIX for pid, q in F.MATHVISTA_QUERIES.items()}
    answers = {prompts["2"]: "The answer is 1000.", prompts["5"]: "The answer is (B).",
               prompts["404"]: "So the answer is D."}
    results, lines, policy = _run(monkeypatch, tmp_path, answers, "--benchmark", "mathvista", "--data", str(data))
    assert policy.unexpected == [] and [x["prompt"] for x in lines] == [prompts[p] for p in ("2", "5", "404")]
    assert results["metric"] == "accuracy" and results["greedy_accuracy"] == pytest.approx(200 / 3)
    assert set(results["per_task"]) == {"VQA", "GPS", "MWP"} and results["per_skill"]["GEO"]["greedy_accuracy"] == 0
    assert results["config"]["data"].endswith(".json" if layout == "github_json_folder" else ".parquet")
    assert any("split found: testmini" in n for n in results["reader"]["notes"])


def _mmbench_answers(skip_right=()):
    """Prompt -> response for every copy of the MMBench fixture: right, except the copies in `skip_right`."""
    answers = {}
    for q in F.MMBENCH_QUESTIONS:
        for c in F.mmbench_copies(q):
            wrong = LETTERS[(LETTERS.index(c["answer"]) + 1) % 4]
            answers[_mcq_prompt(q["question"], c["options"])] = \
                f"The answer is {wrong if c['index'] in skip_right else c['answer']}."
    return answers


def test_mmbench_circular_first_copy_and_reasoning_only(monkeypatch, tmp_path):
    data = str(F.write_mmbench_tsv(tmp_path / "data"))
    answers = _mmbench_answers(skip_right={2000812})  # one copy of question 812 answered wrongly
    results, lines, policy = _run(monkeypatch, tmp_path, answers, "--benchmark", "mmbench", "--data", data)
    assert policy.unexpected == [] and len(policy.asked) == 8
    assert (results["metric"], results["greedy_accuracy"], results["n"], results["rows"]) == ("circular", 50.0, 2, 8)
    assert [x["greedy_correct"] for x in lines].count(False) == 1

    results, _, policy = _run(monkeypatch, tmp_path, answers, "--benchmark", "mmbench", "--data", data,
                              "--metric", "first_copy")
    assert (results["metric"], results["greedy_accuracy"], results["n"], len(policy.asked)) == \
        ("first_copy", 100.0, 2, 2)

    results, lines, _ = _run(monkeypatch, tmp_path, answers, "--benchmark", "mmbench", "--data", data, "--limit", "1")
    assert (results["n"], results["rows"], {x["id"] for x in lines} >= {"2705", "3002705"}) == (1, 4, True)

    results, lines, _ = _run(monkeypatch, tmp_path, answers, "--benchmark", "mmbench", "--data", data,
                             "--reasoning-only")
    assert sorted(x["id"] for x in lines) == ["1002705", "2002705", "2705", "3002705"]  # 812 is perception
    assert (results["greedy_accuracy"], results["n"], results["config"]["benchmark"]) == (100.0, 1, "mmbench-R")


def test_mmbench_lmms_lab_parquet_reasoning_only_reads_capital_l2(monkeypatch, tmp_path):
    row = F.MMBENCH_LMMS_ROW
    prompt = _mcq_prompt(row["question"], [row["A"], row["B"]], hint=row["hint"])
    results, lines, policy = _run(monkeypatch, tmp_path, {prompt: "The answer is B."}, "--benchmark", "mmbench",
                                  "--data", str(F.write_mmbench_parquet(tmp_path / "data")), "--reasoning-only")
    assert [x["id"] for x in lines] == ["241"] and policy.unexpected == [] and results["greedy_accuracy"] == 100.0


def test_mmstar_reasoning_only_removes_exactly_the_perception_rows(monkeypatch, tmp_path):
    data = str(F.write_mmstar_parquet(tmp_path / "data"))
    answers = {}
    for r in F.MMSTAR_ROWS:
        question, options = r["question"].split("\nOptions: ")
        opts = [o.split(": ", 1)[1] for o in options.split(", ") if o[:2] in ("A:", "B:", "C:", "D:")]
        answers[_mcq_prompt(question, opts)] = f"The answer is {r['answer']}."
    results, lines, policy = _run(monkeypatch, tmp_path, answers, "--benchmark", "mmstar", "--data", data)
    assert policy.unexpected == [] and results["greedy_accuracy"] == 100.0 and results["n"] == 4
    results, lines, _ = _run(monkeypatch, tmp_path, answers, "--benchmark", "mmstar", "--data", data,
                             "--reasoning-only")
    assert [x["id"] for x in lines] == ["2", "3"]  # coarse and fine-grained perception removed, nothing else


def test_reasoning_only_that_would_remove_nothing_is_an_error(monkeypatch, tmp_path, capsys):
    data = str(F.write_mmstar_parquet(tmp_path / "data", rows=F.MMSTAR_ROWS[2:]))
    monkeypatch.setattr(mstar_jax, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    rc = main(["eval", str(tmp_path / "ckpt"), "--benchmark", "mmstar", "--data", data, "--reasoning-only",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "none of the 2 items has a perception category" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["vlmevalkit_tsv", "lmms_lab_parquet"])
def test_ai2d(monkeypatch, tmp_path, layout):
    data = F.write_ai2d_tsv(tmp_path / "d") if layout == "vlmevalkit_tsv" else F.write_ai2d_parquet(tmp_path / "d")
    prompts = [_mcq_prompt(r["question"], r["options"]) for r in F.AI2D_ROWS]
    answers = {prompts[0]: "The answer is B.", prompts[1]: "The answer is A.", prompts[2]: "The answer is A."}
    results, lines, policy = _run(monkeypatch, tmp_path, answers, "--benchmark", "ai2d", "--data", str(data))
    assert policy.unexpected == [] and [x["greedy_correct"] for x in lines] == [True, False, True]
    assert results["greedy_accuracy"] == pytest.approx(200 / 3)


def test_m3cot_jsonl_release_folder(monkeypatch, tmp_path):
    data_dir = F.write_m3cot_jsonl(tmp_path / "data").parent
    answers = {}
    for r in F.M3COT_ROWS:
        context = f"[Context]\n{r['context']}\n" if r["context"] else ""
        choices = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(r["choices"]))
        answers[f"{context}[Question]\n{r['question']}\n[Choices]\n{choices}\n{COT_SUFFIX}"] = \
            f"The answer is {r['answer']}."
    results, lines, policy = _run(monkeypatch, tmp_path, answers, "--benchmark", "m3cot", "--data", str(data_dir))
    assert policy.unexpected == [] and results["greedy_accuracy"] == 100.0 and results["n"] == 2
    assert results["config"]["data"].endswith("test.jsonl")  # the default split of a folder
    assert any("leading data/ dropped" in n for n in results["reader"]["notes"])
