"""Bad inputs to `mstar train --config.data.source=files`: each record is reported with its file and id and left
out (the rest loads), or the file is named; nothing raises a traceback."""

from __future__ import annotations

import json

import pytest

from mstar_jax.config import load_config
from mstar_jax.errors import DataError
from mstar_jax.loop.data import load_splits
from tests.test_io import bomb_png, png


def row(rid, image, answer="3"):
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nHow many circles are there?"}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        (root / "img" / f"{i}.png").write_bytes(png(i))
    (root / "img" / "truncated.png").write_bytes(png(9)[:200])
    (root / "img" / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "outside.png").write_bytes(png(8))
    train = [row("ok0", "img/0.png"), row("ok1", "img/1.png"), row("truncated", "img/truncated.png"),
             row("bomb", "img/bomb.png"), row("escapes", "../outside.png")]
    (root / "train.json").write_text(json.dumps(train))
    test = {"t0": {"question": "How many?", "image": "img/2.png", "answer": "3", "answer_type": "integer",
                   "question_type": "free_form"},
            "t1": {"question": "Which matrix?", "image": "img/2.png", "answer": "[[1]]", "answer_type": "matrix",
                   "question_type": "free_form"}}
    (root / "test.json").write_text(json.dumps(test))
    return root


def files_config(root, **files):
    overrides = ["--config.data.source=files", f"--config.data.root={root}", "--config.model.path=unused",
                 f"--config.data.warmup={root / 'train.json'}", f"--config.data.train={root / 'train.json'}",
                 f"--config.data.test_id={root / 'test.json'}"]
    return load_config("smoke", overrides + [f"--config.data.{k}={v}" for k, v in files.items()])


def test_bad_records_are_named_and_left_out(dataset, tmp_path, caplog):
    said = []
    splits = load_splits(files_config(dataset), tmp_path / "run", said.append)
    assert [q.id for q in splits["train"]] == ["ok0", "ok1"] and [q.id for q in splits["test_id"]] == ["t0"]
    assert any("left out 3 (image_corrupt=2, image_outside_root=1)" in line for line in said)
    text = caplog.text  # one warning per record left out (on stderr in a run)
    train = dataset / "train.json"
    assert f"{train}: record truncated: image_corrupt: image 'img/truncated.png' cannot be decoded" in text
    assert f"{train}: record bomb: image_corrupt" in text and "decompression bomb" in text
    assert f"{train}: record escapes: image_outside_root" in text
    assert f"{dataset / 'test.json'}: record t1:" in text and "matrix" in text  # an answer type no checker knows


def test_a_data_file_that_is_not_utf8_is_named(dataset, tmp_path):
    text = json.dumps([row("r0", "img/0.png", "caf\u00e9")], ensure_ascii=False)
    (dataset / "latin1.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{dataset / 'latin1.json'}: not UTF-8 text .* at byte \d+"):
        load_splits(files_config(dataset, train=dataset / "latin1.json"), tmp_path / "run", print)
