"""Final-answer extraction and checking by MathVista's rules, with math-verify for symbolic answers.

An item uses MathVista field names: question_type ('multi_choice' | 'free_form'), answer_type ('integer' |
'float' | 'text' | 'list'), choices, precision, unit, answer (for multiple choice: the choice text, or its letter).

Rules kept from MathVista's `normalize_extracted_answer` (evaluation/calculate_score.py):
  * multiple choice: "(X)" or a bare letter picks that choice; otherwise the Levenshtein-nearest choice.
  * integer: `int(float(prediction))` (truncation, as MathVista does) against the integer gold.
  * float: the prediction rounded to the item's precision.
Deliberate differences (MathVista leaves these to a GPT extractor or to string equality):
  * an empty / missing extraction is wrong (MathVista maps "" to the nearest, i.e. shortest, choice);
  * float golds are compared as numbers at the precision, so a gold "1.20" matches "1.2";
  * units, currency, thousands separators, degrees, percent signs, LaTeX fractions are stripped / parsed;
    "45%" may mean 45 or 0.45 and either reading may match;
  * expressions a fast parser cannot read ("2^{10}", "\\sqrt{2}") go through math-verify.

math-verify's own timeouts use SIGALRM, which only works in a main thread. Here its calls run in a
persistent worker *subprocess* (started with subprocess.Popen, which also works inside daemonic worker
processes such as grain's) with a hard deadline: a call that overruns kills the worker, the answer counts as
not matching, and the next call starts a fresh worker. Inputs are bounded in length before they get there.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from typing import Sequence

from mstar_jax.errors import DataError

__all__ = ["check_answer", "extract_answer", "normalize_prediction", "parse_gold", "GoldAnswerError",
           "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 5.0
# Responses are cut to their tail before extraction: the final answer is at the end, and scanning megabytes
# of degenerate output is wasted work.
MAX_RESPONSE_CHARS = 20_000
MAX_EXTRACTION_CHARS = 300  # an extracted answer longer than this is not an answer
MAX_SYMBOLIC_CHARS = 200  # inputs to math-verify (sympy) are bounded: pathological LaTeX stays out
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class GoldAnswerError(DataError):
    """The item's gold answer cannot be parsed for its answer type (an error, never a pass)."""


# ----------------------------------------------------------------------------------------------- extraction

_MARKERS = ("answer is", "answer:", "answer :")


