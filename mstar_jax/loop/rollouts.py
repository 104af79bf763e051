"""Rollouts for the loop: sample K responses per query, check them, store them as JSONL (reused on resume)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

from mstar_jax.errors import DataError
from mstar_jax.io import load_images, write_lines_atomic


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
    temperature: float | None = None  # what the texts were sampled at (None in files written before it was kept)
    kind: str = "labeled"  # or "unlabeled" (paper 3.4): `correct` then means "agrees with the pseudo label"
    pseudo_answer: str | None = None  # unlabeled: the PRM-weighted vote's answer
    true_correct: list[bool] | None = None  # unlabeled: correctness against the hidden answer (monitoring only)

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


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
        images = [load_images(q.images, record=q.id) for q in part]
        prompts = [prompt_fn(q.item) for q in part]
        # Each chunk gets its own seed so results do not depend on how many chunks ran before a resume.
        out += sampler.generate(params, images, prompts, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                max_new_tokens=max_new_tokens, seed=(seed * 1_000_003 + start) % 2**31)
        bar.update(len(part))
        kill_point(kill_point_name, f"{desc}:{start}")
    bar.close()
    return out


def check_samples(queries: Sequence[Query], samples: Sequence[Sequence]) -> list[list[bool]]:
    """Correctness of every sample against its query's ground truth."""
    from mstar_jax.answers import check_answer

    return [[bool(check_answer(s.text, q.item)) for s in ss] for q, ss in zip(queries, samples)]


def scoring_items(queries: Sequence[Query]) -> list[dict]:
    """The queries' items as scorers read them: question fields plus absolute image paths."""
    return [{**q.item, "images": list(q.images)} for q in queries]


def make_rollouts(queries, samples, prompt_fn, scorer=None, temperature: float | None = None) -> list[Rollout]:
    """Rollout records with correctness (and scores when a scorer is given, and the sampling temperature)."""
    correct = check_samples(queries, samples)
    scores = scorer.score(scoring_items(queries), samples) if scorer is not None else None
    return [Rollout(q.id, prompt_fn(q.item), [s.text for s in ss], c, [list(map(float, s.logprobs)) for s in ss],
                    None if scores is None else list(map(float, scores[i])), temperature)
            for i, (q, ss, c) in enumerate(zip(queries, samples, correct))]


def write_rollouts(path: str | Path, rollouts: Sequence[Rollout]) -> None:
    """Write JSONL atomically: a file that exists is complete (then upload it when in a remote workdir)."""
    write_lines_atomic(path, [json.dumps(r.to_json()) for r in rollouts])


def reusable_rollouts(path: str | Path, queries: Sequence[Query], temperature: float | None = None):
    """The rollouts in `path` if it holds exactly `queries`' (sampled at `temperature`), else None: absent, or
    corrupt or stale (said on stdout), so that the caller samples them again (seeded, so the same file results)."""
    if not Path(path).exists():
        return None
    try:
        reused = read_rollouts(path)
        if [r.query_id for r in reused] != [q.id for q in queries]:
            raise DataError(f"{path}: holds the rollouts of other queries")
        if reused and reused[0].temperature not in (None, temperature):
            raise DataError(f"{path}: sampled at T={reused[0].temperature:g}, not at T={temperature:g}")
        return reused
    except DataError as err:
        print(f"{err}; sampling them again", flush=True)
        return None


def read_rollouts(path: str | Path) -> list[Rollout]:
    """Rollouts written by `write_rollouts`; DataError naming the file and line when one is not a rollout record."""
    fields = {f.name for f in dataclasses.fields(Rollout)}
    out = []
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            missing = {"query_id", "prompt", "texts", "correct", "logprobs"} - set(rec)
            if missing or set(rec) - fields or not len(rec["texts"]) == len(rec["correct"]) == len(rec["logprobs"]):
                raise ValueError(f"not a rollout record (keys {sorted(rec)})")
            out.append(Rollout(**rec))
        except (ValueError, TypeError, AttributeError) as err:  # JSONDecodeError and UnicodeDecodeError too
            raise DataError(f"{path}: line {n}: corrupt rollout record ({type(err).__name__}: {err})") from None
    return out

