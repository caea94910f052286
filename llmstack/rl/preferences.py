"""Preference data: (prompt, chosen, rejected) pairs, from a gold judge with a rubric and from an LLM judge.

Where quality is measurable, a programmatic labeler plays the human of InstructGPT and follows the
written rubric in ``labeling.md``: our SFT model samples several replies to each arithmetic question
(``QUESTION_SETS``: the mixture's 3-digit ``*`` / ``+`` questions, or reasoning-gym's ``+ - *``
``basic_arithmetic_3d``; tools running) and ``gold_score`` grades each; two
replies whose grades differ by at least ``min_margin`` make a pair. Where it is not (open questions),
SmolLM2-135M-Instruct judges two sampled replies in both orders (``arena_battle.LLMJudge``); a verdict
that flips with the order is a tie and makes no pair.

A reply is stored as the text of the assistant turn, tool tokens written out by name
(``<|tool_call_start|>calculator: 12*34<|tool_call_end|><|tool_result_start|>408<|tool_result_end|>
The answer is 408.<|assistant_end|>``): readable, and parsed back into ``Part``s for training.
Files are JSONL, one pair a line: ``{"prompt", "chosen", "rejected", "source", ...}``.

BIG-bench ``hhh_alignment`` (human judgements of helpful, honest, harmless replies) becomes pairs
for evaluation only (``hhh_pairs``); nothing here trains on it.

What is not here: multi-turn prompts, ties as training signal, more than two replies ranked at once
(a ranking of k replies becomes pairs).
"""

from __future__ import annotations

import json
import operator
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmstack.chat.conversation import ChatFormat, Conversation, Part
from llmstack.chat.mixture import arithmetic_question
from llmstack.inference.engine import Engine, ToolUse
from llmstack.inference.sample import SamplingConfig
from llmstack.io import atomic_write
from llmstack.tokenizer import special as S

PREF_SEED = 51_515  # training prompts; disjoint from the SFT mixture (small seeds) and the evals (70_707, 90_210)
HELDOUT_SEED = 61_616  # held-out prompts: RM accuracy, DPO / RLHF gold scores

# ----------------------------------------------------------------------------- pairs and files


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    source: str = "gold"  # gold | llm | hhh_alignment
    scores: tuple[float, float] | None = None  # the labeler's grades of chosen and rejected, when it has them


