"""Query sources: a split as a JSON file, `mstar data prepare` shards and a TFDS dataset gives the same queries;
images are read only when a query is used; bad shards and records are named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mstar_jax.cli import main as cli_main
from mstar_jax.config import load_config
from mstar_jax.data.sources import ListSource, ShardSource, TfdsSource
from mstar_jax.errors import DataError
from mstar_jax.loop.data import load_splits


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic set as JSON, as 3 ArrayRecord shards, and as a TFDS dataset."""
    from mstar_jax.data.synth import SynthConfig, generate

    base = tmp_path_factory.mktemp("sources")
    synth = base / "synth"
    generate(synth, SynthConfig(seed=0, sizes={"warmup": 0, "train": 10, "unlabeled": 0, "val": 0, "test_id": 4,
                                               "test_ood": 0}, families="dice"))
    for split in ("train", "test_id"):
        assert cli_main(["data", "prepare", str(synth / f"{split}.json"), str(base / "shards"), "--shards", "3"]) == 0
    assert cli_main(["data", "tfds", "mstar_synth", "--manual-dir", str(synth), "--data-dir", str(base / "tfds")]) == 0
    return base


def files_config(data, **splits):
    overrides = ["--config.data.source=files", "--config.model.path=unused"]
    return load_config("smoke", overrides + [f"--config.data.{k}={v}" for k, v in splits.items()])


def described(queries):
    return [(q.id, q.item, [open(p, "rb").read() for p in q.images]) for q in queries]


def test_json_shards_and_tfds_give_the_same_queries(data, tmp_path):
    synth = data / "synth"
    ways = {
        "json": dict(train=synth / "train.json", test_id=synth / "test_id.json"),
        "shards": dict(train=data / "shards" / "train.manifest.json", test_id=data / "shards" / "test_id.manifest.json"),
        "tfds": dict(train="tfds:mstar_synth:train", test_id="tfds:mstar_synth:test_id", root=data / "tfds"),
    }
    got = {}
    for name, splits in ways.items():
        run = tmp_path / name
        loaded = load_splits(files_config(data, **splits), run, print)
        got[name] = {s: described(loaded[s]) for s in ("train", "test_id")}
        kind = {"json": ListSource, "shards": ShardSource, "tfds": TfdsSource}[name]
        assert isinstance(loaded["train"], kind) and len(loaded["train"]) == 10
    assert [i for i, *_ in got["json"]["train"]] == [f"train-{k:06d}" for k in range(10)]
    assert got["shards"] == got["json"] and got["tfds"] == got["json"]


def test_images_are_written_only_when_a_query_is_used(data, tmp_path):
    source = ShardSource(sorted((data / "shards").glob("train-*.array_record")), tmp_path / "cache")
    assert len(source) == 10 and not (tmp_path / "cache").exists()
    q = source[7]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [q.images[0].rsplit("/", 1)[1]]
    assert source[-3].id == q.id and [x.id for x in source[6:8]] == ["train-000006", "train-000007"]
    with pytest.raises(IndexError):
        source[10]


