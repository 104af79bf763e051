"""Benchmark metrics against hand computations; the files written; reasoning subsets; run_eval batching."""

from __future__ import annotations

import json

import pytest

from mstar_jax.data.records import Record
from mstar_jax.errors import DataError
from mstar_jax.evaluation import (evaluate_responses, pass_at_k, reasoning_subset, results_markdown, run_eval,
                                  task_of, write_results)


def item(pid, answer, task, **kw):
    d = {"pid": pid, "question_type": "free_form", "answer_type": "integer", "choices": None, "answer": answer,
         "precision": None, "metadata": {"task": task}}
    d.update(kw)
    return d


ITEMS = [item("1", "3", "figure question answering"), item("2", "5", "figure question answering"),
         item("3", "7", "geometry problem solving"),
         item("4", "blue", "visual question answering", question_type="multi_choice", answer_type="text",
              choices=["red", "blue"])]
# greedy first, then 3 samples
RESPONSES = [["The answer is 3.", "The answer is 3.", "The answer is 4.", "The answer is 3."],  # greedy ok, 2/3
             ["The answer is 4.", "The answer is 4.", "The answer is 5.", "no idea"],  # greedy wrong, 1/3
             ["The answer is 6.", "The answer is 6.", "The answer is 6.", "The answer is 6."],  # all wrong
             ["The answer is B.", "The answer is (A)", "The answer is blue", "The answer is B"]]  # ok, 2/3


def test_numbers_match_hand_computation():
    r = evaluate_responses(ITEMS, RESPONSES, k=3)
    assert r["greedy_accuracy"] == pytest.approx(50.0)  # items 1 and 4
    assert r["pass@3"] == pytest.approx(75.0)  # any of 3 samples correct: items 1, 2, 4
    assert r["pass@3-greedy"] == pytest.approx(25.0)
    assert r["per_task"] == {"FQA": {"n": 2, "greedy_accuracy": 50.0, "pass@3": 100.0},
                             "GPS": {"n": 1, "greedy_accuracy": 0.0, "pass@3": 0.0},
                             "VQA": {"n": 1, "greedy_accuracy": 100.0, "pass@3": 100.0}}
    r1 = evaluate_responses(ITEMS, RESPONSES, k=1)
    # pass@1 uses the first sample only: "3" right, "4" wrong, "6" wrong, "(A)" wrong -> 1 of 4
    assert r1["pass@1"] == pytest.approx(25.0)


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_written_files(tmp_path):
    r = evaluate_responses(ITEMS, RESPONSES, k=3)
    paths = write_results(r, tmp_path, title="MathVista")
    metrics = json.loads(paths["json"].read_text())
    assert metrics["greedy_accuracy"] == 50.0 and "per_item" not in metrics
    lines = paths["responses"].read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[3])["responses"] == RESPONSES[3]
    assert json.loads(lines[1])["correct"] == [False, False, True, False]
    md = paths["markdown"].read_text()
    assert "| FQA | 2 | 50.0 | 100.0 |" in md and "| **overall** | 4 | 50.0 | 75.0 |" in md
    greedy_only = results_markdown(evaluate_responses(ITEMS, [r[:1] for r in RESPONSES]))
    assert "pass@" not in greedy_only and "| GPS | 1 | 0.0 |" in greedy_only


def test_reasoning_subsets_drop_perception():
    mk = lambda i, cat, l2=None: Record(id=str(i), images=["a.png"], question="q", choices=["a", "b"],  # noqa
                                       answer="a", answer_type="text", precision=None, unit=None,
                                       question_type="multi_choice", metadata={"category": cat, "l2_category": l2})
    star = [mk(0, "coarse perception"), mk(1, "fine-grained perception"), mk(2, "math"), mk(3, "logical reasoning")]
    assert [r.id for r in reasoning_subset(star, "mmstar")] == ["2", "3"]
    bench = [mk(0, "x", "coarse_perception"), mk(1, "x", "finegrained_perception (cross-instance)"),
             mk(2, "x", "logic_reasoning")]
    assert [r.id for r in reasoning_subset(bench, "mmbench")] == ["2"]
    with pytest.raises(ValueError):
        reasoning_subset(star, "ai2d")
    # categories that are not the benchmark's would silently keep everything: an error naming what was found
    with pytest.raises(DataError, match="none of the 2 items .* found: logical reasoning, math"):
        reasoning_subset(star[2:], "mmstar")


def test_task_of_fallbacks():
    assert task_of({"metadata": {"task": "math word problem"}}) == "MWP"
    assert task_of({"metadata": {"category": "math"}}) == "math"
    assert task_of({}) == "all"


