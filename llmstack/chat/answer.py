"""The one way to answer a chat, with any model: ``ChatModel(bundle)``.

* Our assistants (an llmstack tokenizer with the chat and tool specials): OpenAI-style messages become
  a ``Conversation`` rendered by ``ChatFormat``; tool calls run inside the engine when a ``tools``
  function is given (``name: argument`` -> result text), and the reply's tool spans can be shown as
  text or left out (``visible``).
* Any other chat model (SmolLM2, an imported HF / GGUF model): the messages are rendered with the
  model's own Jinja chat template by ``chat/template.py``'s ``TemplateFormat`` (the one the training
  stages use too): the template's text becomes control tokens, what the user typed never does. With a
  ``tools`` function, ``answer`` runs its calls in rounds, as training renders them (``to_messages``): a
  reply's ``<tool_call>{...}</tool_call>`` stops the turn, the result comes back as a ``tool`` message,
  and the model answers again (at most ``TOOL_ROUNDS`` calls); ``stream`` does the same, round by round.

Chat, serve, eval, the arena, the red team, synthetic data, preferences and RL all answer through
here. What is not here: a base model continuing a document (``inference/simulate.py``), multi-modal turns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.chat.template import TemplateFormat, chat_format, is_ours, parse_hermes_calls, render_template
from llmstack.inference.engine import Engine, Event
from llmstack.inference.sample import SamplingConfig, stream_text
from llmstack.interop.bundle import Bundle, bundle_of
from llmstack.tokenizer import special as S
from llmstack.tools.registry import tool_use

Message = dict[str, Any]
ROOM = 16  # new tokens a prompt must leave room for in the model's context
TOOL_ROUNDS = 4  # tool calls a template model's answer may make before its reply is taken as it is


def call_text(call: dict[str, Any]) -> str:
    """A parsed Hermes call -> our tools' ``name: argument`` (the inverse of ``to_messages``: ``{"input": x}``
    is ``x``; other arguments go as JSON)."""
    args = call["arguments"]
    arg = args["input"] if set(args) == {"input"} else json.dumps(args, ensure_ascii=False)
    return f"{call['name']}: {arg}"


def render(bundle: Bundle, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` under the bundle's chat template."""
    return render_template(
        bundle.template(),
        messages,
        bos_token=bundle.bos_token,
        eos_token=bundle.eos_token,
        add_generation_prompt=add_generation_prompt,
    )


