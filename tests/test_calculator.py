"""The calculator on hostile input: every failure is an ``error: ...`` result, fast; results checked against
Python's own arithmetic (exact ints and Fractions, ``math``), never against the calculator's earlier output."""

from __future__ import annotations

import math
import operator
import random
import time
from fractions import Fraction

import pytest

from llmstack.tools.calculator import MAX_ABS, MAX_EXPONENT, MAX_INPUT_CHARS, MAX_LOG10, calculator, evaluate

HOSTILE = [
    "log(2,1)",  # log base 1: ZeroDivisionError inside math.log
    "0**-1",
    "0.0**-1",
    "(-8)**0.5",  # would be complex
    "(-8)**(1/3)",
    "(-1)**0.5",
    "round(1, -10**8)",  # ran for minutes
    "round(1.5, 10**9)",
    "round(1, 0.5)",
    "factorial(10**6)",
    "(" * 10_000,
    "(" * 150 + "1" + ")" * 150,
    "9" * 100_000,
    "-" * 100_000 + "1",
    "-" * 150 + "1",
    "1/0",
    "1//0",
    "1%0",
    "1.0/0.0",
    "sqrt(-1)",
    "log(0)",
    "log(-1)",
    "log(2, 0)",
    "exp(10**4)",
    "exp(1000)",
    "10.0**400",
    "1e400",
    "1e308*10",
    "1e200*1e200",
    "10**101",
    "2**1001",
    "9**9**9",
    "1<<10**9",
    "1>>1",
    "5&3",
    "~1",
    "not 1",
    "1 < 2",
    "1 if 1 else 2",
    "().__class__.__bases__",
    "(1).real",
    "__import__('os')",
    "open('/etc/passwd')",
    "nan",
    "inf",
    "x + 1",
    "True + 1",
    "lambda: 1",
    "[x for x in (1, 2)]",
    "{1: 2}",
    "'a' * 3",
    "b'a'",
    "1j",
    "f'{1}'",
    "sqrt(*[4])",
    "sqrt(x=4)",
    "round(1, 2, 3)",
    "ceil()",
    "floor(1e300)",
    "round(1e300)",
    "abs(-1e400)",
    "",
    "   ",
    "1 +",
    "٣ + 1",  # Arabic-Indic digit
    "１ + 1",  # full-width digit
    "1\x00",
    "sin(1e400)",
]


@pytest.mark.parametrize("expr", HOSTILE)
def test_every_failure_is_an_error_result_never_an_exception(expr: str) -> None:
    t0 = time.perf_counter()
    out = calculator(expr)
    assert out.startswith("error: "), out
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize(
    "expr, error",
    [
        ("log(2,1)", "division by zero"),
        ("0**-1", "division by zero"),
        ("(-8)**0.5", "negative number to a fractional power"),
        ("round(1, -10**8)", "at most 100 digits"),
        ("1<<10**9", "LShift"),
        ("9" * 100_000, f"longer than {MAX_INPUT_CHARS}"),
        ("-" * 150 + "1", "nested too deeply"),
        ("2**1001", f"limit {MAX_EXPONENT}"),
    ],
)
def test_errors_say_what_is_wrong(expr: str, error: str) -> None:
    assert error in calculator(expr)


def test_small_results_are_real_numbers_not_too_large() -> None:
    assert evaluate("2**-1000") == float(Fraction(1, 2**1000)) == math.ldexp(1.0, -1000)
    assert evaluate("2.0**-1000") == math.ldexp(1.0, -1000)
    assert evaluate("0.5**1000") == math.ldexp(1.0, -1000)
    assert float(calculator("2**-1000")) == pytest.approx(9.33263618503e-302, rel=1e-11)
    assert evaluate("10**-300") == 10.0**-300
    assert evaluate("2**-300 * 2**300") == 1.0 and evaluate("1e-200 * 1e-200") == 0.0  # below the smallest float: 0


def test_negative_bases_give_real_results_or_an_error() -> None:
    assert evaluate("(-2)**3") == -8 and evaluate("(-2)**-2") == Fraction(1, 4)
    assert evaluate("(-2.0)**2.0") == 4.0 and evaluate("-(8**(1/3))") == -(8 ** (1 / 3))
    assert calculator("(-8)**(1/3)").startswith("error: ")


