"""Each reader on its benchmark's published layout (tests/data/benchmark_fixtures.py): ids, answers, the exact
question text, and what the report line says the reader assumed."""

from __future__ import annotations

import json

from mstar_jax.data.readers import read_dataset
from mstar_jax.loop.prompts import COT_SUFFIX, cot_prompt, question_text
from tests.data import benchmark_fixtures as F


def _by_id(records):
    return {r.id: r for r in records}


def test_mathvista_json_merges_query_json(tmp_path):
    records, report = read_dataset(F.write_mathvista_json(tmp_path), "mathvista")
    assert report.skipped == 0 and [r.id for r in records] == ["2", "5", "404"]
    for r in records:
        assert r.query == F.MATHVISTA_QUERIES[r.id]  # the official prompt text, hint and unit included
    by = _by_id(records)
    assert by["404"].answer == "children's class" and by["2"].unit == "g" and by["2"].answer_type == "integer"
    assert "query: from query.json" in report.summary() and "split found: testmini" in report.summary()


def test_mathvista_json_parquet_and_built_queries_give_the_same_prompts(tmp_path):
    with_json, _ = read_dataset(F.write_mathvista_json(tmp_path / "gh"), "mathvista")
    parquet, p_report = read_dataset(F.write_mathvista_parquet(tmp_path / "hf"), "mathvista")
    built, b_report = read_dataset(F.write_mathvista_json(tmp_path / "bare", queries=False), "mathvista")
    assert "build_query" in b_report.summary() and not any(n.startswith("query") for n in p_report.notes)
    prompts = [{r.id: cot_prompt(r.to_item()) for r in recs} for recs in (with_json, parquet, built)]
    assert prompts[0] == prompts[1] == prompts[2]
    assert prompts[0]["404"] == F.MATHVISTA_QUERIES["404"] + "\n" + COT_SUFFIX  # choices listed once, by the query
    assert [(r.id, r.answer, r.choices, r.metadata) for r in with_json] == \
        [(r.id, r.answer, r.choices, r.metadata) for r in parquet]


def test_mathvista_parquet_metadata_struct_and_image_bytes(tmp_path):
    path = F.write_mathvista_parquet(tmp_path)
    import pyarrow.parquet as pq

    assert str(pq.read_schema(path).field("metadata").type).startswith("struct<")  # as the HF release stores it
    records, report = read_dataset(path, "mathvista", root=tmp_path)
    r = _by_id(records)["5"]
    assert r.metadata["task"] == "geometry problem solving" and r.metadata["skills"] == ["geometry reasoning",
                                                                                         "algebraic reasoning"]
    assert r.images[0].startswith("_image_cache/mathvista/") and (tmp_path / r.images[0]).read_bytes() == \
        F.png_bytes(1)
    assert r.answer == "97" and r.precision is None


def test_question_text_lists_choices_of_a_question_with_a_m():
    item = {**F.MATHVISTA_ROWS["404"], "query": None}
    text = question_text(item)
    assert text.count("(A) figure skating practice") == 1 and text.endswith("(D) children's class")
    hinted = {"question": "Vitamin A. is in carrots. U.S.A. grows them. Which?", "choices": ["kale", "corn"]}
    assert "(A) kale\n(B) corn" in question_text(hinted)
    listed = {"question": "Which?\nOptions:\nA. kale\nB. corn", "choices": ["kale", "corn"]}
    assert question_text(listed) == listed["question"]


def test_mmbench_tsv_circular_copies_and_image_references(tmp_path):
    records, report = read_dataset(F.write_mmbench_tsv(tmp_path), "mmbench")
    assert report.skipped == 0 and len(records) == 8
    assert "circular copies: 8 rows of 2 questions" in report.summary()
    by = _by_id(records)
    groups = {r.metadata["circular_group"] for r in records}
    assert groups == {"2705", "812"} and by["3002705"].metadata["circular_copy"] == 3
    q = F.MMBENCH_QUESTIONS[0]
    assert all(by[str(c["index"])].answer == q["options"][0] for c in F.mmbench_copies(q))  # the letter moved
    assert by["1002705"].choices[0] == q["options"][1]
    assert by["1000812"].images == by["812"].images  # the copy's image cell is the main row's index
    assert by["812"].query == ("Question: Which scene category matches this image the best?\nOptions:\n"
                               "A. rock_arch\nB. train_interior\nC. shopfront\nD. office_cubicles")
    assert by["812"].metadata["l2_category"] == "coarse_perception" and by["812"].metadata["split"] == "dev"


