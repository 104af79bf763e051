"""grain pipeline: processor outputs, bucketing, exact resume from a saved state, per-process shards, shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mstar_jax.data.pipeline import PipelineConfig, build_pipeline, bucket_length, num_batches, shard_dataset
from mstar_jax.data.records import Record
from mstar_jax.errors import DataError
from tests.data.conftest import png_bytes

QUESTIONS = ["How many circles are there ?", "What is the value of the red bar ?",
             "How many circles are there ? Think step by step , then finish with : The answer is <answer> ."]


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "images").mkdir()
    records = []
    for i in range(12):
        (tmp_path / "images" / f"{i}.png").write_bytes(png_bytes(i, size=(20 + i, 16 + 2 * i)))
        records.append(Record(id=f"r{i}", images=[f"images/{i}.png"], question=QUESTIONS[i % 3], choices=None,
                              answer=str(i), answer_type="integer", precision=None, unit=None,
                              question_type="free_form", metadata={}))
    return tmp_path, records


def cfg(**kw):
    base = dict(batch_size=4, seed=7, buckets=(8, 16, 32), process_index=0, process_count=1)
    base.update(kw)
    return PipelineConfig(**base)


def prompt(item):
    return item["question"]


def test_batches_match_the_processor(dataset, tiny_processor):
    from PIL import Image

    from mstar_jax.sft_batch import prompt_text

    root, records = dataset
    batch = next(iter(build_pipeline(records, tiny_processor, prompt, root, cfg(shuffle=False))))
    assert batch["input_ids"].shape == (4, 32) and batch["pixel_values"].shape == (4, 3, 28, 28)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["id"].tolist() == ["r0", "r1", "r2", "r3"]
    for row, rec in enumerate(records[:4]):
        with Image.open(root / rec.images[0]) as im:
            ref = tiny_processor(images=[im.convert("RGB")], text=[prompt_text(tiny_processor, rec.question)],
                                 return_tensors="np")
        n = int(batch["lengths"][row])
        np.testing.assert_array_equal(batch["input_ids"][row, :n], ref["input_ids"][0])  # right padding
        assert (batch["input_ids"][row, n:] == tiny_processor.tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].sum() == n
        np.testing.assert_allclose(batch["pixel_values"][row], ref["pixel_values"][0], rtol=1e-6)


def test_left_padding_and_buckets(dataset, tiny_processor):
    root, records = dataset
    batches = list(build_pipeline(records, tiny_processor, prompt, root, cfg(shuffle=False, padding_side="left")))
    assert {b["input_ids"].shape[1] for b in batches} <= {8, 16, 32}
    for b in batches:
        for row, n in enumerate(b["lengths"]):
            assert b["attention_mask"][row, -n:].all() and not b["attention_mask"][row, :-n].any()
    assert bucket_length(9, (8, 16)) == 16
    with pytest.raises(DataError, match="longer than the largest bucket"):
        bucket_length(17, (8, 16))


def test_too_long_prompt_names_the_record(dataset, tiny_processor):
    root, records = dataset
    with pytest.raises(DataError, match="record r0: prompt is"):
        next(iter(build_pipeline(records, tiny_processor, prompt, root, cfg(shuffle=False, buckets=(4,)))))


def test_corrupt_image_names_the_record(dataset, tiny_processor):
    root, records = dataset
    (root / "images" / "0.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="record r0: cannot read the image"):
        next(iter(build_pipeline(records, tiny_processor, prompt, root, cfg(shuffle=False))))


@pytest.mark.parametrize("epochs", [1, 2])
def test_restored_iterator_yields_exactly_the_rest(dataset, tiny_processor, epochs):
    root, records = dataset
    ds = build_pipeline(records, tiny_processor, prompt, root, cfg(num_epochs=epochs))
    full = [b["index"].tolist() for b in ds]
    assert len(full) == 3 * epochs and sorted(sum(full[:3], [])) == list(range(12))
    it = iter(ds)
    next(it)
    next(it)
    state = it.get_state()
    expected_rest = full[2:]
    again = iter(build_pipeline(records, tiny_processor, prompt, root, cfg(num_epochs=epochs)))
    again.set_state(state)
    rest = list(again)
    assert [b["index"].tolist() for b in rest] == expected_rest
    np.testing.assert_array_equal(rest[0]["input_ids"], list(build_pipeline(
        records, tiny_processor, prompt, root, cfg(num_epochs=epochs)))[2]["input_ids"])
    if epochs == 2:  # the second epoch is reshuffled
        assert sum(full[:3], []) != sum(full[3:], [])


def test_two_processes_see_disjoint_shards_covering_the_data(dataset, tiny_processor):
    root, records = dataset
    seen = []
    for p in range(2):
        c = cfg(process_index=p, process_count=2, batch_size=3)
        batches = list(build_pipeline(records, tiny_processor, prompt, root, c))
        assert len(batches) == num_batches(len(records), c) == 2
        seen.append(sorted(i for b in batches for i in b["index"].tolist()))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_uneven_shards_are_cut_and_logged(dataset, tiny_processor, caplog):
    root, records = dataset
    sizes = []
    for p in range(5):
        c = cfg(process_index=p, process_count=5, batch_size=1, shuffle=False)
        sizes.append(len(list(build_pipeline(records, tiny_processor, prompt, root, c))))
    assert sizes == [2] * 5 and "dropping the last 2 of 12 records" in caplog.text


def test_prepared_shards_feed_the_pipeline(dataset, tiny_processor, tmp_path, capsys):
    """`mstar data prepare` (through the CLI) writes shards that give the same batches as the source files."""
    from mstar_jax.cli import main
    from mstar_jax.data.records import write_jsonl

    root, records = dataset
    write_jsonl(records, root / "records.jsonl")
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(root / "records.jsonl"), str(out), "--format", "records", "--root",
                 str(root), "--shards", "3", "--strict"]) == 0
    assert "wrote 12 records to 3 shard(s)" in capsys.readouterr().out
    manifest = json.loads((out / "records.manifest.json").read_text())
    assert manifest["records"] == 12 and len(manifest["shards"]) == 3
    paths = sorted(out.glob("*.array_record"))
    assert len(paths) == 3
    source = shard_dataset(paths)
    assert len(source) == 12
    batches = list(build_pipeline(source, tiny_processor, prompt, root / "nowhere", cfg(shuffle=False)))
    from_files = list(build_pipeline(records, tiny_processor, prompt, root, cfg(shuffle=False)))
    ids = [i for b in batches for i in b["id"].tolist()]
    assert sorted(ids) == sorted(r.id for r in records)
    by_id = {b["id"][j]: b["pixel_values"][j] for b in from_files for j in range(len(b["id"]))}
    for b in batches:
        for j, rid in enumerate(b["id"]):
            np.testing.assert_array_equal(b["pixel_values"][j], by_id[rid])
