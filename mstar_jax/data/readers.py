"""Readers of the published dataset files into `Record`s, each returning (records, LoadReport).

Formats, as the releases store them (where to get each: docs/benchmarks_data.md):
  mathv360k  Zhiqiang007/MathV360K `train_samples_all_tuning.json`: a JSON list of {"id", "image":
             "<Source>/images/<file>", "conversations": [{"from": "human", "value": "<image>\\nHint: ..\\nQuestion:
             ..\\nChoices:\\n(A) .."}, {"from": "gpt", "value": "The answer is B"}]}. The images sit in `data_images/`
             beside the JSON. A gpt value longer than "The answer is X" is kept as the rationale.
  mathvista  AI4Math/MathVista `testmini.json` / `test.json` (a dict keyed by pid) with the prompt text of each pid
             in `query.json` beside it, or the HF parquet (`decoded_image` {"bytes", "path"}, `metadata` a struct,
             `query` a column). Without either query source the query is built as MathVista's build_query does.
  m3cot      LightChen2333/M3CoT parquet (`image` {"bytes", "path"}) or its jsonl release, whose `image` path is
             written from the folder above the jsonl ("data/images/x.png"); the prefix that does not resolve under
             the root is dropped. Without `image`, images/<image_id>.png is used.
  mmstar     Lin-Chen/MMStar parquet: index, question with "Options: A: .., B: .." inside, image, answer letter,
             category, l2_category, meta_info {source, split, image_path}; or a TSV with A-D columns.
  mmbench    VLMEvalKit's MMBench TSV (index, question, hint, A-D, answer, category, l2-category, split, image: base64
             or the index of the row that holds it) or lmms-lab's parquet (`L2-category`). Rotated copies of a question
             sit at index + k * 1e6; each copy is a record and metadata["circular_group"] ties them (CircularEval).
  ai2d       lmms-lab/ai2d parquet (question, options, answer = the 0-based option index, image) or VLMEvalKit's
             AI2D_TEST.tsv (index, question, A-D, answer letter, base64 image).
  records    our own JSONL of `Record.to_json()` (what `mstar data prepare` and tests write).

Every benchmark record's `query` is the text the benchmark asks with (see `mstar_jax.data.queries`). Embedded
images (base64 or parquet bytes) are decoded once into `<root>/_image_cache/<format>/<sha1>.<ext>`, so records stay
plain paths and a re-read reuses the files. Nothing is dropped silently: each left-out record is in the report with
its file and id, and the report's notes say what the reader assumed (root, query source, splits, copies).
"""


from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import logging
import math
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from mstar_jax.data.queries import m3cot_query, mathvista_query, mcq_query
from mstar_jax.data.records import LETTERS, LoadReport, Record, collect, infer_answer_type, safe_relative_path
from mstar_jax.errors import DataError
from mstar_jax.io import write_atomic

log = logging.getLogger(__name__)

CACHE_DIR = "_image_cache"
Candidate = tuple[str, "Record | None", "tuple[str, str] | None"]


# ------------------------------------------------------------------------------------------- file rows


def iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a JSON list / dict, JSONL, parquet or TSV file; rows of dicts as published."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON: {err}") from err
        if isinstance(data, dict):  # MathVista: {pid: row}
            for i, (key, row) in enumerate(data.items()):
                if isinstance(row, dict):
                    row = {"pid": key, **row}
                yield i, row
        elif isinstance(data, list):
            yield from enumerate(data)
        else:
            raise DataError(f"{path}: expected a JSON list or object at the top level")
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as err:
                        yield i, _BadRow(f"line {i + 1} is not valid JSON: {err}")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield n, row
                n += 1
    elif suffix in (".tsv", ".csv"):
        csv.field_size_limit(sys.maxsize)  # base64 images are long fields
        with path.open(encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")):
                yield i, row
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (json, jsonl, parquet, tsv, csv)")


class _BadRow:
    def __init__(self, message: str):
        self.message = message


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() in ("", "nan"))


def _str(v) -> str | None:
    return None if _missing(v) else str(v).strip()


# ----------------------------------------------------------------------------------------------- images


