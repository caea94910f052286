"""Conversations and how they become tokens: the chat template and the SFT loss mask.

A conversation renders as::

    <|bos|>
    <|system_start|> instructions <|system_end|>                      (optional)
    <|user_start|> question <|user_end|>
    <|assistant_start|> text <|tool_call_start|>calculator: 12*34<|tool_call_end|>
        <|tool_result_start|>408<|tool_result_end|> more text <|assistant_end|>
    ... more user/assistant turns

Only what the assistant writes is trained (mask 1): its text, its tool calls and the
``<|assistant_end|>`` that ends its turn. Prompts, the ``<|assistant_start|>`` the engine places, and
tool results (written by the tool, not the model) are mask 0. Message text is encoded as ordinary
text, so a user (or a web page) typing ``<|assistant_end|>`` cannot forge a turn boundary.

Truncation policy (``render(..., max_tokens=N)``): keep the system prompt and the most recent turns;
drop the oldest user/assistant exchanges whole until the rest fits; if the newest exchange alone is
still too long, cut it at the end (for training this loses the tail, never the start of a turn).

``CHAT_TEMPLATE`` is the same rendering in Jinja for Hugging Face ``apply_chat_template`` (OpenAI
message format: ``tool_calls`` on assistant messages, ``role: tool`` for results).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from llmstack.tokenizer import special as S

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Part:
    """A piece of an assistant turn: plain text, a tool call (``name: argument``), or a tool result."""

    kind: Literal["text", "tool_call", "tool_result"]
    text: str


@dataclass
class Message:
    role: Role
    content: str | list[Part]

    @property
    def parts(self) -> list[Part]:
        return [Part("text", self.content)] if isinstance(self.content, str) else list(self.content)

    @property
    def text(self) -> str:
        """The visible text (tool calls and results left out)."""
        return "".join(p.text for p in self.parts if p.kind == "text")


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, m in enumerate(self.messages):
            if m.role not in ("system", "user", "assistant"):
                raise ValueError(f"message {i}: unknown role {m.role!r} (system, user or assistant)")
            if m.role == "system" and i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
            if m.role != "assistant" and any(p.kind != "text" for p in m.parts):
                raise ValueError(f"message {i}: only assistant turns hold tool calls and results")

    @classmethod
    def of(cls, *turns: tuple[str, str | list[Part]]) -> Conversation:
        return cls([Message(role, content) for role, content in turns])  # type: ignore[arg-type]

    @classmethod
    def from_openai(cls, messages: Iterable[dict[str, Any]]) -> Conversation:
        """OpenAI-style messages (``tool_calls`` + ``role: tool``) -> our turns (tool use inside the turn)."""
        out: list[Message] = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content") or ""
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string")
            if role == "tool":
                if not out or out[-1].role != "assistant":
                    raise ValueError(f"message {i}: a tool result must follow an assistant tool call")
                out[-1].content = [*out[-1].parts, Part("tool_result", content)]
                continue
            if role == "assistant":
                parts = [Part("text", content)] if content else []
                for call in m.get("tool_calls") or []:
                    fn = call.get("function", call)
                    args = fn.get("arguments", "")
                    if isinstance(args, dict):  # transformers' convention; ours is ``name: argument`` text
                        args = args["input"] if set(args) == {"input"} else json.dumps(args, ensure_ascii=False)
                    parts.append(Part("tool_call", f"{fn['name']}: {args}"))
                if out and out[-1].role == "assistant" and out[-1].parts and out[-1].parts[-1].kind == "tool_result":
                    out[-1].content = out[-1].parts + parts  # the turn continues after its tool result
                else:
                    out.append(Message("assistant", parts))
                continue
            if role not in ("system", "user"):
                raise ValueError(f"message {i}: unknown role {role!r}")
            out.append(Message(role, content))  # type: ignore[arg-type]
        return cls(out)


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 where the token is trained (what the assistant wrote)


class ChatFormat:
    """Renders conversations with a tokenizer's special tokens."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        sid = tok.special_id
        self.bos = sid(S.BOS)
        self.start = {"system": sid(S.SYSTEM_START), "user": sid(S.USER_START), "assistant": sid(S.ASSISTANT_START)}
        self.end = {"system": sid(S.SYSTEM_END), "user": sid(S.USER_END), "assistant": sid(S.ASSISTANT_END)}
        self.call = (sid(S.TOOL_CALL_START), sid(S.TOOL_CALL_END))
        self.result = (sid(S.TOOL_RESULT_START), sid(S.TOOL_RESULT_END))
        self.pad_id = sid(S.PAD)
        self.stop_ids = frozenset({self.end["assistant"], self.bos})  # a reply ends at either

    def _message(self, m: Message, close: bool = True) -> Rendered:
        enc = self.tok.encode_ordinary
        if m.role != "assistant":
            ids = [self.start[m.role], *enc(m.text), self.end[m.role]]
            return Rendered(ids, [0] * len(ids))
        ids, mask = [self.start["assistant"]], [0]
        for p in m.parts:
            if p.kind == "text":
                piece, trained = enc(p.text), 1
            elif p.kind == "tool_call":
                piece, trained = [self.call[0], *enc(p.text), self.call[1]], 1
            else:
                piece, trained = [self.result[0], *enc(p.text), self.result[1]], 0
            ids += piece
            mask += [trained] * len(piece)
        if close:
            ids.append(self.end["assistant"])
            mask.append(1)
        return Rendered(ids, mask)

    def render(self, conv: Conversation | list[dict[str, Any]], max_tokens: int | None = None) -> Rendered:
        """Tokens and loss mask of a whole conversation (for SFT), truncated by the stated policy."""
        if not isinstance(conv, Conversation):  # OpenAI-style messages (a user's data file)
            conv = Conversation.from_openai(conv)
        msgs = conv.messages
        head = [Rendered([self.bos], [0])]
        if msgs and msgs[0].role == "system":
            head.append(self._message(msgs[0]))
            msgs = msgs[1:]
        body = [self._message(m) for m in msgs]
        if max_tokens is not None:
            fixed = sum(len(r.ids) for r in head)
            while len(body) > 1 and fixed + sum(len(r.ids) for r in body) > max_tokens:
                drop = 2 if len(body) > 2 and msgs[0].role == "user" else 1  # one whole exchange
                body, msgs = body[drop:], msgs[drop:]
        ids = [t for r in head + body for t in r.ids]
        mask = [t for r in head + body for t in r.mask]
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return Rendered(ids, mask)

    def prompt(self, conv: Conversation, max_tokens: int | None = None) -> list[int]:
        """Tokens that ask for the next assistant turn (the conversation + ``<|assistant_start|>``).

        If the last message is an unfinished assistant turn it is continued rather than restarted.
        """
        msgs = conv.messages
        if msgs and msgs[-1].role == "assistant":
            done = self.render(Conversation(msgs[:-1])).ids
            ids = done + self._message(msgs[-1], close=False).ids
        else:
            ids = self.render(conv).ids + [self.start["assistant"]]
        if max_tokens is not None and len(ids) > max_tokens:
            raise ValueError(f"the conversation has {len(ids)} tokens; the model's context is {max_tokens}")
        return ids