def write_pairs(path: str | Path, pairs: Sequence[Pair]) -> None:
    with atomic_write(path) as f:
        for p in pairs:
            row: dict[str, Any] = {k: v for k, v in asdict(p).items() if v is not None}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_pairs(path: str | Path) -> list[Pair]:
    """JSONL of ``{"prompt", "chosen", "rejected"}`` (+ optional ``source``, ``scores``); errors name the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no preference file (make one with `llmstack preferences`)") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            out.append(_pair(f"{path}:{n}", line))
    if not out:
        raise ValueError(f"{path}: no preference pairs")
    return out


def _pair(where: str, line: str) -> Pair:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f'{where}: expected an object {{"prompt": ..., "chosen": ..., "rejected": ...}}')
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ValueError(f'{where}: "{key}" must be a non-empty string')
    if obj["chosen"] == obj["rejected"]:
        raise ValueError(f"{where}: chosen and rejected are the same reply")
    scores = obj.get("scores")
    if scores is not None and not (
        isinstance(scores, list) and len(scores) == 2 and all(isinstance(s, int | float) for s in scores)
    ):
        raise ValueError(f'{where}: "scores" must be two numbers')
    source = obj.get("source", "gold")
    if not isinstance(source, str):
        raise ValueError(f'{where}: "source" must be a string')
    return Pair(obj["prompt"], obj["chosen"], obj["rejected"], source, tuple(scores) if scores else None)


# ----------------------------------------------------------------------------- replies as parts and tokens
_TOOL = re.compile(
    re.escape(S.TOOL_CALL_START)
    + r"(.*?)"
    + re.escape(S.TOOL_CALL_END)
    + "|"
    + re.escape(S.TOOL_RESULT_START)
    + r"(.*?)"
    + re.escape(S.TOOL_RESULT_END),
    re.S,
)


@dataclass
class Reply:
    parts: list[Part]
    finished: bool  # the turn ended with <|assistant_end|> (not cut off by the token budget)

    @property
    def text(self) -> str:
        """What the user sees: the text parts."""
        return "".join(p.text for p in self.parts if p.kind == "text")


def parse_reply(text: str) -> Reply:
    """The stored text of an assistant turn -> its parts. Tool tokens without their partner stay text."""
    finished = text.endswith(S.ASSISTANT_END)
    body = text.removesuffix(S.ASSISTANT_END)
    parts: list[Part] = []
    pos = 0
    for m in _TOOL.finditer(body):
        if m.start() > pos:
            parts.append(Part("text", body[pos : m.start()]))
        parts.append(Part("tool_call", m[1]) if m[1] is not None else Part("tool_result", m[2]))
        pos = m.end()
    if pos < len(body):
        parts.append(Part("text", body[pos:]))
    return Reply(parts, finished)


def encode_reply(fmt: ChatFormat, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of the user's prompt and the assistant's reply; mask 1 on the tokens the model wrote
    (its text, tool calls and ``<|assistant_end|>``), 0 on the prompt and on tool results."""
    r = parse_reply(reply)
    prompt_ids = fmt.prompt(Conversation.of(("user", prompt)))
    ids = fmt.prompt(Conversation.of(("user", prompt), ("assistant", r.parts)))
    if r.finished:
        ids = [*ids, fmt.end["assistant"]]
    mask, in_result = [0] * len(prompt_ids), False
    for t in ids[len(prompt_ids) :]:
        in_result = in_result or t == fmt.result[0]
        mask.append(0 if in_result else 1)
        in_result = in_result and t != fmt.result[1]
    return ids, mask


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
        from llmstack.chat.mixture import REASONING_GYM_3D, reasoning_gym_entries, spread_seed

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


