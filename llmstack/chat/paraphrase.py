"""Wordings written by a teacher model: frames no template author wrote, for the evaluation only.

The held-out frames in ``chat/wording.py`` were written by the same hand as the trained ones, so they
share its habits. Here a teacher model (SmolLM2-135M-Instruct by default) rewrites questions of each
skill; a rewrite that keeps the question's values and still asks the same thing becomes a frame, its
values replaced by fields (``{a}``, ``{b}`` for the operands, ``{w}`` and ``{l}`` for a word and a
letter), so that the evaluation asks it again with fresh values. These frames are never trained on.

    llmstack paraphrase                       # -> data/paraphrases/teacher.json (1-2 minutes on 2 cores)

A rewrite is dropped, and counted under its reason, when it is truncated, loses or changes a value,
adds a number, answers instead of asking (``"To solve this, multiply..."``), is a statement or more
than one sentence, asks about another operation, or repeats a frame already known (a trained,
held-out or earlier teacher frame). A 135M teacher writes few good questions: 18 of 160 survived with
the defaults (the command prints what it kept and the file counts what it dropped, by reason).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstack.chat.mixture import IDENTITY_QUESTIONS
from llmstack.chat.synth import SynthConfig, generate_replies
from llmstack.chat.wording import (
    ARITH_FRAMES,
    IDENTITY_HELDOUT,
    OP_FRAMES,
    PRODUCT_EXPRESSIONS,
    SPELLING_FRAMES,
    SUM_EXPRESSIONS,
)
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.bundle import Bundle
from llmstack.interop.load import load_model
from llmstack.io import write_json
from llmstack.paths import data_dir

SKILLS = ("*", "+", "letters", "name", "maker")

SYSTEM = (
    "You rewrite a question in other words, as a different person would ask it. Keep every number, word "
    "and letter it asks about exactly as written. Do not answer it. Reply with the rewritten question only."
)
# worked rewrites shown before each ask (few-shot turns); their own wordings are never kept as frames
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "*": [("What is 12 times 34?", "Could you tell me what you get from 12 multiplied by 34?")],
    "+": [("What is 12 plus 34?", "How much do 12 and 34 make together?")],
    "letters": [("How many a's are in banana?", "Count for me how often the letter a shows up in banana.")],
    "name": [("What is your name?", "What name do you go by?")],
    "maker": [("Who made you?", "Who was it that created you?")],
}
CUES = {
    "*": re.compile(r"multipl|times|product|\*|×|\d\s*x\s*\d", re.I),
    "+": re.compile(r"plus|sum|add|total|together|\+", re.I),
    "letters": re.compile(r"how many|count|number of|how often|times|occur|appear", re.I),
    # the question must still be about the model: "who did you train?" asks something else
    "name": re.compile(
        r"your name|what name|name (do|are|should|would|did|shall) (you|i)|call you|you called|who are you|"
        r"introduce yourself|talking to|chatting with",
        re.I,
    ),
    "maker": re.compile(
        r"(made|created?|built|developed|trained|designed|programmed)\s+you\b|your (creator|maker|developer|author)"
        r"|behind you|(made|created|built|developed|trained|designed|programmed) by",
        re.I,
    ),
}
OTHER = {"*": CUES["+"], "+": CUES["*"], "name": CUES["maker"], "maker": CUES["name"]}
REQUEST = re.compile(
    r"^(please|could|can|would|will|tell|give|find|compute|calculate|work|count|multiply|add|what|what's|how|who|"
    r"who's|which|do|does|is|are|may|i need|i'd|i want|let|help|show|solve|figure|determine|check|evaluate)\b",
    re.I,
)
ANSWERING = re.compile(r"^(to |the answer|sure|i am|i'm|my name|i was|yes|no\b|answer:|the (product|sum|result))", re.I)
WORDS = ["morning", "letter", "question", "strawberry", "keyboard", "different", "summer", "balloon"]


@dataclass
class TeacherFrames:
    """Frames a teacher wrote, by skill (``*``, ``+``, ``letters``, ``name``, ``maker``), and what was dropped."""

    frames: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    teacher: str = ""

    def summary(self) -> str:
        parts = []
        for s in SKILLS:
            lost = sum(self.dropped.get(s, {}).values())
            parts.append(f"{s} {len(self.frames.get(s, []))} of {len(self.frames.get(s, [])) + lost}")
        return "teacher frames kept: " + ", ".join(parts)

    def save(self, path: Path) -> Path:
        write_json(path, {"teacher": self.teacher, "frames": self.frames, "dropped": self.dropped})
        return path

    @classmethod
    def load(cls, path: Path) -> TeacherFrames:
        try:
            obj: Any = json.loads(path.read_text())
            frames = {k: [str(f) for f in v] for k, v in obj["frames"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a teacher frames file ({e}); write one with `llmstack paraphrase`") from None
        for skill, fs in frames.items():
            for f in fs:
                check_frame(skill, f, where=str(path))
        return cls(frames, obj.get("dropped", {}), str(obj.get("teacher", "")))


def default_path() -> Path:
    return data_dir() / "paraphrases" / "teacher.json"


FIELDS = {"*": ("{a}", "{b}"), "+": ("{a}", "{b}"), "letters": ("{w}", "{l}"), "name": (), "maker": ()}


def check_frame(skill: str, frame: str, where: str = "frame") -> None:
    """A frame must hold each of its skill's fields exactly once and no other braces."""
    if skill not in FIELDS:
        raise ValueError(f"{where}: unknown skill {skill!r}; expected one of {', '.join(SKILLS)}")
    want = FIELDS[skill]
    found = re.findall(r"\{[^{}]*\}", frame)
    if sorted(found) != sorted(want) or frame.count("{") != len(want) or frame.count("}") != len(want):
        raise ValueError(f"{where}: {skill} frame {frame!r} must hold {' and '.join(want) or 'no fields'} once each")


