"""Worked agent episodes to fine-tune on: each task kind solved step by step, the tools really run.

For every task of ``tasks.build`` (another seed than the evaluation's: other numbers, other facts behind
the same names, other memories), a scripted solver makes the calls a good agent makes, through the same
toolbox ``Agent`` builds (workspace, memory file, local web, spotlit results), and the episode is written
as OpenAI messages (``tool_calls`` with our ``name: argument`` text, then ``role: tool`` results):
``llmstack sft --data`` trains any model on them, ours and template models alike.

- product: calculator -> "The answer is P."
- file-product: read numbers.txt -> calculator -> write answer.txt -> "I wrote P to answer.txt."
- lookup: search NAME -> the fact and its source URL, copied from the result
- memory: recall -> the fact, copied from the memory
- read (traces only): "Read NAME.txt in the workspace and answer: ..." -> read -> the fact from the file
  (the red team's file channel asks this way; its pages and payloads are never trained on)

Facts are read from tool results, never known in advance: the lookup facts of these seeds differ from the
evaluation's, so a model that memorised them would be wrong there.
"""

from __future__ import annotations

import random
import re
import tempfile
from pathlib import Path
from typing import Any

from llmstack.agent.tasks import KINDS, MEMORY_FACTS, NAMES, AgentTask, build, corpus
from llmstack.agent.toolkit import agent_toolbox, search_index
from llmstack.agent.workspace import Memory, Workspace
from llmstack.tools.registry import ToolBox
from llmstack.tools.spotlight import Spotlight

TRACE_KINDS = (*KINDS, "read")
FILE_WORDS = (
    "notes", "page", "info", "report", "draft", "list", "facts", "guide", "memo", "summary", "log", "plan",
    "data", "letter", "story", "index", "today", "week", "trip", "visit", "house", "tower", "river", "north",
    "old", "new", "city", "place", "history", "travel", "school", "work", "home", "desk", "box", "blue",
)  # fmt: skip
"""File names of the read episodes are two of these: various enough that a model copies the name it is given."""
TRACE_SEED = 1000
"""Seeds from here on make training episodes; the evaluation uses seed 0 and up."""


def _calls(task: AgentTask) -> list[tuple[str, str]]:
    """The solver's first calls (tool, argument) for a task; a lookup's answer waits for the search result."""
    a_b = task.files.get("numbers.txt", "").split()
    if task.kind == "product":
        a, _, b = task.prompt.removeprefix("What is ").removesuffix("?").partition(" times ")
        return [("calculator", f"{a}*{b}")]
    if task.kind == "file-product":
        return [("read", "numbers.txt"), ("calculator", "*".join(a_b)), ("write", f"answer.txt\n{task.expect[0]}")]
    if task.kind == "lookup":
        return [("search", next(name for name in NAMES if name in task.prompt))]
    if task.kind == "read":
        return [("read", next(iter(task.files)))]
    what = next(w for w, _ in MEMORY_FACTS if w in task.prompt)
    return [("recall", what)]


def _answer(task: AgentTask) -> str:
    if task.kind == "product":
        return f"The answer is {task.expect[0]}."
    if task.kind == "file-product":
        return f"I wrote {task.expect[0]} to answer.txt."
    if task.kind in ("lookup", "read"):
        return f"The answer is {task.expect[0]}." + (f" Source: {task.source}" if task.source else "")
    what = next(w for w, _ in MEMORY_FACTS if w in task.prompt)
    return f"Your {what} is {task.expect[0]}."


def read_tasks(n: int, seed: int) -> list[AgentTask]:
    """Questions answered from a page stored in the workspace: the facts of ``seed``'s local web."""
    rng = random.Random(seed + 2)
    pages = corpus(seed)
    out = []
    for i in range(n):
        page = rng.choice(pages)
        name = next(name for name in NAMES if name in page.text)
        year, city = re.search(r"built in (\d+)", page.text)[1], re.search(r" in ([A-Z]\w+)\.", page.text)[1]  # type: ignore[index]
        file = f"{rng.choice(FILE_WORDS)}{rng.choice(('', '-', '_'))}{rng.choice(FILE_WORDS)}.txt"
        question, fact = rng.choice(
            ((f"In what year was the {name} built?", year), (f"In which city is the {name}?", city))
        )
        prompt = f"Read {file} in the workspace and answer: {question}"
        out.append(AgentTask("read", f"read-{i}", prompt, (fact,), files={file: page.text + "\n"}))
    return out


def episode(task: AgentTask, toolbox: ToolBox) -> dict[str, Any]:
    """One solved episode as OpenAI messages; the tools' results are what they return (spotlit)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": task.prompt}]
    for i, (name, argument) in enumerate(_calls(task)):
        call = {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": argument}}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": toolbox.call(f"{name}: {argument}")})
    messages.append({"role": "assistant", "content": _answer(task)})
    return {"messages": messages}


def traces(
    n: int, seed: int = TRACE_SEED, spotlight: bool = True, kinds: tuple[str, ...] = KINDS
) -> list[dict[str, Any]]:
    """``n`` worked episodes of each of ``kinds``, from tasks of ``seed``; results datamarked as ``Agent`` marks
    them for a model with tool tokens (``spotlight``)."""
    if seed < TRACE_SEED:
        raise ValueError(f"trace seeds start at {TRACE_SEED}: lower ones are the evaluation's")
    mark = Spotlight().datamark if spotlight else None
    index = search_index(corpus(seed))
    out = []
    with tempfile.TemporaryDirectory(prefix="llmstack-traces-") as tmp:
        tasks = build(n, seed, tuple(k for k in kinds if k != "read"))
        for task in tasks + (read_tasks(n, seed) if "read" in kinds else []):
            folder = Path(tmp) / task.id
            (folder / "ws").mkdir(parents=True)
            for name, text in task.files.items():
                (folder / "ws" / name).write_text(text, encoding="utf-8")
            memory = Memory(folder / "memory.md")
            if task.memory:
                memory.path.write_text(task.memory, encoding="utf-8")
            out.append(episode(task, agent_toolbox(Workspace(folder / "ws"), memory, index, mark)))
    return out
