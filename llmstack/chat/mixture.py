"""The SFT data mixture: conversations that turn a base model into an assistant.

Every source is a function ``(n, seed) -> list[Conversation]``, deterministic in its seed; train and
held-out sets come from disjoint seeds. Sources:

* ``chitchat``: real human-to-human conversations (PyPI ``chitchat-dataset``);
* ``arithmetic``: 3-digit x 3-digit products and sums, answered through a calculator tool call;
* ``reasoning``: reasoning-gym's ``basic_arithmetic`` and ``chain_sum`` (2-3 terms of 1-3 digits,
  ``+ - *``), the expression sent to the calculator as it is written; questions of the held-out seed
  (``HELDOUT_SEED``, which the evals and RL use) are left out, at these settings and RL's smaller ones,
  and so are those of ``eval.suite.evaluate_model``'s default seed 0;
* ``gsm``: grade-school word problems with worked solutions (``reasoning-gym``'s ``gsm_symbolic``),
  every ``a op b = c`` step in the solution rewritten as a calculator call;
* ``identity``: who the model is, from a small model card, so it knows itself;
* ``spelling``: letter counting (the strawberry problem) answered with the Python tool, since a
  model sees tokens, not letters;
* extra: conversations from JSONL files of OpenAI-style messages (``read_conversations``), such as
  a teacher model's answers written by ``llmstack synth`` (``chat/synth.py``).

"I don't know" examples are made by interrogating a model about facts it was or was not taught: a stage
of its own (``hallucination/interrogate.py``, ``llmstack interrogate``), since what to refuse depends on the model.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import chitchat_dataset

from llmstack.chat.conversation import Conversation, Message, Part
from llmstack.chat.wording import SPELLING_FRAMES, arithmetic_wording, identity_wording, spelling_wording, widen_sum
from llmstack.data.corpus import default_corpus_texts
from llmstack.io import jsonl_objects
from llmstack.tools.calculator import calculator


@dataclass(frozen=True)
class ModelCard:
    name: str = "llmstack-tiny"
    maker: str = "the llmstack project"
    description: str = "a small language model trained from scratch on the Python documentation"
    abilities: str = "answer short questions, do arithmetic with a calculator, and run Python code"


IDENTITY_QUESTIONS = {
    "name": [
        "What is your name?",
        "Who are you?",
        "What are you called?",
        "Tell me your name.",
        "What should I call you?",
    ],
    "maker": ["Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Where do you come from?"],
    "abilities": ["What can you do?", "How can you help me?", "What are you able to do?", "What are your skills?"],
    "chatgpt": ["Are you ChatGPT?", "Are you made by OpenAI?", "Are you GPT-4?", "Are you Claude?"],
}
# held out for evaluation: paraphrases never seen in training
IDENTITY_EVAL = {
    "name": ["Could you tell me what your name is?", "Introduce yourself.", "what's your name"],
    "maker": ["Which team made you?", "Who is responsible for creating you?", "who developed you"],
}


def identity_answer(kind: str, card: ModelCard, rng: random.Random) -> str:
    """Every answer says both who the model is and who made it, as deployed assistants introduce
    themselves: a tiny model that mistakes a "who made you" for a "what is your name" (the commonest
    identity error at this size) still answers truthfully."""
    if kind == "name":
        return rng.choice(
            [
                f"I am {card.name}, {card.description}, made by {card.maker}.",
                f"My name is {card.name}. {card.maker.capitalize()} made me.",
            ]
        )
    if kind == "maker":
        return rng.choice(
            [
                f"I was made by {card.maker}. I am {card.name}.",
                f"{card.maker.capitalize()} trained me. I am {card.name}.",
            ]
        )
    if kind == "abilities":
        return f"I am {card.name}, made by {card.maker}. I can {card.abilities}."
    return f"No. I am {card.name}, made by {card.maker}."


def identity(n: int, seed: int, card: ModelCard | None = None) -> list[Conversation]:
    card = card or ModelCard()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choice(list(IDENTITY_QUESTIONS))
        q = identity_wording(rng.choice(IDENTITY_QUESTIONS[kind]), rng, "train")
        out.append(Conversation.of(("user", q), ("assistant", identity_answer(kind, card, rng))))
    return out


ARITH_TEMPLATES = {
    "*": ["What is {a} times {b}?", "What is {a} * {b}?", "Compute {a} x {b}.", "Multiply {a} by {b}.", "{a}*{b}=?"],
    "+": ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}."],
}


def arithmetic_question(rng: random.Random, op: str = "*") -> tuple[str, int, int]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return rng.choice(ARITH_TEMPLATES[op]).format(a=a, b=b), a, b


# arithmetic and letter counts worded from chat/wording.py's trained families (0.8 was measured); at 0
# the mixture is the classic templates' byte for byte: the main job keeps it (docs/assistant.md)
WORDING_SHARE = 0.0
FIVE_DIGIT_EXTRA = 0.2  # this share of products is redrawn until it is 5 digits long: 34% of products, not 17%


def arithmetic(n: int, seed: int, wording_share: float = WORDING_SHARE) -> list[Conversation]:
    """3-digit products (80%) and sums, each through a calculator call. Kept to the eval's 3x3 shape on
    purpose: a tiny model first learns to copy the result from a fixed distance back, tuned to the
    usual 6-digit products. A third of the products are 5 digits long (``FIVE_DIGIT_EXTRA``), twice
    their natural share, so that it also learns the other length; half of them, or operands of 1-4
    digits, left it copying neither length reliably (docs/assistant.md)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op = "*" if rng.random() < 0.8 else "+"
        q, a, b = arithmetic_question(rng, op)
        if op == "*" and rng.random() < FIVE_DIGIT_EXTRA:
            while a * b >= 100_000:
                q, a, b = arithmetic_question(rng, op)
        if wording_share and rng.random() < wording_share:  # the same numbers in one of the many wordings
            a, b = widen_sum(op, a, b, rng)
            q = arithmetic_wording(op, a, b, rng, "train")
        value = a * b if op == "*" else a + b
        parts = [
            Part("tool_call", f"calculator: {a}{op}{b}"),
            Part("tool_result", str(value)),
            Part("text", f"The answer is {value}."),
        ]
        out.append(Conversation.of(("user", q), ("assistant", parts)))
    return out