def _norm(text: str) -> str:
    return re.sub(r"[^a-z{}]+", " ", text.lower()).strip()


def known_frames(skill: str) -> set[str]:
    """Every frame written by hand for ``skill`` (trained and held out), normalised, with operators filled in."""
    if skill in ("*", "+"):
        exprs = PRODUCT_EXPRESSIONS if skill == "*" else SUM_EXPRESSIONS
        frames = [f.format(x=e) for split in ARITH_FRAMES.values() for f in split for e in exprs]
        frames += [f for split in OP_FRAMES[skill].values() for f in split]
    elif skill == "letters":
        frames = [f for split in SPELLING_FRAMES.values() for f in split]
    else:
        frames = IDENTITY_QUESTIONS[skill] + IDENTITY_HELDOUT[skill]
    return {_norm(f) for f in frames}


NUMBER = r"(?<!\d)(?<!\d,){}(?!\d|,\d)"  # a whole number: not part of 4120 or 1,412


def _one(text: str, value: str, pattern: str) -> bool:
    return len(re.findall(pattern.format(re.escape(value)), text)) == 1


def to_frame(skill: str, reply: str, values: tuple[str, ...]) -> tuple[str | None, str]:
    """``(frame, "")`` for a usable rewrite of a question asked with ``values``, else ``(None, reason)``."""
    text = reply.strip().splitlines()[0].strip().strip('"').strip() if reply.strip() else ""
    if not text:
        return None, "empty"
    if len(text.split()) > 30:
        return None, "too_long"
    if ANSWERING.match(text) or "=" in text:
        return None, "answers"
    if re.search(r"[.!?]\s+\S", text.rstrip(".!? ")):
        return None, "not_one_question"  # "This is a riddle. What does 3 * 4 mean?"
    asks = (
        text.endswith("?")
        if skill in ("name", "maker")
        else bool(REQUEST.match(text)) or (text.endswith("?") and text[:1].isdigit())
    )
    if not asks:
        return None, "not_a_question"  # a statement: "A simple way to convert 3 x 4!"
    if not CUES[skill].search(text) or (skill in OTHER and OTHER[skill].search(text)):
        return None, "other_question"
    if skill in ("*", "+"):
        a, b = values
        if not (_one(text, a, NUMBER) and _one(text, b, NUMBER)):
            return None, "values_changed"
        frame = re.sub(NUMBER.format(a), "{a}", text, count=1)
        frame = re.sub(NUMBER.format(b), "{b}", frame, count=1)
    elif skill == "letters":
        w, ltr = values
        if not _one(text, w, r"\b{}\b") or not _one(text, ltr, r"(?<![A-Za-z']){}(?=('s|s)?(?![A-Za-z]))"):
            return None, "values_changed"
        if re.search(r"\bbanana\b|\ba's\b", text):  # the worked example's own values
            return None, "values_changed"
        if re.search(r"\b(one|two|three|four|five|six|seven|eight|nine|ten|starts?|ends?|begins?)\b", text, re.I):
            return None, "other_question"  # "... there are five r's in ...", "... starts with r"
        frame = re.sub(rf"\b{w}\b", "{w}", text)
        frame = re.sub(rf"(?<![A-Za-z']){ltr}(?=('s|s)?(?![A-Za-z]))", "{l}", frame)
    else:
        if "llmstack" in text.lower() or not re.search(r"\byou", text, re.I) or re.search(r"\s(?!I\b)[A-Z]", text):
            return None, "other_question"  # "Your name is Simon?" suggests an answer
        frame = text
    if re.search(r"\d", frame):
        return None, "values_changed"
    if "{" in frame.replace("{a}", "").replace("{b}", "").replace("{w}", "").replace("{l}", ""):
        return None, "values_changed"
    return frame, ""


