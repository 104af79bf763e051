"""Monte Carlo step labels for the PRM (paper 3.3 and appendix D, after Wang et al.'s Math-Shepherd).

    questions (N, seeded draw) -> K samples each -> de-duplicated, at most M per question
      -> balanced pairs (correct : wrong 1:1, multiple-choice : free-form 1:1)
      -> steps (prm.step_rule) -> C completions from the end of every step -> label = share of correct ones

A step's label is the fraction of its completions whose final answer `check_answer` accepts; the completion
text is continued from the response's tokens up to the step's end token (`prefix_end`, a character offset), so
`check_answer(response[:prefix_end] + completion, item)` recomputes every flag from the file. The last step is
the whole response: its one "completion" is the empty string and its label the response's own correctness
(`complete_last_step` samples it like the others instead).

Cost: the completions are nearly all the work. Each response is prefilled once with its prompt and all its
step prefixes continue from that one cache (`Sampler.complete`), C samples per step, in batches of
`max_rows` decode rows.

`prm_labels.jsonl` is written in chunks of responses, each appended whole; `prm_labels.progress.json` records
how many bytes and chunks are complete, so a killed run truncates the torn tail and continues with the next
chunk. Completions are seeded per response (its index in the balanced list), so resumed and uninterrupted runs
write the same file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mstar_jax.errors import ConfigError, DataError
from mstar_jax.io import write_atomic
from mstar_jax.prm.encode import response_tokens
from mstar_jax.prm.steps import check_rule, end_tokens, split_steps

BALANCE_MODES = ("fill", "strict")
ITEM_FIELDS = ("answer", "answer_type", "question_type", "choices", "precision", "unit")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One (question, response) pair that may be labelled."""

    query_id: str
    index: int  # the sample's index among the question's K samples
    text: str
    correct: bool
    multi_choice: bool


def is_multi_choice(item: dict) -> bool:
    """Multiple-choice question (MathVista `question_type`, or choices present)."""
    qtype = item.get("question_type")
    return qtype == "multi_choice" if qtype else bool(item.get("choices"))


def candidate_pool(rollouts, items: dict[str, dict], per_question: int) -> tuple[list[Candidate], dict]:
    """De-duplicated, non-empty responses, at most `per_question` per question (first in sample order), and counts
    of what was dropped and of questions whose every sample was correct or wrong."""
    from mstar_jax.loop.selection import normalise_response

    pool, stats = [], {"questions": 0, "samples": 0, "empty": 0, "duplicates": 0, "over_cap": 0,
                       "questions_all_correct": 0, "questions_all_wrong": 0}
    for r in rollouts:
        stats["questions"] += 1
        stats["samples"] += len(r.texts)
        if r.correct and all(r.correct):
            stats["questions_all_correct"] += 1
        elif r.correct and not any(r.correct):
            stats["questions_all_wrong"] += 1
        seen, kept = set(), 0
        mc = is_multi_choice(items[r.query_id])
        for i, (text, ok) in enumerate(zip(r.texts, r.correct)):
            key = normalise_response(text)
            if not key:
                stats["empty"] += 1
            elif key in seen:
                stats["duplicates"] += 1
            elif kept >= per_question:
                stats["over_cap"] += 1
            else:
                seen.add(key)
                kept += 1
                pool.append(Candidate(r.query_id, i, text, bool(ok), mc))
    return pool, stats