def test_run_eval_batches_prompts_through_generate_fn(tmp_path):
    recs = [Record(id=str(i), images=[f"images/{i}.png"], question=f"q{i}", choices=None, answer=str(i),
                   answer_type="integer", precision=None, unit=None, question_type="free_form",
                   metadata={"task": "math word problem"}) for i in range(5)]
    seen = []

    def generate_fn(batch):
        seen.append([b["id"] for b in batch])
        assert all(b["images"][0].startswith(str(tmp_path)) for b in batch)
        return [[f"The answer is {b['prompt'][1:]}", "The answer is 0"] for b in batch]

    r = run_eval(generate_fn, recs, root=tmp_path, prompt_builder=lambda it: it["question"], batch_size=2,
                 out_dir=tmp_path / "out")
    assert seen == [["0", "1"], ["2", "3"], ["4"]]
    assert r["greedy_accuracy"] == 100.0 and r["pass@1"] == 20.0
    assert (tmp_path / "out" / "results.md").exists()


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        evaluate_responses(ITEMS, RESPONSES[:2])


def _letter(rec, text):
    return "ABCD"[rec.choices.index(text)]


def test_mmbench_circular_eval_one_wrong_copy_fails_its_question(tmp_path):
    from mstar_jax.data.readers import read_dataset
    from tests.data import benchmark_fixtures as F

    records, _ = read_dataset(F.write_mmbench_tsv(tmp_path), "mmbench")
    items = [r.to_item() for r in records]
    wrong = "2000812"  # one rotated copy of question 812 answered wrongly, every other copy right
    responses = [[f"The answer is {_letter(r, r.answer) if r.id != wrong else _letter(r, r.choices[-1])}."]
                 for r in records]
    circular = evaluate_responses(items, responses, metric="circular")
    assert (circular["greedy_accuracy"], circular["n"], circular["rows"]) == (50.0, 2, 8)
    assert circular["per_task"] == {"attribute_reasoning": {"n": 1, "greedy_accuracy": 100.0},
                                    "coarse_perception": {"n": 1, "greedy_accuracy": 0.0}}
    first = evaluate_responses(items, responses, metric="first_copy")
    assert (first["greedy_accuracy"], first["n"], first["metric"]) == (100.0, 2, "first_copy")
    assert evaluate_responses(items, responses)["greedy_accuracy"] == pytest.approx(100 * 7 / 8)


def test_circular_pass_at_k_needs_every_copy(tmp_path):
    from mstar_jax.data.readers import read_dataset
    from tests.data import benchmark_fixtures as F

    records, _ = read_dataset(F.write_mmbench_tsv(tmp_path), "mmbench")
    items = [r.to_item() for r in records]

    def responses(samples_of_1000812):
        right = {r.id: f"The answer is {_letter(r, r.answer)}." for r in records}
        return [[right[r.id]] + (samples_of_1000812 if r.id == "1000812" else [right[r.id]] * 2) for r in records]

    wrong, right = "The answer is Z.", f"The answer is {_letter(records[5], records[5].answer)}."
    assert records[5].id == "1000812"
    # every sample of one copy wrong: its question fails Pass@2 although its other copies pass
    assert evaluate_responses(items, responses([wrong, wrong]), k=2, metric="circular")["pass@2"] == 50.0
    assert evaluate_responses(items, responses([wrong, right]), k=2, metric="circular")["pass@2"] == 100.0


def test_mathvista_per_task_and_per_skill_tables(tmp_path):
    from mstar_jax.data.readers import read_dataset
    from tests.data import benchmark_fixtures as F

    records, _ = read_dataset(F.write_mathvista_json(tmp_path / "data"), "mathvista")
    items = [r.to_item() for r in records]  # pids 2 (VQA), 5 (GPS), 404 (MWP)
    responses = [["The answer is 1000."], ["The answer is (D)."], ["The answer is D."]]
    prompts = [f"prompt of {it['pid']}" for it in items]
    r = evaluate_responses(items, responses, prompts=prompts)
    assert r["greedy_accuracy"] == pytest.approx(200 / 3) and r["metric"] == "accuracy"
    assert {t: e["greedy_accuracy"] for t, e in r["per_task"].items()} == {"GPS": 0.0, "MWP": 100.0, "VQA": 100.0}
    # an item counts for each of its skills, as MathVista's calculate_score.py does
    assert {s: (e["n"], e["greedy_accuracy"]) for s, e in r["per_skill"].items()} == {
        "ALG": (1, 0.0), "ARI": (2, 100.0), "GEO": (1, 0.0), "NUM": (2, 100.0), "STA": (1, 100.0)}
    paths = write_results(r, tmp_path / "out", title="MathVista")
    lines = [json.loads(x) for x in paths["responses"].read_text().splitlines()]
    assert [x["prompt"] for x in lines] == prompts and lines[1]["choices"] == ["97", "102", "107", "122"]
    md = paths["markdown"].read_text()
    assert "| GEO | 1 | 0.0 |" in md and "| **overall** | 3 | 66.7 |" in md
    assert json.loads(paths["json"].read_text())["per_skill"]["NUM"]["n"] == 2
