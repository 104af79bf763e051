"""The loop's query sets as grain random-access sources of `Query`, under the one record schema.

A split is one of:
  a dataset file      any format `readers.read_dataset` knows (MathV360K / MathVista JSON, JSONL, parquet, TSV)
  ArrayRecord shards  `mstar data prepare` output: its `<stem>.manifest.json` or the folder holding one
  a TFDS dataset      `tfds:NAME:SPLIT` (or `tfds:NAME/CONFIG:VERSION:SPLIT`), written by `mstar data tfds`

Shards and TFDS entries embed their images; an entry is read when its query is used, and its image bytes are
written once under a cache folder (content-addressed), so a `Query` is always plain image paths and no image is
held in memory.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from mstar_jax.data.records import Record, validate_record
from mstar_jax.errors import DataError
from mstar_jax.loop.rollouts import Query

TFDS_PREFIX = "tfds:"
MANIFEST_SUFFIX = ".manifest.json"


class ListSource(Sequence):
    """Queries held in a list (a dataset file, read and validated up front)."""

    def __init__(self, queries: Sequence[Query], name: str):
        self.queries, self.name = list(queries), name

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i):
        return self.queries[i]

    def __repr__(self) -> str:
        return f"ListSource({self.name}, {len(self)} queries)"


class EmbeddedSource(Sequence):
    """Base of the sources whose entries carry their images: read on access, images cached to files."""

    name = ""

    def __init__(self, cache_dir: Path, labeled: bool):
        self.cache_dir, self.labeled = Path(cache_dir), labeled

    @abc.abstractmethod
    def entry(self, i: int) -> tuple[Record, list[bytes]]:
        """Record i and its image files' bytes."""

    def where(self, i: int) -> str:
        """File (or dataset) and index of entry i, for error messages."""
        return f"{self.name}: record {i}"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} records")
        rec, images = self.checked(i % len(self))
        return Query(rec.id, tuple(self._cached(rel, data) for rel, data in zip(rec.images, images)), rec.to_item())

    def checked(self, i: int) -> tuple[Record, list[bytes]]:
        """Entry i, validated (DataError naming the file and record index otherwise)."""
        rec, images = self.entry(i)
        if not self.labeled and rec.answer is not None:
            rec = rec.unlabeled()
        problems = validate_record(rec, None, labeled=self.labeled, image_check="none")
        if len(images) != len(rec.images):
            problems.append(("malformed", f"{len(rec.images)} image paths but {len(images)} embedded images"))
        if problems:
            raise DataError(f"{self.where(i)} (id {rec.id!r}): " + "; ".join(f"{k}: {m}" for k, m in problems))
        return rec, images

    def record(self, i: int) -> Record:
        """Entry i as a record whose image paths are relative to the cache folder (images written there)."""
        import dataclasses

        rec, images = self.checked(i)
        names = [Path(self._cached(rel, data)).name for rel, data in zip(rec.images, images)]
        return dataclasses.replace(rec, images=tuple(names))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def _cached(self, rel: str, data: bytes) -> str:
        """The image's path in the cache, written on first use (atomically: concurrent readers never see half)."""
        from mstar_jax.io import write_atomic

        path = self.cache_dir / f"{hashlib.sha1(data).hexdigest()[:24]}{Path(rel).suffix or '.img'}"
        if not path.exists():
            write_atomic(path, data, publish=False)
        return str(path.resolve())