def _boxed_at(text: str, start: int) -> str | None:
    """Content of the braces opening at `start` (balanced, linear scan), or None if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def _clean(ans: str) -> str:
    """Strip markdown, math delimiters and trailing sentence punctuation from an extracted answer."""
    for _ in range(3):  # nested wrappers such as **$x$.**
        before = ans
        ans = ans.strip().strip("*").strip().lstrip(":").strip().rstrip(".。!;,").rstrip()
        if len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$":
            ans = ans.strip("$")
        for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
            if ans.startswith(left) and ans.endswith(right):
                ans = ans[len(left):-len(right)]
        if ans == before:
            break
    return ans.strip()


def extract_answer(response: str, item: dict | None = None) -> str | None:
    """The final answer in a response: the last of "The answer is X", "Answer: X", \\boxed{X}; else None.

    A short one-line response without a marker (a direct answer such as "B" or "12 cm") is taken whole.
    """
    if not isinstance(response, str):
        return None
    text = response[-MAX_RESPONSE_CHARS:]
    low = text.lower()
    best_pos, best = -1, None
    for marker in _MARKERS:
        pos = low.rfind(marker)
        if pos > best_pos:
            best_pos, best = pos, text[pos + len(marker):].lstrip(" :\t\n*").split("\n", 1)[0]
    boxed = text.rfind("\\boxed{")
    if boxed > best_pos:  # also covers "The answer is $\\boxed{5}$."
        content = _boxed_at(text, boxed + len("\\boxed"))
        if content is not None:
            best = content
    if best is None:
        stripped = text.strip()
        if not (0 < len(stripped) <= 40 and "\n" not in stripped):
            return None
        best = stripped
    best = _clean(best)
    if not best or len(best) > MAX_EXTRACTION_CHARS:
        return None
    return best


# --------------------------------------------------------------------------------------------- numbers

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d])")
_FRAC = re.compile(r"^\\[dt]?frac\{\s*(" + _NUM + r")\s*\}\{\s*(" + _NUM + r")\s*\}$")
_SLASH = re.compile(r"^(" + _NUM + r")\s*/\s*(" + _NUM + r")$")
_LEADING_NUM = re.compile(r"^(" + _NUM + r")(?:[eE]([-+]?\d+))?")


def _prepare_number_text(s: str, thousands: bool = True) -> str:
    """Strip units, currency, LaTeX text wrappers and thousands separators, keeping the number and %."""
    s = s.strip().replace("−", "-").replace("–", "-").replace("\u2009", "").replace("\\!", "")
    s = s.replace("\\%", "%").replace("\\$", "$").replace("^\\circ", "").replace("^{\\circ}", "")
    s = s.replace("°", "").replace("\\left", "").replace("\\right", "").replace("\\,", "")
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}", r" \1", s)
    if "=" in s:  # "x = 5"
        s = s.rsplit("=", 1)[1]
    s = s.strip().lstrip("$€£¥").strip()
    if s.startswith("-$"):  # "-$5"
        s = "-" + s[2:]
    if thousands:
        s = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), s)
    return s.strip()


def _simple_numbers(s: str, thousands: bool = True) -> list[float] | None:
    """Candidate values of a plain number with an optional unit ("12 cm", "-3.5", "45%", "3/4", "\\frac{1}{2}").

    None when `s` is not such a number (an expression, several numbers, words only).
    """
    t = _prepare_number_text(s, thousands)
    if not t:
        return None
    m = _FRAC.match(t) or _SLASH.match(t)
    if m:
        num, den = float(m.group(1)), float(m.group(2))
        return None if den == 0 else [num / den]
    m = _LEADING_NUM.match(t)
    if not m:
        return None
    value = float(m.group(1) + (("e" + m.group(2)) if m.group(2) else ""))
    rest = t[m.end():].strip()
    percent = rest.startswith("%")
    if percent:
        rest = rest[1:].strip()
    # Whatever follows must be a unit, not more mathematics ("cm", "apples", "m^2" but not "+ 3" or "\pi").
    if rest and (re.search(r"[\d\\+*/^=(){}\[\]<>|]", rest.replace("^2", "").replace("^3", ""))):
        return None
    if rest and len(rest) > 24:
        return None
    return [value, value / 100.0] if percent else [value]


def _split_list(s: str) -> list[str]:
    """Elements of a list answer: "[1, 2, 3]", "(1, 2)", "1, 2 and 3", "a; b"."""
    s = s.strip()
    if len(s) >= 2 and s[0] in "[({" and s[-1] in "])}":
        s = s[1:-1]
    s = re.sub(r"\s+and\s+", ",", s)
    return [p.strip().strip("'\"") for p in re.split(r"[,;]", s) if p.strip()]


def _norm_text(s: str) -> str:
    """Lower-case text with punctuation, articles and extra whitespace removed."""
    s = s.lower().strip()
    s = re.sub(r"[\"'`.,;:!?()\[\]{}*$]", " ", s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


# ----------------------------------------------------------------------------------------- gold answers


def _item_id(item: dict) -> str:
    return str(item.get("pid") or item.get("id") or item.get("index") or "?")


def _precision(item: dict) -> int | None:
    p = item.get("precision")
    if p is None or (isinstance(p, float) and math.isnan(p)) or p == "":
        return None
    return int(float(p))


def _choices(item: dict) -> list[str]:
    ch = item.get("choices")
    return [str(c) for c in ch] if ch is not None else []


def parse_gold(item: dict):
    """The gold answer in comparable form; raises GoldAnswerError if it cannot be parsed for its type.

    multi_choice -> choice index; integer -> int; float -> float; list -> list[str]; text -> str.
    """
    qtype = item.get("question_type") or ("multi_choice" if item.get("choices") else "free_form")
    atype = item.get("answer_type") or "text"
    gold = item.get("answer")
    where = f"item {_item_id(item)}"
    if gold is None or (isinstance(gold, float) and math.isnan(gold)) or str(gold).strip() == "":
        raise GoldAnswerError(f"{where}: no gold answer")
    gold = str(gold).strip()
    if qtype == "multi_choice":
        choices = _choices(item)
        if not choices:
            raise GoldAnswerError(f"{where}: multiple-choice item without choices")
        if gold in choices:
            return choices.index(gold)
        letter = re.fullmatch(r"\(?([A-Za-z])\)?\.?", gold)
        if letter and _LETTERS.find(letter.group(1).upper()) < len(choices):
            return _LETTERS.index(letter.group(1).upper())
        for i, c in enumerate(choices):
            if _norm_text(c) == _norm_text(gold):
                return i
        raise GoldAnswerError(f"{where}: gold {gold!r} is neither a choice nor a choice letter of {choices}")
    if atype not in ("integer", "float", "text", "list"):
        raise GoldAnswerError(f"{where}: unknown answer_type {atype!r}")
    if atype in ("integer", "float"):
        vals = _simple_numbers(gold)
        if vals is None:
            raise GoldAnswerError(f"{where}: {atype} gold {gold!r} is not a number")
        if atype == "integer":
            if vals[0] != int(vals[0]):
                raise GoldAnswerError(f"{where}: integer gold {gold!r} is not an integer")
            return int(vals[0])
        return vals[0]
    if atype == "list":
        parts = _split_list(gold)
        if not parts:
            raise GoldAnswerError(f"{where}: empty list gold {gold!r}")
        return parts
    return gold


# ----------------------------------------------------------------------------------- math-verify worker


def _worker_main() -> None:  # pragma: no cover - runs in the subprocess
    """Serve math-verify requests, one JSON object per line, until stdin closes."""
    import math_verify
    from math_verify import parse, verify

    del math_verify

    def value(s):
        for e in parse(s, parsing_timeout=None):
            if hasattr(e, "is_number") and e.is_number:
                v = complex(e.evalf())
                if abs(v.imag) < 1e-12:
                    return v.real
        return None

    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req["op"] == "value":
                out = value(req["a"])
            else:
                g, p = parse(req["a"], parsing_timeout=None), parse(req["b"], parsing_timeout=None)
                out = bool(g and p and verify(g, p, timeout_seconds=None))
            resp = {"ok": True, "result": out}
        except Exception as err:  # a malformed expression is an answer, not a worker failure
            resp = {"ok": False, "error": repr(err)[:200]}
        sys.stdout.write(json.dumps(resp) + "\n")
        sys.stdout.flush()


class _Verifier:
    """One math-verify worker subprocess per process, used under a lock, killed when a call overruns."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = None
        self.timeouts = 0

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
        code = "from mstar_jax.answers import _worker_main; _worker_main()"
        return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def call(self, req: dict, timeout: float):
        """The worker's result for `req`, or None if it fails or misses the deadline."""
        deadline = time.monotonic() + timeout
        with self._lock:
            # A process forked with a live worker must not share its pipes.
            if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                self._proc, self._pid = self._start(), os.getpid()
            proc = self._proc
            try:
                proc.stdin.write(json.dumps(req) + "\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._kill()
                return None
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            try:
                ready = sel.select(max(0.0, deadline - time.monotonic()))
            finally:
                sel.close()
            if not ready:
                self.timeouts += 1
                self._kill()
                return None
            line = proc.stdout.readline()
            if not line:
                self._kill()
                return None
            resp = json.loads(line)
            return resp.get("result") if resp.get("ok") else None

    def close(self) -> None:
        """Stop the worker (it also stops by itself when this process exits and its stdin closes)."""
        with self._lock:
            self._kill()


_VERIFIER = _Verifier()
atexit.register(_VERIFIER.close)


def _symbolic_value(s: str, timeout: float) -> float | None:
    """Numeric value of a LaTeX / plain expression via math-verify, or None."""
    if not s or len(s) > MAX_SYMBOLIC_CHARS:
        return None
    out = _VERIFIER.call({"op": "value", "a": _wrap_latex(s)}, timeout)
    return float(out) if isinstance(out, (int, float)) else None


def _symbolic_equal(gold: str, pred: str, timeout: float) -> bool:
    """math-verify equivalence of two answers, False on overrun or over-long input."""
    if not gold or not pred or len(gold) > MAX_SYMBOLIC_CHARS or len(pred) > MAX_SYMBOLIC_CHARS:
        return False
    return bool(_VERIFIER.call({"op": "equal", "a": _wrap_latex(gold), "b": _wrap_latex(pred)}, timeout))


def _wrap_latex(s: str) -> str:
    # math-verify finds LaTeX inside $...$; plain expressions are read by its expression parser.
    return f"${s}$" if "$" not in s and any(c in s for c in "\\^{}_") else s


# ------------------------------------------------------------------------------------------- checking


def _pick_choice(pred: str, choices: Sequence[str]) -> int | None:
    """Choice index named by a prediction: "(B)", "B", "B. text", the option text, else Levenshtein-nearest."""
    import Levenshtein

    p = pred.strip()
    n = len(choices)
    m = re.search(r"\(([a-zA-Z])\)", p)  # MathVista: the first "(x)" wins
    if m and _LETTERS.find(m.group(1).upper()) < n:
        return _LETTERS.index(m.group(1).upper())
    m = re.fullmatch(r"(?:option|choice)?\s*([A-Z])\s*[.:)]?", p, flags=re.IGNORECASE)
    # A bare lower-case "a" is a word, not a letter; "option b" is a letter.
    if m and (m.group(1).isupper() or p.lower().startswith(("option", "choice"))) and \
            _LETTERS.find(m.group(1).upper()) < n:
        return _LETTERS.index(m.group(1).upper())
    m = re.match(r"([A-Z])[.:)]\s+\S", p)  # "B. 5 cm"
    if m and _LETTERS.find(m.group(1)) < n:
        return _LETTERS.index(m.group(1))
    for i, c in enumerate(choices):
        if p == c:
            return i
    normed = [_norm_text(c) for c in choices]
    if _norm_text(p) in normed:
        return normed.index(_norm_text(p))
    distances = [Levenshtein.distance(p, c) for c in choices]
    return distances.index(min(distances))


def normalize_prediction(extraction: str | None, item: dict, timeout: float = DEFAULT_TIMEOUT_S):
    """The extraction in the gold's comparable form (see `parse_gold`), or None if it cannot be read."""
    if extraction is None or not extraction.strip():
        return None
    qtype = item.get("question_type") or ("multi_choice" if item.get("choices") else "free_form")
    atype = item.get("answer_type") or "text"
    if qtype == "multi_choice":
        return _pick_choice(extraction, _choices(item))
    if atype in ("integer", "float"):
        vals = _simple_numbers(extraction)
        if vals is None:
            v = _symbolic_value(_prepare_number_text(extraction), timeout)
            vals = None if v is None else [v]
        return vals
    if atype == "list":
        return _split_list(extraction)
    return extraction.strip()


def _numbers_match(pred_vals: list[float], gold: float, atype: str, precision: int | None, gold_text: str) -> bool:
    for v in pred_vals:
        if not math.isfinite(v):
            continue
        if atype == "integer":
            if int(v) == gold:  # MathVista: str(int(float(x))) -- truncation
                return True
        else:
            p = precision if precision is not None else _decimals(gold_text)
            if round(v, p) == round(gold, p) or abs(round(v, p) - round(gold, p)) < 0.5 * 10 ** (-p - 3):
                return True
    return False


def _decimals(text: str) -> int:
    m = re.search(r"\.(\d+)", text)
    return len(m.group(1)) if m else 0


def _elements_match(pred: list[str], gold: list[str]) -> bool:
    if len(pred) != len(gold):
        return False
    for p, g in zip(pred, gold):
        gv, pv = _simple_numbers(g, thousands=False), _simple_numbers(p, thousands=False)
        if gv is not None and pv is not None:
            if not any(abs(a - gv[0]) <= 1e-9 * max(1.0, abs(gv[0])) for a in pv):
                return False
        elif _norm_text(p) != _norm_text(g):
            return False
    return True


def check_answer(response: str, item: dict, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """True if the final answer in `response` matches the item's gold answer (MathVista rules).

    Raises GoldAnswerError if the gold answer cannot be parsed for the item's types.
    """
    gold = parse_gold(item)
    extraction = extract_answer(response, item)
    if extraction is None:
        return False
    qtype = item.get("question_type") or ("multi_choice" if item.get("choices") else "free_form")
    atype = item.get("answer_type") or "text"
    pred = normalize_prediction(extraction, item, timeout)
    gold_text = str(item.get("answer")).strip()
    if qtype == "multi_choice":
        return pred is not None and pred == gold
    if atype in ("integer", "float"):
        return pred is not None and _numbers_match(pred, gold, atype, _precision(item), gold_text)
    if atype == "list":
        return _elements_match(pred, gold) or _symbolic_equal(gold_text, extraction, timeout)
    return _texts_match(pred, gold, extraction, gold_text, timeout)


def _texts_match(pred: str, gold: str, pred_raw: str, gold_raw: str, timeout: float) -> bool:
    r"""Free-form text: normalised string equality, equal numbers, then symbolic equivalence ("\frac{\sqrt{3}}{2}"
    vs ...)."""
    if _norm_text(pred) == _norm_text(gold):
        return True
    gv, pv = _simple_numbers(gold), _simple_numbers(pred)
    if gv is not None and pv is not None:
        return any(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a in pv for b in gv)
    return _symbolic_equal(gold_raw, pred_raw, timeout)


# ---------------------------------------------------------------------------------------------- voting


def same_answer(a: str, b: str, item: dict, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """True if two extracted answers are the same answer to `item` by the checker's rules (for voting).

    Multiple choice: the same option ("(B) 2", "B" and "2" when B is "2"); numbers: equal as the item's answer
    type compares them ("2" and "2.0" for an integer); lists element-wise; text normalised, then symbolically.
    """
    qtype = item.get("question_type") or ("multi_choice" if item.get("choices") else "free_form")
    atype = item.get("answer_type") or "text"
    pa, pb = normalize_prediction(a, item, timeout), normalize_prediction(b, item, timeout)
    if pa is None or pb is None:
        return pa is None and pb is None and _norm_text(a) == _norm_text(b)
    if qtype == "multi_choice":
        return pa == pb
    if atype == "integer":
        return any(int(x) == int(y) for x in pa for y in pb if math.isfinite(x) and math.isfinite(y))
    if atype == "float":
        p = _precision(item)
        p = p if p is not None else max(_decimals(a), _decimals(b))
        return any(round(x, p) == round(y, p) for x in pa for y in pb if math.isfinite(x) and math.isfinite(y))
    if atype == "list":
        return _elements_match(pa, pb)
    return _texts_match(pa, pb, a, b, timeout)


def answer_groups(responses: Sequence[str], item: dict, timeout: float = DEFAULT_TIMEOUT_S) -> list[int | None]:
    """Group id per response: responses whose final answers are `same_answer` share one (numbered in order of
    first appearance); None for a response with no extractable answer."""
    reps: list[str] = []
    out: list[int | None] = []
    for r in responses:
        e = extract_answer(r, item)
        if e is None:
            out.append(None)
            continue
        for g, rep in enumerate(reps):
            if e == rep or same_answer(e, rep, item, timeout):
                out.append(g)
                break
        else:
            reps.append(e)
            out.append(len(reps) - 1)
    return out
