"""A calculator tool: arithmetic parsed with ``ast`` and evaluated over an allow-list. Never ``eval``.

Allowed: int/float literals, + - * / // % **, unary +/-, parentheses, the names ``pi`` and ``e``,
and calls to a few math functions. Every failure is a result, ``error: ...``, never an exception.
Limits keep a hostile expression from eating the machine: the input's length and nesting depth,
every intermediate result (at most 10**100 in size), exponents and ``round``'s digits are bounded,
so each expression costs microseconds. Results are real numbers: a negative number to a fractional
power (``(-8)**0.5``, also ``(-8)**(1/3)``: ``1/3`` is a float, not a third) is an error, never a
complex number; results too small for a float (``1e-200 * 1e-200``) are 0, as in float arithmetic.
What is not covered: variables, comparisons, strings, attribute access, comprehensions: they are
rejected with an error that names the construct.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_INPUT_CHARS = 200
MAX_DEPTH = 30
MAX_LOG10 = 100
MAX_ABS = 10**MAX_LOG10  # any intermediate result beyond this is refused
MAX_EXPONENT = 1000
MAX_NDIGITS = 100  # round(x, n): |n| at most this (beyond it the answer is 0 or x itself)

Number = float | int


class CalculatorError(ValueError):
    pass


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int):
        raise CalculatorError("round: the number of digits must be a whole number")
    if abs(ndigits) > MAX_NDIGITS:
        raise CalculatorError(f"round: at most {MAX_NDIGITS} digits either side of the point")
    return round(x, ndigits)


def _power(a: Number, b: Number) -> Number:
    if abs(b) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {b} is too large (limit {MAX_EXPONENT})")
    if a == 0:
        if b < 0:
            raise CalculatorError("division by zero (zero to a negative power)")
        return a**b
    if a < 0 and not float(b).is_integer():
        raise CalculatorError(f"({a})**{b}: a negative number to a fractional power (an odd root: -(x**(1/n)))")
    if b * math.log10(abs(a)) > MAX_LOG10:  # the result's order of magnitude, before computing it
        raise CalculatorError("the result is too large")
    return a**b


FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": _round,
    "floor": math.floor,
    "ceil": math.ceil,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
CONSTANTS = {"pi": math.pi, "e": math.e}
BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _check(x: Number) -> Number:
    if isinstance(x, float) and math.isnan(x):
        raise CalculatorError("the result is not a number")
    if abs(x) > MAX_ABS:  # inf included
        raise CalculatorError("the result is too large")
    return x


def _apply(name: str, fn: Callable[..., Number], *args: Number) -> Number:
    """``fn(*args)``, checked; Python's own errors (division by zero, math domain, overflow) as CalculatorError."""
    try:
        return _check(fn(*args))
    except (ArithmeticError, ValueError, TypeError) as e:
        if isinstance(e, CalculatorError):
            raise
        raise CalculatorError(f"{name}{e}") from None


def _eval(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalculatorError("the expression is nested too deeply")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return _check(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        a, b = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise CalculatorError("division by zero")
        return _apply("", BINARY[type(node.op)], a, b)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _apply("", UNARY[type(node.op)], _eval(node.operand, depth + 1))
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        if node.keywords or len(node.args) > 2:
            raise CalculatorError(f"{node.func.id}() takes one or two plain arguments")
        args = [_eval(a, depth + 1) for a in node.args]
        return _apply(f"{node.func.id}: ", FUNCTIONS[node.func.id], *args)
    raise CalculatorError(f"not allowed in a calculation: {_describe(node)}")


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"name {node.id!r}"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return f"function {node.func.id!r}"
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return f"operator {type(node.op).__name__}"
    if isinstance(node, ast.Constant):
        return f"Constant {node.value!r:.40}"
    return type(node).__name__


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression, or CalculatorError saying what is wrong."""
    if len(expression) > MAX_INPUT_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_INPUT_CHARS} characters")
    expression = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if not expression:
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: a NUL byte on 3.10
        raise CalculatorError(f"cannot parse {expression!r}: {getattr(e, 'msg', e)}") from None
    return _eval(tree, 0)


def format_number(x: float | int) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    if isinstance(x, float):
        return f"{x:.12g}"
    return str(x)


def calculator(expression: str) -> str:
    """The tool's entry point: a result string, or ``error: ...`` (the model sees either)."""
    try:
        return format_number(evaluate(expression))
    except CalculatorError as e:
        return f"error: {e}"
