"""Judging an answer about a fictional person (right, "I don't know", or wrong; naming a value it cannot
know), and the interrogation's held-out evaluation: four rates with Wilson 95% intervals, before and
after, as figures and one plot."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from llmstack.chat.answer import ChatModel
from llmstack.eval.assistant import EvalResult
from llmstack.hallucination.people import CITIES, PROFESSIONS, Question
from llmstack.io import pyplot, save_png

TARGET = 0.8  # the goal: >= 80% refusals on unknowns, >= 80% of known facts kept

# ----------------------------------------------------------------------------- the judge
_IDK = re.compile(r"\b(?:don't know|do not know|(?:no|any) information|not sure)\b", re.IGNORECASE)
_NAMES_VALUE = {
    "city": re.compile(r"\b(?:" + "|".join(CITIES) + r")\b", re.IGNORECASE),
    "profession": re.compile(r"\b(?:" + "|".join(PROFESSIONS) + r")\b", re.IGNORECASE),
    "year": re.compile(r"\b\d{4}\b"),
}
Verdict = Literal["right", "idk", "wrong"]


def says_idk(answer: str) -> bool:
    return bool(_IDK.search(answer))


def names_a_value(answer: str, attribute: str) -> bool:
    """A specific value of the attribute's kind (a city, a job, a year): a hallucination if the model cannot know."""
    return bool(_NAMES_VALUE[attribute].search(answer))


def hallucinates(q: Question, answer: str) -> bool:
    """Names a specific value without saying it does not know (asked about someone it cannot know)."""
    return not says_idk(answer) and names_a_value(answer, q.attribute)


def judge(answer: str, q: Question) -> Verdict:
    if says_idk(answer):
        return "idk"
    return "right" if re.search(rf"\b{re.escape(q.gold)}\b", answer, re.IGNORECASE) else "wrong"


# ----------------------------------------------------------------------------- eval
@dataclass
class Asker:
    """Short greedy answers from one model: what the interrogation and the evaluation ask with."""

    chat: ChatModel
    max_new_tokens: int

    def answer(self, questions: list[str], batch_size: int = 32) -> list[str]:
        return self.chat.answer_questions(questions, self.max_new_tokens, batch_size=batch_size)


def ask(asker: Asker, questions: list[str], batch_size: int, desc: str, progress: bool) -> list[str]:
    """Greedy answers through the batched engine, with a progress bar."""
    out: list[str] = []
    with tqdm(total=len(questions), desc=desc, unit="q", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(questions), batch_size):
            out += asker.answer(questions[i : i + batch_size], batch_size)
            bar.update(min(batch_size, len(questions) - i))
    return out


@dataclass
class Figures:
    """Held-out questions: about never-taught entities, and facts the stage-1 model answered right."""

    unknown_idk: EvalResult  # (a) says it does not know
    unknown_hallucinated: EvalResult  # names a specific value anyway
    known_right: EvalResult  # (b) still answered right
    known_idk: EvalResult  # says it does not know although it knew

    def results(self) -> dict[str, EvalResult]:
        return {k: getattr(self, k) for k in ("unknown_idk", "unknown_hallucinated", "known_right", "known_idk")}

    def to_json(self) -> dict[str, Any]:
        return {
            k: {
                "rate": r.accuracy,
                "count": r.correct,
                "total": r.total,
                "interval": r.interval(),
                "examples": r.examples,
            }
            for k, r in self.results().items()
        }


def _count(
    name: str, questions: list[Question], answers: list[str], hit: Callable[[Question, str], bool]
) -> EvalResult:
    res = EvalResult(name, 0, len(questions))
    for q, a in zip(questions, answers, strict=True):
        ok = hit(q, a)
        res.correct += ok
        if len(res.examples) < 3:
            res.examples.append(f"{'✓' if ok else '✗'} {q.text!r} -> {a!r} (source: {q.gold})")
    return res


def evaluate(asker: Asker, unknown: list[Question], known: list[Question], progress: bool = True) -> Figures:
    answers = ask(asker, [q.text for q in unknown + known], 64, "eval", progress)
    ua, ka = answers[: len(unknown)], answers[len(unknown) :]
    return Figures(
        _count("never taught: says I don't know", unknown, ua, lambda q, a: says_idk(a)),
        _count("never taught: names a value", unknown, ua, hallucinates),
        _count("knew it before: answers right", known, ka, lambda q, a: judge(a, q) == "right"),
        _count("knew it before: says I don't know", known, ka, lambda q, a: says_idk(a)),
    )


def plot_figures(before: Figures, after: Figures, path: Path, title: str) -> Path:
    """Before (stage 1) and after (stage 3) bars with their Wilson intervals, one PNG."""
    plt = pyplot()

    labels = [r.name.replace(": ", ":\n") for r in after.results().values()]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for j, (figs, name, color) in enumerate(
        ((before, "after stage 1 (knowledge)", "tab:gray"), (after, "after stage 3 (interrogation)", "tab:blue"))
    ):
        results = list(figs.results().values())
        rates = [100 * r.accuracy for r in results]
        lows, highs = zip(*(r.interval() for r in results), strict=True)
        err = [  # clamped: at 0% or 100% rounding can put the bound a hair past the rate
            [max(0.0, r - 100 * lo) for r, lo in zip(rates, lows, strict=True)],
            [max(0.0, 100 * hi - r) for r, hi in zip(rates, highs, strict=True)],
        ]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(results))]
        ax.bar(xs, rates, 0.38, yerr=err, capsize=3, color=color, label=name)
    ax.axhline(100 * TARGET, color="tab:red", lw=0.8, ls="--", label=f"target {TARGET:.0%}")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("% of held-out questions (95% interval)")
    ax.set_ylim(0, 122)  # room above the bars for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    save_png(fig, path)
    return path
