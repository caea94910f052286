"""Generative evaluations of an assistant on held-out problems, run through the engine.

Every skill is asked twice: in the wordings it was trained on (``seen``), and in wordings held out
from training (``unseen``: ``chat/wording.py``'s held-out frame families, with surface variation and
sometimes inside a longer message). Held-out values in both.

* ``arithmetic``: 3-digit x 3-digit products and sums with the calculator, and products without it
  (the same model with tool calls left unanswered, so any number it gives is its own);
* ``identity``: questions about itself; correct when the answer names the model (name questions) or
  its maker (maker questions);
* ``spelling``: letter counts of words the spelling data never uses, with the Python tool.

Each returns accuracy with a 95% Wilson interval, and a few transcripts to read; ``wording_table``
puts seen and unseen side by side.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llmstack.chat.answer import our_chat
from llmstack.chat.mixture import HELDOUT_SEED, IDENTITY_QUESTIONS, ModelCard, arithmetic_question, words_from
from llmstack.chat.paraphrase import TeacherFrames, default_path
from llmstack.chat.wording import (
    IDENTITY_HELDOUT,
    arithmetic_wording,
    identity_wording,
    number,
    spelling_wording,
    teacher_wording,
    widen_sum,
)
from llmstack.data.corpus import default_corpus_texts
from llmstack.interop.load import load_model
from llmstack.io import write_json
from llmstack.paths import runs_dir
from llmstack.tools.registry import default_toolbox

EVAL_SEED = HELDOUT_SEED  # disjoint from the training seeds (small integers)
Wording = Literal["seen", "unseen"]
UNSEEN = {"seen": "", "unseen": ", unseen wording"}  # name suffixes
TEACHER_EVERY = 3  # with teacher frames, every third unseen-wording question is asked in one of them


@dataclass
class EvalResult:
    name: str
    correct: int
    total: int
    examples: list[str] = field(default_factory=list)
    parts: dict[str, list[int]] = field(default_factory=dict)  # source of the wording -> [correct, total]

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


_TOOL_SPANS = re.compile(
    r"<\|tool_call_start\|>.*?(<\|tool_call_end\|>|$)|<\|tool_result_start\|>.*?(<\|tool_result_end\|>|$)"
    r"|<tool_call>.*?(</tool_call>|$)|<tool_response>.*?(</tool_response>|$)",  # ours, and a template model's
    re.S,
)


def _final_number(text: str) -> int | None:
    """The last number the reply says outside its tool calls and results."""
    visible = _TOOL_SPANS.sub(" ", text)
    nums = re.findall(r"-?\d+", visible.replace(",", ""))
    return int(nums[-1]) if nums else None


def _score(
    name: str,
    answers: list[str],
    ok: Callable[[int, str], bool],
    questions: list[str],
    sources: list[str] | None = None,
) -> EvalResult:
    """Accuracy over ``answers``; with ``sources`` (where each question's wording came from), per source too,
    and the first example of each source among the transcripts kept."""
    res = EvalResult(name, 0, len(answers))
    for i, a in enumerate(answers):
        good = ok(i, a)
        res.correct += good
        src = sources[i] if sources else ""
        if sources:
            c, t = res.parts.get(src, [0, 0])
            res.parts[src] = [c + good, t + 1]
        if len(res.examples) < 3 or (sources and res.parts[src][1] == 1):
            res.examples.append(f"{'✓' if good else '✗'} {questions[i]!r} -> {a!r}")
    return res


def _teacher_turn(i: int, frames: list[str]) -> bool:
    return bool(frames) and i % TEACHER_EVERY == TEACHER_EVERY - 1


def eval_arithmetic(
    model,
    tok,
    n: int = 500,
    tools: bool = True,
    wording: Wording = "seen",
    op: str = "*",
    teacher: TeacherFrames | None = None,
) -> EvalResult:
    """3-digit products (or sums) asked in the trained templates (``seen``) or in held-out wordings: the
    held-out frame families, and with ``teacher`` every third question in a teacher-written frame."""
    rng = random.Random(EVAL_SEED + (wording == "unseen"))
    frames = teacher.frames.get(op, []) if teacher else []
    sources = []
    if wording == "seen":
        qs = [arithmetic_question(rng, op) for _ in range(n)]
    else:
        qs = []
        for i in range(n):
            a, b = widen_sum(op, rng.randint(100, 999), rng.randint(100, 999), rng)
            if _teacher_turn(i, frames):
                values = (number(a, rng), number(b, rng))
                qs.append((teacher_wording(op, rng.choice(frames), values, rng), a, b))
                sources.append("teacher")
            else:
                qs.append((arithmetic_wording(op, a, b, rng, "heldout"), a, b))
                sources.append("held-out frames")
    box = default_toolbox().call if tools else None
    answers = our_chat(model, tok, box).answer_questions([q for q, _, _ in qs], 40)
    name = ("multiply 3x3 " if op == "*" else "add ") + ("(calculator)" if tools else "(no tools)")
    value = [a * b if op == "*" else a + b for _, a, b in qs]
    ok = lambda i, a: _final_number(a) == value[i]  # noqa: E731
    return _score(name + UNSEEN[wording], answers, ok, [q for q, _, _ in qs], sources if frames else None)


def eval_identity(
    model, tok, card: ModelCard | None = None, wording: Wording = "unseen", teacher: TeacherFrames | None = None
) -> EvalResult:
    """Questions about itself: paraphrases never trained on (``unseen``, the default, in three spellings
    and in held-out wordings, and each teacher-written one twice), or the trained questions (``seen``);
    correct when the answer names the model (name questions) or its maker (maker questions)."""
    card = card or ModelCard()
    key = {"name": card.name, "maker": card.maker}
    sources: list[str] = []
    if wording == "seen":
        variants = [(q, key[k]) for k in key for q in IDENTITY_QUESTIONS[k]]
    else:
        rng = random.Random(EVAL_SEED)
        items = [(q, key[k]) for k in key for q in IDENTITY_HELDOUT[k]]
        variants = [(v, k) for q, k in items for v in (q, q.lower(), q.rstrip("?.") + "?")]
        variants += [(identity_wording(q, rng, "heldout"), k) for q, k in items for _ in range(3)]
        sources = ["held-out frames"] * len(variants)
        for k in key:
            for frame in teacher.frames.get(k, []) if teacher else []:
                variants += [(frame, key[k]), (teacher_wording(k, frame, (), rng), key[k])]
                sources += ["teacher"] * 2
    answers = our_chat(model, tok).answer_questions([q for q, _ in variants], 40)
    return _score(
        "identity" + UNSEEN[wording],
        answers,
        lambda i, a: variants[i][1].lower() in a.lower(),
        [q for q, _ in variants],
        sources if "teacher" in sources else None,
    )


def eval_spelling(
    model, tok, words: list[str], n: int = 50, wording: Wording = "seen", teacher: TeacherFrames | None = None
) -> EvalResult:
    """Letter counts with the Python tool, of words the spelling data never uses; unseen wording: held-out
    frames, and with ``teacher`` every third question in a teacher-written frame."""
    rng = random.Random(EVAL_SEED + (wording == "unseen"))
    pairs = [(w, rng.choice(w)) for w in rng.sample(words, min(n, len(words)))]
    frames = teacher.frames.get("letters", []) if teacher else []
    sources = []
    if wording == "seen":
        qs = [f"How many {ltr}'s are in {w}?" for w, ltr in pairs]
    else:
        qs = []
        for i, (w, ltr) in enumerate(pairs):
            if _teacher_turn(i, frames):
                qs.append(teacher_wording("letters", rng.choice(frames), (w, ltr), rng))
                sources.append("teacher")
            else:
                qs.append(spelling_wording(w, ltr, rng, "heldout"))
                sources.append("held-out frames")
    answers = our_chat(model, tok, default_toolbox().call).answer_questions(qs, 60)
    ok = lambda i, a: _final_number(a) == pairs[i][0].count(pairs[i][1])  # noqa: E731
    return _score("letter count (python)" + UNSEEN[wording], answers, ok, qs, sources if frames else None)


def heldout_words(corpus_texts: list[str]) -> list[str]:
    """The letter-count eval's words: the corpus's 1,001st to 2,000th most frequent (``words_from``), which
    the spelling data (``corpus_words``: the first 1,000) never uses."""
    return words_from(corpus_texts)[1000:2000]


def evaluate_assistant(
    model, tok, corpus_texts: list[str] | None = None, n: int = 500, teacher: TeacherFrames | None = None
) -> list[EvalResult]:
    """Each skill on seen and on unseen wordings (chat/wording.py; with ``teacher``, its frames among the
    unseen ones), and products without tools."""
    unseen = max(1, min(n, 300))
    results = [
        eval_arithmetic(model, tok, n, tools=True),
        eval_arithmetic(model, tok, unseen, tools=True, wording="unseen", teacher=teacher),
        eval_arithmetic(model, tok, max(1, n // 5), tools=True, op="+"),
        eval_arithmetic(model, tok, max(1, n // 5), tools=True, op="+", wording="unseen", teacher=teacher),
        eval_arithmetic(model, tok, max(1, n // 5), tools=False),
        eval_identity(model, tok, wording="seen"),
        eval_identity(model, tok, teacher=teacher),
    ]
    if corpus_texts:
        words = heldout_words(corpus_texts)
        results.append(eval_spelling(model, tok, words, n=min(n, 100)))
        results.append(eval_spelling(model, tok, words, n=min(n, 100), wording="unseen", teacher=teacher))
    return results


def wording_table(results: list[EvalResult]) -> list[str]:
    """Seen-wording and unseen-wording accuracy side by side, with 95% intervals, one skill a line."""
    by = {r.name: r for r in results}

    def cell(r: EvalResult | None) -> str:
        return f"{r.accuracy:6.1%} [{r.interval()[0]:.0%}, {r.interval()[1]:.0%}] of {r.total}" if r else "-"

    lines = [f"{'skill':<26} {'seen wording':>26}   {'unseen wording':>26}"]
    for r in results:
        if not r.name.endswith(UNSEEN["unseen"]):
            lines.append(f"{r.name:<26} {cell(r):>26}   {cell(by.get(r.name + UNSEEN['unseen'])):>26}")
    taught = [(r.name.split(" (")[0].split(",")[0], *r.parts["teacher"]) for r in results if "teacher" in r.parts]
    if taught:
        lines.append("unseen wording includes teacher-written frames (chat/paraphrase.py); on those alone: " +
                     ", ".join(f"{name} {c}/{t}" for name, c, t in taught))  # fmt: skip
    return lines


def load_teacher_frames(path: Path | None = None) -> TeacherFrames | None:
    """The teacher frames at ``path`` (default ``data/paraphrases/teacher.json``, if `llmstack paraphrase`
    wrote it; ``None`` when it did not)."""
    if path is None and not default_path().exists():
        return None
    return TeacherFrames.load(path or default_path())


def run_assistant_eval(
    source: str | Path,
    n: int = 500,
    out: Path | None = None,
    teacher: Path | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[list[EvalResult], Path]:
    """The assistant's held-out problems (tools, identity, spelling) for any model (our run, an HF folder, a
    .gguf, ``smollm2``: a template model's tool calls run as Hermes calls) -> results, written to ``out`` as
    JSON (default: eval.json in the model's run; for a model that is no run, ``runs/eval/<name>-
    assistant.json``). Unseen wordings include the teacher frames at ``teacher`` (default:
    ``data/paraphrases/teacher.json`` when it exists). Identity asks for ``ModelCard``'s name and maker:
    a model not trained on them scores 0 there. ``dtype`` casts the weights (bf16: a SmolLM2 answers 1.7x
    faster on a CPU with fast bf16); ``None`` keeps them as stored."""
    bundle = load_model(source, dtype=dtype)
    bundle.model.eval()
    model, tok = bundle.model, bundle.tokenizer
    results = evaluate_assistant(model, tok, default_corpus_texts(), n=n, teacher=load_teacher_frames(teacher))
    if out is None:
        ckpt = bundle.checkpoint
        out = (
            ckpt.path.parent.parent / "eval.json"
            if ckpt
            else runs_dir() / "eval" / f"{Path(str(source)).name}-assistant.json"
        )
    fields = ("accuracy", "correct", "total", "parts")
    write_json(out, {r.name: {**{f: getattr(r, f) for f in fields}, "interval": r.interval(), "examples": r.examples}
                     for r in results})  # fmt: skip
    return results, out