class ImageCache:
    """Writes embedded image bytes once under <root>/_image_cache/<name>/ and returns root-relative paths."""

    def __init__(self, root: Path, name: str):
        self.root = Path(root)
        self.dir = self.root / CACHE_DIR / name

    def store(self, data: bytes) -> tuple[str | None, tuple[str, str] | None]:
        """(relative path, None) or (None, (problem kind, message)) for undecodable bytes."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "png").lower()
                im.verify()
        except Exception as err:
            return None, ("image_corrupt", f"embedded image cannot be decoded: {type(err).__name__}: {err}")
        ext = {"jpeg": "jpg"}.get(fmt, fmt)
        name = f"{hashlib.sha1(data).hexdigest()[:24]}.{ext}"
        path = self.dir / name
        if not path.exists():
            write_atomic(path, data, publish=False)  # concurrent readers never see half a file
        return f"{CACHE_DIR}/{self.dir.name}/{name}", None

    def store_base64(self, text: str):
        """Like `store` for a base64 string."""
        try:
            data = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError) as err:
            return None, ("image_corrupt", f"image is not valid base64: {err}")
        return self.store(data)


def _image_ref(value, cache: ImageCache) -> tuple[str | None, tuple[str, str] | None]:
    """Relative path for an image field: a path string, {"bytes", "path"} (HF Image), or raw bytes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return cache.store(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return cache.store(bytes(value))
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    return None, ("image_missing", "record has no image")


# ---------------------------------------------------------------------------------------------- choices

_CHOICE_BLOCK = re.compile(r"(?:choices|options)\s*:\s*", re.IGNORECASE)
_CHOICE_ITEM = re.compile(r"(?:^|\n|,\s*|\s)\(?([A-J])\s*[).:：]\s*(.*?)(?=(?:\n|,\s*|\s)\(?[A-J]\s*[).:：]\s|\Z)",
                          re.DOTALL)


def parse_choices(text: str) -> tuple[str, list[str] | None]:
    """(question without its choice block, choices) from "Choices:\\n(A) x\\n(B) y" or "Options: A: x, B: y"."""
    matches = list(_CHOICE_BLOCK.finditer(text))
    if not matches:
        return text, None
    m = matches[-1]
    items = _CHOICE_ITEM.findall("\n" + text[m.end():])
    letters = [a for a, _ in items]
    if len(items) < 2 or letters != list(LETTERS[:len(letters)]):
        return text, None
    choices = [c.strip().rstrip(",").strip() for _, c in items]
    return text[:m.start()].strip(), choices


def _letter_to_choice(answer: str | None, choices: list[str], letter_first: bool = False) -> str | None:
    """The choice text for a letter / "(B)", or the answer itself if it is a choice.

    letter_first: the file's answers are letters (MMBench, MMStar, AI2D TSV, M3CoT), so "B" means the second choice
    even when some choice's text is "B" (AI2D has options like ["c", "D", "b", "a"]).
    """
    if answer is None:
        return None
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", answer.strip())
    by_letter = choices[LETTERS.index(m.group(1).upper())] if m and LETTERS.find(m.group(1).upper()) < len(
        choices) else None
    if by_letter is not None and (letter_first or answer not in choices):
        return by_letter
    return answer  # a choice's text, or left as is for validation to report as a bad answer


def _mc_record(rid, images, question, choices, answer, metadata, query=None, rationale=None,
               letter_first=True) -> Record:
    return Record(id=str(rid), images=images, question=question, choices=choices,
                  answer=_letter_to_choice(answer, choices, letter_first), answer_type="text", precision=None,
                  unit=None, question_type="multi_choice", metadata=metadata, rationale=rationale, query=query)


def _guard(rows: Iterable[tuple[int, Any]], make: Callable[[int, dict], Candidate], id_key=None) -> Iterator[Candidate]:
    """Run `make` on each row; a row that is not an object or raises becomes a 'malformed' candidate."""
    for i, row in rows:
        rid = f"#{i}"
        if isinstance(row, dict) and id_key and not _missing(row.get(id_key)):
            rid = str(row[id_key])
        if isinstance(row, _BadRow):
            yield rid, None, ("malformed", row.message)
            continue
        if not isinstance(row, dict):
            yield rid, None, ("malformed", f"row is a {type(row).__name__}, not an object")
            continue
        try:
            yield make(i, row)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            yield rid, None, ("malformed", f"{type(err).__name__}: {err}")


# ---------------------------------------------------------------------------------------------- readers


def _mathv360k(root: Path, report: LoadReport) -> Callable[[int, dict], Candidate]:
    from mstar_jax.answers import extract_answer

    images_dir = "data_images"  # the release unzips its images there, beside the JSON

    def locate(rel: str) -> str:
        if not (root / rel).exists() and (root / images_dir / rel).is_file():
            report.note(f"images: under {images_dir}/ in {root}")
            return f"{images_dir}/{rel}"
        return rel

    def make(i: int, row: dict) -> Candidate:
        rid = str(row.get("id") or f"#{i}")
        conv = row["conversations"]
        human = next(t for t in conv if t.get("from") in ("human", "user"))
        gpt = next((t for t in conv if t.get("from") in ("gpt", "assistant")), None)
        query = human["value"].replace("<image>", "").strip()
        body = query.split("Question:", 1)[1].strip() if "Question:" in query else query
        question, choices = parse_choices(body)
        image = row.get("image")
        raw_images = [image] if isinstance(image, str) else list(image or [])
        images = [locate(p) if safe_relative_path(p) else p for p in raw_images]
        answer, rationale = None, None
        if gpt is not None and _str(gpt.get("value")):
            text = gpt["value"].strip()
            answer = extract_answer(text)
            if answer is None:
                return rid, None, ("bad_answer", f"no final answer in the gpt turn {text[:80]!r}")
            if not re.fullmatch(r"(?is)(the )?(final )?answer( is)?\s*:?\s*\S.{0,200}", text):
                rationale = text  # a worked solution, not just "The answer is X"
        source = raw_images[0].split("/", 1)[0] if raw_images and "/" in raw_images[0] else "mathv360k"
        meta = {"source": source, **(row.get("metadata") or {})}
        if choices and (answer is None or _letter_to_choice(answer, choices) in choices):
            return rid, _mc_record(rid, images, question, choices, answer, meta, query, rationale,
                                   letter_first=False), None
        atype, precision = infer_answer_type(answer) if answer is not None else ("text", None)
        return rid, Record(id=rid, images=images, question=question if not choices else body, choices=None,
                           answer=answer, answer_type=atype, precision=precision, unit=None, question_type="free_form",
                           metadata=meta, rationale=rationale, query=query), None
    return make


def _load_queries(path: Path) -> dict[str, str] | None:
    """MathVista's query.json ({pid: prompt text}) beside a split file, or None when there is none."""
    qpath = path.with_name("query.json")
    if not qpath.is_file():
        return None
    try:
        data = json.loads(qpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{qpath}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"{qpath}: expected a JSON object {{pid: query}}")
    return {str(k): str(v) for k, v in data.items()}


def _mathvista(cache: ImageCache, queries: dict[str, str] | None, report: LoadReport
               ) -> Callable[[int, dict], Candidate]:
    def make(i: int, row: dict) -> Candidate:
        rid = str(row.get("pid") or f"#{i}")
        decoded = row.get("decoded_image")
        if isinstance(decoded, dict) and decoded.get("bytes"):
            image, err = cache.store(decoded["bytes"])
        else:
            image, err = _image_ref(row.get("image"), cache)
        if err:
            return rid, None, err
        choices = row.get("choices")
        choices = [str(c) for c in choices] if choices is not None and len(choices) else None
        precision = row.get("precision")
        precision = None if _missing(precision) else int(float(precision))
        answer = _str(row.get("answer"))
        qtype, atype, unit = row.get("question_type"), row.get("answer_type"), _str(row.get("unit"))
        if qtype == "multi_choice" and choices:
            answer = _letter_to_choice(answer, choices)
        meta = row.get("metadata") or {}
        meta = json.loads(meta) if isinstance(meta, str) else dict(meta)  # a struct in parquet, a dict in JSON
        question = str(row["question"])
        query = _str(row.get("query"))
        if query is None and queries is not None and rid in queries:
            query = queries[rid]
            report.note("query: from query.json beside the file")
        elif query is None:
            query = mathvista_query(question, question_type=qtype, answer_type=atype, precision=precision,
                                    unit=unit, choices=choices)
            report.note("query: built from the fields as MathVista's build_query does (no query.json / query column)")
        return rid, Record(id=rid, images=[image], question=question, choices=choices, answer=answer,
                           answer_type=atype, precision=precision, unit=unit, question_type=qtype, metadata=meta,
                           query=query, rationale=_str(row.get("rationale"))), None  # rationale: synth writes it
    return make


def _resolve_below(root: Path, rel: str, report: LoadReport) -> str:
    """`rel`, or its shortest tail that exists under root when rel itself does not (M3CoT's jsonl paths)."""
    if safe_relative_path(rel) is None or (root / rel).exists():
        return rel
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    for k in range(1, len(parts)):
        tail = "/".join(parts[k:])
        if (root / tail).is_file():
            report.note(f"image paths: leading {'/'.join(parts[:k])}/ dropped to resolve them under {root}")
            return tail
    return rel  # validation reports it missing


def _m3cot(cache: ImageCache, root: Path, report: LoadReport) -> Callable[[int, dict], Candidate]:
    def make(i: int, row: dict) -> Candidate:
        rid = str(row.get("id") or f"#{i}")
        value = row.get("image")
        if isinstance(value, str) and value.strip():
            image, err = _resolve_below(root, value.strip(), report), None
        elif not _missing(value):
            image, err = _image_ref(value, cache)
        elif _str(row.get("image_id")):
            image, err = _find_image(root, str(row["image_id"])), None
        else:
            image, err = None, ("image_missing", "record has neither image nor image_id")
        if err:
            return rid, None, err
        choices = [str(c) for c in row["choices"]]
        question, context = str(row["question"]), _str(row.get("context"))
        meta = {k: row.get(k) for k in ("category", "domain", "topic", "split") if not _missing(row.get(k))}
        meta["task"] = meta.get("domain", "m3cot")
        return rid, _mc_record(rid, [image], question, choices, _str(row.get("answer")), meta,
                               m3cot_query(question, choices, context), _str(row.get("rationale"))), None
    return make


def _find_image(root: Path, image_id: str) -> str:
    for rel in (image_id, f"images/{image_id}"):
        for ext in ("", ".png", ".jpg", ".jpeg"):
            if (root / (rel + ext)).is_file():
                return rel + ext
    return f"images/{image_id}.png"  # reported as missing by validation


def _letter_columns(row: dict) -> list[str] | None:
    """Choices from A, B, C, ... columns (stops at the first empty one), or None without such columns."""
    if "A" not in row:
        return None
    out = []
    for letter in LETTERS:
        v = _str(row.get(letter))
        if v is None:
            break
        out.append(v)
    return out


def _embedded_image(value, cache: ImageCache, images_by_index: dict[str, str] | None):
    """A TSV / parquet image cell: HF image dict, raw bytes, base64 text, or the index of the row holding it."""
    if isinstance(value, (dict, bytes, bytearray)):
        return _image_ref(value, cache)
    text = _str(value)
    if text is None:
        return None, ("image_missing", "record has no image")
    if len(text) <= 64 and images_by_index is not None:
        if text not in images_by_index:
            return None, ("image_missing", f"image refers to row index {text!r}, which holds no image")
        text = images_by_index[text]  # VLMEvalKit stores a repeated image once and refers to its row index
    return cache.store_base64(text)


def _l2_category(row: dict) -> str | None:
    """The level-2 category under any of its published spellings (l2-category, L2-category, l2_category)."""
    for key, value in row.items():
        if str(key).lower().replace("_", "-") == "l2-category":
            return _str(value)
    return None


def _meta_info(value) -> dict:
    """MMStar's meta_info: a struct in the parquet, maybe a JSON / Python-literal string in a TSV."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip().startswith("{"):
        import ast

        try:
            return dict(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            return {}
    return {}


def _mmstar(cache: ImageCache, images_by_index) -> Callable[[int, dict], Candidate]:
    def make(i: int, row: dict) -> Candidate:
        rid = str(row.get("index") if not _missing(row.get("index")) else f"#{i}")
        image, err = _embedded_image(row.get("image"), cache, images_by_index)
        if err:
            return rid, None, err
        question, choices = str(row["question"]), _letter_columns(row)
        if not choices:  # the parquet keeps "Options: A: x, B: y" inside the question: take them out
            question, choices = parse_choices(question)
        if not choices:
            return rid, None, ("malformed", "no options found (neither A-D columns nor an 'Options:' block)")
        info = _meta_info(row.get("meta_info"))
        meta = {"category": _str(row.get("category")), "l2_category": _l2_category(row),
                "task": _str(row.get("category"))}
        meta.update({k: _str(info.get(k)) for k in ("source", "split") if _str(info.get(k))})
        return rid, _mc_record(rid, [image], question, choices, _str(row.get("answer")), meta,
                               mcq_query(question, choices)), None
    return make


CIRCULAR_OFFSET = 1_000_000  # MMBench: copy k of question i sits at index i + k * 1e6


def _mmbench(cache: ImageCache, images_by_index) -> Callable[[int, dict], Candidate]:
    def make(i: int, row: dict) -> Candidate:
        rid = str(row.get("index") if not _missing(row.get("index")) else f"#{i}")
        index = int(float(row["index"]))  # lmms-lab's en config stores it as a string
        image, err = _embedded_image(row.get("image"), cache, images_by_index)
        if err:
            return rid, None, err
        choices = _letter_columns(row)
        if not choices:
            return rid, None, ("malformed", "no options in the A-D columns")
        question, hint = str(row["question"]), _str(row.get("hint"))
        l2 = _l2_category(row)
        meta = {k: _str(row.get(k)) for k in ("category", "split", "source") if _str(row.get(k))}
        meta.update(l2_category=l2, task=l2 or meta.get("category"), circular_group=str(index % CIRCULAR_OFFSET),
                    circular_copy=index // CIRCULAR_OFFSET)
        return str(index), _mc_record(index, [image], question, choices, _str(row.get("answer")), meta,
                                      mcq_query(question, choices, hint)), None
    return make


def _ai2d(cache: ImageCache, images_by_index) -> Callable[[int, dict], Candidate]:
    def make(i: int, row: dict) -> Candidate:
        if "options" in row:  # lmms-lab parquet: no id column, so the row number names the question
            rid = f"ai2d-{i}"
            image, err = _image_ref(row.get("image"), cache)
            choices, answer = [str(c) for c in row["options"]], _str(row.get("answer"))
            if answer is not None and re.fullmatch(r"\d+", answer):
                if not 0 <= int(answer) < len(choices):
                    return rid, None, ("bad_answer", f"answer index {answer} outside the {len(choices)} options")
                answer = choices[int(answer)]
        else:  # VLMEvalKit TSV: A-D columns and a letter answer
            rid = f"ai2d-{row['index']}"
            image, err = _embedded_image(row.get("image"), cache, images_by_index)
            choices, answer = _letter_columns(row) or [], _str(row.get("answer"))
            if not choices:
                return rid, None, ("malformed", "neither an options list nor A-D columns")
        if err:
            return rid, None, err
        question = str(row["question"])
        meta = {"task": "ai2d", **({"category": _str(row["category"])} if _str(row.get("category")) else {})}
        return rid, _mc_record(rid, [image], question, choices, answer, meta, mcq_query(question, choices),
                               letter_first="options" not in row), None
    return make


def _records(i: int, row: dict) -> Candidate:
    rec = Record.from_json(row)
    return rec.id, rec, None


# --------------------------------------------------------------------------------------------- dispatch

FORMATS = ("mathv360k", "mathvista", "m3cot", "mmstar", "mmbench", "ai2d", "records")


def detect_format(path: str | Path) -> str:
    """Guess the format from the file name and its first row."""
    path = Path(path)
    name = path.name.lower()
    for fmt in ("mathvista", "m3cot", "mmstar", "mmbench", "ai2d", "mathv360k"):
        if fmt in name:
            return fmt
    try:
        _, row = next(iter_rows(path))
    except StopIteration:
        raise DataError(f"{path}: empty file, cannot detect its format") from None
    keys = set(row) if isinstance(row, dict) else set()
    if "conversations" in keys:
        return "mathv360k"
    if {"question_type", "answer_type"} <= keys and "pid" in keys:
        return "mathvista"
    if {"rationale", "domain", "topic"} <= keys:
        return "m3cot"
    if "options" in keys and "question" in keys or "abcLabel" in keys:
        return "ai2d"
    if "hint" in keys and "A" in keys:
        return "mmbench"
    if "meta_info" in keys or "l2_category" in keys:
        return "mmstar"
    if {"id", "images", "question_type", "answer_type"} <= keys:
        return "records"
    raise DataError(f"{path}: cannot detect the dataset format (pass --format, one of {', '.join(FORMATS)})")


def _images_by_index(rows: list[tuple[int, Any]]) -> dict[str, str]:
    """index -> base64 image of the rows that hold one (VLMEvalKit TSVs refer to them from other rows)."""
    return {str(r.get("index")): r["image"] for _, r in rows
            if isinstance(r, dict) and isinstance(r.get("image"), str) and len(r["image"]) > 64}


def _note_structure(records: list[Record], report: LoadReport, fmt: str) -> None:
    """Say once what the file turned out to hold: its splits and, for MMBench, its rotated copies."""
    splits = sorted({str(r.metadata["split"]) for r in records if r.metadata.get("split") is not None})
    if splits:
        report.note(f"split found: {', '.join(splits)}")
    if fmt == "mmbench" and records:
        groups = {r.metadata["circular_group"] for r in records}
        if len(groups) < len(records):
            report.note(f"circular copies: {len(records)} rows of {len(groups)} questions (grouped by index % 1e6)")
        else:
            report.note("no rotated copies: each row is one question")


def read_dataset(path: str | Path, format: str = "auto", *, root: str | Path | None = None, labeled: bool = True,
                 strict: bool = False, image_check: str = "open") -> tuple[list[Record], LoadReport]:
    """Read one dataset file into records; malformed records are reported (with file and id) and left out.

    root: the dataset root that image paths are relative to (default: the file's folder); embedded images are
    cached under it. labeled=False drops gold answers (unlabeled prompts, hidden test splits). strict=True
    raises DataError if any record is malformed. image_check: "none" | "exists" | "open" | "decode".
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    root = Path(root) if root is not None else path.parent
    report = LoadReport(file=str(path))
    report.note(f"format {fmt}, root {root}")
    cache = ImageCache(root, fmt)
    rows = iter_rows(path)
    if fmt == "mathv360k":
        cands = _guard(rows, _mathv360k(root, report), "id")
    elif fmt == "mathvista":
        queries = _load_queries(path) if path.suffix.lower() == ".json" else None
        cands = _guard(rows, _mathvista(cache, queries, report), "pid")
    elif fmt == "m3cot":
        cands = _guard(rows, _m3cot(cache, root, report), "id")
    elif fmt in ("mmstar", "mmbench", "ai2d"):
        rows = list(rows)  # two passes: TSV rows may refer to another row's image by index
        make = {"mmstar": _mmstar, "mmbench": _mmbench, "ai2d": _ai2d}[fmt](cache, _images_by_index(rows))
        cands = _guard(rows, make, "index")
    else:
        cands = _guard(rows, _records, "id")
    records = collect(cands, report, root=root, labeled=labeled, image_check=image_check)
    _note_structure(records, report, fmt)
    report.log(log)
    if strict:
        report.raise_if_problems()
    return records, report


def read_records(path: str | Path, **kw) -> tuple[list[Record], LoadReport]:
    """Read our own JSONL of records (see `records.write_jsonl`)."""
    return read_dataset(path, "records", **kw)
