"""Monte Carlo step labels: the pool (de-dup, cap), the balance, and records that recompute from the file."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mstar_jax.answers import check_answer
from mstar_jax.loop.rollouts import Query, Rollout
from mstar_jax.prm.labels import (Candidate, LabelSettings, balance, balance_line, candidate_pool, read_labels,
                                  write_labels)

FREE = {"question_type": "free_form", "answer_type": "integer", "answer": "8", "choices": None}
MC = {"question_type": "multi_choice", "answer_type": "text", "answer": "B", "choices": ["3", "8", "9"]}


def _rollout(qid, texts, correct):
    return Rollout(qid, "p", list(texts), list(correct), [[0.0]] * len(texts))


def test_pool_dedups_caps_and_counts_uniform_questions():
    rollouts = [
        _rollout("a", ["x is 8", "x  is 8", "y", "z", "w", ""], [True, True, False, False, True, False]),
        _rollout("b", ["p", "q"], [True, True]),  # every sample correct
        _rollout("c", ["r", "r", "s"], [False, False, False]),  # every sample wrong
    ]
    items = {"a": FREE, "b": MC, "c": FREE}
    pool, stats = candidate_pool(rollouts, items, per_question=3)
    assert [(c.query_id, c.index) for c in pool] == [("a", 0), ("a", 2), ("a", 3), ("b", 0), ("b", 1),
                                                     ("c", 0), ("c", 2)]
    assert stats["duplicates"] == 2 and stats["empty"] == 1 and stats["over_cap"] == 1
    assert stats["questions_all_correct"] == 1 and stats["questions_all_wrong"] == 1
    assert [c.multi_choice for c in pool if c.query_id == "b"] == [True, True]


def _pool(n_mc_ok, n_mc_bad, n_ff_ok, n_ff_bad):
    out, k = [], 0
    for mc, ok, n in ((True, True, n_mc_ok), (True, False, n_mc_bad), (False, True, n_ff_ok), (False, False, n_ff_bad)):
        for _ in range(n):
            out.append(Candidate(f"q{k}", 0, f"t{k}", ok, mc))
            k += 1
    return out


def test_balance_holds_both_ratios_when_the_data_allows():
    chosen, report = balance(_pool(10, 10, 10, 10), pairs=16)
    cells = Counter((c.multi_choice, c.correct) for c in chosen)
    assert cells == {(True, True): 4, (True, False): 4, (False, True): 4, (False, False): 4}
    assert report["short"] == {}
    assert balance(_pool(10, 10, 10, 10), pairs=16)[0] == chosen  # seeded
    assert balance(_pool(10, 10, 10, 10), pairs=16, seed=1)[0] != chosen


def test_fill_reports_and_fills_a_short_side():
    chosen, report = balance(_pool(0, 0, 3, 20), pairs=16, mode="fill")
    cells = Counter((c.multi_choice, c.correct) for c in chosen)
    assert cells == {(False, True): 3, (False, False): 13}
    assert report["short"] == {"multi_choice": 8, "correct": 5}
    line = balance_line(report)
    assert "multi_choice by 8" in line and "correct by 5" in line and "filled" in line


def test_strict_keeps_exact_ratios():
    chosen, report = balance(_pool(2, 9, 9, 9), pairs=16, mode="strict")
    assert Counter((c.multi_choice, c.correct) for c in chosen) == {(True, True): 2, (True, False): 2,
                                                                    (False, True): 2, (False, False): 2}
    with pytest.raises(Exception, match="balance"):
        balance(_pool(1, 1, 1, 1), 4, mode="equal")


class _CannedSampler:
    """Completes every step prefix with canned texts (right and wrong answers), recording the cuts asked for."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, texts, []

    def complete(self, params, images, prompts, continuations, cuts, *, n, indices, **kw):
        from mstar_jax.sampler import Sample

        self.calls.append((list(indices), [list(c) for c in cuts]))
        return [[[Sample([], self.texts[(i + s + j) % len(self.texts)], [], "stop") for j in range(n)]
                 for s in range(len(cs))] for i, cs in zip(indices, cuts)]


def test_labels_are_the_share_of_correct_completions_and_recompute_from_the_file(tmp_path, tiny_models):
    from PIL import Image
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["clip_llama"][0])
    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(img)
    queries = {"q0": Query("q0", (str(img),), dict(FREE, query="sum?")),
               "q1": Query("q1", (str(img),), dict(MC, query="which?"))}
    chosen = [Candidate("q0", 0, "The left die shows 3. The right die shows 5. The answer is 8.", True, False),
              Candidate("q1", 2, "The bar is B. So the answer is (A).", False, True),
              Candidate("q0", 1, "One step only, the answer is 9.", False, False)]
    sampler = _CannedSampler(tok, [" The answer is 8.", " The answer is 9.", " The answer is B.", " Hmm."])
    s = LabelSettings(completions=3, step_rule="sentences", chunk=2)
    records = write_labels(sampler, None, chosen, queries, lambda item: item["query"], s, tmp_path / "l.jsonl")
    assert records == read_labels(tmp_path / "l.jsonl") and len(records) == 3
    # Chunks of 2 with stable per-response indices; the one-step response (chunk 2) needs no completions.
    assert [c[0] for c in sampler.calls] == [[0, 1]]
    flags = 0
    for rec in records:
        item = rec["item"]
        for k, st in enumerate(rec["steps"]):
            assert st["label"] == pytest.approx(sum(st["correct"]) / len(st["correct"]))
            prefix = rec["response"][:st["prefix_end"]]
            assert st["correct"] == [check_answer(prefix + c, item) for c in st["completions"]]
            assert rec["response"][slice(*st["span"])] == st["text"]
            if k < len(rec["steps"]) - 1:
                assert len(st["completions"]) == 3 and st["prefix_end"] >= st["span"][1]
            else:  # the last step is the response itself
                assert st["completions"] == [""] and st["correct"] == [rec["correct"]]
            flags += sum(st["correct"])
    assert 0 < flags < sum(len(st["correct"]) for r in records for st in r["steps"])
    with (tmp_path / "l.jsonl").open() as f:
        assert all(set(json.loads(line)) >= {"query_id", "response", "steps", "item", "prompt"} for line in f)


def test_a_torn_chunk_is_dropped_and_redone(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["clip_llama"][0])
    queries = {"q0": Query("q0", (), dict(FREE, query="sum?"))}
    chosen = [Candidate("q0", i, f"Step {i}. The answer is {i}.", i == 8, False) for i in range(5)]
    s = LabelSettings(completions=2, step_rule="sentences", chunk=2)
    sampler = _CannedSampler(tok, [" The answer is 8.", " no"])
    ref = write_labels(sampler, None, chosen, queries, lambda it: it["query"], s, tmp_path / "ref.jsonl")
    path = tmp_path / "l.jsonl"
    write_labels(sampler, None, chosen, queries, lambda it: it["query"], s, path)
    # Simulate a kill after a third chunk was appended but before it was recorded: a torn tail.
    progress = json.loads((tmp_path / "l.progress.json").read_text())
    progress.update(chunks=1, bytes=len(path.read_text().splitlines(True)[0]) + len(
        path.read_text().splitlines(True)[1]))
    (tmp_path / "l.progress.json").write_text(json.dumps(progress))
    with path.open("a") as f:
        f.write('{"torn": ')
    sampler.calls.clear()
    again = write_labels(sampler, None, chosen, queries, lambda it: it["query"], s, path)
    assert again == ref and path.read_text() == (tmp_path / "ref.jsonl").read_text()
    assert [c[0] for c in sampler.calls] == [[2, 3], [4]]  # only the chunks after the recorded one
