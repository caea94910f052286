"""Multi-step tasks for the agent, each with a deterministic checker; fictional facts, so no model knows them.

Kinds (``KINDS``):

* ``product``: "What is 347 times 829?": one calculator call, then the answer (the product in it);
* ``file-product``: numbers.txt in the workspace holds two numbers; their product must end up in answer.txt:
  read -> calculator -> write;
* ``lookup``: a fact from the local web, answered with its source: search (-> browse) -> answer holding
  the fact and the page's URL;
* ``memory``: a fact from the agent's memory file (notes kept by earlier episodes) -> the answer holds it.

``corpus()`` is the local web the lookups search: one page per fact and as many decoys. Seeded: the same
seed gives the same tasks.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmstack.data.corpus import Document

KINDS = ("product", "file-product", "lookup", "memory")
FILE_PRODUCT = (
    "The file numbers.txt in the workspace holds two numbers. Multiply them and write the result to answer.txt."
)
NAMES = (
    "Quill Tower", "Amber Mill", "Corvin Hall", "Delta Arch", "Elm Pavilion", "Fenwick Dome", "Garnet Gate",
    "Heron Lock", "Iris Chapel", "Juniper Fort", "Kestrel Bridge", "Linden Court", "Marrow Keep", "Nettle Barn",
    "Opal Theatre", "Pike Station", "Quarry House", "Raven Lighthouse", "Sorrel Market", "Tamsin Library",
)  # fmt: skip
KINDS_OF_PLACE = ("lighthouse", "mill", "concert hall", "bridge", "museum", "station", "library", "market")
CITIES = ("Brest", "Porto", "Ghent", "Lund", "Turku", "Split", "Graz", "Cork", "Bergen", "Tartu")
MEMORY_FACTS = (
    ("locker code", "{n4}"),
    ("gym PIN", "{n4}"),
    ("bike lock number", "{n4}"),
    ("sister's flat number", "{n3}"),
    ("Wi-Fi password", "heron-{n4}"),
)


@dataclass(frozen=True)
class AgentTask:
    kind: str
    id: str
    prompt: str
    expect: tuple[str, ...]  # the answer (or answer.txt) must hold one of these
    source: str = ""  # lookup: the URL the answer must give
    files: dict[str, str] = field(default_factory=dict)  # the workspace before the episode
    memory: str = ""  # the memory file before the episode
    answer_file: str = ""  # file-product: the answer is checked in this workspace file


def _norm(text: str) -> str:
    """Lower case, thousands separators out (``287,663`` -> ``287663``), spaces collapsed."""
    return " ".join(re.sub(r"(?<=\d)[,\u202f](?=\d{3})", "", text.lower()).split())


def holds(text: str, expect: tuple[str, ...]) -> bool:
    """Whether ``text`` holds one of ``expect``; a number only as a whole number (``42`` is not in ``1420``)."""
    t = _norm(text)
    for e in expect:
        e = _norm(e)
        if re.fullmatch(r"\d+", e):
            if re.search(rf"(?<![\d.]){e}(?![\d])", t):
                return True
        elif e in t:
            return True
    return False


def solved(task: AgentTask, answer: str, workspace: Path | None) -> bool:
    """The task's checker: the answer (or ``answer_file`` in the workspace) holds the result, and a lookup
    names its source."""
    if task.answer_file:
        f = (workspace / task.answer_file) if workspace is not None else None
        if f is None or not f.is_file() or f.is_symlink():
            return False
        return holds(f.read_text(encoding="utf-8", errors="replace"), task.expect)
    return holds(answer, task.expect) and (not task.source or task.source.lower() in answer.lower())


def _facts(seed: int) -> list[tuple[str, str, str, int]]:
    """(name, kind of place, city, year) for every name: the local web's facts."""
    rng = random.Random(seed)
    return [(n, rng.choice(KINDS_OF_PLACE), rng.choice(CITIES), rng.randint(1820, 1990)) for n in NAMES]


def _url(name: str) -> str:
    return "https://facts.example/" + name.lower().replace(" ", "-")


def corpus(seed: int = 0) -> list[Document]:
    """One page per fact: what it is, where, and when it was built."""
    return [
        Document(_url(n), _url(n), f"The {n} is a {kind} in {city}. It was built in {year}. Visitors come all year.")
        for n, kind, city, year in _facts(seed)
    ]


def build(n: int = 8, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[AgentTask]:
    """``n`` tasks of each kind in ``kinds``."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or n < 1:
        raise ValueError(f"agent tasks: unknown kind {bad[0]!r} (kinds: {', '.join(KINDS)})" if bad else "n >= 1")
    rng = random.Random(seed + 1)
    facts = _facts(seed)
    out: list[AgentTask] = []
    for kind in kinds:
        for i in range(n):
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            tid = f"{kind}-{i}"
            if kind == "product":
                out.append(AgentTask(kind, tid, f"What is {a} times {b}?", (str(a * b),)))
            elif kind == "file-product":
                prompt = FILE_PRODUCT
                out.append(
                    AgentTask(
                        kind, tid, prompt, (str(a * b),), files={"numbers.txt": f"{a}\n{b}\n"}, answer_file="answer.txt"
                    )
                )
            elif kind == "lookup":
                name, _, city, year = facts[i % len(facts)]
                if i % 2 == 0:
                    out.append(
                        AgentTask(
                            kind,
                            tid,
                            f"Search the web: in what year was the {name} built? Give the source.",
                            (str(year),),
                            _url(name),
                        )
                    )
                else:
                    out.append(
                        AgentTask(
                            kind,
                            tid,
                            f"Search the web: in which city is the {name}? Give the source.",
                            (city,),
                            _url(name),
                        )
                    )
            else:
                what, form = MEMORY_FACTS[i % len(MEMORY_FACTS)]
                value = form.format(
                    n4=rng.randint(1000, 9999),
                    n3=rng.randint(100, 999),
                )
                notes = [f"- My {what} is {value}.", "- I prefer tea to coffee.", "- The plumber comes next week."]
                rng.shuffle(notes)
                out.append(AgentTask(kind, tid, f"What is my {what}?", (value,), memory="\n".join(notes) + "\n"))
    return out
