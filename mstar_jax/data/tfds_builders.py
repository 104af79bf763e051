"""TFDS builders of the loop's datasets (synthetic, MathV360K, MathVista) from a local download, as ArrayRecord.

Everything here runs without TensorFlow: TFDS writes ArrayRecord with its own serializer, and an example holds
only text and byte strings (TFDS's `Image` feature would need TensorFlow to encode, and `tfds.data_source` would
decode every image on access). An example is the one record schema: `record` is `Record.to_json()` as JSON
(nulls kept), `image_bytes` the image files as published, in the record's `images` order; `id`, `question` and
`answer` are copies for browsing. Generation order is kept (no shuffling), so a split read back through
`tfds.data_source` lists the records in the order the source file does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from mstar_jax.data.records import Record
from mstar_jax.errors import DataError

VERSION = "1.0.0"


def record_features() -> tfds.features.FeaturesDict:
    """The features of one example (see the module docstring)."""
    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        "id": text(), "question": text(), "answer": text(), "record": text(),
        "image_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    })


def record_example(rec: Record, images: list[bytes]) -> dict:
    """A TFDS example of a record and its image files' bytes."""
    return {"id": rec.id, "question": rec.question, "answer": rec.answer or "",
            "record": json.dumps(rec.to_json(), sort_keys=True), "image_bytes": list(images)}


def example_to_entry(example: dict) -> tuple[Record, list[bytes]]:
    """(record, image bytes) of an example as `tfds.data_source` returns it."""
    raw = example["record"]
    rec = Record.from_json(json.loads(raw.decode() if isinstance(raw, bytes) else raw))
    return rec, [bytes(b) for b in example["image_bytes"]]


class _FromReaders(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Splits read from dataset files in the manual folder by `readers.read_dataset` (problems logged, left out)."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {"1.0.0": "First release: the mstar-jax record schema, images as file bytes."}
    FORMAT = "auto"
    SPLIT_FILES: dict[str, tuple[str, ...]] = {}  # split -> file name patterns in the manual folder, first found

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=record_features(),
                                     disable_shuffling=True)

    @classmethod
    def split_files(cls, root: Path) -> dict[str, Path]:
        """split -> the file it is read from (the first pattern found; empty splits left out); DataError if none."""
        found = {}
        for split, names in cls.SPLIT_FILES.items():
            path = next((p for n in names for p in sorted(Path(root).glob(n)) if p.is_file()), None)
            if path is not None and not _empty_json(path):  # e.g. a synthetic split of size 0
                found[split] = path
        if not found:
            wanted = "; ".join(f"{s}: {' or '.join(n)}" for s, n in cls.SPLIT_FILES.items())
            raise DataError(f"{root}: none of the {cls.name} files found ({wanted})")
        return found

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        return {split: self._generate_examples(path, root) for split, path in self.split_files(root).items()}

    def _generate_examples(self, path: Path, root: Path):
        from mstar_jax.data.readers import read_dataset

        records, report = read_dataset(path, self.FORMAT, root=root)
        print(report.summary(), flush=True)  # names the file and what was left out
        for rec in records:
            yield rec.id, record_example(rec, [(root / rel).read_bytes() for rel in rec.images])


def _empty_json(path: Path) -> bool:
    return path.suffix == ".json" and path.read_text(encoding="utf-8").strip() in ("", "[]", "{}")


class MstarSynth(_FromReaders):
    """The synthetic visual-math set of `mstar data synth` (manual folder: its output)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Run `mstar data synth DIR` and pass DIR as the manual folder."
    SPLIT_FILES = {s: (f"{s}.json",) for s in ("warmup", "train", "unlabeled", "val", "test_id", "test_ood")}


class Mathv360k(_FromReaders):
    """MathV360K (Zhiqiang007/MathV360K): the tuning JSON with `data_images/` beside it."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download train_samples_all_tuning.json and unzip data_images.zip beside it "
                                    "(docs/benchmarks_data.md); pass that folder as the manual folder.")
    FORMAT = "mathv360k"
    SPLIT_FILES = {"train": ("train_samples_all_tuning.json", "train.json")}


class Mathvista(_FromReaders):
    """MathVista (AI4Math/MathVista): testmini / test JSON (with query.json) or the HF parquet files."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put testmini.json (+ query.json, images/) or testmini-*.parquet from "
                                    "AI4Math/MathVista in the manual folder.")
    FORMAT = "mathvista"
    SPLIT_FILES = {"testmini": ("testmini.json", "testmini*.parquet", "data/testmini*.parquet"),
                   "test": ("test.json", "test*.parquet", "data/test-*.parquet")}


BUILDERS = {b.name: b for b in (MstarSynth, Mathv360k, Mathvista)}  # mstar_synth, mathv360k, mathvista


def build(name: str, manual_dir: str | Path, data_dir: str | Path) -> Path:
    """Run builder `name` on a local download; returns the dataset's folder (data_dir/name/version)."""
    if name not in BUILDERS:
        raise DataError(f"unknown TFDS builder {name!r}; known: {', '.join(BUILDERS)}")
    if not Path(manual_dir).is_dir():
        raise DataError(f"{manual_dir}: manual folder not found")
    BUILDERS[name].split_files(Path(manual_dir))  # says which files are missing before TFDS starts
    builder = BUILDERS[name](data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return Path(builder.data_dir)


def open_data_source(spec: str, data_dir: str | None):
    """`tfds.data_source` of "NAME[:VERSION]:SPLIT"; each ArrayRecord file is opened first so a bad one is named."""
    from array_record.python import array_record_module

    name, sep, split = spec.rpartition(":")
    if not sep or not name or not split:
        raise DataError(f"tfds:{spec}: expected tfds:NAME:SPLIT (or tfds:NAME:VERSION:SPLIT)")
    where = f"tfds:{spec} (data dir {data_dir or 'the TFDS default'})"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (tfds.core.registered.DatasetNotFoundError, AssertionError, ValueError, FileNotFoundError) as err:
        raise DataError(f"{where}: cannot be opened ({type(err).__name__}: {err})") from None
    base_split = re.split(r"[\[+]", split)[0]  # "train[:10%]" reads files of "train"
    for path in source.dataset_info.splits[base_split].filepaths:
        try:
            array_record_module.ArrayRecordReader(str(path)).close()
        except RuntimeError as err:
            raise DataError(f"{path}: not a readable ArrayRecord file, truncated or corrupt "
                            f"({err or 'no detail'}); build {name} again") from None
    return source
