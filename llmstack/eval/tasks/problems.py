"""Generative problems for chat models, generated from a seed (the suite's default seed is held out).

* reasoning-gym: ``chain_sum`` (2-3 terms of 1-2 digits) and ``gsm_symbolic`` (grade-school word
  problems; the SFT mixture draws its own from small seeds), asked ``direct`` / ``cot`` (chain of
  thought) and, for our assistants, with the calculator (``tools``);
* ``bigger_decimal``: "Which is bigger, 9.11 or 9.9?": half the pairs have the bigger number written
  with fewer decimals, so comparing the digits after the point as integers is wrong half the time;
* ``multiply``, ``identity``, ``spelling``: ``eval/assistant.py``'s held-out problems for our own
  assistants (3x3-digit products with and without the calculator, questions about itself, letter
  counts with the Python tool); with the suite's default seed they are the same problems as
  ``llmstack eval`` without ``--tasks``.

Answers are compared as numbers (``Problem.correct``), not with reasoning-gym's string scorers, so that
"279.0" and "279" agree.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from llmstack.chat.mixture import IDENTITY_EVAL, ModelCard, arithmetic_question, reasoning_gym_entries, words_from
from llmstack.data.corpus import find_default_corpus, read_jsonl
from llmstack.eval.tasks.base import Examples, Kind, Mode, Problem


@dataclass
class ReasoningGymTask:
    name: str
    dataset: str
    config: dict[str, Any] = field(default_factory=dict)
    kind: Kind = "gen"
    modes: tuple[Mode, ...] = ("direct", "cot", "tools")
    ours_only: bool = False

    @property
    def about(self) -> str:
        return f"reasoning-gym {self.dataset}, generated from the seed"

    def examples(self, limit: int | None, seed: int) -> Examples[Problem]:
        ds = reasoning_gym_entries(self.dataset, limit or 100, seed, **self.config)
        return Examples([Problem(f"{self.dataset}/{i}", x["question"], str(x["answer"])) for i, x in enumerate(ds)])


@dataclass
class BiggerDecimal:
    name: str = "bigger_decimal"
    kind: Kind = "gen"
    modes: tuple[Mode, ...] = ("direct", "cot")
    ours_only: bool = False
    about: str = "which of two decimals is bigger (9.11 or 9.9), generated here"
    chance_level: float = 0.5  # naming either number at random

    def examples(self, limit: int | None, seed: int) -> Examples[Problem]:
        rng = random.Random(seed)
        out = []
        for i in range(limit or 100):
            # w.s against w.tu: the two-decimal one is bigger exactly when t >= s (u is never 0)
            whole, s = rng.randint(1, 20), rng.randint(1, 9)
            t = rng.randint(s, 9) if i % 2 == 0 else rng.randint(0, s - 1)
            pair = [f"{whole}.{s}", f"{whole}.{t}{rng.randint(1, 9)}"]
            rng.shuffle(pair)
            out.append(Problem(f"decimal/{i}", f"Which is bigger, {pair[0]} or {pair[1]}?", max(pair, key=float)))
        return Examples(out)


@dataclass
class AssistantTask:
    """``eval/assistant.py``'s problems; they need our chat format (and tools for ``tools``)."""

    name: str
    kind: Kind = "gen"
    modes: tuple[Mode, ...] = ("plain",)
    ours_only: bool = True

    @property
    def about(self) -> str:
        return f"eval/assistant.py {self.name}, held-out"

    def examples(self, limit: int | None, seed: int) -> Examples[Problem]:
        rng = random.Random(seed)
        if self.name == "multiply":
            qs = [arithmetic_question(rng, "*") for _ in range(limit or 100)]
            return Examples([Problem(f"multiply/{i}", q, str(a * b)) for i, (q, a, b) in enumerate(qs)])
        if self.name == "identity":
            card = ModelCard()
            items = [(q, card.name) for q in IDENTITY_EVAL["name"]] + [(q, card.maker) for q in IDENTITY_EVAL["maker"]]
            variants = [(v, key) for q, key in items for v in (q, q.lower(), q.rstrip("?.") + "?")]
            probs = [Problem(f"identity/{i}", q, key, "contains") for i, (q, key) in enumerate(variants)]
            return Examples(probs[:limit] if limit else probs)
        return self._spelling(rng, limit or 50)

    def _spelling(self, rng: random.Random, n: int) -> Examples[Problem]:
        try:
            texts = [d.text for d in read_jsonl(find_default_corpus())]
        except FileNotFoundError as e:
            return Examples([], note=f"needs the corpus's words: {e}")
        words = words_from(texts)[1000:2000]
        pairs = [(w, rng.choice(w)) for w in rng.sample(words, min(n, len(words)))]
        probs = [
            Problem(f"spelling/{i}", f"How many {c}'s are in {w}?", str(w.count(c))) for i, (w, c) in enumerate(pairs)
        ]
        return Examples(probs)


def problem_tasks() -> list[Any]:
    return [
        ReasoningGymTask("chain_sum", "chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)),
        ReasoningGymTask("gsm_symbolic", "gsm_symbolic"),
        BiggerDecimal(),
        AssistantTask("multiply", modes=("tools", "plain")),
        AssistantTask("identity"),
        AssistantTask("spelling", modes=("tools",)),
    ]