def _source(skill: str, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """A question to rewrite (from the trained frames) and the values it holds."""
    if skill in ("*", "+"):
        a, b = str(rng.randint(100, 999)), str(rng.randint(100, 999))
        expr = rng.choice(PRODUCT_EXPRESSIONS if skill == "*" else SUM_EXPRESSIONS).format(a=a, b=b)
        return rng.choice(ARITH_FRAMES["train"][:4]).format(x=expr), (a, b)
    if skill == "letters":
        w = rng.choice(WORDS)
        ltr = rng.choice(sorted(set(w) - {"a", "i"}))
        return rng.choice(SPELLING_FRAMES["train"][:3]).format(l=ltr, w=w), (w, ltr)
    return rng.choice(IDENTITY_QUESTIONS[skill]), ()


def ask(skill: str, question: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for q, r in EXAMPLES[skill]:
        messages += [{"role": "user", "content": f"Rewrite: {q}"}, {"role": "assistant", "content": r}]
    return [*messages, {"role": "user", "content": f"Rewrite: {question}"}]


def paraphrase(
    teacher: Bundle,
    asks: int = 32,
    seed: int = 0,
    batch_size: int = 48,
    on_done: Callable[[int], None] = lambda n: None,
    teacher_name: str = "",
) -> TeacherFrames:
    """``asks`` rewrites per skill, sampled (temperature 1, top-p 0.95, seeds ``seed + i``) -> frames."""
    rng = random.Random(seed)
    jobs = [(skill, *_source(skill, rng)) for skill in SKILLS for _ in range(asks)]
    cfg = SynthConfig(
        batch_size=batch_size, sampling=SamplingConfig(max_new_tokens=48, temperature=1.0, top_p=0.95, seed=seed)
    )
    replies = generate_replies(teacher, [ask(s, q) for s, q, _ in jobs], cfg, on_done)
    out = TeacherFrames(teacher=teacher_name)
    seen: dict[str, set[str]] = {s: known_frames(s) | {_norm(r) for _, r in EXAMPLES[s]} for s in SKILLS}
    dropped: dict[str, Counter[str]] = {s: Counter() for s in SKILLS}
    for (skill, _, values), (reply, finish) in zip(jobs, replies, strict=True):
        frame, why = (None, "truncated") if finish == "length" else to_frame(skill, reply, values)
        if frame is not None and _norm(frame) in seen[skill]:
            frame, why = None, "known"
        if frame is None:
            dropped[skill][why] += 1
            continue
        seen[skill].add(_norm(frame))
        out.frames.setdefault(skill, []).append(frame)
    out.dropped = {s: dict(c) for s, c in dropped.items() if c}
    return out


def write_teacher_frames(
    teacher: str = "smollm2",
    out: Path | None = None,
    asks: int = 32,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[TeacherFrames, Path]:
    """Load ``teacher`` (smollm2, an HF folder, a .gguf, a run), have it rewrite ``asks`` questions per skill,
    and write the frames it kept to ``out`` (default ``data/paraphrases/teacher.json``), atomically."""
    from tqdm import tqdm

    bundle = load_model(teacher, device)
    bundle.template()  # no chat template: fail before generating anything
    with tqdm(total=asks * len(SKILLS), desc="paraphrase", unit="ask", disable=not progress) as bar:
        frames = paraphrase(bundle, asks, seed, on_done=bar.update, teacher_name=teacher)
    if not any(frames.frames.values()):
        raise ValueError(f"{teacher}: the teacher kept no frame of {asks * len(SKILLS)} asked ({frames.dropped})")
    return frames, frames.save(out or default_path())
