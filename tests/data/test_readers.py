"""Every reader parses a fixture in its published layout; malformed records are reported, the rest loads."""

from __future__ import annotations

import base64
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mstar_jax.data.readers import detect_format, parse_choices, read_dataset
from mstar_jax.errors import DataError
from tests.data.conftest import png_bytes


def _images(root, names):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (root / "images" / n).write_bytes(png_bytes(i))


def _conv(q, a=None):
    turns = [{"from": "human", "value": "<image>\n" + q}]
    if a is not None:
        turns.append({"from": "gpt", "value": a})
    return turns


@pytest.fixture
def mathv360k(tmp_path):
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png at all")
    rows = [
        {"id": "ok-int", "image": "images/a.png", "conversations": _conv("How many circles are there?",
                                                                          "The answer is 4")},
        {"id": "ok-mc", "image": "images/b.png", "conversations": _conv(
            "First perform reasoning.\nQuestion: Which bar is tallest?\nChoices:\n(A) red\n(B) blue\n(C) green",
            "The answer is B")},
        {"id": "ok-cot", "image": "images/c.png", "conversations": _conv(
            "What is the sum?", "The red bar is 3. The blue bar is 4. 3 + 4 = 7. The answer is 7.")},
        {"id": "ok-float", "image": "images/a.png", "conversations": _conv("Average?", "The answer is 3.25")},
        {"id": "no-answer", "image": "images/a.png", "conversations": _conv("How many?")},
        {"id": "escape", "image": "../secret.png", "conversations": _conv("How many?", "The answer is 1")},
        {"id": "absolute", "image": "/etc/passwd", "conversations": _conv("How many?", "The answer is 1")},
        {"id": "gone", "image": "images/missing.png", "conversations": _conv("How many?", "The answer is 1")},
        {"id": "corrupt", "image": "images/corrupt.png", "conversations": _conv("How many?", "The answer is 1")},
        {"id": "no-conv", "image": "images/a.png"},
        "not an object",
    ]
    path = tmp_path / "train_samples_all_tuning.json"
    path.write_text(json.dumps(rows))
    return path


def test_mathv360k_reads_good_and_reports_each_bad_record(mathv360k):
    records, report = read_dataset(mathv360k, "mathv360k")
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == ["ok-cot", "ok-float", "ok-int", "ok-mc"]
    assert by_id["ok-int"].answer == "4" and by_id["ok-int"].answer_type == "integer"
    assert by_id["ok-int"].question == "How many circles are there?" and by_id["ok-int"].rationale is None
    mc = by_id["ok-mc"]
    assert mc.question_type == "multi_choice" and mc.choices == ("red", "blue", "green") and mc.answer == "blue"
    assert mc.question == "Which bar is tallest?"
    assert by_id["ok-cot"].rationale.endswith("The answer is 7.") and by_id["ok-cot"].answer == "7"
    assert (by_id["ok-float"].answer_type, by_id["ok-float"].precision) == ("float", 2)
    assert report.counts == {"missing_answer": 1, "image_outside_root": 2, "image_missing": 1,
                             "image_corrupt": 1, "malformed": 2}
    assert report.loaded + report.skipped == 11  # nothing dropped silently
    ids = {p.record_id: p for p in report.problems}
    assert ids["escape"].kind == "image_outside_root" and ids["escape"].file == str(mathv360k)
    assert ids["#10"].kind == "malformed" and "no-conv" in ids
    assert "corrupt" in str(ids["corrupt"]) and str(mathv360k) in str(ids["corrupt"])


def test_strict_stops_with_file_and_record(mathv360k):
    with pytest.raises(DataError, match=r"train_samples_all_tuning.json: record no-answer: missing_answer"):
        read_dataset(mathv360k, "mathv360k", strict=True)


