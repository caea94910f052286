"""What the red team attacks: a model behind one interface, ``answer(chats, max_tokens)``.

* ``OurTarget``: an llmstack assistant (tool tokens): OpenAI-style messages -> ``Conversation`` ->
  ``ChatFormat``; a ``role: tool`` message lands inside the assistant turn as a tool result, and the
  model continues that turn. Tool calls it makes run in the engine (the calculator; others answer
  with an error). The judged answer is its visible text (tool calls and results left out).
* ``TemplateTarget``: any other bundle (SmolLM2, an HF / GGUF import) with its own chat template.
* ``EndpointTarget``: an OpenAI-compatible server (``/v1/chat/completions``), requests in parallel.

A chat that does not fit the model's context answers ``None`` (counted as skipped, not scored).
Greedy decoding everywhere, so a run is repeatable.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from llmstack.inference.sample import SamplingConfig
from llmstack.interop.bundle import Bundle

Chat = list[dict[str, Any]]
ROOM = 16  # new tokens a prompt must leave room for


class Target(Protocol):
    name: str
    ours: bool  # tool tokens: data can arrive as a tool result inside the assistant turn

    def answer(self, chats: list[Chat], max_tokens: int, tools: Callable[[str], str] | None) -> list[str | None]: ...


class OurTarget:
    ours = True

    def __init__(self, name: str, bundle: Bundle, batch_size: int = 16) -> None:
        self.name, self.bundle, self.batch_size = name, bundle, batch_size

    def answer(self, chats: list[Chat], max_tokens: int, tools: Callable[[str], str] | None) -> list[str | None]:
        from llmstack.chat.conversation import ChatFormat, Conversation
        from llmstack.inference.engine import Engine, ToolUse
        from llmstack.tokenizer import special as S

        tok = self.bundle.tokenizer
        fmt = ChatFormat(tok)
        tool_use = ToolUse.from_tokenizer(tok, tools) if tools else None
        engine = Engine(self.bundle.model, tool_use)
        stop = {tok.special_id(S.ASSISTANT_END)} | ({tok.bos_id} if tok.bos_id is not None else set())
        spans = {
            tok.special_id(s) for s in (S.TOOL_CALL_START, S.TOOL_CALL_END, S.TOOL_RESULT_START, S.TOOL_RESULT_END)
        }
        ctx = self.bundle.model.config.max_seq_len
        prompts: list[list[int] | None] = []
        for chat in chats:
            ids = fmt.prompt(Conversation.from_openai(chat))
            prompts.append(ids if len(ids) <= ctx - ROOM else None)
        out: list[str | None] = [None] * len(chats)
        todo = [i for i, p in enumerate(prompts) if p is not None]
        cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0)
        for k in range(0, len(todo), self.batch_size):
            rows = todo[k : k + self.batch_size]
            for i, ids in zip(rows, engine.generate([prompts[i] for i in rows], cfg, stop), strict=True):  # type: ignore[misc]
                out[i] = tok.decode(_visible(ids, spans, stop))
        return out


def _visible(ids: list[int], spans: set[int], stop: set[int]) -> list[int]:
    """The tokens outside tool-call and tool-result spans, up to the first stop token."""
    out, depth = [], 0
    for t in ids:
        if t in stop:
            break
        if t in spans:
            depth = 1 - depth  # start and end tokens alternate: call start/end, result start/end
            continue
        if not depth:
            out.append(t)
    return out


class TemplateTarget:
    ours = False

    def __init__(self, name: str, bundle: Bundle, batch_size: int = 16) -> None:
        bundle.template()  # no chat template: say so now
        self.name, self.bundle, self.batch_size = name, bundle, batch_size

    def answer(self, chats: list[Chat], max_tokens: int, tools: Callable[[str], str] | None) -> list[str | None]:
        from llmstack.inference.engine import Engine
        from llmstack.interop.chat import prompt_ids

        engine = Engine(self.bundle.model)
        stops = self.bundle.stop_ids()
        ctx = self.bundle.model.config.max_seq_len
        prompts = [prompt_ids(self.bundle, chat) for chat in chats]
        out: list[str | None] = [None] * len(chats)
        todo = [i for i, p in enumerate(prompts) if len(p) <= ctx - ROOM]
        cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0)
        # similar lengths together: less padding in a batch
        todo.sort(key=lambda i: len(prompts[i]))
        for k in range(0, len(todo), self.batch_size):
            rows = todo[k : k + self.batch_size]
            for i, ids in zip(rows, engine.generate([prompts[i] for i in rows], cfg, stops), strict=True):
                out[i] = self.bundle.tokenizer.decode([t for t in ids if t not in stops])
        return out


class EndpointTarget:
    """Chats go out as they are; a server that lacks tools gets the data inside the user message
    (``ours`` is False), so any OpenAI-compatible endpoint can be attacked."""

    ours = False

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, workers: int = 4) -> None:
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=1, timeout=600)
        self.model = model or self.client.models.list().data[0].id
        self.name, self.workers = f"{self.model}@{base_url}", workers

    def answer(self, chats: list[Chat], max_tokens: int, tools: Callable[[str], str] | None) -> list[str | None]:
        import openai

        def one(chat: Chat) -> str | None:
            try:
                r = self.client.chat.completions.create(
                    model=self.model,
                    messages=chat,  # type: ignore[arg-type]
                    max_tokens=max_tokens,
                    temperature=0,
                )
            except openai.BadRequestError:  # too long for its context, or refused by the server
                return None
            return r.choices[0].message.content or ""

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, chats))


def load_target(
    spec: str, endpoint_model: str | None = None, api_key: str | None = None, device: str = "cpu"
) -> Target:
    """``http(s)://...`` -> an endpoint; anything else (run dir, HF dir, .gguf, ``smollm2``) -> a local model."""
    if spec.startswith(("http://", "https://")):
        return EndpointTarget(spec, endpoint_model, api_key)
    from pathlib import Path

    from llmstack.eval.answer import is_ours
    from llmstack.interop.load import load_model

    bundle = load_model(spec)
    bundle.model.to(device)
    p = Path(spec).resolve()
    name = spec if spec == "smollm2" else f"{p.parent.name}-{p.name}"
    return OurTarget(name, bundle) if is_ours(bundle) else TemplateTarget(name, bundle)
