"""Rollouts for the loop: sample K responses per query, check them, store them as JSONL (reused on resume)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from mstar_jax.workdir import publish


@dataclasses.dataclass(frozen=True)
class Query:
    """One question of the loop: an id, absolute image paths, and the MathVista-style item dict."""

    id: str
    images: tuple[str, ...]
    item: dict


@dataclasses.dataclass
class Rollout:
    """The samples of one query with their correctness and scorer scores."""

    query_id: str
    prompt: str
    texts: list[str]
    correct: list[bool]
    logprobs: list[list[float]]
    scores: list[float] | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def load_images(paths: Sequence[str]):
    """Decode images as RGB (the processor does the rest)."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def sample_queries(sampler, params, queries: Sequence[Query], prompt_fn: Callable[[dict], str], *, n: int,
                   temperature: float, seed: int, max_new_tokens: int, batch_size: int, top_p: float = 1.0,
                   top_k: int = 0, desc: str = "rollouts", progress: bool = True,
                   kill_point_name: str = "sampling") -> list[list]:
    """n samples for every query, in chunks of `batch_size` prompts, with a progress bar."""
    from tqdm.auto import tqdm

    from mstar_jax.faults import kill_point

    out: list[list] = []
    params = sampler.sampling_params(params)  # once per phase (e.g. the fp32 master weights as bf16)
    chunk = max(1, batch_size // max(1, n)) if temperature > 0 else batch_size
    bar = tqdm(total=len(queries), desc=desc, unit="q", disable=not progress, leave=False)
    for start in range(0, len(queries), chunk):
        part = queries[start:start + chunk]
        images = [load_images(q.images) for q in part]
        prompts = [prompt_fn(q.item) for q in part]
        # Each chunk gets its own seed so results do not depend on how many chunks ran before a resume.
        out += sampler.generate(params, images, prompts, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                max_new_tokens=max_new_tokens, seed=(seed * 1_000_003 + start) % 2**31)
        bar.update(len(part))
        kill_point(kill_point_name)
    bar.close()
    return out


def check_samples(queries: Sequence[Query], samples: Sequence[Sequence]) -> list[list[bool]]:
    """Correctness of every sample against its query's ground truth."""
    from mstar_jax.answers import check_answer

    return [[bool(check_answer(s.text, q.item)) for s in ss] for q, ss in zip(queries, samples)]


def make_rollouts(queries, samples, prompt_fn, scorer=None) -> list[Rollout]:
    """Rollout records with correctness (and scores when a scorer is given)."""
    correct = check_samples(queries, samples)
    scores = scorer.score([q.item for q in queries], samples) if scorer is not None else None
    return [Rollout(q.id, prompt_fn(q.item), [s.text for s in ss], c, [list(map(float, s.logprobs)) for s in ss],
                    None if scores is None else list(map(float, scores[i])))
            for i, (q, ss, c) in enumerate(zip(queries, samples, correct))]


def write_rollouts(path: str | Path, rollouts: Sequence[Rollout]) -> None:
    """Write JSONL atomically: a file that exists is complete (then upload it when in a remote workdir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        for r in rollouts:
            f.write(json.dumps(r.to_json()) + "\n")
    os.replace(tmp, path)
    publish(path)


def read_rollouts(path: str | Path) -> list[Rollout]:
    """Rollouts written by `write_rollouts`."""
    return [Rollout(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]