class ShardSource(EmbeddedSource):
    """ArrayRecord shards of `mstar data prepare`, read through grain's ArrayRecordDataSource."""

    def __init__(self, paths: Sequence[Path], cache_dir: Path, labeled: bool = True):
        import grain
        from array_record.python import array_record_module

        super().__init__(cache_dir, labeled)
        self.paths = [Path(p) for p in paths]
        self.name = str(self.paths[0].parent)
        self.offsets = [0]
        for p in self.paths:  # opened one by one first, so a truncated shard is named
            if not p.is_file():
                raise DataError(f"{p}: ArrayRecord shard not found")
            try:
                reader = array_record_module.ArrayRecordReader(str(p))
                self.offsets.append(self.offsets[-1] + reader.num_records())
                reader.close()
            except RuntimeError as err:
                raise DataError(f"{p}: not a readable ArrayRecord shard, truncated or corrupt ({err or 'no detail'}); "
                                "write it again with `mstar data prepare`") from None
        sizes = [b - a for a, b in zip(self.offsets, self.offsets[1:])]
        if any(sizes[s] != len(range(s, len(self), len(sizes))) for s in range(len(sizes))):
            raise DataError(f"{self.name}: shard sizes {sizes} are not a round-robin split of {len(self)} records; "
                            "were shards of several `mstar data prepare` runs mixed?")
        self.source = grain.sources.ArrayRecordDataSource([str(p) for p in self.paths])

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, index in it) of query i: `mstar data prepare` deals records to shards round-robin, so query i
        is the file's record i whatever the shard count."""
        n = len(self.paths)
        return i % n, i // n

    def where(self, i: int) -> str:
        s, k = self.locate(i)
        return f"{self.paths[s]}: record {k}"

    def entry(self, i: int):
        from mstar_jax.data.records import decode_entry

        s, k = self.locate(i)
        try:
            return decode_entry(self.source[self.offsets[s] + k])
        except RuntimeError as err:  # array_record's error for a corrupt chunk
            raise DataError(f"{self.where(i)}: cannot be read ({err})") from None
        except (DataError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise DataError(f"{self.where(i)}: malformed entry ({type(err).__name__}: {err})") from None

    def __repr__(self) -> str:
        return f"ShardSource({len(self.paths)} shard(s) in {self.name}, {len(self)} records)"


class TfdsSource(EmbeddedSource):
    """A TFDS dataset written by our builders (`mstar_jax.data.tfds_builders`), read with `tfds.data_source`."""

    def __init__(self, spec: str, data_dir: str | None, cache_dir: Path, labeled: bool = True):
        from mstar_jax.data.tfds_builders import open_data_source

        super().__init__(cache_dir, labeled)
        self.name = spec
        self.source = open_data_source(spec, data_dir)

    def __len__(self) -> int:
        return len(self.source)

    def entry(self, i: int):
        from mstar_jax.data.tfds_builders import example_to_entry

        try:
            return example_to_entry(self.source[i])
        except RuntimeError as err:
            raise DataError(f"{self.where(i)}: cannot be read ({err})") from None
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{self.where(i)}: malformed entry ({type(err).__name__}: {err})") from None

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}, {len(self)} records)"


def shard_paths(spec: Path) -> list[Path]:
    """The shards a manifest (or the one manifest in a folder) lists, in order."""
    import json

    if spec.is_dir():
        found = sorted(spec.glob("*" + MANIFEST_SUFFIX))
        if len(found) != 1:
            raise DataError(f"{spec}: expected one *{MANIFEST_SUFFIX} of `mstar data prepare`, found {len(found)}; "
                            "name the manifest")
        spec = found[0]
    try:
        names = json.loads(spec.read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{spec}: not a manifest of `mstar data prepare` ({type(err).__name__}: {err})") from None
    return [spec.parent / n for n in names]


def is_shard_spec(spec: str) -> bool:
    """Whether a split setting names ArrayRecord shards (a manifest, or a folder with one)."""
    return spec.endswith(MANIFEST_SUFFIX) or Path(spec).is_dir()


def open_queries(spec: str, *, root: Path | None, cache_dir: Path, labeled: bool,
                 read_file: Callable[[Path, Path, bool], list[Query]]) -> Sequence[Query]:
    """The query source a split setting names; `read_file(path, root, labeled)` reads a plain dataset file."""
    if spec.startswith(TFDS_PREFIX):
        return TfdsSource(spec[len(TFDS_PREFIX):], str(root) if root else None, cache_dir / "tfds", labeled)
    path = Path(spec)
    if is_shard_spec(spec):
        paths = shard_paths(path)
        key = hashlib.sha1(str(paths[0].resolve()).encode()).hexdigest()[:12]
        return ShardSource(paths, cache_dir / f"shards-{key}", labeled)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    return ListSource(read_file(path, root if root is not None else path.parent, labeled), str(path))


def is_embedded_file_spec(spec: str) -> bool:
    """Whether a `--data` value names shards (a manifest) or a TFDS split rather than a dataset file."""
    return spec.startswith(TFDS_PREFIX) or spec.endswith(MANIFEST_SUFFIX)


def embedded_records(spec: str, data_dir: Path | None, cache_dir: Path) -> tuple[list[Record], Path]:
    """Every record of a shard set (manifest) or TFDS split, and their root: the cache folder the images went to."""
    source = open_queries(spec, root=data_dir, cache_dir=cache_dir, labeled=True, read_file=None)
    return [source.record(i) for i in range(len(source))], source.cache_dir
