"""What the red team attacks: a model behind one interface, ``answer(chats, max_tokens)``.

* ``ModelTarget``: a loaded model through ``llmstack/chat/answer.py``. Ours (tool tokens): a
  ``role: tool`` message lands inside the assistant turn as a tool result, and the model continues
  that turn; tool calls it makes run in the engine (the calculator; others answer with an error).
  The judged answer is its visible text (tool calls and results left out). Any other bundle
  (SmolLM2, an HF / GGUF import) gets its own chat template.
* ``EndpointTarget``: an OpenAI-compatible server (``/v1/chat/completions``), requests in parallel.

A chat that does not fit the model's context answers ``None`` (counted as skipped, not scored).
Greedy decoding everywhere, so a run is repeatable.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from llmstack.chat.answer import ChatModel
from llmstack.inference.sample import SamplingConfig
from llmstack.interop.bundle import Bundle
from llmstack.interop.load import load_model

Chat = list[dict[str, Any]]


class Target(Protocol):
    name: str
    ours: bool  # tool tokens: data can arrive as a tool result inside the assistant turn

    def answer(self, chats: list[Chat], max_tokens: int, tools: Callable[[str], str] | None) -> list[str | None]: ...


class ModelTarget:
    """A loaded model (ours or a template model), answering through ``ChatModel``: greedy, batched,
    the judged answer being its visible text."""

    def __init__(self, name: str, bundle: Bundle, batch_size: int = 16) -> None:
        self.name, self.batch_size = name, batch_size
        self.chat = ChatModel(bundle)  # no chat template: say so now
        self.ours = self.chat.ours

    def answer(self, chats: list[Chat], max_tokens: int, tools: Callable[[str], str] | None) -> list[str | None]:
        cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0)
        return self.chat.answer(chats, cfg, tools, self.batch_size, visible=True)


class EndpointTarget:
    """Chats go out as they are; a server that lacks tools gets the data inside the user message
    (``ours`` is False), so any OpenAI-compatible endpoint can be attacked."""

    ours = False

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, workers: int = 4) -> None:
        import openai  # optional: pip install openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=1, timeout=600)
        self.model = model or self.client.models.list().data[0].id
        self.name, self.workers = f"{self.model}@{base_url}", workers

    def answer(self, chats: list[Chat], max_tokens: int, tools: Callable[[str], str] | None) -> list[str | None]:
        import openai  # optional: pip install openai

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
    p = Path(spec).resolve()
    name = spec if spec == "smollm2" else f"{p.parent.name}-{p.name}"
    return ModelTarget(name, load_model(spec, device))
