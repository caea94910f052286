"""Multiple-choice sets from JSONL files: OpenAI evals' chat-format sets (``quartz``) and our own format.

* OpenAI evals (``evals/registry/data/<set>/samples.jsonl``): ``{"input": [chat messages], "ideal":
  "A"}``, where the last user message is the question followed by lettered options on lines of their
  own (``" A: increases"``). Scored as ``Question: <stem>\\nAnswer:`` + `` <option>``, the options'
  text, not their letters (a small model cannot be asked to write letters). Data: ``llmstack data fetch``.
* Ours, for any set a user brings (``llmstack eval --tasks my_set.jsonl``): ``{"question": str,
  "choices": [str, ...], "answer": index or the correct choice's text}``, formatted the same way.

Every line that is not valid JSON or lacks a field is counted under a reason, never raised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.eval.tasks.base import BadRow, Examples, Kind, Mode, Question, parse_rows, subsample
from llmstack.eval.tasks.bigbench import FETCH_HINT

_OPTION = re.compile(r"^\s*([A-Z])[:.)]\s*(.+?)\s*$")


def qa_context(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def _json_lines(path: Path) -> Iterator[Any]:
    """Each line parsed, or a BadRow standing in for a line that is not JSON (counted by ``parse_rows``)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield BadRow("not valid JSON")


def evals_question(i: int, row: Any) -> Question:
    if isinstance(row, BadRow):
        raise row
    user = [m["content"] for m in row["input"] if m.get("role") == "user"]
    if not user:
        raise BadRow("no user message")
    stem: list[str] = []
    letters: list[str] = []
    options: list[str] = []
    for line in str(user[-1]).splitlines():
        m = _OPTION.match(line)
        if m:
            letters.append(m.group(1))
            options.append(m.group(2))
        elif not options:
            stem.append(line)
    ideal = row["ideal"]
    ideal = ideal[0] if isinstance(ideal, list) and ideal else ideal
    if ideal not in letters:
        raise BadRow("the ideal answer is not one of the options")
    return Question(str(i), qa_context("\n".join(stem)), tuple(options), (letters.index(ideal),))


def jsonl_question(i: int, row: Any) -> Question:
    if isinstance(row, BadRow):
        raise row
    choices = tuple(str(c) for c in row["choices"])
    answer = row["answer"]
    if not isinstance(answer, int) and str(answer) not in choices:
        raise BadRow("the answer is not one of the choices")
    gold = answer if isinstance(answer, int) else choices.index(str(answer))
    return Question(str(row.get("id", i)), qa_context(str(row["question"])), choices, (gold,))


@dataclass
class JsonlTask:
    name: str
    path: Path
    source: str = "ours"  # "ours" or "evals" (OpenAI evals' chat format)
    kind: Kind = "mc"
    modes: tuple[Mode, ...] = ()

    @property
    def about(self) -> str:
        what = "OpenAI evals" if self.source == "evals" else "JSONL"
        return f"{what} {self.path.name} (multiple choice by log-likelihood)"

    def examples(self, limit: int | None, seed: int) -> Examples[Question]:
        if not self.path.is_file():
            hint = FETCH_HINT if self.source == "evals" else "no such file"
            return Examples([], note=f"{self.path}: {hint}")
        parse = evals_question if self.source == "evals" else jsonl_question
        return subsample(parse_rows(_json_lines(self.path), parse), limit, seed)
