"""The judges that label preference pairs. The gold judge: arithmetic questions with a known answer
(``QUESTION_SETS``) and the written rubric of ``labeling.md`` (``gold_score``), which ranks a
question's sampled replies into pairs and scores a policy. The LLM judge: SmolLM2-135M-Instruct
comparing two replies to an open question in both orders (``arena_battle.LLMJudge``)."""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmstack.chat.mixture import REASONING_GYM_3D, arithmetic_question, reasoning_gym_entries, spread_seed
from llmstack.eval.arena_battle import LLMJudge, Problem, final_number, readable_tools
from llmstack.interop.load import load_model
from llmstack.rl.pairs import Pair, parse_reply
from llmstack.rl.policy_replies import sample_replies
from llmstack.tokenizer import special as S

PREF_SEED = 51_515  # training prompts; disjoint from the SFT mixture (small seeds) and the evals (70_707, 90_210)
HELDOUT_SEED = 61_616  # held-out prompts: RM accuracy, DPO / RLHF gold scores

# ----------------------------------------------------------------------------- the gold judge
_VALUE: dict[str, Callable[[int, int], int]] = {"*": operator.mul, "+": operator.add, "-": operator.sub}


@dataclass(frozen=True)
class ArithmeticProblem:
    prompt: str
    a: int
    b: int
    op: str  # "*", "+" or "-"

    @property
    def answer(self) -> int:
        return _VALUE[self.op](self.a, self.b)


# The questions the gold judge can grade: the SFT mixture's 3-digit products and sums (what the SFT
# model was taught, and answers right 97-99% of the time), or RL's reasoning-gym task, two numbers of
# up to 3 digits and one of + - * ("Calculate 505 - 663."), where it errs on a quarter of its samples
QUESTION_SETS = ("mixture", "basic_arithmetic_3d")
_EXPRESSION = re.compile(r"^(\d+) ([-+*]) (\d+)$")


def arithmetic_problems(n: int, seed: int, questions: str = "mixture") -> list[ArithmeticProblem]:
    """``n`` questions of the set ``questions`` (``QUESTION_SETS``), drawn with ``seed``."""
    if questions == "mixture":  # 3-digit operands, 80% products
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            op = "*" if rng.random() < 0.8 else "+"
            q, a, b = arithmetic_question(rng, op)
            out.append(ArithmeticProblem(q, a, b, op))
        return out
    if questions == "basic_arithmetic_3d":
        config = REASONING_GYM_3D["basic_arithmetic"]
        entries = reasoning_gym_entries("basic_arithmetic", n, spread_seed(seed), **config)  # seeds far apart
        out = []
        for e in entries:
            expression = e["metadata"]["expression"]
            if (m := _EXPRESSION.match(expression)) is None:
                raise ValueError(f"reasoning-gym basic_arithmetic: unexpected expression {expression!r}")
            out.append(ArithmeticProblem(e["question"], int(m[1]), int(m[3]), m[2]))
        return out
    raise ValueError(f"unknown question set {questions!r}; choose one of {', '.join(QUESTION_SETS)}")


# The rubric of labeling.md, in points. Best possible: 1.5.
CORRECT = 1.0  # the final number outside tool calls is the right answer
TOOL_OPERANDS = 0.25  # one calculator call of the question's operation: half a share per number copied right
FAITHFUL = 0.25  # the final number is what the calculator returned
BROKEN = -0.5  # cut off, a tool error, or no number at all
VERBOSE_PER_CHAR = 0.01  # per visible character beyond CONCISE_CHARS, at most MAX_VERBOSE
CONCISE_CHARS = 24  # "The answer is 123456." plus a little
MAX_VERBOSE = 0.25

_CALC_EXPR = re.compile(r"^\s*calculator:\s*(\d+)\s*([-*+x×])\s*(\d+)\s*$")


@dataclass
class Grade:
    score: float
    notes: list[str] = field(default_factory=list)


def gold_score(problem: ArithmeticProblem, reply: str) -> Grade:
    """Grade one reply by the rubric of ``labeling.md``; ``notes`` say which rules applied."""
    r = parse_reply(reply)
    g = Grade(0.0)
    got = final_number(readable_tools(reply.removesuffix(S.ASSISTANT_END)))
    calls = [p.text for p in r.parts if p.kind == "tool_call"]
    results = [p.text.strip() for p in r.parts if p.kind == "tool_result"]
    if got is not None and got == str(problem.answer):
        g.score += CORRECT
        g.notes.append("correct")
    if len(calls) == 1 and (m := _CALC_EXPR.match(calls[0])) and ("*" if m[2] in "*x×" else m[2]) == problem.op:
        left = [problem.a, problem.b]
        for i, x in enumerate((int(m[1]), int(m[3]))):  # the question's numbers, in either order but for "-"
            if x in left and (problem.op != "-" or x == (problem.a, problem.b)[i]):
                left.remove(x)
                g.score += TOOL_OPERANDS / 2
                g.notes.append(f"tool operand {x}")
    if got is not None and results and got == results[-1]:
        g.score += FAITHFUL
        g.notes.append("faithful to the tool")
    if not r.finished or got is None or any(x.startswith("error") for x in results):
        g.score += BROKEN
        g.notes.append("broken")
    extra = max(0, len(r.text.strip()) - CONCISE_CHARS)
    if extra:
        g.score -= min(MAX_VERBOSE, VERBOSE_PER_CHAR * extra)
        g.notes.append(f"{extra} characters too long")
    return g