def test_round_matches_python_within_its_bounds() -> None:
    for x, n in [(1.23456, 3), (123456, -2), (2.5, 0), (-7.5, 0), (1e-5, 7), (10**99 + 1, -99), (0.1, 100)]:
        assert evaluate(f"round({x!r}, {n})") == round(x, n)
    assert evaluate("round(2.5)") == round(2.5) == 2


def test_functions_match_math() -> None:
    assert evaluate("log(8, 2)") == math.log(8, 2) and evaluate("log10(1e-300)") == math.log10(1e-300)
    assert evaluate("sqrt(2)") == math.sqrt(2) and evaluate("exp(-745)") == math.exp(-745)
    assert evaluate("floor(-2.5) + ceil(2.5)") == math.floor(-2.5) + math.ceil(2.5)


# ------------------------------------------------------------------------------------- random expressions

ERROR = object()  # the calculator must refuse
UNCHECKED = object()  # a float result (a negative exponent): not compared exactly
ATOMS = (0, 1, 2, 3, 7, 10, 12, 99, 10**6, 10**50)
INT_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}


def int_expression(rng: random.Random, depth: int) -> tuple[str, object]:
    """A random integer expression and its value by Python int arithmetic, or ``ERROR`` where the
    calculator must refuse: division by zero, a result beyond 10**100, an exponent beyond its limit."""
    if depth == 0 or rng.random() < 0.25:
        n = rng.choice(ATOMS)
        return str(n), n
    if rng.random() < 0.15:
        text, v = int_expression(rng, depth - 1)
        return f"-({text})", -v if isinstance(v, int) else v
    op = rng.choice([*INT_OPS, "**"])
    (a, va), (b, vb) = int_expression(rng, depth - 1), int_expression(rng, depth - 1)
    text = f"({a}){op}({b})"
    if not isinstance(va, int) or not isinstance(vb, int):
        return text, ERROR if ERROR in (va, vb) else UNCHECKED
    if op in ("//", "%") and vb == 0 or op == "**" and (abs(vb) > MAX_EXPONENT or va == 0 and vb < 0):
        return text, ERROR
    if op == "**" and vb < 0:
        return text, UNCHECKED
    if op == "**" and abs(va) > 1 and vb * math.log10(abs(va)) > MAX_LOG10 + 1:  # too large: not computed
        return text, ERROR
    v = va**vb if op == "**" else INT_OPS[op](va, vb)
    return text, ERROR if abs(v) > MAX_ABS else v


def test_random_integer_expressions_match_python_exactly() -> None:
    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        text, value = int_expression(rng, 4)
        out = calculator(text)
        if value is ERROR or len(text) > MAX_INPUT_CHARS:
            assert out.startswith("error: "), (text, out)
        elif value is not UNCHECKED:
            assert out == str(value), (text, out, value)
            checked += 1
    assert checked > 1000


def hostile_expression(rng: random.Random, depth: int) -> str:
    """Anything the grammar of the calculator's input allows, and things it does not."""
    if depth == 0 or rng.random() < 0.2:
        return rng.choice(
            ["0", "1", "-1", "2.5", "1e-300", "1e300", "10**99", "pi", "e", "x", "True", "'s'", "1j", "0.0", "9" * 90]
        )
    kind = rng.random()
    a, b = hostile_expression(rng, depth - 1), hostile_expression(rng, depth - 1)
    if kind < 0.5:
        op = rng.choice(["+", "-", "*", "/", "//", "%", "**", "^", "<<", "&", "@", "<"])
        return f"({a}){op}({b})"
    if kind < 0.65:
        return rng.choice(["-", "+", "~", "not "]) + f"({a})"
    name = rng.choice(["sqrt", "abs", "round", "floor", "ceil", "log", "log10", "exp", "sin", "cos", "tan", "pow"])
    args = rng.choice([[], [a], [a, b], [a, b, a]])
    return f"{name}({', '.join(args)})"


def test_random_hostile_expressions_never_raise_and_return_fast() -> None:
    rng = random.Random(1)
    t0 = time.perf_counter()
    slowest = 0.0
    n_numbers = 0
    for _ in range(3000):
        text = hostile_expression(rng, 4)
        t = time.perf_counter()
        out = calculator(text)
        slowest = max(slowest, time.perf_counter() - t)
        if not out.startswith("error: "):
            x = float(out)  # a real number: never complex, nan or inf
            assert math.isfinite(x) and abs(x) <= MAX_ABS, (text, out)
            n_numbers += 1
    assert n_numbers > 100
    assert slowest < 0.2 and time.perf_counter() - t0 < 10
