"""Generative evaluations of an assistant on held-out problems, run through the engine.

* ``arithmetic``: 3-digit x 3-digit products, with the calculator and without (the same model with
  tool calls left unanswered, so any number it gives is its own);
* ``identity``: paraphrased questions about itself never seen in training; correct when the answer
  names the model (name questions) or its maker (maker questions);
* ``spelling``: letter counts, with the Python tool.

Each returns accuracy with a 95% Wilson interval, and a few transcripts to read.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmstack.chat.answer import our_chat
from llmstack.chat.mixture import HELDOUT_SEED, IDENTITY_EVAL, ModelCard, arithmetic_question, words_from
from llmstack.data.corpus import default_corpus_texts
from llmstack.interop.load import load_trainable
from llmstack.io import write_json
from llmstack.tools.registry import default_toolbox

EVAL_SEED = HELDOUT_SEED  # disjoint from the training seeds (small integers)


@dataclass
class EvalResult:
    name: str
    correct: int
    total: int
    examples: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval."""
        n, p = self.total, self.accuracy
        if n == 0:
            return 0.0, 1.0
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def line(self) -> str:
        lo, hi = self.interval()
        return f"{self.name:<24} {self.accuracy:6.1%}  [{lo:.1%}, {hi:.1%}]  ({self.correct}/{self.total})"


def _final_number(text: str) -> int | None:
    visible = re.sub(r"<\|tool_call_start\|>.*?(<\|tool_call_end\|>|$)", " ", text, flags=re.S)
    visible = re.sub(r"<\|tool_result_start\|>.*?(<\|tool_result_end\|>|$)", " ", visible, flags=re.S)
    nums = re.findall(r"-?\d+", visible.replace(",", ""))
    return int(nums[-1]) if nums else None


def _score(name: str, answers: list[str], ok: Callable[[int, str], bool], questions: list[str]) -> EvalResult:
    res = EvalResult(name, 0, len(answers))
    for i, a in enumerate(answers):
        good = ok(i, a)
        res.correct += good
        if len(res.examples) < 3:
            res.examples.append(f"{'✓' if good else '✗'} {questions[i]!r} -> {a!r}")
    return res


def eval_arithmetic(model, tok, n: int = 500, tools: bool = True) -> EvalResult:
    rng = random.Random(EVAL_SEED)
    qs = [arithmetic_question(rng, "*") for _ in range(n)]
    box = default_toolbox().call if tools else None
    answers = our_chat(model, tok, box).answer_questions([q for q, _, _ in qs], 40)
    name = "multiply 3x3 " + ("(calculator)" if tools else "(no tools)")
    return _score(name, answers, lambda i, a: _final_number(a) == qs[i][1] * qs[i][2], [q for q, _, _ in qs])


def eval_identity(model, tok, card: ModelCard | None = None) -> EvalResult:
    card = card or ModelCard()
    items = [(q, card.name) for q in IDENTITY_EVAL["name"]] + [(q, card.maker) for q in IDENTITY_EVAL["maker"]]
    variants = [(v, key) for q, key in items for v in (q, q.lower(), q.rstrip("?.") + "?")]
    answers = our_chat(model, tok).answer_questions([q for q, _ in variants], 40)
    return _score("identity", answers, lambda i, a: variants[i][1].lower() in a.lower(), [q for q, _ in variants])


def eval_spelling(model, tok, words: list[str], n: int = 50) -> EvalResult:
    rng = random.Random(EVAL_SEED)
    pairs = [(w, rng.choice(w)) for w in rng.sample(words, min(n, len(words)))]
    qs = [f"How many {ltr}'s are in {w}?" for w, ltr in pairs]
    answers = our_chat(model, tok, default_toolbox().call).answer_questions(qs, 60)
    return _score("letter count (python)", answers, lambda i, a: _final_number(a) == pairs[i][0].count(pairs[i][1]), qs)


def evaluate_assistant(model, tok, corpus_texts: list[str] | None = None, n: int = 500) -> list[EvalResult]:
    results = [
        eval_arithmetic(model, tok, n, tools=True),
        eval_arithmetic(model, tok, n, tools=False),
        eval_identity(model, tok),
    ]
    if corpus_texts:
        results.append(eval_spelling(model, tok, words_from(corpus_texts)[1000:2000], n=min(n, 50)))
    return results


def run_assistant_eval(source: str | Path, n: int = 500, out: Path | None = None) -> tuple[list[EvalResult], Path]:
    """Our assistant's held-out problems (tools, identity, spelling) -> results, written to ``out`` as JSON
    (default: eval.json in the model's run)."""
    model, tok, bundle = load_trainable(source)
    results = evaluate_assistant(model, tok, default_corpus_texts(), n=n)
    assert bundle.checkpoint is not None  # load_trainable opened one of our runs
    out = out or bundle.checkpoint.path.parent.parent / "eval.json"
    fields = ("accuracy", "correct", "total")
    write_json(out, {r.name: {**{f: getattr(r, f) for f in fields}, "interval": r.interval(), "examples": r.examples}
                     for r in results})  # fmt: skip
    return results, out
