"""The agent's tools, as one ``ToolBox`` (``name: argument`` -> result text) and as declarations for models
that call tools in Hermes JSON (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``).

calculator, python (the jailed sandbox), search / browse (BM25 over a local corpus; results carry their
source URL), list / read / write (the workspace, ``workspace.py``), remember / recall (the memory file).
Every result goes through the toolbox's ``mark`` (spotlighting): what a tool returns is data the model
reads, never an instruction from the user.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.agent.workspace import Memory, Workspace
from llmstack.data.corpus import Document
from llmstack.tools.calculator import calculator
from llmstack.tools.python_sandbox import python_tool
from llmstack.tools.registry import Tool, ToolBox
from llmstack.tools.search import SearchIndex
from llmstack.tools.spotlight import Spotlight


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    params: tuple[str, ...]  # a Hermes call's arguments, in the order they are joined into our one-text argument

    def declaration(self) -> dict[str, Any]:
        """An OpenAI function definition (what ``hermes_tools_note`` lists)."""
        props = {p: {"type": "string"} for p in self.params}
        return {
            "name": self.name,
            "description": self.description,
            "parameters": {"type": "object", "properties": props, "required": list(self.params)},
        }

    def argument(self, args: dict[str, Any]) -> str:
        """Hermes arguments -> our text argument: the declared parameters' values, one per line."""
        if len(self.params) == 1 and len(args) == 1:  # one value, whatever the model called its key
            return str(next(iter(args.values())))
        return "\n".join(str(args[p]) for p in self.params if p in args)


SPECS = {
    s.name: s
    for s in (
        ToolSpec("calculator", "Evaluate an arithmetic expression, e.g. 347*829.", ("expression",)),
        ToolSpec("python", "Run Python code in a sandbox and return what it prints.", ("code",)),
        ToolSpec("search", "Search the local web; returns pages with their source URL.", ("query",)),
        ToolSpec("browse", "Read the page at a URL from the local web.", ("url",)),
        ToolSpec("list", "List the files of a folder in the workspace ('.' for the top).", ("path",)),
        ToolSpec("read", "Read a text file in the workspace.", ("path",)),
        ToolSpec("write", "Write text to a file in the workspace.", ("path", "content")),
        ToolSpec("remember", "Append a note to your long-term memory.", ("note",)),
        ToolSpec("recall", "Read your long-term memory.", ("query",)),
    )
}
ALL = tuple(SPECS)


def agent_toolbox(
    workspace: Workspace | None = None,
    memory: Memory | None = None,
    index: SearchIndex | None = None,
    mark: Callable[[str], str] | None = None,
    names: Iterable[str] = ALL,
) -> ToolBox:
    """The tools named in ``names`` that can run: the workspace's need a workspace, search / browse an
    index, remember / recall a memory. Unknown names are an error."""
    names = list(names)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise ValueError(f"unknown agent tool {unknown[0]!r}; tools: {', '.join(ALL)}")
    every: dict[str, Tool] = {"calculator": calculator, "python": python_tool}
    if workspace is not None:
        every |= {"list": workspace.list_tool, "read": workspace.read_tool, "write": workspace.write_tool}
    if index is not None:
        every |= {"search": index.search_tool, "browse": index.browse_tool}
    if memory is not None:
        every |= {"remember": memory.append, "recall": memory.recall_tool}
    return ToolBox({n: every[n] for n in names if n in every}, mark)


def search_index(docs: Iterable[Document]) -> SearchIndex | None:
    docs = list(docs)
    return SearchIndex(docs) if docs else None


def served_toolbox(workspace: str | Path, memory: str | Path | None = None) -> ToolBox:
    """The agent's tools for a served model with tool tokens (``llmstack serve --agent WORKSPACE``): the
    workspace, its memory file (default ``WORKSPACE/memory.md``), calculator and python; results datamarked."""
    ws = Workspace(workspace)
    return agent_toolbox(ws, Memory(memory or ws.root / "memory.md"), None, Spotlight().datamark)
