"""An iteration's queries as a grain pipeline: chunks of the iteration's slice, this process's share, images
decoded ahead in a worker thread; sampled chunk by chunk with progress kept so a killed run resumes mid-iteration.

Chunk k of an iteration holds its queries [k*chunk, (k+1)*chunk) and is sampled with a seed of its own start, so
which process samples it (chunk k goes to process k % process_count) and when (before or after a resume) changes
nothing in the samples. Each finished chunk is appended to `<rollouts>.p<process>.progress.jsonl` (flushed and
fsynced) with the grain iterator's state after it; a rerun restores that state and samples only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from mstar_jax.loop.rollouts import Query


class LoadChunk:
    """grain map: a chunk start -> its queries and their decoded images (runs in grain's prefetch thread)."""

    def __init__(self, queries: Sequence[Query], indices: Sequence[int], chunk: int):
        self.queries, self.indices, self.chunk = queries, [int(i) for i in indices], chunk

    def __call__(self, start: int) -> dict:
        from mstar_jax.io import load_images

        part = [self.queries[i] for i in self.indices[start:start + self.chunk]]
        return {"start": start, "queries": part, "images": [load_images(q.images, record=q.id) for q in part]}


def chunk_dataset(queries: Sequence[Query], indices: Sequence[int], chunk: int, process_index: int = 0,
                  process_count: int = 1):
    """grain MapDataset of this process's chunks of `queries[indices]` (each a LoadChunk dict)."""
    import grain

    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    starts = list(range(0, len(indices), chunk))
    return grain.MapDataset.source(starts)[process_index::process_count].map(LoadChunk(queries, indices, chunk))


def chunk_iterator(ds):
    """An iterator with grain's get_state/set_state; decodes at most two chunks ahead (memory stays flat)."""
    import grain

    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def process_info() -> tuple[int, int]:
    """(jax.process_index(), jax.process_count())."""
    import jax

    return jax.process_index(), jax.process_count()


class Progress:
    """The chunks this process has sampled so far, in an append-only JSONL (one line per chunk, then fsync)."""

    def __init__(self, path: Path, key: str, say: Callable[[str], None] = print):
        self.path, self.key, self.chunks, self.state = Path(path), key, {}, None
        if self.path.exists():
            self._read(say)

    def _read(self, say) -> None:
        lines = self.path.read_bytes().split(b"\n")
        try:
            if json.loads(lines[0]).get("key") != self.key:
                say(f"{self.path}: progress of other queries or settings; sampling the iteration again")
                self.path.unlink()
                return
        except ValueError:
            self.path.unlink()  # a header cut by a kill: nothing of it was sampled yet
            return
        for n, line in enumerate(lines[1:], 2):
            try:
                rec = json.loads(line)
            except ValueError:
                break  # the line a kill cut short, and nothing after it
            self.chunks[int(rec["start"])] = rec["samples"]
            self.state = rec["data_state"]
        if self.chunks:
            say(f"{self.path}: resuming after {len(self.chunks)} sampled chunk(s)")

    def add(self, start: int, samples: list, state: dict) -> None:
        """Append one chunk durably (a kill after this returns loses nothing of it)."""
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            if new:
                f.write(json.dumps({"key": self.key}).encode() + b"\n")
            f.write(json.dumps({"start": start, "samples": samples, "data_state": state}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.chunks[start] = samples
        self.state = state

    def remove(self) -> None:
        """Delete the file once the iteration's rollouts are written."""
        self.path.unlink(missing_ok=True)


def gather_chunks(local: dict[int, list]) -> dict[int, list]:
    """Every process's sampled chunks (keyed by start): process_allgather of their JSON; one process: as is."""
    import jax

    if jax.process_count() == 1:
        return dict(local)
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps({str(k): v for k, v in local.items()}).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    out: dict[int, list] = {}
    for p, size in enumerate(sizes):
        out.update({int(k): v for k, v in json.loads(every[p, :int(size)].tobytes()).items()})
    return out


def progress_key(queries: Sequence[Query], **settings) -> str:
    """What a progress file must match to be reused: the iteration's query ids and the sampling settings."""
    h = hashlib.sha1(json.dumps([q.id for q in queries]).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def sample_stream(sampler, params, queries: Sequence[Query], indices: Sequence[int], prompt_fn, *, n: int,
                  temperature: float, seed: int, max_new_tokens: int, batch_size: int, top_p: float = 1.0,
                  top_k: int = 0, desc: str = "rollouts", progress_path: Path, kill_point_name: str = "rollouts",
                  data_state: dict | None = None, say: Callable[[str], None] = print) -> list[list]:
    """n samples for each of `queries[indices]` in order, like `rollouts.sample_queries` (same chunks, same seeds,
    same samples), sampled by the processes chunk by chunk through the grain pipeline and gathered.

    data_state: the iterator state to start from (the iteration checkpoint's); a progress file's later one wins.
    """
    from tqdm.auto import tqdm

    from mstar_jax.faults import kill_point
    from mstar_jax.sampler import Sample
    from mstar_jax.workdir import journal_path

    index, count = process_info()
    chunk = max(1, batch_size // max(1, n)) if temperature > 0 else batch_size
    part = [queries[i] for i in indices]
    key = progress_key(part, n=n, temperature=temperature, seed=seed, chunk=chunk, count=count,
                       max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k)
    path = journal_path(progress_path)
    progress = Progress(path.with_name(f"{path.stem}.p{index}.progress.jsonl"), key, say)
    it = chunk_iterator(chunk_dataset(queries, indices, chunk, index, count))
    state = progress.state or data_state
    if state is not None:
        it.set_state(state)
    # Each process samples its chunks alone, on its own devices: the params (cast once per phase, e.g. the fp32
    # master weights as bf16) are gathered from the training mesh onto the process's devices.
    sampler = sampler.process_local()
    params = sampler.adopt(sampler.sampling_params(params))
    bar = tqdm(total=len(indices), initial=sum(len(s) for s in progress.chunks.values()), desc=desc, unit="q",
               leave=False)
    for element in it:
        start = element["start"]
        prompts = [prompt_fn(q.item) for q in element["queries"]]
        # Each chunk gets its own seed so results do not depend on how many chunks ran before a resume.
        out = sampler.generate(params, element["images"], prompts, n=n, temperature=temperature, top_p=top_p,
                               top_k=top_k, max_new_tokens=max_new_tokens, seed=(seed * 1_000_003 + start) % 2**31)
        progress.add(start, [[s.to_json() for s in ss] for ss in out], it.get_state())
        bar.update(len(prompts))
        kill_point(kill_point_name, f"{desc}:{start}")
    bar.close()
    chunks = gather_chunks(progress.chunks)
    samples = [[Sample(**s) for s in ss] for start in sorted(chunks) for ss in chunks[start]]
    if len(samples) != len(indices):
        raise RuntimeError(f"{desc}: gathered samples of {len(samples)} queries, expected {len(indices)}")
    return samples


def start_state() -> dict:
    """grain's state of a chunk iterator before its first chunk (what an iteration checkpoint records)."""
    import grain

    return chunk_iterator(grain.MapDataset.source([0])).get_state()
