"""grain input pipelines: records -> shard -> seeded shuffle -> decode + HF processor -> pad to a bucket -> batch.

The chain is built from grain's own `MapDataset` ops, so the iterator state (`get_state()` / `set_state()`)
is grain's: a dict that can be stored with a checkpoint and restored to continue with exactly the remaining
batches. Sharding is by process (`jax.process_index()` / `jax.process_count()`, overridable): process p
reads records p, p + n, p + 2n, ... of the record list, then shuffles its shard with the seed (reshuffled
each epoch), so processes see disjoint shards that together cover the data.

Length bucketing: each batch is padded to the smallest of a few fixed lengths (`buckets`) that fits its
longest element, so a jitted step compiles once per bucket instead of once per length.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mstar_jax.data.records import Record
from mstar_jax.errors import DataError
from mstar_jax.io import load_images
from mstar_jax.sft_batch import prompt_text

log = logging.getLogger(__name__)

PromptBuilder = Callable[[dict], str]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Batching, shuffling, sharding and padding settings of a pipeline."""

    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None: repeat forever
    buckets: tuple[int, ...] = (64, 128, 256, 512)
    padding_side: str = "right"  # "left" for generation prompts
    drop_remainder: bool = False
    drop_uneven: bool = True  # cut the record list to a multiple of process_count so all hosts agree
    process_index: int | None = None  # None: jax.process_index()
    process_count: int | None = None  # None: jax.process_count()
    worker_count: int = 0  # > 0: grain multiprocessing prefetch with this many workers


class ProcessorTransform:
    """grain map: a record dict -> decoded image + processor output (input_ids, attention_mask, pixel_values)."""

    def __init__(self, processor, prompt_builder: PromptBuilder, root: str | Path, max_length: int | None = None):
        self.processor = processor
        self.prompt_builder = prompt_builder
        self.root = str(root)
        self.max_length = max_length

    def __call__(self, element: dict) -> dict[str, Any]:
        """Process one element ({"index": i, "record": Record.to_json()})."""
        rec = element["record"]
        if element.get("image_bytes") is not None:  # from `mstar data prepare` shards: images embedded
            images = load_images(element["image_bytes"], record=rec["id"])
        else:
            images = load_images([Path(self.root) / rel for rel in rec["images"]], self.root, rec["id"])
        item = Record.from_json(rec).to_item()
        text = prompt_text(self.processor, self.prompt_builder(item), len(images))
        out = self.processor(images=images, text=[text], return_tensors="np")
        ids = np.asarray(out["input_ids"][0], dtype=np.int32)
        if self.max_length is not None and len(ids) > self.max_length:
            raise DataError(f"record {rec['id']}: prompt is {len(ids)} tokens, longer than the largest bucket "
                            f"{self.max_length}")
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        return {"input_ids": ids, "attention_mask": np.asarray(out["attention_mask"][0], dtype=np.int32),
                "pixel_values": pixels[0] if len(images) == 1 else pixels, "index": element["index"],
                "id": rec["id"]}


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length; DataError if none fits."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise DataError(f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}")


class PadBatch:
    """grain batch_fn: pad token rows to a shared bucket length and stack everything else."""

    def __init__(self, buckets: Sequence[int], pad_id: int, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.buckets = tuple(buckets)
        self.pad_id = int(pad_id)
        self.padding_side = padding_side

    def __call__(self, elements: Sequence[dict]) -> dict[str, np.ndarray]:
        """Stack a list of processed elements into one padded batch."""
        length = bucket_length(max(len(e["input_ids"]) for e in elements), self.buckets)
        n = len(elements)
        ids = np.full((n, length), self.pad_id, dtype=np.int32)
        mask = np.zeros((n, length), dtype=np.int32)
        for i, e in enumerate(elements):
            k = len(e["input_ids"])
            sl = slice(0, k) if self.padding_side == "right" else slice(length - k, length)
            ids[i, sl] = e["input_ids"]
            mask[i, sl] = e["attention_mask"]
        return {"input_ids": ids, "attention_mask": mask,
                "pixel_values": np.stack([e["pixel_values"] for e in elements]),
                "index": np.asarray([e["index"] for e in elements], dtype=np.int64),
                "lengths": np.asarray([len(e["input_ids"]) for e in elements], dtype=np.int32),
                "id": np.asarray([e["id"] for e in elements])}


def _process_info(cfg: PipelineConfig) -> tuple[int, int]:
    if cfg.process_index is not None and cfg.process_count is not None:
        index, count = cfg.process_index, cfg.process_count
    else:
        import jax

        index, count = jax.process_index(), jax.process_count()
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is outside [0, {count})")
    return index, count


def shard_dataset(paths: Sequence[str | Path]):
    """grain MapDataset of {"index", "record", "image_bytes"} over ArrayRecord shards of `mstar data prepare`."""
    import grain

    from mstar_jax.data.records import decode_entry

    source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])

    def element(i: int, raw: bytes) -> dict:
        rec, images = decode_entry(raw)
        return {"index": i, "record": rec.to_json(), "image_bytes": images}

    return grain.MapDataset.source(source).map_with_index(element)


def record_dataset(records, cfg: PipelineConfig):
    """grain MapDataset of elements (this process's shard, shuffled per epoch, repeated).

    records: a sequence of Record, or a MapDataset of elements such as `shard_dataset(...)`.
    """
    import grain

    index, count = _process_info(cfg)
    n = len(records)
    if cfg.drop_uneven and count > 1 and n % count:
        # Every host must run the same number of steps; the cut is logged, never silent.
        log.warning("pipeline: dropping the last %d of %d records so that %d processes get equal shards",
                    n % count, n, count)
        n -= n % count
    if isinstance(records, grain.MapDataset):
        ds = records[:n][index::count]
    else:
        elements = [{"index": i, "record": r.to_json()} for i, r in enumerate(records[:n])]
        ds = grain.MapDataset.source(elements)[index::count]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)  # reseeds the shuffle each epoch
    return ds


def build_pipeline(records, processor, prompt_builder: PromptBuilder, root: str | Path,
                   cfg: PipelineConfig = PipelineConfig()):
    """An iterable grain dataset of padded batches; `iter()` gives an iterator with get_state/set_state.

    records: Records (images read from `root`) or `shard_dataset(paths)` (images embedded in the shards).
    """
    import grain

    pad_id = getattr(processor.tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    transform = ProcessorTransform(processor, prompt_builder, root, max(cfg.buckets))
    ds = record_dataset(records, cfg).map(transform)
    ds = ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder,
                  batch_fn=PadBatch(cfg.buckets, pad_id, cfg.padding_side))
    it_ds = ds.to_iter_dataset()
    if cfg.worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return it_ds


def num_batches(num_records: int, cfg: PipelineConfig) -> int:
    """Batches per epoch for this process."""
    _, count = _process_info(cfg)
    n = num_records - (num_records % count if cfg.drop_uneven and count > 1 else 0)
    per_process = len(range(_process_info(cfg)[0], n, count))
    return per_process // cfg.batch_size if cfg.drop_remainder else -(-per_process // cfg.batch_size)