def test_unlabeled_read_drops_answers(mathv360k):
    records, report = read_dataset(mathv360k, "mathv360k", labeled=False)
    assert "no-answer" in {r.id for r in records} and all(r.answer is None for r in records)
    assert "missing_answer" not in report.counts


def _mathvista_row(pid, **kw):
    row = {"question": "What is the value of the red bar?", "image": f"images/{pid}.png", "choices": None,
           "unit": None, "precision": None, "answer": "4", "question_type": "free_form", "answer_type": "integer",
           "pid": pid, "metadata": {"split": "testmini", "source": "FigureQA", "task": "figure question answering",
                                    "category": "math-targeted-vqa", "skills": ["statistical reasoning"]},
           "query": "Hint: Please answer the question requiring an integer answer.\nQuestion: What is ..."}
    row.update(kw)
    return row


def test_mathvista_json_dict(tmp_path):
    _images(tmp_path, ["1.png", "2.png", "3.png", "4.png", "5.png"])
    data = {"1": _mathvista_row("1"),
            "2": _mathvista_row("2", choices=["1.5", "2.5"], answer="2.5", question_type="multi_choice",
                                answer_type="float", precision=1.0),
            "3": _mathvista_row("3", answer_type="complex"),
            "4": _mathvista_row("4", answer="abc"),
            "5": _mathvista_row("5", answer=None)}
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps(data))
    assert detect_format(path) == "mathvista"
    records, report = read_dataset(path)
    assert [r.id for r in records] == ["1", "2"]
    assert records[0].metadata["task"] == "figure question answering" and records[0].query.startswith("Hint:")
    assert records[1].precision == 1 and records[1].choices == ("1.5", "2.5")
    assert report.counts == {"unknown_answer_type": 1, "bad_answer": 1, "missing_answer": 1}
    assert {p.record_id for p in report.problems} == {"3", "4", "5"}
    item = records[0].to_item()
    assert item["pid"] == "1" and item["answer"] == "4" and item["question_type"] == "free_form"


def test_mathvista_parquet_with_decoded_image(tmp_path):
    rows = [_mathvista_row("7", image="images/7.jpg", decoded_image={"bytes": png_bytes(7), "path": "7.jpg"}),
            _mathvista_row("8", image="images/8.jpg", decoded_image={"bytes": b"garbage", "path": "8.jpg"})]
    for r in rows:
        r["metadata"] = json.dumps(r["metadata"])  # keep the fixture's schema simple
    path = tmp_path / "testmini-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = read_dataset(path, "mathvista", root=tmp_path)
    assert [r.id for r in records] == ["7"] and report.counts == {"image_corrupt": 1}
    cached = tmp_path / records[0].images[0]
    assert records[0].images[0].startswith("_image_cache/mathvista/") and cached.read_bytes() == png_bytes(7)


def _m3cot_row(i, **kw):
    row = {"id": f"physical-commonsense-{i}", "category": "physical-commonsense", "image_id": f"img{i}",
           "question": "Which object would you use to cut paper?", "choices": ["spoon", "scissors", "cup"],
           "context": "", "answer": "B", "rationale": "Scissors have blades. The answer is B.", "split": "test",
           "domain": "commonsense", "topic": "physical-commonsense"}
    row.update(kw)
    return row


def test_m3cot_jsonl_and_parquet(tmp_path):
    _images(tmp_path, ["img0.png"])
    lines = [json.dumps(_m3cot_row(0)), json.dumps(_m3cot_row(1, answer="F", image_id="img0")), "{broken json"]
    path = tmp_path / "m3cot_test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, report = read_dataset(path, "m3cot")
    assert len(records) == 1 and records[0].answer == "scissors" and records[0].images == ("images/img0.png",)
    assert records[0].metadata["task"] == "commonsense" and records[0].rationale.startswith("Scissors")
    assert report.counts == {"bad_answer": 1, "malformed": 1}
    pq_path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([_m3cot_row(2, image={"bytes": png_bytes(2), "path": None},
                                                   context="A classroom.")]), pq_path)
    records, report = read_dataset(pq_path, "m3cot")
    assert report.skipped == 0 and records[0].query.startswith("[Context]\nA classroom.\n[Question]")