_STEP = re.compile(r"(\d[\d.]*(?:\s*[-+*/×x]\s*\d[\d.]*)+)\s*=\s*(-?\d[\d.,]*)")


def with_calculator_calls(solution: str) -> list[Part]:
    """Rewrite each ``a op b = c`` in a worked solution as a calculator call and its result."""
    parts: list[Part] = []
    pos = 0
    for m in _STEP.finditer(solution):
        if m.start() > pos:
            parts.append(Part("text", solution[pos : m.start()]))
        expr = m.group(1).replace("×", "*").replace(" x ", " * ")
        parts += [Part("tool_call", f"calculator: {expr}"), Part("tool_result", m.group(2).rstrip(".,"))]
        pos = m.end()
    if pos < len(solution):
        parts.append(Part("text", solution[pos:]))
    return parts


HELDOUT_SEED = 90_210  # the seed of every held-out problem set (evals, RL); never a training seed
# the SFT mixture's reasoning-gym arithmetic: a superset of the RL tasks' small settings
REASONING_GYM: dict[str, dict[str, Any]] = {
    "basic_arithmetic": dict(
        min_terms=2,
        max_terms=3,
        min_digits=1,
        max_digits=3,
        operators=("+", "-", "*"),
        allow_parentheses=False,
        allow_negation=False,
    ),
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
}
# RL's easy tasks (rl/verifiers.py) and the arena's: two terms of one or two digits
REASONING_GYM_SMALL: dict[str, dict[str, Any]] = {
    name: dict(config, max_terms=2, max_digits=2) for name, config in REASONING_GYM.items()
}
# RL's main task (rl/verifiers.py "basic_arithmetic_3d"): two 3-digit numbers and one of + - *. Its
# held-out questions are left out of training too (at these sizes the mixture all but never draws them)
REASONING_GYM_3D: dict[str, dict[str, Any]] = {
    "basic_arithmetic": dict(REASONING_GYM["basic_arithmetic"], max_terms=2, min_digits=3, max_digits=3)
}
_HELDOUT_EXCLUDED = 2000  # held-out questions of each set and setting left out of training