class ChatModel:
    """A loaded model that answers chats: prompt ids, batched answers, a streamed reply.

    ``tools`` runs our assistants' tool calls (``name: argument`` -> result); ``None`` leaves a call
    unanswered (the reply stops being useful there, but nothing runs).
    """

    def __init__(self, bundle: Bundle, tools: Callable[[str], str] | None = None) -> None:
        self.bundle, self.tok = bundle, bundle.tokenizer
        self.ours = is_ours(bundle)
        self.fmt: ChatFormat | TemplateFormat = chat_format(bundle)  # no chat template: says so now
        self.tools = tools
        self.context = int(bundle.model.config.max_seq_len)
        bos = self.tok.bos_id if self.ours else None
        self.stop_ids = frozenset(bundle.stop_ids() | ({bos} if bos is not None else set()))
        self._engines: dict[Callable[[str], str] | None, Engine] = {}
        self.engine = self.engine_for(tools)

    def engine_for(self, tools: Callable[[str], str] | None) -> Engine:
        """One engine per tool function (an engine keeps its CUDA graphs: build it once). Keyed by the function
        itself, not its id: two ``box.call`` of one toolbox are equal, and a freed function's id is reused."""
        key = tools if self.ours else None  # a template model runs no tools: one engine
        if key not in self._engines:
            runs = tool_use(self.tok, key) if key is not None else None
            self._engines[key] = Engine(self.bundle.model, runs, token_bytes=self.tok.decode_token_bytes)
        return self._engines[key]

    # ------------------------------------------------------------------------- prompts
    def prompt(self, messages: list[Message] | Conversation, max_tokens: int | None = None) -> list[int]:
        """Messages (OpenAI style, or our ``Conversation``) -> ids that ask for the next assistant turn."""
        if isinstance(self.fmt, ChatFormat):
            conv = messages if isinstance(messages, Conversation) else Conversation.from_openai(messages)
            return self.fmt.prompt(conv, max_tokens=max_tokens)
        if isinstance(messages, Conversation):
            return self.fmt.prompt(messages, max_tokens=max_tokens)
        plain = [
            {"role": m["role"], "content": m.get("content") or ""}
            | ({"tool_calls": m["tool_calls"]} if m.get("tool_calls") else {})
            for m in messages
        ]
        return self.fmt.prompt(plain, max_tokens=max_tokens)

    def ask(self, question: str, system: str | None = None) -> list[Message]:
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]

    def fits(self, messages: list[Message], room: int = ROOM) -> bool:
        return len(self.prompt(messages)) <= self.context - room

    # ------------------------------------------------------------------------- answers
    def text(self, ids: Sequence[int], visible: bool = False) -> str:
        """Generated ids -> text up to the first stop token; ``visible`` leaves tool spans out."""
        kept: list[int] = []
        spans = self._span_ids() if visible else frozenset()
        depth = 0
        for t in ids:
            if t in self.stop_ids:
                break
            if t in spans:
                depth = 1 - depth  # start and end tokens alternate: call start/end, result start/end
                continue
            if not depth:
                kept.append(t)
        return self.tok.decode(kept)

    def _span_ids(self) -> frozenset[int]:
        if not self.ours:
            return frozenset()
        names = (S.TOOL_CALL_START, S.TOOL_CALL_END, S.TOOL_RESULT_START, S.TOOL_RESULT_END)
        return frozenset(self.tok.special_id(n) for n in names)

    def generate(
        self, prompts: list[list[int]], cfg: SamplingConfig, tools: Callable[[str], str] | None = None
    ) -> list[list[int]]:
        """Generated ids of each prompt, one batch (stop tokens included where they ended a row)."""
        return self.engine_for(tools).generate(prompts, cfg, set(self.stop_ids))

    def answer(
        self,
        chats: Sequence[list[Message]],
        cfg: SamplingConfig,
        tools: Callable[[str], str] | None = None,
        batch_size: int = 32,
        visible: bool = False,
    ) -> list[str | None]:
        """The reply to each chat, batched (similar lengths together); ``None`` where the prompt leaves
        the context less than ``ROOM`` tokens. Our replies keep their tool calls and results as text
        unless ``visible``; a template model's with ``tools`` keep theirs as ``<tool_call>`` and
        ``<tool_response>`` blocks unless ``visible``."""
        tools = tools or self.tools
        if not self.ours and tools is not None:
            return self._answer_in_rounds(chats, cfg, tools, batch_size, visible)
        return self._answer_once([self.prompt(chat) for chat in chats], cfg, tools, batch_size, visible)

    def _answer_once(
        self,
        prompts: list[list[int]],
        cfg: SamplingConfig,
        tools: Callable[[str], str] | None,
        batch_size: int,
        visible: bool,
    ) -> list[str | None]:
        out: list[str | None] = [None] * len(prompts)
        todo = sorted(
            (i for i, p in enumerate(prompts) if len(p) <= self.context - ROOM), key=lambda i: len(prompts[i])
        )
        for k in range(0, len(todo), batch_size):
            rows = todo[k : k + batch_size]
            for i, ids in zip(rows, self.generate([prompts[i] for i in rows], cfg, tools), strict=True):
                out[i] = self.text(ids, visible)
        return out

    def _answer_in_rounds(
        self,
        chats: Sequence[list[Message]],
        cfg: SamplingConfig,
        tools: Callable[[str], str],
        batch_size: int,
        visible: bool,
    ) -> list[str | None]:
        """A template model with tools: generate; where the reply calls tools, run them, add the assistant's
        call and a ``tool`` message with each result (as SFT renders tool use), and generate again."""
        history = [list(chat) for chat in chats]
        shown: list[list[str]] = [[] for _ in chats]
        out: list[str | None] = [None] * len(chats)
        todo = list(range(len(chats)))
        for round_ in range(TOOL_ROUNDS + 1):
            prompts = [self.prompt(history[i]) for i in todo]
            replies = self._answer_once(prompts, cfg, None, batch_size, False)
            again = []
            for i, reply in zip(todo, replies, strict=True):
                if reply is None:  # the history outgrew the context: what was said so far
                    out[i] = "".join(shown[i]) if round_ else None
                    continue
                responses = run_calls(reply, tools, history[i]) if round_ < TOOL_ROUNDS else None
                if responses is None:
                    out[i] = "".join(shown[i]) + (parse_hermes_calls(reply)[0] if visible else reply)
                    continue
                shown[i].append(parse_hermes_calls(reply)[0] if visible else reply + responses)
                again.append(i)
            todo = again
            if not todo:
                break
        return out

    def answer_questions(
        self,
        questions: Sequence[str],
        max_new_tokens: int = 64,
        tools: Callable[[str], str] | None = None,
        batch_size: int = 32,
    ) -> list[str]:
        """Greedy replies to single user questions (an empty one where a question does not fit)."""
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        return [a or "" for a in self.answer([self.ask(q) for q in questions], cfg, tools, batch_size)]

    def events(self, prompts: list[list[int]], cfg: SamplingConfig) -> Iterator[Event]:
        """The engine's events for ready prompts (with this model's stop tokens and tools)."""
        return self.engine.stream(prompts, cfg, set(self.stop_ids))

    def stream(self, messages: list[Message], cfg: SamplingConfig, added: list[Message] | None = None) -> Iterator[str]:
        """Stream the next reply as text pieces; the end-of-turn token itself is not shown. A template model
        with ``tools`` runs its calls between rounds, as ``answer`` does, and streams each tool's response as a
        ``<tool_response>`` block. ``added`` gets the messages the reply adds to the chat, in order (the
        assistant's calls, the ``tool`` results, its answer), once the stream has been read to its end: the
        history to keep for the next turn. Tool results that fill the context end the reply with a note."""
        if self.ours or self.tools is None:
            return self._stream_round(messages, cfg, added)
        return self._stream_rounds(messages, cfg, self.tools, added)

    def _stream_round(self, messages: list[Message], cfg: SamplingConfig, added: list[Message] | None) -> Iterator[str]:
        def until_stop() -> Iterator[int]:
            for ev in self.events([self.prompt(messages)], cfg):
                if ev.token in self.stop_ids:
                    return
                yield ev.token

        pieces = []
        for piece in stream_text(until_stop(), self.tok.decode_token_bytes):
            pieces.append(piece)
            yield piece
        if added is not None:
            added.append({"role": "assistant", "content": "".join(pieces)})

    def _stream_rounds(
        self, messages: list[Message], cfg: SamplingConfig, tools: Callable[[str], str], added: list[Message] | None
    ) -> Iterator[str]:
        history, new = list(messages), list[Message]()
        for round_ in range(TOOL_ROUNDS + 1):
            if round_ and not self.fits(history):  # the tools' results outgrew the context: stop there
                note = f"[the tool results fill the model's {self.context}-token context]"
                new.append({"role": "assistant", "content": note})
                yield note
                break
            turn: list[Message] = []
            yield from self._stream_round(history, cfg, turn)
            responses = run_calls(turn[0]["content"], tools, new) if round_ < TOOL_ROUNDS else None
            if responses is None:
                new += turn
                break
            history = list(messages) + new
            yield responses
        if added is not None:
            added += new

    def reply(self, messages: list[Message], cfg: SamplingConfig) -> str:
        return "".join(self.stream(messages, cfg))