def test_truncated_shard_is_named(data, tmp_path):
    shards = sorted((data / "shards").glob("train-*.array_record"))
    bad = tmp_path / shards[1].name
    bad.write_bytes(shards[1].read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{bad}: not a readable ArrayRecord shard, truncated or corrupt"):
        ShardSource([shards[0], bad, shards[2]], tmp_path / "cache")
    manifest = json.loads((data / "shards" / "train.manifest.json").read_text())
    (tmp_path / "train.manifest.json").write_text(json.dumps(manifest))
    for s in (shards[0], shards[2]):
        (tmp_path / s.name).write_bytes(s.read_bytes())
    with pytest.raises(DataError, match=f"{bad}: not a readable"):
        load_splits(files_config(data, train=tmp_path / "train.manifest.json", test_id=tmp_path), tmp_path, print)


def write_shard(path, entries):
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for e in entries:
        writer.write(e)
    writer.close()


def test_malformed_records_are_named_with_file_and_index(data, tmp_path):
    from mstar_jax.data.records import Record, encode_entry

    good = ShardSource([data / "shards" / "train-00000-of-00003.array_record"], tmp_path / "c")
    rec, images = good.entry(0)
    unlabeled = Record.from_json({**rec.to_json(), "answer": None})
    two_paths = Record.from_json({**rec.to_json(), "images": ["a.png", "b.png"]})
    raw = encode_entry(rec, images)
    cases = [(b"not an entry", "malformed entry .*bad magic"), (raw[:8] + b"{oops" + raw[13:], "malformed entry"),
             (encode_entry(unlabeled, images), "missing_answer"),
             (encode_entry(two_paths, images), "2 image paths but 1 embedded images")]
    path = tmp_path / "bad.array_record"
    write_shard(path, [raw] + [c[0] for c in cases])
    source = ShardSource([path], tmp_path / "cache")
    assert source[0].id == rec.id
    for k, (_, message) in enumerate(cases, 1):
        with pytest.raises(DataError, match=f"{path}: record {k}.*{message}"):
            source[k]
    assert ShardSource([path], tmp_path / "c2", labeled=False)[3].item["answer"] is None  # unlabeled split: fine


def test_truncated_tfds_file_is_named(data, tmp_path):
    import shutil

    copy = tmp_path / "tfds"
    shutil.copytree(data / "tfds", copy)
    (f,) = (copy / "mstar_synth" / "1.0.0").glob("mstar_synth-train.array_record-*")
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(DataError, match=f"{f}: not a readable ArrayRecord file, truncated or corrupt"):
        TfdsSource("mstar_synth:train", str(copy), tmp_path / "cache")
    with pytest.raises(DataError, match="tfds:nope:train .*cannot be opened"):
        TfdsSource("nope:train", str(copy), tmp_path / "cache")


def test_tfds_data_source_reads_the_build_without_our_code_or_tensorflow(data):
    """The build is a plain TFDS dataset: a fresh process reads it with `tfds.data_source` alone."""
    code = ("import sys, json, tensorflow_datasets as tfds\n"
            f"ds = tfds.data_source('mstar_synth', split='test_id', data_dir={str(data / 'tfds')!r})\n"
            "ex = ds[2]\n"
            "print(json.dumps([len(ds), json.loads(ex['record'])['id'], ex['image_bytes'][0][:4].hex(),"
            " 'tensorflow' in sys.modules, any(m.startswith('mstar_jax') for m in sys.modules)]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [4, "test_id-000002", "89504e47", False, False]


def test_builders_say_what_is_missing(tmp_path):
    from mstar_jax.data.tfds_builders import build

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="none of the mathv360k files found .*train_samples_all_tuning.json"):
        build("mathv360k", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="unknown TFDS builder 'mathverse'"):
        build("mathverse", tmp_path / "empty", tmp_path / "out")


@pytest.mark.parametrize("name,write,split,fmt", [
    ("mathv360k", "write_mathv360k", "train", "mathv360k"),
    ("mathvista", "write_mathvista_json", "testmini", "mathvista"),
    ("mathvista", "write_mathvista_parquet", "testmini", "mathvista"),
])
def test_benchmark_builders_keep_what_the_readers_read(tmp_path, name, write, split, fmt):
    from mstar_jax.data.readers import read_dataset
    from mstar_jax.data.tfds_builders import build
    from tests.data import benchmark_fixtures

    download = tmp_path / "download"
    download.mkdir()
    path = getattr(benchmark_fixtures, write)(download)
    records, _ = read_dataset(path, fmt, root=download)
    build(name, download, tmp_path / "tfds")
    source = TfdsSource(f"{name}:{split}", str(tmp_path / "tfds"), tmp_path / "cache")
    assert len(source) == len(records) > 0
    for k, rec in enumerate(records):
        got, images = source.entry(k)
        assert got == rec and images == [(download / rel).read_bytes() for rel in rec.images]


def test_eval_reads_shards_and_tfds_like_the_file(data):
    from mstar_jax.benchmark_eval import load_benchmark

    def read(spec, root=None):
        got = load_benchmark(spec, "mathvista", root=root)
        return [(r.id, r.answer, [(got["root"] / p).read_bytes() for p in r.images]) for r in got["records"]]

    ref = read(data / "synth" / "test_id.json")
    assert len(ref) == 4
    assert read(data / "shards" / "test_id.manifest.json") == ref
    assert read("tfds:mstar_synth:test_id", data / "tfds") == ref