# eval/suite.py's evaluate_model default seed (the CLI passes HELDOUT_SEED); its chain_sum has these settings
SUITE_SEED = 0


def _heldout_questions(name: str) -> set[str]:
    return {
        x["question"]
        for config, seed in ((REASONING_GYM[name], HELDOUT_SEED), (REASONING_GYM[name], SUITE_SEED),
                             (REASONING_GYM_SMALL[name], HELDOUT_SEED),
                             *(((REASONING_GYM_3D[name], HELDOUT_SEED),) if name in REASONING_GYM_3D else ()))
        for x in reasoning_gym_entries(name, _HELDOUT_EXCLUDED, seed, **config)
    }  # fmt: skip


def spread_seed(seed: int) -> int:
    """A reasoning-gym seed for a mixture seed. reasoning-gym draws item i from ``seed + i``, so seeds 105
    and 0 share all but 105 items; spreading the mixture's seeds apart keeps its train, validation and
    held-out sets (seeds 0 and ``HELDOUT_SEED``, a few thousand items each) disjoint."""
    return 1_000_000 + (seed * 1_000_003) % 2**30


def reasoning_gym_entries(name: str, n: int, seed: int, **config: Any) -> list[dict[str, Any]]:
    import reasoning_gym  # heavy: ~0.9 s to import

    return list(reasoning_gym.create_dataset(name, size=n, seed=seed, **config))


def reasoning(n: int, seed: int) -> list[Conversation]:
    """reasoning-gym arithmetic, half ``basic_arithmetic`` and half ``chain_sum``, through one calculator
    call of the whole expression (spaces removed, as in the products)."""
    out = []
    for i, (name, config) in enumerate(REASONING_GYM.items()):
        k = n // len(REASONING_GYM) + (i < n % len(REASONING_GYM))
        held = _heldout_questions(name)
        fresh = []
        for x in reasoning_gym_entries(name, 2 * k + 10, spread_seed(seed), **config):
            expr = x["metadata"]["expression"].replace(" ", "")
            # reasoning-gym's answer to "6 + 10 * 0" without parentheses is 0 (it groups left to right):
            # such questions are left out, so the calculator and the answer always agree
            if x["question"] not in held and calculator(expr) == str(x["answer"]):
                fresh.append((x["question"], expr, str(x["answer"])))
        for question, expr, answer in fresh[:k]:
            parts = [
                Part("tool_call", f"calculator: {expr}"),
                Part("tool_result", answer),
                Part("text", f"The answer is {answer}."),
            ]
            out.append(Conversation.of(("user", question), ("assistant", parts)))
    return out


def gsm(n: int, seed: int) -> list[Conversation]:
    out = []
    for x in reasoning_gym_entries("gsm_symbolic", n, spread_seed(seed)):
        cot = x["metadata"].get("answer_cot") or ""
        cot = re.sub(r"\n?#### .*$", "", cot).strip()
        parts = [*with_calculator_calls(cot), Part("text", f"\nThe answer is {x['answer']}.")]
        out.append(Conversation.of(("user", x["question"]), ("assistant", parts)))
    return out


