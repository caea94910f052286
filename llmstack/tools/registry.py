"""Tool dispatch: the text inside a tool-call span is ``name: argument``; the answer is text.

Whatever goes wrong (an unknown tool, a malformed call, a tool that raises) comes back to the model
as an ``error: ...`` result instead of stopping generation. ``mark`` (spotlighting, see
``llmstack.tools.spotlight``) is applied to what a tool returns, where the result text is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmstack.inference.engine import ToolUse
from llmstack.tokenizer import special as S
from llmstack.tools.calculator import calculator
from llmstack.tools.python_sandbox import python_tool

Tool = Callable[[str], str]
MAX_RESULT_CHARS = 2000


class ToolBox:
    def __init__(self, tools: dict[str, Tool], mark: Callable[[str], str] | None = None) -> None:
        self.tools = dict(tools)
        self.mark = mark

    def call(self, text: str) -> str:
        name, sep, argument = text.partition(":")
        name = name.strip()
        if not sep or not name:
            return f"error: a tool call is written 'name: argument'; tools: {', '.join(sorted(self.tools))}"
        tool = self.tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r}; tools: {', '.join(sorted(self.tools))}"
        try:
            result = tool(argument.strip())
        except Exception as e:  # a tool bug must not end the conversation
            result = f"error: {type(e).__name__}: {e}"
        if len(result) > MAX_RESULT_CHARS:
            result = result[:MAX_RESULT_CHARS] + "\n[truncated]"
        return self.mark(result) if self.mark else result


def default_toolbox(mark: Callable[[str], str] | None = None) -> ToolBox:
    return ToolBox({"calculator": calculator, "python": python_tool}, mark)


def tool_use(tok: Any, run: Callable[[str], str]) -> ToolUse:
    """How the engine runs tools for a model with our tokenizer: its tool-span ids, and ``run`` for the calls."""
    return ToolUse(
        tok.special_id(S.TOOL_CALL_START),
        tok.special_id(S.TOOL_CALL_END),
        tok.special_id(S.TOOL_RESULT_START),
        tok.special_id(S.TOOL_RESULT_END),
        run,
        tok.encode_ordinary,
        tok.decode,
    )
