"""A multi-turn chat session with one of our assistants: streaming, tools, commands.

The session keeps the conversation, renders it with ``ChatFormat``, and streams the engine's events,
turning them back into turns: text goes to the screen as it comes; a tool call and its result are
shown on their own lines (``[calculator] 12*34`` / ``[result] 408``) and stored as tool parts, so the
next turn's prompt carries them. Commands: ``/reset``, ``/system TEXT``, ``/tokens`` (toggle the token
view: each generated token's id after it), ``/quit``.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llmstack.chat.answer import our_chat
from llmstack.chat.conversation import Conversation, Message, Part
from llmstack.inference.sample import SamplingConfig
from llmstack.tokenizer import special as S
from llmstack.tools.registry import ToolBox


@dataclass
class ChatSession:
    model: object
    tok: object
    tools: ToolBox | None
    cfg: SamplingConfig
    system: str | None = None
    show_tokens: bool = False
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.chat = our_chat(self.model, self.tok, self.tools.call if self.tools else None)  # type: ignore[arg-type]
        self.fmt = self.chat.fmt
        self.tool_use = self.chat.engine.tools
        self.end = self.tok.special_id(S.ASSISTANT_END)  # type: ignore[attr-defined]

    def conversation(self) -> Conversation:
        head = [Message("system", self.system)] if self.system else []
        return Conversation(head + self.messages)

    def reset(self) -> None:
        self.messages = []

    def ask(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply as display pieces; the turn is stored at the end."""
        tok = self.tok
        self.messages.append(Message("user", text))
        prompt = self.chat.prompt(self.conversation(), max_tokens=self.chat.context)
        parts: list[Part] = []
        text_ids: list[int] = []
        span: list[int] = []
        mode = "text"
        tu = self.tool_use
        decode: Callable[[list[int]], str] = tok.decode  # type: ignore[attr-defined]
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens

        def flush_text() -> None:
            if text_ids:
                parts.append(Part("text", decode(text_ids)))
                text_ids.clear()

        for ev in self.chat.events([prompt], self.cfg):
            t = ev.token
            if t == self.end or t == tok.bos_id:  # type: ignore[attr-defined]
                break
            if tu is not None and t == tu.call_start:
                flush_text()
                mode, span = "call", []
            elif tu is not None and t == tu.call_end:
                parts.append(Part("tool_call", decode(span)))
                yield f"\n[tool call] {decode(span)}\n"
                mode = "wait"
            elif tu is not None and t == tu.result_start:
                mode, span = "result", []
            elif tu is not None and t == tu.result_end:
                parts.append(Part("tool_result", decode(span)))
                yield f"[tool result] {decode(span)}\n"
                mode = "text"
            elif mode in ("call", "result"):
                span.append(t)
            else:
                text_ids.append(t)
                piece = utf8.decode(tok.decode_token_bytes(t))  # type: ignore[attr-defined]
                yield piece + (f"[{t}]" if self.show_tokens else "")
        flush_text()
        self.messages.append(Message("assistant", parts or ""))

    def handle(self, line: str) -> str | None:
        """A slash command's reply, or None when the line is a message for the model."""
        if line == "/reset":
            self.reset()
            return "(conversation cleared)"
        if line.startswith("/system"):
            self.system = line.removeprefix("/system").strip() or None
            self.reset()
            return f"(system prompt {'set' if self.system else 'removed'}; conversation cleared)"
        if line == "/tokens":
            self.show_tokens = not self.show_tokens
            return f"(token view {'on' if self.show_tokens else 'off'})"
        if line.startswith("/"):
            return "commands: /reset, /system TEXT, /tokens, /quit"
        return None