def test_mmbench_lmms_lab_parquet_capital_l2_category(tmp_path):
    records, report = read_dataset(F.write_mmbench_parquet(tmp_path), "mmbench")
    by = _by_id(records)
    r = by["241"]
    assert r.metadata["l2_category"] == "attribute_reasoning" and r.choices == (F.MMBENCH_LMMS_ROW["A"],
                                                                                  F.MMBENCH_LMMS_ROW["B"])
    assert r.answer == F.MMBENCH_LMMS_ROW["B"] and r.query.startswith("Hint: 下面的文章")
    assert by["812"].metadata["l2_category"] == "coarse_perception"
    assert "no rotated copies" in report.summary()


def test_mmstar_options_leave_the_question_and_split_comes_from_meta_info(tmp_path):
    records, report = read_dataset(F.write_mmstar_parquet(tmp_path), "mmstar")
    r = _by_id(records)["0"]
    assert r.question == "Which option describe the object relationship in the image correctly?"
    assert r.choices[0] == "The suitcase is on the book." and r.answer == "The suitcase is on the book."
    assert r.metadata["split"] == "val" and r.metadata["source"] == "MMBench"
    prompt = cot_prompt(r.to_item())
    assert prompt.count("The suitcase is beneath the cat.") == 1  # the options are shown once
    assert prompt.startswith("Question: Which option describe")
    assert "Options:\nA. The suitcase is on the book." in prompt
    assert "split found: val" in report.summary()


def test_ai2d_tsv_and_parquet_load_the_same_questions(tmp_path):
    tsv, t_report = read_dataset(F.write_ai2d_tsv(tmp_path / "vlmevalkit"), "ai2d")
    parquet, p_report = read_dataset(F.write_ai2d_parquet(tmp_path / "lmms"), "ai2d")
    assert t_report.skipped == p_report.skipped == 0
    assert [(r.id, r.question, r.choices, r.answer) for r in tsv] == \
        [(r.id, r.question, r.choices, r.answer) for r in parquet]
    # lmms-lab answer "1" -> option B, whose text is "D"; the TSV's letter "A" is the first option, "D", too
    assert [r.answer for r in tsv] == ["D", "face", "D"]
    assert [cot_prompt(r.to_item()) for r in tsv] == [cot_prompt(r.to_item()) for r in parquet]


def test_m3cot_jsonl_paths_from_the_folder_above_and_parquet(tmp_path):
    records, report = read_dataset(F.write_m3cot_jsonl(tmp_path / "data"), "m3cot")
    assert report.skipped == 0 and records[0].images == ("images/physics-1074.png",)
    assert "leading data/ dropped" in report.summary()
    parquet, _ = read_dataset(F.write_m3cot_parquet(tmp_path / "hf"), "m3cot")
    for a, b in zip(records, parquet):
        assert (a.id, a.answer, a.query) == (b.id, b.answer, b.query)
    assert records[0].answer == "fuzzy" and records[0].query == (
        "[Context]\nSelect the best answer.\n[Question]\nWhich property do these three objects have in common?\n"
        "[Choices]\n(A) fragile\n(B) sticky\n(C) fuzzy")
    assert records[1].query.startswith("[Question]\n")  # an empty context is left out


def test_mathv360k_images_under_data_images_without_root(tmp_path):
    records, report = read_dataset(F.write_mathv360k(tmp_path))  # root: the JSON's folder, as `mstar data` uses
    assert report.skipped == 0 and "images: under data_images/" in report.summary()
    by = _by_id(records)
    mc = by["tabmwp-1"]
    assert mc.images == ("data_images/TabMWP/images/1.png",) and mc.question_type == "multi_choice"
    assert mc.choices == ("private class", "children's class", "adult class") and mc.answer == "children's class"
    assert mc.question == "Which activity begins at 11.50 A.M.?" and mc.metadata["source"] == "TabMWP"
    assert (by["iconqa-7"].answer, by["iconqa-7"].answer_type) == ("7", "integer")
    assert json.loads(json.dumps(report.to_json()))["notes"]  # the assumptions travel with the manifest
