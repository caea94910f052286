"""The task suite: every task by name, and the groups ``--tasks`` accepts (``mc``, ``gen``, ``all``).

A name that ends in ``.jsonl`` is a multiple-choice file of one's own (``files.JsonlTask``), one that
ends in ``.txt`` a text for bits per byte. To add a task, write a small class with the ``Task``
interface (``base.py``) and list it in ``all_tasks``.
"""

from __future__ import annotations

from pathlib import Path

from llmstack.data.fetch import BIGBENCH_TASKS
from llmstack.eval.tasks.base import Document, Examples, Problem, Question, Task, chance
from llmstack.eval.tasks.bigbench import BigBenchTask
from llmstack.eval.tasks.files import JsonlTask
from llmstack.eval.tasks.problems import problem_tasks
from llmstack.eval.tasks.text import HeldOutText

__all__ = ["Document", "Examples", "Problem", "Question", "Task", "all_tasks", "chance", "select"]


def all_tasks(data: Path) -> list[Task]:
    """Every named task, reading fetched data under ``data`` (``data_dir()``)."""
    tasks: list[Task] = [HeldOutText()]
    tasks += [BigBenchTask(name, data / "eval" / "bigbench") for name in BIGBENCH_TASKS]
    tasks.append(JsonlTask("quartz", data / "eval" / "evals" / "quartz" / "samples.jsonl", source="evals"))
    return tasks + problem_tasks()


def select(spec: str, data: Path) -> list[Task]:
    """``a,b,c`` -> tasks; names, groups (``mc``, ``gen``, ``bpb``, ``all``) and files may be mixed."""
    named = {t.name: t for t in all_tasks(data)}
    out: list[Task] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in named:
            found = [named[part]]
        elif part == "all":
            found = list(named.values())
        elif part in ("mc", "gen", "bpb"):
            found = [t for t in named.values() if t.kind == part]
        elif part.endswith(".jsonl"):
            found = [JsonlTask(Path(part).stem, Path(part))]
        elif part.endswith(".txt"):
            found = [HeldOutText(Path(part).stem + "_bpb", Path(part))]
        else:
            raise ValueError(f"unknown task {part!r}; known: {', '.join(named)}, or mc, gen, bpb, all, FILE.jsonl")
        out += [t for t in found if t.name not in {o.name for o in out}]
    if not out:
        raise ValueError("--tasks names no task")
    return out
