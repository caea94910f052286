"""What every evaluation task is: a name, a kind, a chance baseline and examples drawn by (limit, seed).

Three kinds, each scored by the suite (``llmstack/eval/suite.py``) the same way for every task of it:

* ``mc``: multiple choice, scored by the log-likelihood of each choice given the context;
* ``gen``: a chat model answers a problem; ``Problem.correct`` checks the reply;
* ``bpb``: bits per byte on held-out text (lower is better; chance is 8, a uniform guess over bytes).

A task never raises on bad data: a malformed row is skipped and counted under a reason
(``Examples.skipped``), and a task whose data is missing loads nothing and says why.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

Kind = Literal["mc", "gen", "bpb"]
Mode = Literal["direct", "cot", "tools", "plain"]
"""How a generative problem is put to a chat model: ``direct`` asks for just the answer, ``cot`` to think
step by step first, ``tools`` asks it as is with our tools on, ``plain`` as is with no tools."""

T = TypeVar("T")


class BadRow(ValueError):
    """A row of a task file that cannot be an example; the message is the reason it is counted under."""


@dataclass(frozen=True)
class Question:
    """A multiple-choice question: the model scores ``context + continuation(choice)`` for each choice."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: tuple[int, ...]  # the correct choices (BIG-bench allows several)
    delimiter: str = " "  # put between the context and each choice (lm-eval's target_delimiter)

    def continuation(self, i: int) -> str:
        return self.delimiter + self.choices[i]


@dataclass(frozen=True)
class Problem:
    """A generative problem: ``answer`` is a number (compared as numbers) or, with ``match="contains"``,
    a text the reply must contain (case-insensitive)."""

    id: str
    question: str
    answer: str
    match: Literal["number", "contains"] = "number"

    def correct(self, reply: str) -> bool:
        if self.match == "contains":
            return self.answer.lower() in reply.lower()
        got = final_number(reply)
        return got is not None and abs(got - float(self.answer)) <= 1e-9 * max(1.0, abs(float(self.answer)))


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass
class Examples(Generic[T]):
    items: list[T]
    skipped: Counter[str] = field(default_factory=Counter)
    note: str | None = None  # why there are none (data not fetched, ...)


class Task(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> Kind: ...

    @property
    def about(self) -> str:
        """One line: what the task is and where its data comes from."""
        ...

    @property
    def modes(self) -> tuple[Mode, ...]:
        """Generative tasks: the ways their problems are put (a row each); () for the other kinds."""
        ...

    def examples(self, limit: int | None, seed: int) -> Examples[Any]:
        """Up to ``limit`` examples (all when None), drawn or generated with ``seed``."""
        ...


def chance(task: Task, items: Sequence[object]) -> float | None:
    """The score of guessing: accuracy of a uniform pick for ``mc``, 0 for ``gen``, 8 bits for ``bpb``."""
    if task.kind == "bpb":
        return 8.0
    if task.kind == "gen":
        return 0.0
    qs = [q for q in items if isinstance(q, Question)]
    return sum(len(q.gold) / len(q.choices) for q in qs) / len(qs) if qs else None


def check_question(q: Question) -> Question:
    """A question the scorer can use, or BadRow naming what is wrong with it."""
    if not q.context.strip():
        raise BadRow("empty context")
    if len(q.choices) < 2:
        raise BadRow("fewer than two choices")
    if any(not c.strip() for c in q.choices):
        raise BadRow("an empty choice")
    if len(set(q.choices)) != len(q.choices):
        raise BadRow("duplicate choices")
    if not q.gold:
        raise BadRow("no correct choice")
    if any(not 0 <= g < len(q.choices) for g in q.gold):
        raise BadRow("answer index out of range")
    if len(q.gold) == len(q.choices):
        raise BadRow("every choice is correct")
    return q


def parse_rows(rows: Iterable[T], parse: Callable[[int, T], Question]) -> Examples[Question]:
    """Parse raw rows into checked questions, counting the ones that fail under their reason."""
    out: Examples[Question] = Examples([])
    for i, row in enumerate(rows):
        try:
            out.items.append(check_question(parse(i, row)))
        except BadRow as e:
            out.skipped[str(e)] += 1
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            out.skipped[f"malformed row ({type(e).__name__})"] += 1
    return out


def subsample(found: Examples[T], limit: int | None, seed: int) -> Examples[T]:
    """At most ``limit`` items drawn with ``seed``, kept in file order (all of them when ``limit`` is None)."""
    if limit is None or len(found.items) <= limit:
        return found
    keep = sorted(random.Random(seed).sample(range(len(found.items)), limit))
    return Examples([found.items[i] for i in keep], found.skipped, found.note)


_TOOL_SPAN = re.compile(r"<\|tool_(call|result)_start\|>.*?(<\|tool_\1_end\|>|$)", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(reply: str) -> float | None:
    """The answer a reply gives: the first number after its last ``Answer:``, else its last number. Tool
    calls and results are not the model's answer and are left out."""
    visible = _TOOL_SPAN.sub(" ", reply).replace(",", "")
    if "Answer:" in visible:
        after = _NUMBER.findall(visible.rsplit("Answer:", 1)[1])
        if after:
            return float(after[0])
    nums = _NUMBER.findall(visible)
    return float(nums[-1]) if nums else None
