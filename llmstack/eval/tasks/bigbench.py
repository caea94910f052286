"""BIG-bench JSON tasks as multiple choice: ``{"input", "target_scores": {choice: score}}`` rows.

The prompt is built from the task's own fields as BIG-bench's JSON tasks build it, zero-shot (defaults
in brackets): ``task_prefix`` [""] + ``example_input_prefix`` ["\\nQ: "] + input + ``example_output_prefix``
["\\nA: "]; each choice is scored as the continuation. The correct choices are those with the highest
score. A task with subtasks (``goal_step_wikihow``, ``logical_deduction``, ``arithmetic``) pools their rows.

Cloze by default: the choices are not listed in the prompt (BIG-bench lists them after
``choice_prefix`` ["\\n  choice: "] where ``append_choices_to_input`` [true]), the way lm-eval scores
ARC or HellaSwag. With the list, SmolLM2-135M picks by position and scores at chance on every task
(general_knowledge 17% against 14% chance, 41% without it); ``list_choices=True`` restores it.
Data: ``llmstack data fetch`` (``fetch_eval_data``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmstack.eval.tasks.base import BadRow, Examples, Kind, Mode, Question, parse_rows, subsample

FETCH_HINT = "not fetched: run `llmstack data fetch`"


@dataclass(frozen=True)
class _Format:
    task_prefix: str = ""
    input_prefix: str = "\nQ: "
    output_prefix: str = "\nA: "
    choice_prefix: str = "\n  choice: "
    append_choices: bool = True

    @classmethod
    def of(cls, task: dict[str, Any]) -> _Format:
        d = cls()
        return cls(
            str(task.get("task_prefix", d.task_prefix)),
            str(task.get("example_input_prefix", d.input_prefix)),
            str(task.get("example_output_prefix", d.output_prefix)),
            str(task.get("choice_prefix", d.choice_prefix)),
            bool(task.get("append_choices_to_input", d.append_choices)),
        )


def bigbench_question(_: int, row: tuple[_Format, str, int, Any]) -> Question:
    fmt, subtask, i, ex = row
    text, scores = ex["input"], ex["target_scores"]
    if not isinstance(text, str) or not isinstance(scores, dict):
        raise BadRow("input is not text or target_scores is not an object")
    choices = tuple(str(c) for c in scores)
    values = [float(v) for v in scores.values()]
    if len(values) > 1 and max(values) <= min(values):
        raise BadRow("no correct choice")
    gold = tuple(j for j, v in enumerate(values) if v == max(values, default=0.0))
    if fmt.append_choices:
        listed = sorted(choices)
        random.Random(i).shuffle(listed)
        text += fmt.choice_prefix + fmt.choice_prefix.join(listed)
    context = fmt.task_prefix + fmt.input_prefix + text + fmt.output_prefix
    return Question(f"{subtask}/{i}", context, choices, gold, delimiter="")


@dataclass
class BigBenchTask:
    name: str
    root: Path  # the folder holding <name>/task.json (data/eval/bigbench)
    list_choices: bool = False  # BIG-bench's append_choices_to_input; off: cloze, each choice scored alone
    kind: Kind = "mc"
    modes: tuple[Mode, ...] = ()

    @property
    def about(self) -> str:
        return f"BIG-bench {self.name} (bigbench sdist, multiple choice by log-likelihood)"

    def examples(self, limit: int | None, seed: int) -> Examples[Question]:
        folder = self.root / self.name
        files = sorted(p for p in folder.glob("**/task.json")) if folder.is_dir() else []
        if not files:
            return Examples([], note=f"{folder}: {FETCH_HINT}")
        rows: list[tuple[_Format, str, int, Any]] = []
        unreadable = 0
        for f in files:
            try:
                task = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                unreadable += 1
                continue
            sub = f.parent.relative_to(folder).as_posix()
            fmt, sub = _Format.of(task), sub if sub != "." else self.name
            fmt = fmt if self.list_choices else replace(fmt, append_choices=False)
            rows += [(fmt, sub, i, ex) for i, ex in enumerate(task.get("examples", []))]
        found = parse_rows(rows, bigbench_question)
        if unreadable:
            found.skipped["unreadable task.json"] += unreadable
        return subsample(found, limit, seed)
