"""Any model's own chat template as a chat format: prompts for answering, ids + loss mask for training.

Our assistants render with ``ChatFormat`` (our special tokens, tools inside the turn). Every other
model (SmolLM2, Llama, Qwen, Mistral, imported from Hugging Face or GGUF) renders with its Jinja chat
template, run the way ``transformers`` runs it (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``tools``, ``raise_exception``) in Jinja's sandbox. ``TemplateFormat`` has the same
``render`` / ``prompt`` as ``ChatFormat``, so SFT, DPO, GRPO, the reward model and RLHF train any model.

Two rules make the token ids right:

* **Message text never becomes a control token.** Each message's content is swapped for a sentinel
  before the template runs; the template's own text is encoded with special tokens, the content
  without (a user typing ``<|im_end|>`` gets ordinary tokens), exactly as ``ChatFormat`` does.
* **Pieces are encoded where generation would split them.** The prompt is encoded alone and the
  assistant's reply after it, so training sees the same ids as answering produces.

The loss mask: the template is rendered turn by turn. An assistant message's tokens are those that
``render(messages[:i+1])`` adds after ``render(messages[:i], add_generation_prompt=True)``: its text,
its tool calls as the template writes them, and the end-of-turn token; the generation prompt, text
after the end-of-turn token (ChatML's newline), prompts and tool results are 0. A template that
renders earlier turns differently once later ones follow (some drop old reasoning) cannot be masked
this way and is refused by name.

Tool calls go in the template's own format when it has one (it reads ``tool_calls``: Qwen / Hermes,
Llama 3.1, Mistral); a template without one gets them as Hermes-style text in the assistant's
content (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``) and results as ``tool`` turns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmstack.chat.conversation import ChatFormat, Conversation, Rendered
from llmstack.interop.bundle import Bundle, stop_ids_of
from llmstack.tokenizer import special as S
from llmstack.tokenizer.bpe import Tokenizer

Message = dict[str, Any]

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """transformers' ``tojson``: plain ``json.dumps`` (Jinja's own sorts keys and escapes ``<>&'`` for HTML,
    so a template's tool calls would come out as other text, and other tokens, than under transformers)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"chat template does not parse: {e}") from None


def render_template(
    template: str,
    messages: list[Message],
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The text of ``messages`` under a Jinja chat template, as ``transformers.apply_chat_template`` renders it."""
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            tools=None,  # as transformers passes it when no tools are given (``tools is none`` holds)
        )
    except TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None


def hermes_call(name: str, arguments: dict[str, Any]) -> str:
    """A tool call as text, Hermes / Qwen style, for templates with no tool format of their own."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def hermes_tools_note(tools: list[dict[str, Any]]) -> str:
    """A system note declaring ``tools`` (OpenAI function definitions) in the Hermes convention, for
    templates with no tool format of their own: calls come back as ``hermes_call`` text."""
    listing = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to help with the user's request. The functions:\n<tools>\n"
        f"{listing}\n</tools>\nTo call one, reply with a JSON object holding its name and arguments inside "
        '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function name>, "arguments": <arguments object>}'
        "\n</tool_call>"
    )


def parse_hermes_calls(text: str, names: Collection[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """``text`` -> (the text outside the calls, the calls as ``{"name", "arguments"}`` with arguments a dict).
    A call is a well-formed ``<tool_call>`` block naming one of ``names`` (any name when None: a call to an
    unknown tool then gets the toolbox's error); any other block stays in the text."""
    calls, kept, pos = [], [], 0
    for m in _HERMES_CALL.finditer(text):
        try:
            value = json.loads(m[1])
        except ValueError:
            continue
        if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
            continue
        if names is not None and value["name"] not in names:
            continue
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"input": args}
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append({"name": value["name"], "arguments": args if isinstance(args, dict) else {"input": args}})
    return "".join(kept) + text[pos:], calls


HERMES_TAG = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def to_messages(conv: Conversation) -> list[Message]:
    """Our conversation -> OpenAI-style messages: an assistant turn with tool use becomes assistant
    messages (with ``tool_calls``, transformers' convention: arguments as a dict) and ``tool`` results."""
    out: list[Message] = []
    for m in conv.messages:
        if m.role != "assistant":
            out.append({"role": m.role, "content": m.text})
            continue
        text, calls = "", []

        def flush(text: str, calls: list[dict[str, Any]]) -> None:
            msg: Message = {"role": "assistant", "content": text}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)

        for p in m.parts:
            if p.kind == "text":
                text += p.text
            elif p.kind == "tool_call":
                name, _, arg = p.text.partition(":")
                call = {"name": name.strip(), "arguments": {"input": arg.strip()}}
                calls.append({"type": "function", "function": call})
            else:
                flush(text, calls)
                text, calls = "", []
                out.append({"role": "tool", "content": p.text})
        if text or calls or not out or out[-1]["role"] != "tool":
            flush(text, calls)
    return out


def _calls_as_text(m: Message) -> Message:
    """An assistant message's ``tool_calls`` written into its content (``hermes_call``)."""
    text = m.get("content") or ""
    for call in m["tool_calls"]:
        fn = call.get("function", call)
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"input": args}
        text += hermes_call(str(fn.get("name", "")), args if isinstance(args, dict) else {"input": args})
    return {k: v for k, v in m.items() if k != "tool_calls"} | {"content": text}