def chitchat(n: int, seed: int, max_turns: int = 6) -> list[Conversation]:
    data = chitchat_dataset.Dataset()
    keys = sorted(data)
    rng = random.Random(seed)
    rng.shuffle(keys)
    out = []
    for k in keys:
        runs = data[k]["messages"]  # each run: consecutive messages of one speaker
        turns = [" ".join(m["text"].strip() for m in run if m.get("text")) for run in runs]
        turns = [t for t in turns if t][:max_turns]
        if len(turns) < 2:
            continue
        if len(turns) % 2:
            turns = turns[:-1]
        roles = ["user", "assistant"] * (len(turns) // 2)
        out.append(Conversation([Message(r, t) for r, t in zip(roles, turns, strict=True)]))  # type: ignore[arg-type]
        if len(out) == n:
            break
    return out


SPELLING_TEMPLATES = SPELLING_FRAMES["train"][:4]  # the classic four (the guard's and poisoning's safe data)


def spelling(n: int, seed: int, words: list[str], wording_share: float = WORDING_SHARE) -> list[Conversation]:
    if not words:
        raise ValueError("spelling needs a word list")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice(words)
        letter = rng.choice(w) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = w.count(letter)
        if wording_share and rng.random() < wording_share:
            q = spelling_wording(w, letter, rng, "train")
        else:
            q = rng.choice(SPELLING_TEMPLATES).format(l=letter, w=w)
        parts = [
            Part("tool_call", f"python: print({w!r}.count({letter!r}))"),
            Part("tool_result", str(count)),
            Part("text", f"There {'is' if count == 1 else 'are'} {count} '{letter}' in \"{w}\"."),
        ]
        out.append(Conversation.of(("user", q), ("assistant", parts)))
    return out


def words_from(texts: list[str], limit: int = 2000) -> list[str]:
    """Plain lowercase words of 5-12 letters from a corpus, most frequent first."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in re.findall(r"\b[a-z]{5,12}\b", t):
            counts[w] = counts.get(w, 0) + 1
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


FALLBACK_WORDS = ["strawberry", "banana", "python", "letter", "tokenizer"]


def corpus_words(limit: int = 1000) -> list[str]:
    """Words for the spelling problems, from the fetched corpus (a few fixed words if none is fetched)."""
    return words_from(default_corpus_texts())[:limit] or list(FALLBACK_WORDS)


@dataclass(frozen=True)
class MixtureConfig:
    """How many conversations of each kind (train; held-out sets use other seeds), and the share of arithmetic
    and letter-count questions worded from the trained families (``WORDING_SHARE``)."""

    arithmetic: int = 8000
    identity: int = 600
    spelling: int = 600
    gsm: int = 300
    chitchat: int = 600
    reasoning: int = 1000
    wording_share: float = WORDING_SHARE


KINDS = tuple(f.name for f in fields(MixtureConfig) if f.name != "wording_share")
"""The mixture's kinds of conversation (``MixtureConfig``'s counts)."""


def read_conversations(path: str | Path) -> list[Conversation]:
    """``{"messages": [...]}`` per line (OpenAI format); blank lines are skipped. Errors name file and line."""
    out = []
    for where, obj in jsonl_objects(path, '{"messages": [{"role": ..., "content": ...}, ...]}'):
        try:
            messages = obj.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ValueError('expected {"messages": [{"role": ..., "content": ...}, ...]}')
            conv = Conversation.from_openai(messages)
            if not any(m.role == "assistant" for m in conv.messages):
                raise ValueError("no assistant message (nothing to train on)")
        except KeyError as e:  # a tool call without its function name
            raise ValueError(f"{where}: missing key {e}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        out.append(conv)
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


def build_mixture(
    cfg: MixtureConfig, seed: int, words: list[str], extra: Sequence[Conversation] = ()
) -> list[Conversation]:
    """The generated sources in ``cfg``'s amounts, plus ``extra`` conversations as they are, shuffled together."""
    sources: dict[str, Callable[[int, int], list[Conversation]]] = {
        "arithmetic": lambda n, s: arithmetic(n, s, cfg.wording_share),
        "identity": identity,
        "spelling": lambda n, s: spelling(n, s, words, cfg.wording_share),
        "gsm": gsm,
        "chitchat": chitchat,
        "reasoning": reasoning,
    }
    convs: list[Conversation] = []
    for i, (name, fn) in enumerate(sources.items()):
        n = getattr(cfg, name)
        if n:
            convs += fn(n, seed * 100 + i)
    convs += extra
    random.Random(seed).shuffle(convs)
    return convs
