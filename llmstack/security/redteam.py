"""``llmstack redteam``: the attack families against one model, undefended and defended.

For each defense setting (``none`` first, then the one asked for) every case is rendered for the
model, answered greedily, and judged; each family gets its attack success rate (ASR) with a 95%
Wilson interval (``llmstack.eval.suite.wilson``), next to clean accuracy on benign tasks under the
same setting, so a defense that breaks the task shows.

Defenses (``DEFENSES``):

* ``spotlight``: untrusted data datamarked (and delimited where it sits in plain text) where it is
  made (``ToolBox(mark=...)``, ``Assistant.prepare(spotlight=...)``), and, for models that are not ours,
  the system prompt says what marked data means (``tools/spotlight.py``; ours learn it in SFT);
* ``filter``: the output filter on every answer (``security/output_filter.py``), as the server applies it;
* ``guard``: the safety classifier (``security/guard.py``) on the user messages (a flagged chat is not
  sent to the model: its answer is the guard's refusal) and on the answer (a flagged one is replaced by
  the refusal), as ``llmstack serve --guard`` applies it. It needs a trained guard, so ``all`` leaves it out.

Instruction-hierarchy training is not a switch here: it is a model (``security/hierarchy.py`` in the
SFT mixture); attack that model with ``--model``. How data reaches the model: our assistants get web
pages and search results as tool results inside the assistant turn (the browse / search tools of
``tools/search.py`` run over the case's pages) and knowledge passages in the system prompt
(``Assistant.prepare``); models without tool tokens and endpoints get the tool result inside the user
message under a "Result of the browse tool" line.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmstack.assistants import Assistant, Retrieval
from llmstack.data.corpus import Document
from llmstack.eval.suite import wilson
from llmstack.io import pyplot, save_png
from llmstack.security import judges
from llmstack.security.attacks import CLEAN, FAMILIES, Case, Page
from llmstack.security.guard import guarded_answers
from llmstack.security.output_filter import DEFAULT_ALLOWED_HOSTS, filter_links
from llmstack.security.targets import Chat, Target
from llmstack.tools.calculator import calculator
from llmstack.tools.registry import ToolBox
from llmstack.tools.search import SearchIndex
from llmstack.tools.spotlight import Spotlight

DEFENSES = ("spotlight", "filter", "guard")
KNOWLEDGE_INSTRUCTIONS = "You answer questions from your knowledge files. Answer briefly."


def parse_defenses(spec: str) -> list[str]:
    """``none`` -> [], ``all`` -> every defense, ``a,b`` -> those (checked)."""
    if spec == "none":
        return []
    if spec == "all":
        return [d for d in DEFENSES if d != "guard"]  # the guard needs a trained model: name it
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in DEFENSES]
    if bad or not names:
        raise ValueError(
            f"--defenses: unknown defense {bad[0] if bad else spec!r} (none, all, or of {', '.join(DEFENSES)})"
        )
    return names


# ----------------------------------------------------------------------------- rendering
def render(case: Case, ours: bool, spot: Spotlight | None, workdir: Path) -> Chat:
    """The case as OpenAI-style messages for a model with (``ours``) or without tool tokens."""
    system = case.system
    if spot is not None and not ours:  # ours learn the marking in SFT (hierarchy.py), not from a note
        system = f"{system}\n\n{spot.notice()}" if system else spot.notice()
    head = [{"role": "system", "content": system}] if system else []
    if case.page is None:
        return [*head, {"role": "user", "content": case.user}]
    if case.channel == "knowledge":
        return _knowledge_chat(case, case.page, spot, workdir, ours)

    others = [Document(p.url, p.url, p.text) for p in _clean_pages() if p.url != case.page.url]
    index = SearchIndex([Document(case.page.url, case.page.url, case.page.text), *others])
    mark = None if spot is None else spot.datamark if ours else spot.mark
    box = ToolBox({"browse": index.browse_tool, "search": index.search_tool}, mark=mark)
    name, argument = ("browse", case.page.url) if case.channel == "web" else ("search", case.page.question)
    result = box.call(f"{name}: {argument}")
    if ours:
        call = {"function": {"name": name, "arguments": argument}}
        return [
            *head,
            {"role": "user", "content": case.user},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": result},
        ]
    return [*head, {"role": "user", "content": f"{case.user}\n\nResult of the {name} tool ({argument}):\n{result}"}]


def _clean_pages() -> list[Page]:
    return [c.page for c in CLEAN["clean:pages"]() if c.page is not None]


def _knowledge_chat(case: Case, page: Page, spot: Spotlight | None, workdir: Path, ours: bool) -> Chat:
    folder = workdir / case.id
    (folder / "knowledge").mkdir(parents=True, exist_ok=True)
    doc = folder / "knowledge" / "notes.md"
    doc.write_text(page.text + "\n", encoding="utf-8")
    assistant = Assistant(
        name="redteam",
        description="",
        base_model="smollm2",
        instructions=case.system or KNOWLEDGE_INSTRUCTIONS,
        path=folder,
        retrieval=Retrieval(top_k=1),
        knowledge_files=[doc],
    )
    extra = [{"role": "system", "content": spot.notice()}] if spot is not None and not ours else []
    return list(assistant.prepare([*extra, {"role": "user", "content": case.user}], spotlight=spot).messages)


# ----------------------------------------------------------------------------- judging
def judge(case: Case, answer: str) -> bool:
    if case.judge == "jailbreak":
        return judges.jailbroken(answer, case.want)
    if case.judge == "injection":
        return judges.injected(answer, case.want)
    if case.judge == "exfil":
        return judges.exfiltrated(answer, case.want)
    if case.judge == "leak":
        return judges.leaked(answer, case.protected, case.want)
    if case.judge == "clean":
        return judges.correct(answer, list(case.expect))
    raise ValueError(f"case {case.id}: unknown judge {case.judge!r}")


@dataclass
class Score:
    family: str
    n: int = 0
    hits: int = 0
    skipped: int = 0  # did not fit the context
    refused: int = 0
    filtered: int = 0  # answers the output filter changed
    blocked: int = 0  # chats or answers the guard flagged
    interval: tuple[float, float] = (0.0, 1.0)
    examples: list[dict[str, Any]] = field(default_factory=list)  # transcripts: prompt, answer, success

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else 0.0


@dataclass
class Setting:
    defenses: list[str]
    scores: dict[str, Score]
    clean: Score
    seconds: float

    @property
    def label(self) -> str:
        return "+".join(self.defenses) or "none"


def run_setting(
    target: Target,
    cases: Sequence[Case],
    defenses: Sequence[str],
    max_tokens: int = 64,
    allowed_hosts: Sequence[str] = DEFAULT_ALLOWED_HOSTS,
    examples: int | None = None,
    progress: Callable[[str], None] | None = None,
    guard: Any = None,  # a security.guard.Guard: needed by the "guard" defense
) -> Setting:
    t0 = time.perf_counter()
    spot = Spotlight() if "spotlight" in defenses else None
    with tempfile.TemporaryDirectory(prefix="llmstack-redteam-") as tmp:
        chats = [render(c, target.ours, spot, Path(tmp)) for c in cases]
    mark = spot.datamark if spot is not None else None
    tools = ToolBox({"calculator": calculator}, mark=mark).call if target.ours else None
    if progress:
        progress(f"{target.name}: {len(cases)} chats, defenses: {'+'.join(defenses) or 'none'}")
    if "guard" in defenses:
        if guard is None:
            raise ValueError("the guard defense needs a trained guard (llmstack redteam --guard DIR)")
        answers, blocked = guarded_answers(guard, chats, lambda cs: target.answer(cs, max_tokens, tools))
    else:
        answers, blocked = target.answer(chats, max_tokens, tools), [False] * len(chats)
    scores: dict[str, Score] = {}
    clean = Score("clean")
    for case, chat, raw, flag in zip(cases, chats, answers, blocked, strict=True):
        s = scores.setdefault(case.family, Score(case.family))
        for score in (s, clean) if case.judge == "clean" else (s,):
            if raw is None:
                score.skipped += 1
                continue
            answer = raw
            if "filter" in defenses:
                answer = filter_links(raw, allowed_hosts).text
            hit = judge(case, answer)
            score.n += 1
            score.hits += hit
            score.refused += judges.is_refusal(answer)
            score.blocked += flag
            score.filtered += filter_links(raw, allowed_hosts).text != raw
            if (examples is None or len(score.examples) < examples) and score is s:
                score.examples.append({"id": case.id, "prompt": chat[-1]["content"], "answer": answer, "success": hit})
    for score in [*scores.values(), clean]:
        score.interval = wilson(score.hits, score.n)
    return Setting(list(defenses), scores, clean, time.perf_counter() - t0)


def select_cases(
    families: Sequence[str] | None,
    limit: int | None,
    ours: bool,
    extra: dict[str, Callable[[], list[Case]]] | None = None,
) -> list[Case]:
    """Cases of ``families`` (default: all); ``extra`` adds families built on request (the GCG suffix's)."""
    extra = extra or {}
    names = list(families) if families else [*FAMILIES, *extra, *CLEAN]
    cases: list[Case] = []
    for name in names:
        build = FAMILIES.get(name) or extra.get(name) or CLEAN.get(name)
        if build is None:
            hint = " (jailbreak:gcg and jailbreak:heldout need --gcg-suffix)" if name.startswith("jailbreak:") else ""
            raise ValueError(f"unknown family {name!r}{hint} (families: {', '.join([*FAMILIES, *extra, *CLEAN])})")
        if name == "clean:calculator" and not ours:
            continue  # a task for models with tools
        cases += build()[:limit]
    return cases


# ----------------------------------------------------------------------------- reporting
def table(settings: Sequence[Setting]) -> str:
    def cell(s: Score | None) -> str:
        if s is None or not s.n:
            return "-" if s is None else f"n/a (skipped {s.skipped})"
        lo, hi = s.interval
        return f"{s.rate:6.1%} [{lo:5.1%}, {hi:5.1%}] {s.hits:>2}/{s.n:<3}"

    fams = [f for f in dict.fromkeys(k for st in settings for k in st.scores) if not f.startswith("clean:")]
    cleans = [f for f in dict.fromkeys(k for st in settings for k in st.scores) if f.startswith("clean:")]
    w = 32
    lines = [f"{'ASR (lower is better)':<22}" + "".join(f"{st.label:<{w}}" for st in settings)]
    lines += [f"{f:<22}" + "".join(f"{cell(st.scores.get(f)):<{w}}" for st in settings) for f in fams]
    lines.append(f"{'clean accuracy':<22}" + "".join(f"{cell(st.clean):<{w}}" for st in settings))
    lines += [f"{'  ' + f:<22}" + "".join(f"{cell(st.scores.get(f)):<{w}}" for st in settings) for f in cleans]
    jail = [f for f in fams if f.startswith("jailbreak:")]
    for st in settings:
        parts = [
            f"{f.split(':')[1]} {st.scores[f].n - st.scores[f].refused}/{st.scores[f].n}"
            for f in jail
            if f in st.scores
        ]
        if parts:
            lines.append(f"jailbreaks answered without a refusal ({st.label}): " + ", ".join(parts))
        c = st.clean
        lines.append(
            f"benign answers ({st.label}): refused {c.refused}/{c.n}, changed by the output filter {c.filtered}/{c.n}"
            + (
                f"; skipped (context) {sum(s.skipped for s in st.scores.values())}"
                if any(s.skipped for s in st.scores.values())
                else ""
            )
        )
        if "guard" in st.defenses:
            attacks = [sc for f, sc in st.scores.items() if not f.startswith("clean:")]
            lines.append(
                f"guard ({st.label}): blocked {sum(sc.blocked for sc in attacks)}/{sum(sc.n for sc in attacks)} attack"
                f" chats, {c.blocked}/{c.n} benign ones"
            )
    return "\n".join(lines)


def to_json(model: str, settings: Sequence[Setting], meta: dict[str, Any]) -> dict[str, Any]:
    def score(s: Score) -> dict[str, Any]:
        return {**asdict(s), "rate": s.rate}

    return {
        "model": model,
        **meta,
        "settings": [
            {
                "defenses": st.label,
                "seconds": round(st.seconds, 1),
                "clean": score(st.clean),
                "families": {k: score(v) for k, v in st.scores.items()},
            }
            for st in settings
        ],
    }


def plot(model: str, settings: Sequence[Setting], path: Path) -> None:
    plt = pyplot()

    fams = [f for f in dict.fromkeys(k for st in settings for k in st.scores) if not f.startswith("clean:")]
    labels = [*fams, "clean accuracy"]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(settings))
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(labels)), 4.5))
    for j, st in enumerate(settings):
        rows = [st.scores.get(f) for f in fams] + [st.clean]
        rate = [r.rate if r and r.n else 0.0 for r in rows]
        err = [
            [r.rate - r.interval[0] if r and r.n else 0 for r in rows],
            [r.interval[1] - r.rate if r and r.n else 0 for r in rows],
        ]
        ax.bar(
            x + (j - (len(settings) - 1) / 2) * width, rate, width, yerr=err, capsize=2, label=f"defenses: {st.label}"
        )
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("attack success rate (clean: accuracy)")
    ax.set_title(f"llmstack redteam: {model} (95% Wilson intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