@dataclass
class TemplateFormat:
    """A model's own chat template with its tokenizer: ``render`` (ids + loss mask) and ``prompt`` (ids)."""

    tok: Any
    template: str
    bos_token: str | None = None
    eos_token: str | None = None
    stop_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        _compile(self.template)
        self.structured_calls = "tool_calls" in self.template

    @property
    def pad_id(self) -> int:
        """Any id: padded positions are never trained (the eos, else 0)."""
        return min(self.stop_ids) if self.stop_ids else 0

    def _text(self, messages: list[Message], gen: bool) -> str:
        return render_template(
            self.template, messages, bos_token=self.bos_token, eos_token=self.eos_token, add_generation_prompt=gen
        )

    def messages(self, conv: Conversation | list[Message]) -> list[Message]:
        """OpenAI-style messages for the template; tool calls as text where it has no tool format."""
        msgs = to_messages(conv) if isinstance(conv, Conversation) else list(conv)
        if self.structured_calls:
            return msgs
        return [_calls_as_text(m) if m.get("tool_calls") else m for m in msgs]

    def _encode(self, text: str, contents: list[str]) -> list[int]:
        """Template text with specials, sentinel'd message contents as ordinary text."""
        ids: list[int] = []
        pos = 0
        for m in _SENTINEL.finditer(text):
            ids += self.tok.encode_with_special(text[pos : m.start()]) if m.start() > pos else []
            ids += self.tok.encode_ordinary(contents[int(m[1])])
            pos = m.end()
        return ids + (self.tok.encode_with_special(text[pos:]) if pos < len(text) else [])

    def _sentinel(self, messages: list[Message]) -> tuple[list[Message], list[str]]:
        contents: list[str] = []
        out: list[Message] = []
        for m in messages:
            c = m.get("content")
            if isinstance(c, str) and c:
                out.append({**m, "content": f"\ue000{len(contents)}\ue001"})
                contents.append(c)
            else:
                out.append(m)
        return out, contents

    def prompt(self, conv: Conversation | list[Message], max_tokens: int | None = None) -> list[int]:
        """Ids that ask for the next assistant turn."""
        marked, contents = self._sentinel(self.messages(conv))
        ids = self._encode(self._text(marked, gen=True), contents)
        if max_tokens is not None and len(ids) > max_tokens:
            raise ValueError(f"the conversation has {len(ids)} tokens; the model's context is {max_tokens}")
        return ids

    def render(self, conv: Conversation | list[Message], max_tokens: int | None = None) -> Rendered:
        """Ids and loss mask of a whole conversation (1 on what the assistant writes), cut at ``max_tokens``."""
        msgs = self.messages(conv)
        marked, contents = self._sentinel(msgs)
        full = self._text(marked, gen=False)
        # cut points: where each assistant message starts (after its generation prompt) and ends
        cuts: list[tuple[int, int]] = []
        for i, m in enumerate(marked):
            if m["role"] != "assistant":
                continue
            before = self._text(marked[:i], gen=True)
            through = self._text(marked[: i + 1], gen=False)
            if not (full.startswith(through) and through.startswith(before)):
                raise ValueError(
                    "this chat template renders a turn differently once later turns follow (or its generation "
                    "prompt is not a prefix of the assistant turn), so the assistant's tokens cannot be masked"
                )
            cuts.append((len(before), len(through)))
        ids: list[int] = []
        mask: list[int] = []
        pos = 0
        for start, end in cuts:  # character offsets into ``full``
            piece = self._encode(full[pos:start], contents)
            ids += piece
            mask += [0] * len(piece)
            reply = self._encode(full[start:end], contents)
            last_stop = max((k for k, t in enumerate(reply) if t in self.stop_ids), default=len(reply) - 1)
            ids += reply
            mask += [1 if k <= last_stop else 0 for k in range(len(reply))]
            pos = end
        tail = self._encode(full[pos:], contents)
        ids += tail
        mask += [0] * len(tail)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return Rendered(ids, mask)


def is_ours(bundle: Bundle) -> bool:
    """Our chat format and tool tokens (else: the model's own chat template)."""
    return _our_chat_tokens(bundle.tokenizer)


def _our_chat_tokens(tok: Any) -> bool:
    return isinstance(tok, Tokenizer) and all(
        s in tok.special_tokens for s in (S.ASSISTANT_START, S.ASSISTANT_END, S.TOOL_CALL_START)
    )


def chat_format(bundle: Bundle) -> ChatFormat | TemplateFormat:
    """The chat format every stage renders ``bundle``'s conversations with: ours, or the model's own template."""
    if is_ours(bundle):
        return ChatFormat(bundle.tokenizer)
    return TemplateFormat(
        bundle.tokenizer, bundle.template(), bundle.bos_token, bundle.eos_token, frozenset(bundle.stop_ids())
    )


def format_of(tok: Any) -> ChatFormat | TemplateFormat:
    """The chat format of a tokenizer alone: ours, or the template an imported tokenizer carries (the same
    choice as ``chat_format`` on its bundle, also for an import converted to our tokenizer class)."""
    if _our_chat_tokens(tok) and not tok.chat_template:
        return ChatFormat(tok)
    if not tok.chat_template:
        raise ValueError("this model has no chat template (tokenizer_config.json / tokenizer.chat_template)")
    return TemplateFormat(
        tok, tok.chat_template, tok.bos_token, tok.eos_token, frozenset(stop_ids_of(tok, tok.eos_token))
    )
