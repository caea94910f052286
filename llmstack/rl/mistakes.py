"""Replies with one known mistake: the policy's right replies with one wrong digit (``perturb``), which
make extra training pairs (``perturbed_pairs``), and replies built with each kind of mistake
(``built_mistakes``), which probe what a reward model can tell from the right reply (``mistake_probe``)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from llmstack.rl.judges import CORRECT, FAITHFUL, TOOL_OPERANDS, ArithmeticProblem, gold_score
from llmstack.rl.pairs import Pair
from llmstack.tokenizer import special as S
from llmstack.tools.calculator import calculator

_CALL_SPAN = re.compile(r"(calculator:\s*)(\d+)(\s*[-*+x×]\s*)(\d+)")
_RESULT_SPAN = re.compile(re.escape(S.TOOL_RESULT_START) + r"(.*?)" + re.escape(S.TOOL_RESULT_END), re.S)
_ANSWER_SPAN = re.compile(r"(-?\d+)([^\d-]*)$")


def _wrong_digit(number: str, rng: random.Random) -> str:
    i = rng.randrange(len(number))
    choices = [d for d in "0123456789" if d != number[i] and not (i == 0 and d == "0")]
    return number[:i] + rng.choice(choices) + number[i + 1 :]


def _dropped_digit(number: str, rng: random.Random) -> str:
    shorter = [number[:i] + number[i + 1 :] for i in range(len(number))]
    shorter = [x for x in shorter if x and not x.startswith("0")]  # one digit left out, no leading zero
    return rng.choice(shorter) if shorter else _wrong_digit(number, rng)


def perturb(problem: ArithmeticProblem, reply: str, rng: random.Random) -> str | None:
    """One of the policy's own mistakes, made on purpose in a right reply: an operand copied into the
    call with one wrong digit or one digit left out (the calculator's result and the answer follow
    it), or the calculator's result reported with one wrong digit. None when the reply has no call or
    no final number."""
    call, result = _CALL_SPAN.search(reply), _RESULT_SPAN.search(reply)
    answer = _ANSWER_SPAN.search(reply[result.end() :]) if result else None
    if not (call and result and answer):
        return None
    tail = reply[result.end() :]
    if rng.random() < 0.5:  # a copying error on the way in
        a, b = call[2], call[4]
        miscopy = _dropped_digit if rng.random() < 0.5 else _wrong_digit
        a, b = (miscopy(a, rng), b) if rng.random() < 0.5 else (a, miscopy(b, rng))
        value = calculator(f"{a}{problem.op}{b}")
        head = reply[: call.start()] + call[1] + a + call[3] + b + reply[call.end() : result.start(1)]
        return head + value + reply[result.end(1) : result.end()] + tail.replace(answer[1], value)
    sign, digits = ("-", answer[1][1:]) if answer[1].startswith("-") else ("", answer[1])
    wrong = sign + _wrong_digit(digits, rng)  # a copying error on the way out
    return reply[: result.end()] + tail[: answer.start(1)] + wrong + tail[answer.end(1) :]


def tool_reply(a: int | str, op: str, b: int | str, answer: str | None = None) -> str:
    """The reply the SFT mixture teaches: one calculator call, its result, "The answer is <result>."
    (``answer``, when given, is reported instead of the result)."""
    value = calculator(f"{a}{op}{b}")
    return (
        f"{S.TOOL_CALL_START}calculator: {a}{op}{b}{S.TOOL_CALL_END}{S.TOOL_RESULT_START}{value}"
        f"{S.TOOL_RESULT_END}The answer is {value if answer is None else answer}.{S.ASSISTANT_END}"
    )


MISTAKES = ("operand digit left out", "operand digit changed", "wrong operation", "result miscopied", "sign dropped")


def built_mistakes(problem: ArithmeticProblem) -> dict[str, str]:
    """Replies to ``problem`` with one known mistake each (``MISTAKES``; the second operand is the one
    miscopied, and "sign dropped" exists only for negative answers): a probe of what a reward model
    can tell from the right reply (``tool_reply(problem.a, problem.op, problem.b)``)."""
    a, op, b, value = problem.a, problem.op, str(problem.b), str(problem.answer)
    out = {
        "operand digit changed": tool_reply(a, op, b[:-1] + str((int(b[-1]) + 3) % 10)),
        "wrong operation": tool_reply(a, "*" if op != "*" else "+", b),
        "result miscopied": tool_reply(a, op, b, value[:-1] + str((int(value[-1]) + 3) % 10)),
    }
    if len(b) > 1:
        out["operand digit left out"] = tool_reply(a, op, b[:-1])
    if value.startswith("-"):
        out["sign dropped"] = tool_reply(a, op, b, value[1:])
    return {k: out[k] for k in MISTAKES if k in out}


def mistake_probe(
    reward: Callable[[Sequence[str], Sequence[str]], list[float]], problems: Sequence[ArithmeticProblem]
) -> dict[str, float]:
    """For each kind of ``built_mistakes``: how often ``reward`` scores the wrong reply above the right
    one (0 is perfect, 0.5 is a coin). Held-out accuracy counts the mistakes the policy happened to
    make; this counts the ones it could learn to make, which is where RLHF pushes it."""
    if not problems:
        return {}
    right = reward([p.prompt for p in problems], [tool_reply(p.a, p.op, p.b) for p in problems])
    wrong = [(i, kind, bad) for i, p in enumerate(problems) for kind, bad in built_mistakes(p).items()]
    scores = reward([problems[i].prompt for i, _, _ in wrong], [bad for _, _, bad in wrong])
    wins: dict[str, list[bool]] = {}
    for (i, kind, _), score in zip(wrong, scores, strict=True):
        wins.setdefault(kind, []).append(score > right[i])
    return {k: sum(v) / len(v) for k, v in wins.items()}


def perturbed_pairs(
    problems: Sequence[ArithmeticProblem],
    replies: Sequence[Sequence[str]],
    n: int,
    min_margin: float = 0.25,
    seed: int = 0,
) -> list[Pair]:
    """``n`` pairs of a right reply of the policy's against the same reply with one wrong digit
    (``perturb``), both graded by ``gold_score``: more of the mistakes the policy makes too rarely for
    its samples to show them often (training data only; held-out pairs stay the policy's own)."""
    rng = random.Random(seed)
    best = CORRECT + TOOL_OPERANDS + FAITHFUL
    right = [
        (p, r) for p, group in zip(problems, replies, strict=True) for r in sorted(set(group))
        if gold_score(p, r).score >= best - 1e-9
    ]  # fmt: skip
    out: list[Pair] = []
    for _ in range(n * 3 if right else 0):
        problem, good = rng.choice(right)
        bad = perturb(problem, good, rng)
        if bad is None or bad == good:
            continue
        sa, sb = gold_score(problem, good).score, gold_score(problem, bad).score
        if sa - sb >= min_margin:
            out.append(Pair(problem.prompt, good, bad, "gold", (sa, sb)))
        if len(out) == n:
            break
    return out
