"""The question text each benchmark asks with, built the way its official evaluation code builds it.

  mcq_query        VLMEvalKit's ImageMCQDataset.build_prompt (MMBench, MMStar, AI2D): "Hint: ..\\nQuestion: ..\\n
                   Options:\\nA. ..\\nB. ..", without its closing instruction (our prompt builders add their own).
  mathvista_query  MathVista's evaluation/build_query.py, zero-shot "solution" mode: the hint for the answer
                   type, "Question: ..", " (Unit: ..)", "Choices:\\n(A) ..". It equals data/query.json for all 1000
                   testmini pids; the readers prefer query.json / the parquet `query` column when present.
  m3cot_query      The layout of M3CoT's released prompts (experiment/*/*.jsonl): "[Context]\\n..\\n[Question]\\n..\\n
                   [Choices]\\n(A) ..".
"""

from __future__ import annotations

from typing import Sequence

from mstar_jax.data.records import LETTERS

# MathVista's hints by (question_type / answer_type, precision); other answer types get no hint.
_MATHVISTA_HINTS = {
    "multi_choice": "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, "
               "at the end.",
    ("float", 1): "Please answer the question requiring a floating-point number with one decimal place and provide "
                  "the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    ("float", 2): "Please answer the question requiring a floating-point number with two decimal places and provide "
                  "the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Please answer the question requiring a Python list as an answer and provide the final list, e.g., "
            "[1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}


def mcq_query(question: str, choices: Sequence[str], hint: str | None = None) -> str:
    """VLMEvalKit's multiple-choice prompt body: optional hint, the question, then "Options:" with "A. x" lines."""
    lines = ([f"Hint: {hint}"] if hint else []) + [f"Question: {question}", "Options:"]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def mathvista_query(question: str, *, question_type: str | None, answer_type: str | None, precision: int | None,
                    unit: str | None, choices: Sequence[str] | None) -> str:
    """MathVista's zero-shot query for a row (hint for the answer type, question, unit, lettered choices)."""
    if question_type == "multi_choice":
        hint = _MATHVISTA_HINTS["multi_choice"]
    else:
        hint = _MATHVISTA_HINTS.get((answer_type, precision)) or _MATHVISTA_HINTS.get(answer_type or "")
    text = f"Question: {question}" + (f" (Unit: {unit})" if unit else "")
    parts = ([f"Hint: {hint}"] if hint else []) + [text]
    if choices:
        parts.append("\n".join(["Choices:"] + [f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)]))
    return "\n".join(parts).strip()


def m3cot_query(question: str, choices: Sequence[str], context: str | None = None) -> str:
    """M3CoT's prompt layout: [Context] (when there is one), [Question], [Choices] with "(A) x" lines."""
    parts = ([f"[Context]\n{context}"] if context else []) + [f"[Question]\n{question}", "[Choices]"]
    parts += [f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    return "\n".join(parts)
