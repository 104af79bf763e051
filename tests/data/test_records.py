"""The record schema: conversions, validation rules, path safety, shard entries, reports."""

from __future__ import annotations

import dataclasses

import pytest

from mstar_jax.data.records import (LoadReport, Record, decode_entry, encode_entry, infer_answer_type,
                                    safe_relative_path, validate_record)
from mstar_jax.errors import DataError
from tests.data.conftest import png_bytes


def make(**kw):
    base = dict(id="r1", images=["images/a.png"], question="How many circles?", choices=None, answer="3",
                answer_type="integer", precision=None, unit=None, question_type="free_form",
                metadata={"task": "visual question answering"})
    base.update(kw)
    return Record(**base)


def test_to_item_uses_mathvista_names():
    rec = make(choices=["2", "3"], question_type="multi_choice", answer_type="text", query="Q full")
    item = rec.to_item()
    assert {k: item[k] for k in ("pid", "question_type", "answer_type", "choices", "answer", "precision", "unit",
                                 "query")} == {"pid": "r1", "question_type": "multi_choice", "answer_type": "text",
                                               "choices": ["2", "3"], "answer": "3", "precision": None,
                                               "unit": None, "query": "Q full"}
    assert make().to_item()["query"] == "How many circles?"  # falls back to the question


def test_frozen_and_json_round_trip():
    rec = make(rationale="There are 3. The answer is 3.")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.answer = "4"
    assert isinstance(rec.images, tuple)
    assert Record.from_json(rec.to_json()) == rec
    assert rec.unlabeled().answer is None and rec.unlabeled().rationale is None and rec.labeled


@pytest.mark.parametrize("path,ok", [("images/a.png", True), ("a/./b.png", True), ("a/../b.png", True),
                                     ("../a.png", False), ("a/../../b.png", False), ("/etc/passwd", False),
                                     ("C:/x.png", False), ("", False)])
def test_safe_relative_path(path, ok):
    assert (safe_relative_path(path) is not None) is ok


def test_validate_record_kinds(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    assert validate_record(make(), tmp_path) == []
    kinds = lambda rec, **kw: [k for k, _ in validate_record(rec, tmp_path, **kw)]  # noqa: E731
    assert kinds(make(answer=None)) == ["missing_answer"]
    assert kinds(make(answer=None), labeled=False) == []
    assert kinds(make(answer_type="complex")) == ["unknown_answer_type"]
    assert kinds(make(question_type="open")) == ["unknown_question_type"]
    assert kinds(make(answer="abc")) == ["bad_answer"]
    assert kinds(make(images=["images/none.png"])) == ["image_missing"]
    assert kinds(make(images=["../a.png"])) == ["image_outside_root"]
    assert kinds(make(question_type="multi_choice", answer_type="text")) == ["malformed"]


@pytest.mark.parametrize("answer,expected", [("12", ("integer", None)), ("-3", ("integer", None)),
                                             ("1,234", ("integer", None)), ("3.25", ("float", 2)),
                                             ("[1, 2]", ("list", None)), ("x^2", ("text", None))])
def test_infer_answer_type(answer, expected):
    assert infer_answer_type(answer) == expected


def test_shard_entry_round_trip_and_bad_magic():
    rec = make(images=["a.png", "b.png"])
    imgs = [png_bytes(1), png_bytes(2)]
    back, back_imgs = decode_entry(encode_entry(rec, imgs))
    assert back == rec and back_imgs == imgs
    with pytest.raises(DataError, match="bad magic"):
        decode_entry(b"XXXX" + encode_entry(rec, imgs)[4:])


def test_report_counts_summary_and_strict():
    rep = LoadReport("f.json", loaded=3)
    rep.add("image_missing", "a", "gone")
    rep.add("image_missing", "b", "gone")
    rep.add("bad_answer", "c", "abc")
    assert rep.counts == {"image_missing": 2, "bad_answer": 1} and rep.skipped == 3
    assert rep.summary() == "f.json: loaded 3 records, left out 3 (bad_answer=1, image_missing=2)"
    with pytest.raises(DataError, match="f.json: record a: image_missing"):
        rep.raise_if_problems()
