"""The one record schema every reader produces, its validation, and the load report readers return.

Conventions:
  * `images` are paths relative to a dataset root (never absolute, never escaping it with `..`).
  * For multiple-choice records `answer` is the text of the correct choice (MathVista's convention); readers
    of letter-answer datasets (MMBench, MMStar, M3CoT, AI2D) convert the letter / index to that text.
  * `answer is None` means unlabeled (the M-STaR unlabeled prompts, benchmark test splits).
  * `query` is the exact question text a benchmark asks with (hint, question, and its choices when the benchmark
    lists them in its prompt); `metadata["circular_group"]` ties MMBench's rotated copies of one question.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

from mstar_jax.errors import DataError

log = logging.getLogger(__name__)

ANSWER_TYPES = ("integer", "float", "text", "list")
QUESTION_TYPES = ("multi_choice", "free_form")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Problem kinds a reader reports (a record with any of these is left out, and counted).
PROBLEM_KINDS = (
    "malformed",  # not an object / required field missing or of the wrong type
    "missing_answer",  # a labeled split without a gold answer
    "bad_answer",  # a gold answer that cannot be parsed for its type (e.g. "abc" for an integer)
    "unknown_answer_type",
    "unknown_question_type",
    "image_missing",
    "image_corrupt",
    "image_outside_root",  # absolute path or `..` leaving the dataset root
    "duplicate_id",
)


@dataclasses.dataclass(frozen=True)
class Record:
    """One question: image paths (relative to a dataset root), text, choices, gold answer and metadata."""

    id: str
    images: tuple[str, ...]
    question: str
    choices: tuple[str, ...] | None
    answer: str | None
    answer_type: str
    precision: int | None
    unit: str | None
    question_type: str
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rationale: str | None = None
    query: str | None = None

    def __post_init__(self):
        # Accept lists for convenience but store tuples, so a frozen record is really immutable and hashable
        # parts stay hashable.
        object.__setattr__(self, "images", tuple(self.images))
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(str(c) for c in self.choices))
        object.__setattr__(self, "metadata", dict(self.metadata or {}))

    @property
    def labeled(self) -> bool:
        """True if the record has a gold answer."""
        return self.answer is not None

    def to_item(self) -> dict:
        """MathVista-style dict for `mstar_jax.answers.check_answer` and the prompt builders."""
        return {
            "pid": self.id,
            "id": self.id,
            "question": self.question,
            "query": self.query or self.question,
            "choices": list(self.choices) if self.choices is not None else None,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "precision": self.precision,
            "unit": self.unit,
            "question_type": self.question_type,
            "metadata": dict(self.metadata),
            "rationale": self.rationale,
            "images": list(self.images),
        }

    def to_json(self) -> dict:
        """A JSON-ready dict (inverse of `Record.from_json`)."""
        d = dataclasses.asdict(self)
        d["images"] = list(self.images)
        d["choices"] = list(self.choices) if self.choices is not None else None
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Record":
        """A record from `to_json` output."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def unlabeled(self) -> "Record":
        """The same record without its answer or rationale (the M-STaR unlabeled prompt set)."""
        return dataclasses.replace(self, answer=None, rationale=None)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One malformed record: where it is, what is wrong."""

    kind: str
    file: str
    record_id: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.record_id}: {self.kind}: {self.message}"


@dataclasses.dataclass
class LoadReport:
    """What a reader loaded and what it left out, with counts per problem kind."""

    file: str
    loaded: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    # What the reader assumed about an ambiguous file (root used, split found, ...), each said once.
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Number of left-out records per problem kind."""
        return dict(collections.Counter(p.kind for p in self.problems))

    @property
    def skipped(self) -> int:
        """Number of records left out."""
        return len(self.problems)

    def add(self, kind: str, record_id: Any, message: str, file: str | None = None) -> Problem:
        """Record a problem (the kind must be one of PROBLEM_KINDS)."""
        assert kind in PROBLEM_KINDS, kind
        p = Problem(kind, file or self.file, str(record_id), message)
        self.problems.append(p)
        return p

    def note(self, text: str) -> None:
        """Record an assumption the reader made (kept once, in order)."""
        if text not in self.notes:
            self.notes.append(text)

    def merge(self, other: "LoadReport") -> None:
        """Fold another report (e.g. of another shard) into this one."""
        self.loaded += other.loaded
        self.problems.extend(other.problems)
        for text in other.notes:
            self.note(text)

    def summary(self) -> str:
        """One line: loaded count, per-kind counts of what was left out, and what the reader assumed."""
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        line = f"{self.file}: loaded {self.loaded} records, left out {self.skipped} ({kinds})"
        return line + "".join(f"; {n}" for n in self.notes)

    def log(self, logger: logging.Logger = log, max_lines: int = 20) -> None:
        """Log the summary and the first `max_lines` problems."""
        (logger.warning if self.problems else logger.info)(self.summary())
        for p in self.problems[:max_lines]:
            logger.warning("  %s", p)
        if len(self.problems) > max_lines:
            logger.warning("  ... and %d more", len(self.problems) - max_lines)

    def raise_if_problems(self) -> None:
        """Raise DataError naming the first problem (strict mode)."""
        if self.problems:
            first = self.problems[0]
            raise DataError(f"{first} ({self.skipped} malformed record(s) in total: {self.counts})")

    def to_json(self) -> dict:
        """JSON-ready dict."""
        return {"file": self.file, "loaded": self.loaded, "counts": self.counts, "notes": list(self.notes),
                "problems": [dataclasses.asdict(p) for p in self.problems]}


