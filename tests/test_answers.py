"""Answer extraction and checking: a table of realistic responses, gold errors, pathological inputs, timeouts."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from mstar_jax import answers
from mstar_jax.answers import GoldAnswerError, check_answer, extract_answer


def mc(answer, choices):
    return {"pid": "mc", "question_type": "multi_choice", "answer_type": "text", "choices": choices,
            "answer": answer, "precision": None, "unit": None}


def free(answer, atype="integer", precision=None, unit=None):
    return {"pid": "ff", "question_type": "free_form", "answer_type": atype, "choices": None, "answer": answer,
            "precision": precision, "unit": unit}


ABCD = ["3", "4", "5", "6"]
COLORS = ["red", "blue", "green", "orange"]
GEO = ["30°", "45°", "60°", "90°"]

CASES = [
    # --- multiple choice: letters with and without parentheses
    ("The answer is B.", mc("4", ABCD), True),
    ("The answer is (B).", mc("4", ABCD), True),
    ("The answer is (b)", mc("4", ABCD), True),
    ("Answer: C", mc("5", ABCD), True),
    ("Answer: (C) 5", mc("5", ABCD), True),
    ("The answer is C. 5", mc("5", ABCD), True),
    ("The answer is B.", mc("5", ABCD), False),
    ("The answer is (D)", mc("5", ABCD), False),
    ("So the correct option is B.\nThe answer is A.", mc("3", ABCD), True),
    ("The answer is A, not B.", mc("3", ABCD), True),  # MathVista: the first "(x)"-free reading -> nearest
    ("Option D", mc("6", ABCD), True),
    ("The answer is option b", mc("4", ABCD), True),
    ("The answer is c", mc("c", ["a", "c", "e"]), True),  # a lower-case "c" that is an option text, not C
    ("B", mc("4", ABCD), True),
    ("(A)", mc("3", ABCD), True),
    ("\\boxed{B}", mc("4", ABCD), True),
    ("The answer is $\\boxed{(C)}$.", mc("5", ABCD), True),
    # gold given as a letter (MMBench / M3CoT style)
    ("The answer is B", mc("B", ABCD), True),
    ("The answer is C", mc("B", ABCD), False),
    # --- option text instead of the letter
    ("The tallest bar is blue. The answer is blue.", mc("blue", COLORS), True),
    ("The answer is Blue", mc("blue", COLORS), True),
    ("The answer is green.", mc("blue", COLORS), False),
    ("The answer is 45°", mc("45°", GEO), True),
    ("The answer is 45 degrees", mc("45°", GEO), True),  # Levenshtein-nearest choice
    ("The answer is 60", mc("45°", GEO), False),
    ("The answer is bluish", mc("blue", COLORS), True),  # nearest by edit distance, as MathVista
    ("The answer is the green one", mc("green one", ["red", "blue", "green one", "orange"]), True),
    ("The answer is 5", mc("5", ABCD), True),  # the option text of C
    ("The answer is 6", mc("5", ABCD), False),
    # --- integers
    ("There are 7 circles. The answer is 7.", free("7"), True),
    ("The answer is 7", free("8"), False),
    ("The answer is: 12", free("12"), True),
    ("Answer: 12 apples", free("12"), True),
    ("The answer is 1,234.", free("1234"), True),
    ("The answer is 1234", free("1,234"), True),
    ("The answer is -3.", free("-3"), True),
    ("The answer is −3.", free("-3"), True),  # unicode minus
    ("The answer is 3", free("-3"), False),
    ("The answer is $12$.", free("12"), True),
    ("The answer is **12**.", free("12"), True),
    ("The answer is \\boxed{12}", free("12"), True),
    ("The answer is 12.0", free("12"), True),
    ("The answer is 12.7", free("12"), True),  # MathVista's int(float(x)) truncation, kept on purpose
    ("The answer is 13.2", free("12"), False),
    ("x = 5, so the answer is x = 5", free("5"), True),
    ("The answer is $5", free("5"), True),
    ("The answer is 70°", free("70"), True),
    ("The answer is 70^\\circ", free("70"), True),
    ("The answer is 2^{10}", free("1024"), True),  # via math-verify
    ("The answer is 2^{10}", free("1000"), False),
    ("The answer is 3 + 4", free("7"), True),  # an expression, evaluated by math-verify
    ("The answer is twelve", free("12"), False),
    # --- floats at precision 1 and 2
    ("The answer is 3.5.", free("3.5", "float", 1), True),
    ("The answer is 3.54", free("3.5", "float", 1), True),
    ("The answer is 3.45", free("3.5", "float", 1), True),  # Python round(3.45, 1) == 3.5, as in MathVista
    ("The answer is 3.44", free("3.5", "float", 1), False),
    ("The answer is 3.6", free("3.5", "float", 1), False),
    ("The answer is 1.23", free("1.23", "float", 2), True),
    ("The answer is 1.234", free("1.23", "float", 2), True),
    ("The answer is 1.2", free("1.23", "float", 2), False),
    ("The answer is 1.2", free("1.20", "float", 2), True),  # gold compared as a number
    ("The answer is -0.5", free("-0.5", "float", 1), True),
    ("The answer is 0.5", free("-0.5", "float", 1), False),
    ("The answer is .5", free("0.5", "float", 1), True),
    ("The answer is 4", free("4.0", "float", 1), True),
    # --- fractions vs decimals
    ("The answer is 1/2", free("0.5", "float", 1), True),
    ("The answer is \\frac{1}{2}", free("0.5", "float", 1), True),
    ("The answer is \\dfrac{3}{4}", free("0.75", "float", 2), True),
    ("The answer is 3/4", free("0.7", "float", 1), False),
    ("The answer is 0.75", free("3/4", "text"), True),
    ("The answer is \\frac{3}{4}", free("0.75", "text"), True),
    # --- percentages
    ("The answer is 45%", free("45"), True),
    ("The answer is 45\\%", free("45"), True),
    ("The answer is 45%", free("0.45", "float", 2), True),
    ("The answer is 45%", free("0.54", "float", 2), False),
    ("The answer is 12.5%", free("12.5", "float", 1), True),
    # --- units
    ("The answer is 12 cm", free("12", unit="cm"), True),
    ("The answer is 12 cm^2", free("12"), True),
    ("The answer is 3.5 m", free("3.5", "float", 1, unit="m"), True),
    ("The answer is \\text{12 cm}", free("12"), True),
    ("The answer is 12 \\text{cm}", free("12"), True),
    # --- lists
    ("The answer is [1, 2, 3]", free("[1, 2, 3]", "list"), True),
    ("The answer is [1,2,3].", free("[1, 2, 3]", "list"), True),
    ("The answer is 1, 2, 3", free("[1, 2, 3]", "list"), True),
    ("The answer is [1, 3, 2]", free("[1, 2, 3]", "list"), False),
    ("The answer is [1, 2]", free("[1, 2, 3]", "list"), False),
    ("The answer is [1.0, 2.5]", free("[1, 2.5]", "list"), True),
    ("The answer is (a, b)", free("[a, b]", "list"), True),
    # --- LaTeX / symbolic text answers
    ("The answer is $\\frac{\\sqrt{3}}{2}$", free("\\frac{\\sqrt{3}}{2}", "text"), True),
    ("The answer is \\sqrt{3}/2", free("\\frac{\\sqrt{3}}{2}", "text"), True),
    ("The answer is \\sqrt{2}", free("\\frac{\\sqrt{3}}{2}", "text"), False),
    ("The answer is \\sqrt{2}", free("1.41", "float", 2), True),
    ("The answer is 2\\pi", free("6.28", "float", 2), True),
    ("The answer is \\pi", free("3.14", "float", 2), True),
    ("The answer is yes", free("Yes", "text"), True),
    ("The answer is no.", free("yes", "text"), False),
    ("The answer is the cat", free("cat", "text"), True),
    # --- several answers in one response: the last one counts
    ("The answer is 3. Wait, recount. The answer is 4.", free("4"), True),
    ("The answer is 4. Wait, recount. The answer is 3.", free("4"), False),
    ("Answer: 4\n\\boxed{5}", free("5"), True),
    ("\\boxed{5} ... The answer is 4", free("4"), True),
    ("\\boxed{5} ... The answer is 4", free("5"), False),
    ("The answer is A.\nActually, the answer is (C).", mc("5", ABCD), True),
    # --- no answer
    ("", free("4"), False),
    ("I am not sure how to count these shapes, there are many of them in the picture.", free("4"), False),
    ("The answer is", free("4"), False),
    ("The answer is .", mc("4", ABCD), False),
    ("Let me think step by step about the bars in this chart and their values.", mc("4", ABCD), False),
    ("\\boxed{", free("4"), False),
]


@pytest.mark.parametrize("response,item,expected", CASES, ids=[f"{i:03d}" for i in range(len(CASES))])
def test_checker_table(response, item, expected):
    assert check_answer(response, item) is expected


def test_table_is_large_and_balanced():
    assert len(CASES) >= 80
    assert 0.3 < sum(e for *_, e in CASES) / len(CASES) < 0.8


@pytest.mark.parametrize("response,expected", [
    ("The answer is 5.", "5"),
    ("Step 1. 2 + 3 = 5.\nThe answer is 3.5.", "3.5"),
    ("The final answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("Answer: (B)", "(B)"),
    ("\\boxed{a{b}c}", "a{b}c"),
    ("The answer is **42**.", "42"),
    ("The answer is:\n7", "7"),
    ("no marker in this long response about shapes and bars", None),
    ("12 cm", "12 cm"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response, {}) == expected


@pytest.mark.parametrize("item", [
    free("abc"),  # integer gold that is not a number
    free("2.5"),  # integer gold that is not an integer
    free("", "float", 1),
    free(None),
    free("3", "complex"),  # unknown answer type
    mc("E", ABCD),  # letter outside the choices
    mc("7", ABCD),  # text that is not a choice
    mc("A", []),
])
def test_unparseable_gold_raises_not_passes(item):
    with pytest.raises(GoldAnswerError):
        check_answer("The answer is 3", item)


PATHOLOGICAL = {
    "huge_nested_latex": "The answer is " + "\\frac{" * 3000 + "1" + "}{2}" * 3000,
    "boxed_nested_latex": "\\boxed{" + "\\sqrt{" * 150 + "2" + "}" * 151,
    "long_100k": "The answer is 7. " + "blah " * 20000,
    "long_100k_no_marker": "x" * 100_000,
    "deep_parentheses": "The answer is " + "(" * 5000 + "1" + ")" * 5000,
    "short_deep_parentheses": "The answer is " + "(" * 90 + "1" + ")" * 90,
    "many_markers": "The answer is 1. " * 10000 + "The answer is 5.",
    "unclosed_boxed": "\\boxed{" * 20000,
    "power_tower": "The answer is " + "^".join(["9"] * 60),
    "factorial_tower": "The answer is ((((9!)!)!)!)",
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_inputs_finish_within_timeout(name):
    timeout = 2.0
    start = time.monotonic()
    for item in (free("5"), free("0.5", "float", 1), free("\\frac{1}{2}", "text"), mc("4", ABCD),
                 free("[1, 2]", "list")):
        check_answer(PATHOLOGICAL[name], item, timeout=timeout)
    # Five checks, each bounded by the timeout (plus a worker restart after an overrun).
    assert time.monotonic() - start < 5 * (timeout + 1.5)


def test_many_markers_last_counts():
    assert check_answer(PATHOLOGICAL["many_markers"], free("5"))
    assert not check_answer(PATHOLOGICAL["many_markers"], free("1"))


def test_overrun_kills_worker_and_next_call_recovers():
    v = answers._VERIFIER
    before = v.timeouts
    # A deadline no worker can meet: the call gives up, counts the timeout and kills the worker.
    assert v.call({"op": "value", "a": "$2^{10}$"}, timeout=1e-6) is None
    assert v.timeouts == before + 1
    assert check_answer("The answer is 2^{10}", free("1024"))


def test_symbolic_check_outside_main_thread():
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ok", check_answer("The answer is \\sqrt{2}",
                                                                           free("1.41", "float", 2))))
    t.start()
    t.join(30)
    assert out == {"ok": True}


def _check_in_worker(_):
    return (check_answer("The answer is 2^{10}", free("1024")),
            check_answer("The answer is " + "\\frac{" * 3000 + "1" + "}{2}" * 3000, free("5"), timeout=1.0))


def test_symbolic_check_in_daemonic_worker_process():
    # multiprocessing pool workers are daemonic and may not start multiprocessing children: the verifier uses
    # subprocess instead, so symbolic checks (and their deadline) still work there.
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.map(_check_in_worker, [0]) == [(True, False)]
