"""The prompts of the loop: direct answers (base eval), chain-of-thought (rollouts, eval) and the warm-up hint.

Paper 2.2 / appendix B: during warm-up the model sees the ground-truth answer and is asked to explain it step by
step; the hint is removed from the prompt it is then trained on.
"""

from __future__ import annotations

DIRECT_SUFFIX = "Answer the question using a single word or phrase."
COT_SUFFIX = "Think step by step, then finish with: The answer is <answer>."
HINT_TEMPLATE = "The correct answer is {answer}. Explain step by step how to get it."


def question_text(item: dict) -> str:
    """The item's query (else question), with "Choices:\\n(A) x ..." appended unless it already lists them all."""
    import re

    q = item.get("query") or item.get("question") or ""
    choices = item.get("choices") or []
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    # A choice counts as listed only as "(A) x" / "A. x" / "A: x" with its own text, so "11.50 A.M." or a hint
    # mentioning "Vitamin A." does not hide the choices.
    listed = all(re.search(rf"(?<![A-Za-z])\(?{letters[i]}\s*[).:]\s*{re.escape(str(c).strip())}", q)
                 for i, c in enumerate(choices))
    if choices and not listed:
        q = q + "\nChoices:\n" + "\n".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))
    return q


def direct_prompt(item: dict) -> str:
    """Ask for the answer only (how base LMMs answer)."""
    return f"{question_text(item)}\n{DIRECT_SUFFIX}"


def cot_prompt(item: dict) -> str:
    """Ask for step-by-step reasoning that ends in 'The answer is X.' (rollouts and evaluation)."""
    return f"{question_text(item)}\n{COT_SUFFIX}"


def hinted_prompt(item: dict) -> str:
    """The warm-up prompt: CoT instruction plus the ground-truth answer as a hint."""
    return f"{cot_prompt(item)}\n{HINT_TEMPLATE.format(answer=item['answer'])}"
