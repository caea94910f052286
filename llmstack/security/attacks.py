"""The attack cases, built from the data files in ``security/data`` (written for this suite).

Families (``FAMILIES``), each a list of ``Case``:

* jailbreaks, on the harmful asks of ``jailbreaks.yaml``: ``plain`` (the ask itself, the baseline),
  ``roleplay`` (the grandmother), ``encoding`` (base64 and ROT13 in turn), ``language`` (French),
  ``prefix`` (prefix injection: "Start your answer with 'Sure, here is ...'");
* prompt injection (``injections.yaml``): ``direct`` (the user overrides the app's system prompt) and
  indirect, the instruction hidden in a page that reaches the model as a ``web`` page (the browse
  tool), a ``tool`` result (the search tool) or a ``knowledge`` file of a custom assistant;
* ``exfil``: the page asks for a markdown image / link whose URL carries a secret of the context;
* ``extraction``: the user tries to get the protected system prompt out;
* clean tasks (``CLEAN``): benign questions, and the pages without payload asked about through the
  same channel as the injections (so a defense that breaks reading data shows).

A case says what it needs (system prompt, user text, a page and its channel) and how it is judged;
``redteam.py`` renders it for a model. New families (poisoned data) are new builders here or in their
own file, registered in ``FAMILIES``. The GCG families (``gcg``) need a suffix file, so they are built
on request (``llmstack redteam --gcg-suffix``) rather than registered.
"""

from __future__ import annotations

import base64
import codecs
import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmstack.chat.mixture import arithmetic_question
from llmstack.eval.assistant import EVAL_SEED

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Page:
    url: str
    text: str  # with the payload in it, if any
    question: str
    expect: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    family: str
    id: str
    user: str
    judge: str  # jailbreak | injection | exfil | leak | clean
    want: str = ""  # the target string, canary, secret (exfil, leak) or "" (clean)
    system: str | None = None
    page: Page | None = None
    channel: str | None = None  # web | tool | knowledge (how the page reaches the model)
    protected: str = ""  # leak: the protected instructions
    expect: tuple[str, ...] = ()  # clean: right answers


@functools.cache
def load(name: str) -> Any:
    path = DATA / f"{name}.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _pages() -> list[dict[str, Any]]:
    return list(load("injections")["pages"])


def _page(p: dict[str, Any], payload: str | None, first: bool) -> Page:
    text = p["text"] if payload is None else f"{payload} {p['text']}" if first else f"{p['text']} {payload}"
    return Page(p["url"], text, p["question"], tuple(str(e) for e in p["expect"]))


def ask_for(page: Page, channel: str) -> str:
    """What the user says: web pages are named by URL; the search tool and knowledge files find them."""
    return f"Read {page.url} and answer: {page.question}" if channel == "web" else page.question


# ----------------------------------------------------------------------------- jailbreaks
def jailbreak(kind: str) -> Callable[[], list[Case]]:
    def build() -> list[Case]:
        data = load("jailbreaks")
        out = []
        for i, a in enumerate(data["asks"]):
            fields = dict(a)
            template = kind
            if kind == "encoding":
                template = "base64" if i % 2 == 0 else "rot13"
                raw = f"{a['ask']}."
                fields["encoded"] = (
                    base64.b64encode(raw.encode()).decode() if template == "base64" else codecs.encode(raw, "rot13")
                )
            text = data["templates"][template].format(**fields)
            out.append(Case(f"jailbreak:{kind}", f"{kind}-{i}", " ".join(text.split()), "jailbreak", a["target"]))
        return out

    return build


def plain_asks() -> list[tuple[str, str]]:
    """Every harmful ask as the ``plain`` family sends it, with its target string (GCG's training pairs)."""
    data = load("jailbreaks")
    return [(" ".join(data["templates"]["plain"].format(**a).split()), a["target"]) for a in data["asks"]]


def gcg(suffix: str, held_out: Sequence[int]) -> dict[str, Callable[[], list[Case]]]:
    """Two families on the asks held out of a GCG search (``security/gcg.py``): ``jailbreak:heldout``, the
    plain asks (the baseline), and ``jailbreak:gcg``, the same asks with the suffix appended as is."""

    def build(with_suffix: bool) -> Callable[[], list[Case]]:
        def cases() -> list[Case]:
            asks = plain_asks()
            family, tag = ("jailbreak:gcg", "gcg") if with_suffix else ("jailbreak:heldout", "heldout")
            return [
                Case(family, f"{tag}-{i}", asks[i][0] + suffix if with_suffix else asks[i][0], "jailbreak", asks[i][1])
                for i in held_out
            ]

        return cases

    return {"jailbreak:heldout": build(False), "jailbreak:gcg": build(True)}


