"""A calculator tool: arithmetic parsed with ``ast`` and evaluated over an allow-list. Never ``eval``.

Allowed: int/float literals, + - * / // % **, unary +/-, parentheses, the names ``pi`` and ``e``,
and calls to a few math functions. Limits keep a hostile expression from eating the machine:
exponents, operand sizes and results are bounded, and so is the input length and nesting depth.
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
MAX_ABS = 10**100  # any intermediate result beyond this is refused
MAX_EXPONENT = 1000

FUNCTIONS: dict[str, Callable[..., float | int]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
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
Number = float | int
BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def _check(x: float | int) -> float | int:
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("the result is not a finite number")
    if abs(x) > MAX_ABS:
        raise CalculatorError("the result is too large")
    return x


def _power(a: float | int, b: float | int) -> float | int:
    if abs(b) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {b} is too large (limit {MAX_EXPONENT})")
    if a != 0 and abs(a) != 1 and abs(b) * math.log10(abs(a)) > 100:
        raise CalculatorError("the result is too large")
    return a**b


def _eval(node: ast.AST, depth: int) -> float | int:
    if depth > MAX_DEPTH:
        raise CalculatorError("the expression is nested too deeply")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return _check(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        a, b = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _check(_power(a, b))
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise CalculatorError("division by zero")
        return _check(BINARY[type(node.op)](a, b))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _check(UNARY[type(node.op)](_eval(node.operand, depth + 1)))
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        if node.keywords or len(node.args) > 2:
            raise CalculatorError(f"{node.func.id}() takes one or two plain arguments")
        args = [_eval(a, depth + 1) for a in node.args]
        try:
            return _check(FUNCTIONS[node.func.id](*args))
        except (ValueError, TypeError, OverflowError) as e:
            raise CalculatorError(f"{node.func.id}: {e}") from None
    what = type(node).__name__
    if isinstance(node, ast.Name):
        what = f"name {node.id!r}"
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        what = f"function {node.func.id!r}"
    raise CalculatorError(f"not allowed in a calculation: {what}")


def evaluate(expression: str) -> float | int:
    """The value of an arithmetic expression, or CalculatorError saying what is wrong."""
    if len(expression) > MAX_INPUT_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_INPUT_CHARS} characters")
    expression = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if not expression:
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"cannot parse {expression!r}: {e.msg}") from None
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