# ------------------------------------------------------------------------------------------- validation


def safe_relative_path(path: str) -> str | None:
    """The POSIX form of `path` if it is relative and stays inside its root, else None."""
    if not isinstance(path, str) or not path or "\x00" in path:
        return None
    p = PurePosixPath(path.replace("\\", "/"))
    if p.is_absolute() or (p.parts and ":" in p.parts[0]):  # "/x", "C:/x"
        return None
    depth = 0
    for part in p.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return None
    return str(p)


def check_image(root: Path, rel: str, mode: str = "open") -> tuple[str, str] | None:
    """(problem kind, message) for an image reference, or None if it is fine.

    mode: "none" (path rules only), "exists", "open" (header decodes: cheap), "decode" (full pixel decode).
    """
    safe = safe_relative_path(rel)
    if safe is None:
        return "image_outside_root", f"image path {rel!r} is absolute or leaves the dataset root"
    if mode == "none":
        return None
    full = Path(root) / safe
    try:
        full.resolve().relative_to(Path(root).resolve())  # a symlink may still point outside
    except ValueError:
        return "image_outside_root", f"image {rel!r} resolves outside {root}"
    if not full.is_file():
        return "image_missing", f"image {rel!r} not found under {root}"
    if mode == "exists":
        return None
    from PIL import Image

    try:
        with Image.open(full) as im:
            if mode == "decode":
                im.load()
            else:
                im.verify()
    except Exception as err:  # PIL raises many types for bad files
        return "image_corrupt", f"image {rel!r} cannot be decoded: {type(err).__name__}: {err}"
    return None


def validate_record(rec: Record, root: str | Path | None = None, *, labeled: bool = True,
                    image_check: str = "open") -> list[tuple[str, str]]:
    """(problem kind, message) pairs for everything wrong with a record (empty if it is usable)."""
    out: list[tuple[str, str]] = []
    if not isinstance(rec.id, str) or not rec.id:
        out.append(("malformed", "empty id"))
    if not isinstance(rec.question, str) or not rec.question.strip():
        out.append(("malformed", "empty question"))
    if rec.question_type not in QUESTION_TYPES:
        out.append(("unknown_question_type", f"question_type {rec.question_type!r} not in {QUESTION_TYPES}"))
    if rec.answer_type not in ANSWER_TYPES:
        out.append(("unknown_answer_type", f"answer_type {rec.answer_type!r} not in {ANSWER_TYPES}"))
    if rec.question_type == "multi_choice" and not rec.choices:
        out.append(("malformed", "multiple-choice record without choices"))
    if not rec.images:
        out.append(("image_missing", "record has no image"))
    for rel in rec.images:
        if root is None:
            if safe_relative_path(rel) is None:
                out.append(("image_outside_root", f"image path {rel!r} is absolute or leaves the dataset root"))
            continue
        bad = check_image(Path(root), rel, image_check)
        if bad:
            out.append(bad)
    if labeled and rec.answer is None:
        out.append(("missing_answer", "labeled split but no answer"))
    if rec.answer is not None and not out:
        from mstar_jax.answers import GoldAnswerError, parse_gold

        try:
            parse_gold(rec.to_item())
        except GoldAnswerError as err:
            out.append(("bad_answer", str(err)))
    return out