def gold_pairs(
    problems: Sequence[ArithmeticProblem],
    replies: Sequence[Sequence[str]],
    min_margin: float = 0.25,
    per_prompt: int = 2,
    seed: int = 0,
) -> list[Pair]:
    """Rank each prompt's replies by ``gold_score``; pairs whose grades differ by ``min_margin`` or more,
    at most ``per_prompt`` of them (the best against the worst first)."""
    rng = random.Random(seed)
    out: list[Pair] = []
    for problem, group in zip(problems, replies, strict=True):
        graded = sorted({(gold_score(problem, r).score, r) for r in group}, reverse=True)
        candidates = [(a, b) for i, a in enumerate(graded) for b in graded[i + 1 :] if a[0] - b[0] >= min_margin]
        if not candidates:
            continue
        best_worst = (graded[0], graded[-1])  # the widest margin: a pair whenever any pair qualifies
        rest = [c for c in candidates if c != best_worst]
        picked = [best_worst, *rng.sample(rest, min(len(rest), per_prompt - 1))]
        for (sa, a), (sb, b) in picked:
            out.append(Pair(problem.prompt, a, b, "gold", (sa, sb)))
    return out


# ----------------------------------------------------------------------------- scoring a policy
@dataclass
class PolicyScore:
    gold: float  # mean gold_score
    correct: float  # fraction with the right final number
    reward: float | None = None  # mean reward-model score, when one was given
    examples: list[str] = field(default_factory=list)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        d = {f"{prefix}gold": self.gold, f"{prefix}correct": self.correct}
        if self.reward is not None:
            d[f"{prefix}rm"] = self.reward
        return d


def score_policy(
    model: torch.nn.Module,
    tok: Any,
    problems: Sequence[ArithmeticProblem],
    temperature: float = 0.0,
    seed: int = HELDOUT_SEED,
    reward: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None,
    max_new_tokens: int = 48,
    samples: int = 1,
) -> PolicyScore:
    """``samples`` replies per problem (one, greedy, by default): mean gold score, accuracy, and the
    reward model's mean, over all replies."""
    if samples < 1 or (samples > 1 and temperature == 0):
        raise ValueError(f"samples must be 1, or more when sampling at a temperature above 0 (got {samples})")
    problems = [p for p in problems for _ in range(samples)]
    prompts = [p.prompt for p in problems]
    replies = [g[0] for g in sample_replies(model, tok, prompts, 1, temperature, seed, max_new_tokens)]
    graded = [gold_score(p, r) for p, r in zip(problems, replies, strict=True)]
    grades = [g.score for g in graded]
    correct = ["correct" in g.notes for g in graded]
    rm = None
    if reward is not None:
        scores = reward(prompts, replies)
        rm = sum(scores) / len(scores)
    n = max(1, len(problems))
    examples = [f"{p.prompt!r} -> {r!r}" for p, r in list(zip(problems, replies, strict=True))[:3]]
    return PolicyScore(sum(grades) / n, sum(correct) / n, rm, examples)


# ----------------------------------------------------------------------------- the LLM judge
def llm_pairs(
    prompts: Sequence[str], replies: Sequence[Sequence[str]], judge: Callable[..., tuple[str, str]]
) -> list[Pair]:
    """Consecutive replies of each prompt (0 vs 1, 2 vs 3, ...) judged by ``judge`` (an ``arena_battle``
    judge: problem, answer a, answer b -> (a | b | tie, note)); ties make no pair."""
    out = []
    for prompt, group in zip(prompts, replies, strict=True):
        for a, b in zip(group[0::2], group[1::2], strict=False):
            if a == b:
                continue
            seen_a, seen_b = (readable_tools(x.removesuffix(S.ASSISTANT_END)).strip() for x in (a, b))
            winner, _ = judge(Problem(prompt), seen_a, seen_b)
            if winner in ("a", "b"):
                chosen, rejected = (a, b) if winner == "a" else (b, a)
                out.append(Pair(prompt, chosen, rejected, "llm"))
    return out


def load_llm_judge(spec: str = "smollm2") -> Callable[..., tuple[str, str]]:
    bundle = load_model(spec)
    bundle.model.float().eval()
    return LLMJudge(bundle, spec)
