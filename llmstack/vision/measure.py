"""Held-out accuracy of a VLM, with and without the image, each with a Wilson 95% interval.

Three conditions ask the same held-out questions (``data.make_examples(split="test")``):

    image   the image at its placeholders (what the model is for)
    blank   a uniform grey image instead: the same prompt with nothing to see
    none    no placeholders at all: the question as text only

An answer is right when it equals the reference after lower-casing and stripping spaces and a final
full stop. Questions (colour, shape, count, chart, digit) and captions are reported apart; "all questions"
pools the five question kinds. The image is used when the ``image`` interval lies above both baselines'.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmstack.eval.suite import wilson
from llmstack.io import pyplot, save_png
from llmstack.vision.data import QUESTIONS, Example
from llmstack.vision.images import blank_like
from llmstack.vision.vlm import LoadedVLM, generate

Condition = Literal["image", "blank", "none"]
CONDITIONS: tuple[Condition, ...] = ("image", "blank", "none")
ALL = "all questions"


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def answers(vlm: LoadedVLM, examples: Sequence[Example], condition: Condition, batch_size: int = 64) -> list[str]:
    """Greedy answers to ``examples`` under ``condition``."""
    out: list[str] = []
    vlm.model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [vlm.chat.question(e.question, with_image=condition != "none") for e in chunk]
        images: torch.Tensor | None = torch.stack([e.image for e in chunk])
        if condition == "blank":
            images = blank_like(images)  # type: ignore[arg-type]
        elif condition == "none":
            images = None
        longest = max(len(normalise(e.answer)) for e in chunk)
        ids = generate(vlm.model, prompts, images, longest + 8, vlm.stop_ids)
        out += [vlm.tok.decode(row) for row in ids]
    return out


@dataclass(frozen=True)
class Score:
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.n)

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{self.accuracy:6.1%} [{lo:.0%}, {hi:.0%}] of {self.n}"


def measure(vlm: LoadedVLM, examples: Sequence[Example], conditions: Sequence[Condition] = CONDITIONS) -> dict:
    """{condition: {kind: Score}} over ``examples``, plus ``ALL`` (the question kinds pooled)."""
    results: dict[str, dict[str, Score]] = {}
    for condition in conditions:
        got = answers(vlm, examples, condition)
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for e, a in zip(examples, got, strict=True):
            right = int(normalise(a) == normalise(e.answer))
            for key in (e.kind, ALL) if e.kind in QUESTIONS else (e.kind,):
                counts[key][0] += right
                counts[key][1] += 1
        results[condition] = {k: Score(c, n) for k, (c, n) in counts.items()}
    return results


def image_is_used(results: dict[str, dict[str, Score]], kind: str = ALL) -> bool:
    """The ``image`` interval lies wholly above each baseline's (non-overlapping Wilson 95% intervals)."""
    lo = results["image"][kind].interval[0]
    return all(results[c][kind].interval[1] < lo for c in results if c != "image")


def sample_figure(vlm: LoadedVLM, examples: Sequence[Example], path: Path, per_kind: int = 2) -> Path:
    """A grid of held-out images, each with its question, the reference, and the answers with the image and
    with a blank one (green: right, red: wrong)."""
    picked = [e for kind in QUESTIONS for e in [x for x in examples if x.kind == kind][:per_kind]]
    with_image, blank = answers(vlm, picked, "image"), answers(vlm, picked, "blank")
    plt = pyplot()
    cols = len(QUESTIONS)
    fig, axes = plt.subplots(per_kind, cols, figsize=(2.2 * cols, 3.0 * per_kind), squeeze=False)
    for ax, e, a, b in zip(axes.T.flatten(), picked, with_image, blank, strict=False):
        ax.imshow(((e.image.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(e.question, fontsize=7)
        for y, (label, text) in enumerate((("image", a), ("blank", b))):
            ok = normalise(text) == normalise(e.answer)
            ax.text(0, -0.08 - 0.1 * y, f"{label}: {text.strip()[:18]}", transform=ax.transAxes, fontsize=7,
                    color="green" if ok else "red", va="top")  # fmt: skip
        ax.text(0, -0.28, f"reference: {e.answer}", transform=ax.transAxes, fontsize=7, va="top")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.14, wspace=0.15, hspace=0.7)
    return save_png(fig, path, dpi=90)


def table(results: dict[str, dict[str, Score]]) -> str:
    conditions = list(results)
    kinds = [*QUESTIONS, ALL, "caption"]
    lines = [f"{'kind':<14}" + "".join(f"{c:>30}" for c in conditions)]
    for kind in kinds:
        if kind in results[conditions[0]]:
            lines.append(f"{kind:<14}" + "".join(f"{results[c][kind]!s:>30}" for c in conditions))
    return "\n".join(lines)


def as_json(results: dict[str, dict[str, Score]]) -> dict[str, Any]:
    return {
        c: {
            k: {"correct": s.correct, "n": s.n, "accuracy": s.accuracy, "interval": list(s.interval)}
            for k, s in r.items()
        }
        for c, r in results.items()
    }
