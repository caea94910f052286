"""Synthetic SFT conversations: a teacher model answers seed questions, bad answers are dropped.

    llmstack synth --out data/synth/smollm2.jsonl                 # SmolLM2-135M-Instruct answers the seeds
    llmstack sft --extra-conversations data/synth/smollm2.jsonl   # mixed into the SFT data

The questions (``prompts/synth_topics.txt``) and the teacher's system prompt (``prompts/synth_system.txt``)
are data in the repo. Each question is rendered with the teacher's own chat template and answered in
batches through the engine; conversation ``i`` samples with seed ``seed + i``, so the same settings
give the same file. A reply is dropped, and counted under its reason, when it is ``truncated`` (the
token budget ran out before the end-of-turn token), ``empty``, ``too_short`` or ``repetitive`` (the
Gopher repetition rules of ``data/filters.py``, without its top-n-gram rules, which misfire on a
few sentences). Kept ones are written atomically as JSONL in the OpenAI message format, user then
assistant: the system prompt steers the teacher and is not part of the data.

What is not here: multi-turn conversations, a judge model grading the answers, deduplication
against the evaluation sets, and any check that the teacher is right. The teacher's licence and
mistakes travel into the student.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmstack.chat.answer import ChatModel
from llmstack.data.filters import GopherRepetition
from llmstack.inference.engine import Engine, Request
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.bundle import Bundle
from llmstack.io import atomic_write, read_text

PROMPTS = Path(__file__).with_name("prompts")
TOPICS = PROMPTS / "synth_topics.txt"
SYSTEM = PROMPTS / "synth_system.txt"

_repetition = GopherRepetition(top_n_grams=())


def read_lines(path: str | Path) -> list[str]:
    """Non-blank lines that do not start with ``#``, stripped."""
    lines = [s.strip() for s in read_text(path).splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no lines (blank lines and # comments are skipped)")
    return lines


@dataclass(frozen=True)
class SynthConfig:
    n: int | None = None  # conversations to generate (default: one per question; more cycle through them)
    batch_size: int = 8
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.9, seed=0)
    min_words: int = 4  # shorter replies are dropped as "too_short"


def verdict(reply: str, finish: str | None, min_words: int = 4) -> str | None:
    """``None`` to keep a reply, else why it is dropped."""
    if finish == "length":
        return "truncated"
    text = reply.strip()
    if not text:
        return "empty"
    if len(text.split()) < min_words:
        return "too_short"
    if _repetition(text) is not None:
        return "repetitive"
    return None


@dataclass
class SynthResult:
    conversations: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        total = len(self.conversations) + sum(self.dropped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in self.dropped.most_common()) or "none"
        return f"kept {len(self.conversations)} of {total}; dropped: {reasons}"


def generate_replies(
    teacher: Bundle,
    chats: list[list[dict[str, str]]],
    cfg: SynthConfig = SynthConfig(),
    on_done: Callable[[int], None] = lambda n: None,
) -> list[tuple[str, str | None]]:
    """The teacher's next assistant turn for each chat (OpenAI-style messages), batched through the engine;
    chat ``i`` samples with seed ``cfg.sampling.seed + i``. Returns ``(reply, finish reason)`` per chat."""
    tok = teacher.tokenizer
    chat = ChatModel(teacher)  # no chat template: fail before generating anything
    engine = Engine(teacher.model, token_bytes=tok.decode_token_bytes)
    stops = frozenset(teacher.stop_ids())
    seed = cfg.sampling.seed
    out: list[tuple[str, str | None]] = []
    for start in range(0, len(chats), cfg.batch_size):
        batch = chats[start : start + cfg.batch_size]
        reqs = [
            Request(chat.prompt(messages), replace(cfg.sampling, seed=None if seed is None else seed + start + j),
                    stops, tool_mode="off")
            for j, messages in enumerate(batch)
        ]  # fmt: skip
        tokens: list[list[int]] = [[] for _ in batch]
        finish: list[str | None] = [None] * len(batch)
        for ev in engine.run(reqs):
            if ev.token not in stops:
                tokens[ev.row].append(ev.token)
            if ev.finish:
                finish[ev.row] = ev.finish
                on_done(1)
        out += [(tok.decode(ids).strip(), fin) for ids, fin in zip(tokens, finish, strict=True)]
    return out


def synthesize(
    teacher: Bundle,
    questions: list[str],
    system: str | None,
    cfg: SynthConfig = SynthConfig(),
    on_done: Callable[[int], None] = lambda n: None,
) -> SynthResult:
    """Answer ``questions`` (cycled up to ``cfg.n``) with the teacher; ``on_done(k)`` after each k replies."""
    if not questions:
        raise ValueError("no questions to answer")
    n = len(questions) if cfg.n is None else cfg.n
    asked = [questions[i % len(questions)] for i in range(n)]
    chats = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
             for q in asked]  # fmt: skip
    result = SynthResult()
    for q, (reply, fin) in zip(asked, generate_replies(teacher, chats, cfg, on_done), strict=True):
        reason = verdict(reply, fin, cfg.min_words)
        if reason:
            result.dropped[reason] += 1
        else:
            result.conversations.append(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]}
            )
    return result


def write_conversations(path: str | Path, conversations: list[dict[str, Any]]) -> Path:
    """One JSON object per line, all or nothing (temporary file + rename)."""
    with atomic_write(path) as f:
        for conv in conversations:
            f.write(json.dumps(conv, ensure_ascii=False) + "\n")
    return Path(path)