def pairs_questions(pairs: str | Path) -> str:
    """The question set a preference directory was sampled on (its ``summary.json``; ``mixture`` if none)."""
    try:
        summary = json.loads((Path(pairs) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "mixture"
    return str(summary.get("config", {}).get("questions", "mixture"))


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
    from llmstack.eval.arena_battle import final_number, readable_tools

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


# ----------------------------------------------------------------------------- pairs for the loop
class PairStream:
    """The data side of a pair task for the shared loop (``RewardTask``, ``DPOTask``): a shuffled walk
    over ``self.train`` that each epoch reshuffles, split across ranks, resumable from its cursor."""

    train: Sequence[Any]

    def _start(self, train_size: int, cfg: Any, dist: Any) -> None:
        if train_size < cfg.batch_size * dist.world_size:
            raise ValueError(f"{train_size} training pairs are fewer than one global batch ({cfg.batch_size})")
        self.batch_size, self.rank, self.world = cfg.batch_size, dist.rank, dist.world_size
        self.seed, self.device = cfg.seed, dist.device
        self.cursor = 0  # pairs consumed by all ranks together

    def _index(self, g: int) -> int:
        epoch, i = divmod(g, len(self.train))
        return int(np.random.default_rng([self.seed, epoch]).permutation(len(self.train))[i])

    def _next_indices(self) -> list[int]:
        first = self.cursor + self.rank * self.batch_size
        self.cursor += self.world * self.batch_size
        return [self._index(first + i) for i in range(self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "n_train": len(self.train)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_train") != len(self.train):
            raise ValueError(
                f"preference data changed since the checkpoint ({state.get('n_train')} vs {len(self.train)})"
            )
        self.cursor = int(state["cursor"])


# ----------------------------------------------------------------------------- sampling replies
def sample_replies(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    k: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    top_k: int | None = 50,
) -> list[list[str]]:
    """``k`` replies to each prompt (tools running), through the batched engine; ``temperature`` 0 is greedy."""
    rows = sample_tokens(model, tok, prompts, k, temperature, seed, max_new_tokens, batch_size, top_k)
    texts = [tok.decode([t for t in gen if t != tok.bos_id]) for _, gen, _ in rows]
    return [texts[j * k : (j + 1) * k] for j in range(len(prompts))]


def sample_tokens(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    k: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    top_k: int | None = None,
) -> list[tuple[list[int], list[int], list[bool]]]:
    """(prompt ids, generated ids, forced?) per reply, ``k`` per prompt in order: what RL trains on
    (the sampled tokens themselves; forced ones are the tool's results)."""
    from llmstack.tools.registry import default_toolbox

    fmt = ChatFormat(tok)
    engine = Engine(model, ToolUse.from_tokenizer(tok, default_toolbox().call))
    stop = {fmt.end["assistant"], fmt.bos}
    rows = [fmt.prompt(Conversation.of(("user", p))) for p in prompts for _ in range(k)]
    out: list[tuple[list[int], list[int], list[bool]]] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed + i)
        gen: list[list[int]] = [[] for _ in chunk]
        forced: list[list[bool]] = [[] for _ in chunk]
        for ev in engine.stream(chunk, cfg, stop):
            gen[ev.row].append(ev.token)
            forced[ev.row].append(ev.forced)
        out += [(p, g, f) for p, g, f in zip(chunk, gen, forced, strict=True)]
    return out


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
    from llmstack.tools.calculator import calculator

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
    from llmstack.tools.calculator import calculator

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


# ----------------------------------------------------------------------------- the LLM judge
def llm_pairs(
    prompts: Sequence[str], replies: Sequence[Sequence[str]], judge: Callable[..., tuple[str, str]]
) -> list[Pair]:
    """Consecutive replies of each prompt (0 vs 1, 2 vs 3, ...) judged by ``judge`` (an ``arena_battle``
    judge: problem, answer a, answer b -> (a | b | tie, note)); ties make no pair."""
    from llmstack.eval.arena_battle import Problem, readable_tools

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
    from llmstack.eval.arena_battle import LLMJudge
    from llmstack.interop.bundle import load_bundle

    bundle = load_bundle(spec)
    bundle.model.float().eval()
    return LLMJudge(bundle, spec)


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


# ----------------------------------------------------------------------------- BIG-bench hhh_alignment
def hhh_pairs(root: str | Path) -> list[Pair]:
    """BIG-bench ``hhh_alignment`` (root: ``data/eval/bigbench``): each question's preferred reply against
    each other one. Evaluation only: every file carries BIG-bench's canary."""
    from llmstack.eval.tasks.bigbench import FETCH_HINT

    folder = Path(root) / "hhh_alignment"
    files = sorted(folder.glob("**/task.json")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: {FETCH_HINT}")
    out = []
    for f in files:
        try:
            task = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: unreadable BIG-bench task ({e})") from None
        for ex in task.get("examples", []):
            scores = ex.get("target_scores")
            if not isinstance(ex.get("input"), str) or not isinstance(scores, dict) or len(scores) < 2:
                continue
            best = max(scores.values())
            good = [c for c, v in scores.items() if v == best]
            for c, v in scores.items():
                if v < best:
                    out += [Pair(ex["input"].strip(), g.strip(), c.strip(), "hhh_alignment") for g in good[:1]]
    return out


# ----------------------------------------------------------------------------- the stage
@dataclass
class PrefConfig:
    prompts: int = 1200  # training questions for the gold judge
    heldout_prompts: int = 200  # held-out questions: held-out pairs, and the gold score of DPO / RLHF
    samples: int = 8  # replies sampled per question
    temperature: float = 1.0  # a 99.6% policy errs rarely: 280 pairs from 9,600 replies at 1.0
    min_margin: float = 0.25  # the least gold difference that makes a pair
    per_prompt: int = 2  # pairs kept per question
    # training pairs of a right reply against itself with one copying error: they teach the RM to check
    # the operands, which it otherwise fails to (README: RLHF hacks that blind spot; DPO gains twice as much)
    perturbed: int = 2000
    open_prompts: int = 16  # open questions for the LLM judge (0: none)
    open_samples: int = 4  # replies per open question, judged in pairs
    max_new_tokens: int = 48
    # QUESTION_SETS: RL's + - * questions, where the main job's SFT model errs on a third of its samples
    # (1,009 pairs from 1,200 questions); on the mixture's products it errs on 2% (280 pairs)
    questions: str = "basic_arithmetic_3d"


def preset(name: str) -> PrefConfig:
    """``tiny``: ~3 min on 2 CPU cores; ``gpu``: more questions, twice the samples."""
    if name == "tiny":
        return PrefConfig()
    if name == "gpu":
        return PrefConfig(
            prompts=4000, heldout_prompts=500, samples=16, open_prompts=64, open_samples=8, perturbed=6000
        )
    raise ValueError(f"unknown preset {name!r}; choose tiny or gpu")


def load_policy(spec: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any, Any]:
    """An llmstack run (or checkpoint) -> (model, checkpoint, its tokenizer)."""
    from llmstack.tokenizer import Tokenizer
    from llmstack.training.checkpoint import load_model

    model, ckpt = load_model(spec, device)
    tok = Tokenizer.load(ckpt.path.parent.parent / "tokenizer")
    if ckpt.meta.get("tokenizer_fingerprint") != tok.fingerprint:
        raise ValueError(f"{ckpt.path} was trained with another tokenizer than {ckpt.path.parent.parent / 'tokenizer'}")
    return model, ckpt, tok


def run_preferences(
    model: torch.nn.Module,
    tok: Any,
    cfg: PrefConfig,
    out: str | Path,
    judge: Callable[..., tuple[str, str]] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Sample, label and write ``out/train.jsonl`` (gold + LLM-judged) and ``out/heldout.jsonl`` (gold,
    held-out questions); returns a summary."""
    import time

    from llmstack.eval.arena_battle import OPEN_PROMPTS
    from llmstack.io import write_json

    out = Path(out)
    model.eval()
    t0 = time.perf_counter()
    train_q = arithmetic_problems(cfg.prompts, PREF_SEED, cfg.questions)
    held_q = arithmetic_problems(cfg.heldout_prompts, HELDOUT_SEED, cfg.questions)
    kw = dict(k=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    train_r = sample_replies(model, tok, [p.prompt for p in train_q], seed=seed, **kw)  # type: ignore[arg-type]
    held_r = sample_replies(model, tok, [p.prompt for p in held_q], seed=seed + 7_919, **kw)  # type: ignore[arg-type]
    n_replies = cfg.samples * (len(train_q) + len(held_q))
    log(f"preferences: {n_replies} replies sampled in {time.perf_counter() - t0:.0f}s")
    train = gold_pairs(train_q, train_r, cfg.min_margin, cfg.per_prompt, seed)
    made = perturbed_pairs(train_q, train_r, cfg.perturbed, cfg.min_margin, seed)
    train += made
    held = gold_pairs(held_q, held_r, cfg.min_margin, cfg.per_prompt, seed)
    write_pairs(out / "train.jsonl", train)  # now, so that a slow or failing LLM judge loses nothing
    write_pairs(out / "heldout.jsonl", held)
    llm: list[Pair] = []
    if judge is not None and cfg.open_prompts:
        opens = [OPEN_PROMPTS[i % len(OPEN_PROMPTS)] for i in range(cfg.open_prompts)]
        open_r = sample_replies(model, tok, opens, cfg.open_samples, 1.0, seed, cfg.max_new_tokens)
        llm = llm_pairs(opens, open_r, judge)
        log(
            f"preferences: the LLM judge decided {len(llm)} of {cfg.open_prompts * (cfg.open_samples // 2)} comparisons"
        )
        write_pairs(out / "train.jsonl", train + llm)
    grades = [gold_score(p, r).score for p, g in zip(train_q, train_r, strict=True) for r in g]
    summary = {
        "train_pairs_gold": len(train) - len(made),
        "train_pairs_perturbed": len(made),
        "train_pairs_llm": len(llm),
        "heldout_pairs": len(held),
        "mean_gold_of_samples": sum(grades) / max(1, len(grades)),
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "summary.json", summary)
    log(
        f"preferences: {len(train) - len(made)} gold + {len(made)} perturbed + {len(llm)} LLM-judged training pairs, "
        f"{len(held)} held-out -> {out}"
    )
    return summary