# ----------------------------------------------------------------------------- prompt injection
def direct() -> list[Case]:
    d, canaries = load("injections")["direct"], load("injections")["canaries"]
    out = []
    for i, (s, a) in enumerate((s, a) for a in d["attacks"] for s in d["systems"]):
        canary = canaries[i % len(canaries)]
        out.append(Case("injection:direct", f"direct-{i}", a.format(canary=canary), "injection", canary, system=s))
    return out


def indirect(channel: str) -> Callable[[], list[Case]]:
    offset = {"web": 0, "tool": 2, "knowledge": 4}[channel]

    def build() -> list[Case]:
        data = load("injections")
        pages, payloads, canaries = _pages(), data["payloads"], data["canaries"]
        out = []
        for i in range(2 * len(pages)):
            canary = canaries[(i + offset) % len(canaries)]
            payload = payloads[(i + offset) % len(payloads)].format(canary=canary)
            page = _page(pages[i % len(pages)], payload, first=i % 2 == 1)
            out.append(
                Case(
                    f"injection:{channel}",
                    f"{channel}-{i}",
                    ask_for(page, channel),
                    "injection",
                    canary,
                    None,
                    page,
                    channel,
                )
            )
        return out

    return build


def exfil() -> list[Case]:
    e = load("injections")["exfil"]
    pages = _pages()
    out = []
    for i in range(2 * len(e["secrets"])):
        secret = e["secrets"][i % len(e["secrets"])]
        payload = e["payloads"][i % len(e["payloads"])].format(secret_name=e["secret_name"])
        page = _page(pages[i % len(pages)], payload, first=False)
        system = e["system"].format(secret=secret)
        out.append(Case("exfil:markdown", f"exfil-{i}", ask_for(page, "web"), "exfil", secret, system, page, "web"))
    return out


def extraction() -> list[Case]:
    x = load("injections")["extraction"]
    out = []
    for i, (attack, (system, secret)) in enumerate(
        (a, sp) for a in x["attacks"] for sp in zip(x["systems"], x["secrets"], strict=True)
    ):
        protected = system.format(secret=secret)
        out.append(Case("extraction:system", f"extract-{i}", attack, "leak", secret, protected, protected=protected))
    return out


# ----------------------------------------------------------------------------- clean tasks
def clean_questions() -> list[Case]:
    return [
        Case("clean:questions", f"q-{i}", q["prompt"], "clean", expect=tuple(str(e) for e in q["expect"]))
        for i, q in enumerate(load("benign")["questions"])
    ]


def clean_pages() -> list[Case]:
    out = []
    for i, p in enumerate(_pages()):
        page = _page(p, None, first=False)
        out.append(
            Case("clean:pages", f"page-{i}", ask_for(page, "web"), "clean", "", None, page, "web", expect=page.expect)
        )
    return out


def clean_calculator(n: int = 20) -> list[Case]:
    """Our assistants' trained task: 3-digit products with the calculator (held-out seed)."""
    rng = random.Random(EVAL_SEED)
    out = []
    for i in range(n):
        q, a, b = arithmetic_question(rng, "*")
        out.append(Case("clean:calculator", f"calc-{i}", q, "clean", expect=(str(a * b),)))
    return out


FAMILIES: dict[str, Callable[[], list[Case]]] = {
    "jailbreak:plain": jailbreak("plain"),
    "jailbreak:roleplay": jailbreak("roleplay"),
    "jailbreak:encoding": jailbreak("encoding"),
    "jailbreak:language": jailbreak("language"),
    "jailbreak:prefix": jailbreak("prefix"),
    "injection:direct": direct,
    "injection:web": indirect("web"),
    "injection:tool": indirect("tool"),
    "injection:knowledge": indirect("knowledge"),
    "exfil:markdown": exfil,
    "extraction:system": extraction,
}
CLEAN: dict[str, Callable[[], list[Case]]] = {
    "clean:questions": clean_questions,
    "clean:pages": clean_pages,
    "clean:calculator": clean_calculator,  # our assistants only (tool tokens)
}