def collect(candidates: Iterable[tuple[str, Record | None, tuple[str, str] | None]], report: LoadReport, *,
            root: str | Path | None, labeled: bool, image_check: str = "open") -> list[Record]:
    """Validate (record id, record or None, (problem kind, message) or None) triples.

    Good records are returned; every other one is added to `report` with its id.
    """
    out: list[Record] = []
    seen: set[str] = set()
    for rid, rec, error in candidates:
        if rec is None or error is not None:
            kind, msg = error or ("malformed", "could not be parsed")
            report.add(kind, rid, msg)
            continue
        if not labeled and rec.answer is not None:
            rec = rec.unlabeled()
        problems = validate_record(rec, root, labeled=labeled, image_check=image_check)
        if rec.id in seen:
            problems.append(("duplicate_id", f"id {rec.id!r} appears more than once"))
        if problems:
            for kind, msg in problems:
                report.add(kind, rid, msg)
            continue
        seen.add(rec.id)
        out.append(rec)
    report.loaded += len(out)
    return out


def infer_answer_type(answer: str) -> tuple[str, int | None]:
    """(answer_type, precision) of a free-form answer string: integer, float (its decimals), list, or text."""
    import re

    a = answer.strip()
    if re.fullmatch(r"[-+]?\d+", a.replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+", a) else a):
        return "integer", None
    m = re.fullmatch(r"[-+]?\d*\.(\d+)", a)
    if m:
        return "float", len(m.group(1))
    if re.fullmatch(r"\[.*\]", a, flags=re.S) and "," in a:
        return "list", None
    return "text", None


def write_jsonl(records: Sequence[Record], path: str | Path) -> None:
    """Write records as JSONL (our own interchange format; `readers.read_records` reads it back)."""
    from mstar_jax.io import write_lines_atomic

    write_lines_atomic(path, [json.dumps(r.to_json(), sort_keys=True) for r in records], publish=False)


# ArrayRecord entries of `mstar data prepare`: magic, header length, JSON header (record + image sizes), then the
# image files' bytes back to back, so a shard is self-contained on hosts without the dataset's file tree.
_ENTRY_MAGIC = b"MSR1"


def encode_entry(rec: Record, images: Sequence[bytes]) -> bytes:
    """One self-contained shard entry: the record and its image files' bytes."""
    header = json.dumps({"record": rec.to_json(), "image_sizes": [len(b) for b in images]},
                        sort_keys=True).encode()
    return _ENTRY_MAGIC + len(header).to_bytes(4, "little") + header + b"".join(images)


def decode_entry(data: bytes) -> tuple[Record, list[bytes]]:
    """Inverse of `encode_entry`; DataError on anything else."""
    if data[:4] != _ENTRY_MAGIC:
        raise DataError("not an mstar shard entry (bad magic); was the shard written by `mstar data prepare`?")
    n = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8:8 + n])
    images, pos = [], 8 + n
    for size in header["image_sizes"]:
        images.append(data[pos:pos + size])
        pos += size
    if pos != len(data):
        raise DataError(f"shard entry of record {header['record'].get('id')}: {len(data) - pos} trailing bytes")
    return Record.from_json(header["record"]), images
