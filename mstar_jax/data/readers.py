"""Readers of the published dataset files into `Record`s, each returning (records, LoadReport).

Formats (the layouts as published; where a detail could not be checked against the real files it says so):
  mathv360k  Math-LLaVA's `train_samples_all_tuning.json`: a JSON list of
             {"id", "image": "<rel path>", "conversations": [{"from": "human", "value": "<image>\\n..."},
             {"from": "gpt", "value": "The answer is X"}]}; a longer gpt value is kept as the rationale.
             Choices are read from a "Choices:" / "Options:" block of the question.
  mathvista  AI4Math/MathVista `testmini.json` / `test.json` (a JSON dict keyed by pid) or its parquet
             (`decoded_image` = {"bytes", "path"}); fields pid, question, image, choices, unit, precision,
             answer, question_type, answer_type, metadata{task, category, skills, source, ...}, query.
  m3cot      LightChen2333/M3CoT (parquet, JSON or JSONL): id, category, image_id, question, choices, context,
             answer (a letter), rationale, split, image ({"bytes", "path"} or a path), domain, topic.
             Assumption: without an `image` field the image is looked up as images/<image_id>.{png,jpg,...}.
  mmstar     Lin-Chen/MMStar parquet (index, question, image, answer letter, category, l2_category, meta_info)
             or VLMEvalKit's MMStar.tsv (base64 image, optional A-D columns). Without A-D columns the options
             are read from "Options: A: x, B: y, ..." inside the question.
  mmbench    VLMEvalKit / OpenCompass MMBench TSV: index, question, hint, A, B, C, D, answer, category,
             l2-category, image (base64; a short value is the index of the row holding the same image).
  ai2d       lmms-lab/ai2d parquet: question, options (list), answer (the 0-based option index as a string),
             image ({"bytes", "path"}); ids are "ai2d-<row>".
  records    our own JSONL of `Record.to_json()` (what `mstar data prepare` and tests write).

Embedded images (base64 or parquet bytes) are decoded once and written to
`<root>/_image_cache/<format>/<sha1 of the bytes>.<ext>`, so records stay plain paths and a re-read reuses
the files. Nothing is dropped silently: each left-out record is in the report with its file and id.
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
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mstar_jax.data.records import LETTERS, LoadReport, Record, collect, infer_answer_type
from mstar_jax.errors import DataError

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
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: concurrent readers never see half a file
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


def _letter_to_choice(answer: str | None, choices: list[str]) -> str | None:
    """The choice text for a letter / "(B)" / 0-based index string, or the answer itself if it is a choice."""
    if answer is None:
        return None
    if answer in choices:
        return answer
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", answer.strip())
    if m and LETTERS.find(m.group(1).upper()) < len(choices):
        return choices[LETTERS.index(m.group(1).upper())]
    return answer  # left as is: validation reports it as a bad answer


def _mc_record(rid, images, question, choices, answer, metadata, query=None, rationale=None) -> Record:
    return Record(id=str(rid), images=images, question=question, choices=choices,
                  answer=_letter_to_choice(answer, choices), answer_type="text", precision=None, unit=None,
                  question_type="multi_choice", metadata=metadata, rationale=rationale, query=query)


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


def _mathv360k(i: int, row: dict) -> Candidate:
    from mstar_jax.answers import extract_answer

    rid = str(row.get("id") or f"#{i}")
    conv = row["conversations"]
    human = next(t for t in conv if t.get("from") in ("human", "user"))
    gpt = next((t for t in conv if t.get("from") in ("gpt", "assistant")), None)
    query = human["value"].replace("<image>", "").strip()
    body = query.split("Question:", 1)[1].strip() if "Question:" in query else query
    question, choices = parse_choices(body)
    image = row.get("image")
    images = [image] if isinstance(image, str) else list(image or [])
    answer, rationale = None, None
    if gpt is not None and _str(gpt.get("value")):
        text = gpt["value"].strip()
        answer = extract_answer(text)
        if answer is None:
            return rid, None, ("bad_answer", f"no final answer in the gpt turn {text[:80]!r}")
        if not re.fullmatch(r"(?is)(the )?(final )?answer( is)?\s*:?\s*\S.{0,200}", text):
            rationale = text  # a worked solution, not just "The answer is X"
    meta = {"source": images[0].split("/", 1)[0] if images and "/" in images[0] else "mathv360k"}
    meta.update(row.get("metadata") or {})
    if choices and answer is not None and (_letter_to_choice(answer, choices) in choices):
        return rid, _mc_record(rid, images, question, choices, answer, meta, query, rationale), None
    if choices and answer is None:
        return rid, _mc_record(rid, images, question, choices, None, meta, query, rationale), None
    atype, precision = infer_answer_type(answer) if answer is not None else ("text", None)
    return rid, Record(id=rid, images=images, question=question if not choices else body, choices=None,
                       answer=answer, answer_type=atype, precision=precision, unit=None, question_type="free_form",
                       metadata=meta, rationale=rationale, query=query), None


def _mathvista(cache: ImageCache) -> Callable[[int, dict], Candidate]:
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
        qtype = row.get("question_type")
        if qtype == "multi_choice" and choices:
            answer = _letter_to_choice(answer, choices)
        meta = row.get("metadata") or {}
        meta = json.loads(meta) if isinstance(meta, str) else dict(meta)  # a struct in parquet, a dict in JSON
        return rid, Record(id=rid, images=[image], question=str(row["question"]), choices=choices, answer=answer,
                           answer_type=row.get("answer_type"), precision=precision, unit=_str(row.get("unit")),
                           question_type=qtype, metadata=meta, query=_str(row.get("query")),
                           rationale=_str(row.get("rationale"))), None  # not in MathVista; synth writes it
    return make


def _m3cot(cache: ImageCache, root: Path) -> Callable[[int, dict], Candidate]:
    def make(i: int, row: dict) -> Candidate:
        rid = str(row.get("id") or f"#{i}")
        if not _missing(row.get("image")):
            image, err = _image_ref(row.get("image"), cache)
        elif _str(row.get("image_id")):
            image, err = _find_image(root, str(row["image_id"])), None
        else:
            image, err = None, ("image_missing", "record has neither image nor image_id")
        if err:
            return rid, None, err
        choices = [str(c) for c in row["choices"]]
        context = _str(row.get("context"))
        question = str(row["question"])
        query = f"Context: {context}\n{question}" if context else None
        meta = {k: row.get(k) for k in ("category", "domain", "topic", "split") if not _missing(row.get(k))}
        meta["task"] = meta.get("domain", "m3cot")
        return rid, _mc_record(rid, [image], question, choices, _str(row.get("answer")), meta, query,
                               _str(row.get("rationale"))), None
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
    """An MMBench/MMStar image cell: HF image dict, raw bytes, base64 text, or a reference to another row."""
    if isinstance(value, (dict, bytes, bytearray)):
        return _image_ref(value, cache)
    text = _str(value)
    if text is None:
        return None, ("image_missing", "record has no image")
    if len(text) <= 64 and images_by_index is not None and text in images_by_index:
        text = images_by_index[text]  # VLMEvalKit stores a repeated image once and refers to its row index
    return cache.store_base64(text)


def _mmstar(cache: ImageCache) -> Callable[[int, dict], Candidate]:
    def make(i: int, row: dict) -> Candidate:
        rid = str(row.get("index") if not _missing(row.get("index")) else f"#{i}")
        image, err = _embedded_image(row.get("image"), cache, None)
        if err:
            return rid, None, err
        raw_q = str(row["question"])
        choices = _letter_columns(row)
        question = raw_q
        if not choices:
            question, choices = parse_choices(raw_q)
        if not choices:
            return rid, None, ("malformed", "no options found (neither A-D columns nor an 'Options:' block)")
        l2 = _str(row.get("l2_category") or row.get("l2-category"))
        meta = {"category": _str(row.get("category")), "l2_category": l2, "task": _str(row.get("category"))}
        if not _missing(row.get("meta_info")):
            meta["meta_info"] = row["meta_info"] if isinstance(row["meta_info"], (dict, str)) else str(row["meta_info"])
        return rid, _mc_record(rid, [image], question, choices, _str(row.get("answer")), meta, raw_q), None
    return make


def _mmbench(cache: ImageCache, images_by_index: dict[str, str]) -> Callable[[int, dict], Candidate]:
    def make(i: int, row: dict) -> Candidate:
        rid = str(row.get("index") if not _missing(row.get("index")) else f"#{i}")
        image, err = _embedded_image(row.get("image"), cache, images_by_index)
        if err:
            return rid, None, err
        choices = _letter_columns(row)
        if not choices:
            return rid, None, ("malformed", "no options in the A-D columns")
        question = str(row["question"])
        hint = _str(row.get("hint"))
        query = f"Hint: {hint}\nQuestion: {question}" if hint else None
        l2 = _str(row.get("l2-category") or row.get("l2_category"))
        meta = {k: _str(row.get(k)) for k in ("category", "split", "source") if _str(row.get(k))}
        meta["l2_category"] = l2
        meta["task"] = l2 or meta.get("category")
        return rid, _mc_record(rid, [image], question, choices, _str(row.get("answer")), meta, query), None
    return make


def _ai2d(cache: ImageCache) -> Callable[[int, dict], Candidate]:
    def make(i: int, row: dict) -> Candidate:
        rid = f"ai2d-{i}"
        image, err = _image_ref(row.get("image"), cache)
        if err:
            return rid, None, err
        choices = [str(c) for c in row["options"]]
        answer = _str(row.get("answer"))
        if answer is not None and re.fullmatch(r"\d+", answer):
            k = int(answer)
            if not 0 <= k < len(choices):
                return rid, None, ("bad_answer", f"answer index {k} outside the {len(choices)} options")
            answer = choices[k]
        return rid, _mc_record(rid, [image], str(row["question"]), choices, answer, {"task": "ai2d"}), None
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
    if "options" in keys and "question" in keys:
        return "ai2d"
    if "hint" in keys and "A" in keys:
        return "mmbench"
    if "l2_category" in keys or "l2-category" in keys:
        return "mmstar"
    if {"id", "images", "question_type", "answer_type"} <= keys:
        return "records"
    raise DataError(f"{path}: cannot detect the dataset format (pass --format, one of {', '.join(FORMATS)})")


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
    cache = ImageCache(root, fmt)
    rows = iter_rows(path)
    if fmt == "mathv360k":
        cands = _guard(rows, _mathv360k, "id")
    elif fmt == "mathvista":
        cands = _guard(rows, _mathvista(cache), "pid")
    elif fmt == "m3cot":
        cands = _guard(rows, _m3cot(cache, root), "id")
    elif fmt == "mmstar":
        cands = _guard(rows, _mmstar(cache), "index")
    elif fmt == "mmbench":
        rows = list(rows)  # two passes: rows may refer to another row's image by index
        by_index = {str(r.get("index")): r.get("image") for _, r in rows
                    if isinstance(r, dict) and isinstance(r.get("image"), str) and len(r.get("image")) > 64}
        cands = _guard(rows, _mmbench(cache, by_index), "index")
    elif fmt == "ai2d":
        cands = _guard(rows, _ai2d(cache))
    else:
        cands = _guard(rows, _records, "id")
    report = LoadReport(file=str(path))
    records = collect(cands, report, root=root, labeled=labeled, image_check=image_check)
    report.log(log)
    if strict:
        report.raise_if_problems()
    return records, report


def read_records(path: str | Path, **kw) -> tuple[list[Record], LoadReport]:
    """Read our own JSONL of records (see `records.write_jsonl`)."""
    return read_dataset(path, "records", **kw)