def test_mmstar_row_without_options_is_malformed(tmp_path):
    rows = [{"index": 1, "question": "No options here", "image": {"bytes": png_bytes(1), "path": None},
             "answer": "A", "category": "math", "l2_category": "numeric", "meta_info": None}]
    path = tmp_path / "mmstar.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = read_dataset(path)
    assert records == [] and report.counts == {"malformed": 1} and report.problems[0].record_id == "1"
    assert "Options:" in report.problems[0].message


def test_mmbench_tsv_base64_and_image_reference(tmp_path):
    b64 = base64.b64encode(png_bytes(3)).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    rows = [
        ["10", "What comes next?", "Look at the pattern.", "1", "2", "3", "4", "C", "sequence", b64, "x",
         "logic_reasoning", "", "dev"],
        ["11", "Which is bigger?", "", "cat", "elephant", "", "", "B", "size", "10", "x", "attribute_reasoning",
         "", "dev"],  # image given as the index of row 10
        ["12", "Broken image", "", "a", "b", "", "", "A", "size", "!!!notbase64!!!" * 10, "x", "coarse_perception",
         "", "dev"],
    ]
    path = tmp_path / "MMBench_DEV_EN_V11.tsv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    records, report = read_dataset(path)
    assert [r.id for r in records] == ["10", "11"] and report.counts == {"image_corrupt": 1}
    assert records[0].query == ("Hint: Look at the pattern.\nQuestion: What comes next?\nOptions:\nA. 1\nB. 2\nC. 3\n"
                                "D. 4") and records[0].answer == "3"
    assert records[1].choices == ("cat", "elephant") and records[1].images == records[0].images
    assert records[0].metadata["l2_category"] == "logic_reasoning"


def test_ai2d_answer_index_outside_the_options(tmp_path):
    rows = [{"question": "Out of range", "options": ["a", "b"], "answer": "5",
             "image": {"bytes": png_bytes(6), "path": None}}]
    path = tmp_path / "ai2d-test-00000-of-00002.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = read_dataset(path)
    assert records == [] and report.counts == {"bad_answer": 1} and report.problems[0].record_id == "ai2d-0"


def test_image_reference_to_a_row_without_image(tmp_path):
    path = tmp_path / "MMBench_DEV_EN_V11.tsv"
    path.write_text("index\tquestion\thint\tA\tB\tanswer\timage\n5\tQ?\t\tx\ty\tA\t77\n")
    records, report = read_dataset(path)
    assert records == [] and report.counts == {"image_missing": 1} and "'77'" in report.problems[0].message


def test_parse_choices_variants():
    assert parse_choices("Q?\nChoices:\n(A) 1\n(B) 2") == ("Q?", ["1", "2"])
    assert parse_choices("Q? Options: A. x y\nB. z") == ("Q?", ["x y", "z"])
    assert parse_choices("No choices") == ("No choices", None)


def test_unknown_file_type_and_format(tmp_path):
    bad = tmp_path / "data.xml"
    bad.write_text("<x/>")
    with pytest.raises(DataError, match="unsupported file type"):
        read_dataset(bad, "mathvista")
    ok = tmp_path / "d.json"
    ok.write_text("[]")
    with pytest.raises(DataError, match="unknown dataset format"):
        read_dataset(ok, "imagenet")


def test_mathvista_query_json_that_is_not_json_names_the_file(tmp_path):
    from tests.data.benchmark_fixtures import write_mathvista_json

    path = write_mathvista_json(tmp_path)
    (tmp_path / "query.json").write_text('{"2": "Hint: ...",')
    with pytest.raises(DataError, match=r"query.json: not valid JSON"):
        read_dataset(path, "mathvista")