def _split(total: int, avail_a: int, avail_b: int) -> tuple[int, int]:
    """Share `total` 1:1 between two sides; a side that runs short leaves its rest to the other."""
    a = min(avail_a, (total + 1) // 2)
    b = min(avail_b, total - a)
    a = min(avail_a, total - b)
    return a, b


def balance(pool: Sequence[Candidate], pairs: int, mode: str = "fill", seed: int = 0
            ) -> tuple[list[Candidate], dict]:
    """Up to `pairs` candidates, 1:1 correct:wrong within each question type and 1:1 multiple-choice:free-form.

    `fill`: a side that runs short is filled from the other (the shortfall is reported); `strict`: the ratios
    hold exactly and the total shrinks to what the smallest cell allows. Returns (chosen, report), the chosen in
    a seeded random order."""
    if mode not in BALANCE_MODES:
        raise ConfigError(f"prm.label.balance {mode!r} is not one of {', '.join(BALANCE_MODES)}")
    rng = np.random.default_rng([int(seed), 4099])
    cells = {}
    for mc in (True, False):
        for ok in (True, False):
            members = [c for c in pool if c.multi_choice == mc and c.correct == ok]
            cells[mc, ok] = [members[i] for i in rng.permutation(len(members))]
    avail = {k: len(v) for k, v in cells.items()}
    if mode == "strict":
        per = min([pairs // 4] + list(avail.values()))
        take = {k: per for k in cells}
    else:
        n_mc, n_ff = _split(pairs, avail[True, True] + avail[True, False], avail[False, True] + avail[False, False])
        take = {}
        for mc, n in ((True, n_mc), (False, n_ff)):
            take[mc, True], take[mc, False] = _split(n, avail[mc, True], avail[mc, False])
    chosen = [c for k in cells for c in cells[k][:take[k]]]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    want_half, want_cell = pairs / 2, pairs / 4
    got = {"multi_choice": take[True, True] + take[True, False], "free_form": take[False, True] + take[False, False],
           "correct": take[True, True] + take[False, True], "wrong": take[True, False] + take[False, False]}
    report = {"pairs_wanted": int(pairs), "pairs": len(chosen), **got, "available": {
        f"{'multi_choice' if mc else 'free_form'}/{'correct' if ok else 'wrong'}": n for (mc, ok), n in avail.items()},
        "short": {k: int(round(want_half - v)) for k, v in got.items() if v < want_half},
        "cells": {f"{'multi_choice' if mc else 'free_form'}/{'correct' if ok else 'wrong'}": n
                  for (mc, ok), n in take.items()}, "wanted_per_cell": want_cell, "mode": mode}
    return chosen, report


def balance_line(report: dict) -> str:
    """One line for the stage: the kept pairs and every side that ran short."""
    line = (f"{report['pairs']} of {report['pairs_wanted']} pairs ({report['correct']} correct / {report['wrong']} "
            f"wrong, {report['multi_choice']} multiple-choice / {report['free_form']} free-form)")
    if report["short"]:
        line += "; short: " + ", ".join(f"{k} by {v}" for k, v in sorted(report["short"].items()))
        line += (" (filled from the other side)" if report["mode"] == "fill" else " (total reduced to keep the ratios)")
    return line


# ------------------------------------------------------------------------------------------------ labelling


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    """The labelling knobs of config section `prm.label` (paper values in configs/paper.py)."""

    completions: int = 8
    temperature: float = 1.0
    step_rule: str = "lines"
    complete_last_step: bool = False
    max_new_tokens: int = 256
    top_p: float = 1.0
    top_k: int = 0
    chunk: int = 32  # responses per appended chunk
    max_rows: int = 256  # decode rows per sampler call
    seed: int = 0


def _prefix_cuts(tokenizer, response: str, spans, complete_last: bool) -> tuple[list[int], list[int], list[int]]:
    """(token ids, cut per completed step = tokens up to its end token, char offset where each cut ends)."""
    ids, offsets = response_tokens(tokenizer, response)
    ends = end_tokens(offsets, spans)
    n = len(ends) if complete_last else len(ends) - 1
    cuts = [e + 1 for e in ends[:n]]
    return ids, cuts, [offsets[e][1] for e in ends[:n]]


def label_chunk(sampler, params, chosen: Sequence[Candidate], start: int, queries: dict, prompt_fn: Callable,
                s: LabelSettings, check: Callable[[str, dict], bool], base: Path | None = None) -> list[dict]:
    """Label responses chosen[start:start+chunk]: their step records with completions and labels.

    Image paths are written relative to `base` (the labels file's folder), so a workdir or a dataset and its
    labels can move together."""
    from mstar_jax.io import load_images

    part = chosen[start:start + s.chunk]
    tok = sampler.tokenizer
    records, jobs = [], []
    for k, c in enumerate(part):
        q = queries[c.query_id]
        spans = split_steps(c.text, s.step_rule)
        ids, cuts, prefix_ends = _prefix_cuts(tok, c.text, spans, s.complete_last_step)
        item = {f: q.item.get(f) for f in ITEM_FIELDS}
        images = [os.path.relpath(p, base) if base is not None else p for p in q.images]
        records.append({"query_id": c.query_id, "response_index": c.index, "prompt": prompt_fn(q.item),
                        "images": images, "item": item, "response": c.text, "correct": c.correct,
                        "multi_choice": c.multi_choice, "step_rule": s.step_rule,
                        "steps": [{"text": c.text[a:b], "span": [a, b]} for a, b in spans]})
        if cuts:
            jobs.append((k, ids, cuts, prefix_ends))
    if jobs:
        images = [load_images(queries[part[k].query_id].images) for k, *_ in jobs]
        prompts = [records[k]["prompt"] for k, *_ in jobs]
        out = sampler.complete(params, images, prompts, [j[1] for j in jobs], [j[2] for j in jobs],
                               n=s.completions, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                               max_new_tokens=s.max_new_tokens, seed=s.seed,
                               indices=[start + k for k, *_ in jobs], max_rows=s.max_rows)
        for (k, _, cuts, prefix_ends), per_cut in zip(jobs, out):
            rec = records[k]
            for step, pe, samples in zip(rec["steps"], prefix_ends, per_cut):
                step["prefix_end"] = int(pe)
                step["completions"] = [x.text for x in samples]
    for rec in records:
        item = rec["item"]
        for step in rec["steps"]:
            if "completions" not in step:  # the last step: the response is its own completion
                step["prefix_end"], step["completions"] = len(rec["response"]), [""]
            prefix = rec["response"][:step["prefix_end"]]
            step["correct"] = [bool(check(prefix + comp, item)) for comp in step["completions"]]
            step["label"] = float(np.mean(step["correct"]))
    return records


class AppendLog:
    """A JSONL file grown by whole chunks, with a progress record that makes a torn tail harmless."""

    def __init__(self, path: Path, plan: str):
        self.path, self.plan = Path(path), plan
        self.progress_path = self.path.with_name(self.path.stem + ".progress.json")
        self.chunks, size = 0, 0
        if self.progress_path.exists():
            prog = json.loads(self.progress_path.read_text())
            if prog.get("plan") == plan and self.path.exists():
                self.chunks, size = int(prog["chunks"]), int(prog["bytes"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:  # drop whatever a kill left after the last complete chunk
            f.truncate(size)
        self.bytes = size

    def append(self, lines: Sequence[str]) -> None:
        """Append one chunk durably, then record it as complete."""
        data = "".join(line + "\n" for line in lines).encode()
        with self.path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.bytes += len(data)
        self.chunks += 1
        from mstar_jax.faults import kill_point

        # Appended, not yet recorded: the resume must drop it.
        kill_point("prm_label_chunk", f"{self.path.name}:{self.chunks}")
        write_atomic(self.progress_path, json.dumps({"plan": self.plan, "chunks": self.chunks, "bytes": self.bytes}),
                     publish=False)
        from mstar_jax.workdir import publish

        publish(self.path)
        publish(self.progress_path)


def plan_hash(chosen: Sequence[Candidate], s: LabelSettings) -> str:
    """Identity of a labelling run: the chosen responses and the settings."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(s), sort_keys=True).encode())
    for c in chosen:
        h.update(f"{c.query_id}\0{c.index}\0{c.text}\0".encode())
    return h.hexdigest()[:16]


def write_labels(sampler, params, chosen: Sequence[Candidate], queries: dict, prompt_fn: Callable,
                 s: LabelSettings, path: Path, progress=None) -> list[dict]:
    """Label every chosen response into `path` (resuming a previous run of the same plan); returns the records."""
    from mstar_jax.answers import check_answer

    check_rule(s.step_rule)
    log = AppendLog(path, plan_hash(chosen, s))
    n_chunks = -(-len(chosen) // s.chunk)
    if progress is not None:
        progress(log.chunks * s.chunk)
    for c in range(log.chunks, n_chunks):
        records = label_chunk(sampler, params, chosen, c * s.chunk, queries, prompt_fn, s, check_answer,
                              base=Path(path).resolve().parent)
        log.append([json.dumps(r) for r in records])
        if progress is not None:
            progress(min(len(chosen), (c + 1) * s.chunk))
    return read_labels(path)


def read_labels(path: str | Path) -> list[dict]:
    """The records of a `prm_labels.jsonl` (DataError naming the line when one is malformed), image paths
    resolved against the file's folder."""
    out = []
    path = Path(path)
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            steps = rec["steps"]
            for st in steps:
                float(st["label"]), list(st["span"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}:{n}: not a PRM label record ({type(err).__name__}: {err})") from None
        if not steps:
            raise DataError(f"{path}:{n}: record of query {rec.get('query_id')!r} has no steps (empty response)")
        rec["images"] = [str((path.resolve().parent / p)) for p in rec.get("images", [])]
        out.append(rec)
    return out


def label_stats(records: Sequence[dict]) -> dict:
    """Counts and label means of a label file (for the stage line and metrics)."""
    steps = [st for r in records for st in r["steps"]]
    labels = np.array([st["label"] for st in steps], np.float64) if steps else np.zeros(0)
    return {"responses": len(records), "steps": len(steps),
            "steps_per_response": len(steps) / max(1, len(records)),
            "completions": sum(len(st["completions"]) for st in steps),
            "label_mean": float(labels.mean()) if labels.size else float("nan"),
            "label_mean_correct": float(np.mean([st["label"] for r in records if r["correct"] for st in r["steps"]]
                                                or [np.nan])),
            "label_mean_wrong": float(np.mean([st["label"] for r in records if not r["correct"] for st in r["steps"]]
                                              or [np.nan]))}
