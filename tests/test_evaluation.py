"""Benchmark metrics against hand computations; the files written; reasoning subsets; run_eval batching."""

from __future__ import annotations

import json

import pytest

from mstar_jax.data.records import Record
from mstar_jax.evaluation import (evaluate_responses, markdown_table, pass_at_k, reasoning_subset, run_eval,
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
    greedy_only = markdown_table(evaluate_responses(ITEMS, [r[:1] for r in RESPONSES]))
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