def run_calls(reply: str, tools: Callable[[str], str], history: list[Message]) -> str | None:
    """A template model's reply with Hermes tool calls: append the assistant's calls and a ``tool`` message
    with each result to ``history`` (as SFT renders tool use) and return the results as ``<tool_response>``
    blocks; ``None`` (nothing appended) when the reply calls no tool."""
    text, calls = parse_hermes_calls(reply)
    if not calls:
        return None
    history.append(
        {"role": "assistant", "content": text, "tool_calls": [{"type": "function", "function": c} for c in calls]}
    )
    results = [tools(call_text(c)) for c in calls]
    history += [{"role": "tool", "content": r} for r in results]
    return "".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


def write_stream(pieces: Iterable[str], out: Any) -> str:
    """Write text pieces as they come, then a newline; the whole text."""
    seen = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        seen.append(piece)
    out.write("\n")
    return "".join(seen)


def repl(
    reply: Callable[[str], Iterable[str]],
    out: Any,
    read: Callable[[str], str] = input,
    command: Callable[[str], str | None] | None = None,
) -> None:
    """The one read-reply loop of the chat commands: a line in, its reply streamed out. An empty line,
    ``/quit`` or EOF ends it; ``command`` may answer a line itself (``/reset`` ...), None passes it on."""
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            break
        if not line or line == "/quit":
            break
        answer = command(line) if command else None
        if answer is not None:
            out.write(answer + "\n")
            continue
        write_stream(reply(line), out)


def chat_repl(model: ChatModel, cfg: SamplingConfig, system: str | None, out: Any, read: Any = input) -> None:
    """Multi-turn chat with any model: the history grows by each question and what its reply added (a template
    model's tool calls and their results too, when the model has tools)."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []

    def reply(text: str) -> Iterator[str]:
        messages.append({"role": "user", "content": text})
        added: list[Message] = []
        yield from model.stream(messages, cfg, added)
        messages.extend(added)

    repl(reply, out, read)


def our_chat(model: Any, tok: Any, tools: Callable[[str], str] | None = None) -> ChatModel:
    """A ChatModel for a model being trained or evaluated in-process: ours (our chat format and tools), or
    any other (its tokenizer carries its chat template)."""
    return ChatModel(bundle_of(model, tok), tools)
