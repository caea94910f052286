"""The models a server offers: loaded bundles, how each turns OpenAI messages into prompt ids.

Two kinds of chat model sit behind one interface:

* ours (an llmstack tokenizer with tool tokens): messages become a ``Conversation`` rendered with
  ``ChatFormat``; tools can run inside the engine (calculator, python, ...) or be handed back to the
  client as OpenAI ``tool_calls``;
* any other bundle (SmolLM2 from its GGUF, an HF directory): messages are rendered with the model's
  own chat template; it has no tool tokens: a client's ``tools`` are declared in a system note and its
  calls are Hermes ``<tool_call>`` JSON in the text, which the server turns into ``tool_calls``.

A LoRA adapter directory is a served model of its own over its base model's weights (loaded once, shared
by all its adapters): the ``model`` field of a request picks the adapter. A custom assistant
(``llmstack.assistants``) is a served model of its own: its instructions and the
passages retrieved from its knowledge files are put in front of the client's messages, and its
answer gets a ``Sources:`` footer. A vision-language model (``llmstack.vision``, ``serve --vlm DIR``) is a
served model whose LM answers text chats through the engine; a chat with an ``image_url`` part (a
``data:`` URL) is answered by the whole VLM (``ServedModel.image_answer``); other models refuse images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmstack.chat.answer import ChatModel
from llmstack.chat.conversation import Conversation
from llmstack.chat.template import TemplateFormat, hermes_tools_note
from llmstack.inference.engine import Engine
from llmstack.interop.bundle import Bundle, llmstack_bundle
from llmstack.interop.load import load_model, resolve_model
from llmstack.tokenizer import special as S
from llmstack.tools.registry import ToolBox, default_toolbox
from llmstack.training.lora import adapted_copy, adapter_base, is_adapter_dir
from llmstack.vision.images import ImageError, decode_data_url
from llmstack.vision.vlm import LoadedVLM, load_vlm


class RequestError(ValueError):
    """A client error: becomes a 4xx OpenAI-style JSON error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class ServedModel:
    name: str
    bundle: Bundle
    toolbox: ToolBox | None  # tools the engine runs itself (ours only)
    assistant: Any = None  # an llmstack.assistants Assistant, or None
    created: int = 0
    vision: LoadedVLM | None = None  # a vision-language model: image chats are answered by it (``image_answer``)
    engine: Engine = field(init=False)

    def __post_init__(self) -> None:
        tok = self.bundle.tokenizer
        self.chat = ChatModel(self.bundle, self.toolbox.call if self.toolbox else _no_server_tools)
        self.ours = self.chat.ours
        self.engine = self.chat.engine
        self.stop_ids = self.chat.stop_ids
        self.special_ids = frozenset(tok.special_tokens.values())

    @property
    def context(self) -> int:
        return int(self.bundle.model.config.max_seq_len)

    def prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        """OpenAI messages (already validated) -> prompt ids asking for the next assistant turn."""
        if not self.ours:  # its own template; tools declared in a system note, calls as Hermes text
            msgs = list(messages)
            if tools:
                note = hermes_tools_note(tools)
                if msgs and msgs[0]["role"] == "system":
                    msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{note}"}
                else:
                    msgs.insert(0, {"role": "system", "content": note})
            assert isinstance(self.chat.fmt, TemplateFormat)
            try:
                return self.chat.fmt.prompt(msgs)
            except ValueError as e:
                raise RequestError(f"messages: {e}", "messages") from None
        msgs = [_our_message(m) for m in messages]
        if tools:
            listing = "\n".join(f"- {t['name']}: {t.get('description', '')}".rstrip(": ") for t in tools)
            note = f"You can call these tools (write `name: argument`):\n{listing}"
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{note}"}
            else:
                msgs.insert(0, {"role": "system", "content": note})
        try:
            conv = Conversation.from_openai(msgs)
        except (ValueError, KeyError) as e:
            raise RequestError(f"messages: {e}", "messages") from None
        return self.chat.prompt(conv)

    def image_prompt(
        self, messages: list[dict[str, Any]], image_url: str, user_turn: int, where: str
    ) -> tuple[list[int], torch.Tensor]:
        """A chat with one image in its ``user_turn``-th user message (``where``: that part's request field):
        prompt ids asking for the next assistant turn, and their input embeddings (the image's soft tokens at
        its placeholders) for the engine."""
        if self.vision is None:
            raise RequestError(
                f"{where}: the model {self.name!r} does not read images; serve a vision-language model "
                "(llmstack serve --vlm NAME=DIR) and send the image to it",
                where,
                "image_not_supported",
            )
        try:
            image = decode_data_url(image_url, where)
            conv = Conversation.from_openai(messages)
        except ImageError as e:
            raise RequestError(str(e), where, "invalid_image") from None
        except (ValueError, KeyError) as e:
            raise RequestError(f"messages: {e}", "messages") from None
        try:
            return self.vision.prompt(conv, image, user_turn)
        except ValueError as e:  # a conversation over the context with its image
            raise RequestError(f"messages: {e}", "messages") from None

    def runs_tool(self, name: str) -> bool:
        """Whether the server itself runs a tool of this name for this model (calculator, python, ...)."""
        return self.ours and self.toolbox is not None and name in self.toolbox.tools

    def tool_call_prefix(self, name: str | None) -> list[int]:
        """Ids that force a tool call (``tool_choice``): the call-start token and the tool's name."""
        tok = self.bundle.tokenizer
        return [tok.special_id(S.TOOL_CALL_START), *(tok.encode_ordinary(f"{name}: ") if name else [])]

    def text_ids(self, text: str) -> list[int]:
        """A completion prompt: the text as ordinary tokens, after BOS where the model's files say a text starts
        with it (``Bundle.add_bos``: ours yes, SmolLM2's GGUF no), so that it reads the text as it was trained."""
        tok = self.bundle.tokenizer
        ids = tok.encode_ordinary(text)
        bos = self.bundle.bos_token
        if self.bundle.add_bos and bos and bos in tok.special_tokens:
            ids = [tok.special_tokens[bos], *ids]
        return ids


def _no_server_tools(call: str) -> str:
    return "error: no tools run on this server for this model"


def _our_message(m: dict[str, Any]) -> dict[str, Any]:
    """OpenAI tool-call arguments (JSON) -> our ``name: argument`` text."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        fn = c["function"]
        calls.append({"function": {"name": fn["name"], "arguments": arguments_text(fn.get("arguments", ""))}})
    return {**m, "tool_calls": calls}


def arguments_text(arguments: str) -> str:
    """``{"input": "2+3"}`` -> ``2+3``; any other JSON is kept as written."""
    try:
        parsed = json.loads(arguments)
    except (ValueError, TypeError):
        return arguments
    if isinstance(parsed, dict) and set(parsed) == {"input"} and isinstance(parsed["input"], str):
        return parsed["input"]
    return arguments


def arguments_json(argument: str, key: str = "input") -> str:
    """Our call argument -> OpenAI ``arguments``: a JSON object as is, else ``{key: ...}`` (the tool's one
    string parameter, ``constrain.bare_key``)."""
    try:
        if isinstance(json.loads(argument), dict):
            return argument
    except ValueError:
        pass
    return json.dumps({key: argument})


class ModelRegistry:
    """Named models, loaded once; assistants share their base model's weights."""

    def __init__(self, device: str = "cpu", dtype: str | None = None) -> None:
        self.models: dict[str, ServedModel] = {}
        self._bundles: dict[str, Bundle] = {}
        self.device = device
        self.dtype = getattr(torch, dtype) if dtype else None

    def bundle(self, spec: str | Path) -> Bundle:
        """The loaded model at ``spec``. A LoRA adapter directory (PEFT's layout, e.g. ``<run>/checkpoints/
        step_N/adapter``) is served over its base model, which is loaded once and shared by every adapter."""
        key = str(resolve_model(spec).resolve())
        if key not in self._bundles:
            if is_adapter_dir(resolve_model(spec)):
                base = self.bundle(adapter_base(spec))
                model = adapted_copy(base.model, spec)
                bundle = Bundle(
                    model,  # type: ignore[arg-type]
                    base.tokenizer,
                    base.chat_template,
                    base.bos_token,
                    base.eos_token,
                    add_bos=base.add_bos,
                )
                bundle.source = str(spec)
            else:
                bundle = load_model(spec, dtype=self.dtype)
                bundle.model.to(self.device)
            self._bundles[key] = bundle
        return self._bundles[key]

    def preload(self, spec: str | Path, bundle: Bundle) -> None:
        """Use an already loaded bundle for ``spec`` (tests, or a caller that loaded it)."""
        self._bundles[str(resolve_model(spec).resolve())] = bundle

    def add(self, name: str, spec: str | Path, created: int = 0) -> ServedModel:
        if name in self.models:
            raise ValueError(f"two models are named {name!r}: give one another name (--model NAME=PATH)")
        sm = ServedModel(name, self.bundle(spec), default_toolbox(), created=created)
        self.models[name] = sm
        return sm

    def add_vlm(self, name: str, path: str | Path, created: int = 0) -> ServedModel:
        """A vision-language model directory (``llmstack vlm train``): its LM answers text chats through the
        engine, the whole VLM answers chats with an image."""
        if name in self.models:
            raise ValueError(f"two models are named {name!r}: give one another name (--vlm NAME=DIR)")
        vlm = load_vlm(path, self.device)
        bundle = llmstack_bundle(vlm.model, vlm.tok)
        bundle.source = str(path)
        sm = ServedModel(name, bundle, default_toolbox(), created=created, vision=vlm)
        self.models[name] = sm
        return sm

    def add_assistant(self, assistant: Any, created: int = 0) -> ServedModel:
        if assistant.name in self.models:
            raise ValueError(f"assistant {assistant.name!r} has the name of a model already served")
        toolbox = assistant.toolbox()  # what its tools: names, search over its knowledge files included
        sm = ServedModel(assistant.name, self.bundle(assistant.base_model), toolbox, assistant, created)
        self.models[assistant.name] = sm
        return sm

    def add_agent(self, name: str, spec: str | Path, toolbox: ToolBox, created: int = 0) -> ServedModel:
        """An agent (``llmstack.agent``) over a model with tool tokens: its engine runs the agent's tools
        (workspace files, memory, calculator, python; results spotlit by ``toolbox``) at each call of a reply,
        the reply's ``max_tokens`` being its budget. Models without tool tokens: ``llmstack agent run``."""
        if name in self.models:
            raise ValueError(f"--agent: the name {name!r} is taken by a model already served")
        sm = ServedModel(name, self.bundle(spec), toolbox, created=created)
        if not sm.ours:
            raise ValueError(f"--agent: {spec} has no tool tokens; run it as an agent with `llmstack agent run`")
        self.models[name] = sm
        return sm

    def get(self, name: str) -> ServedModel:
        if name not in self.models:
            raise RequestError(
                f"The model {name!r} does not exist; models: {', '.join(sorted(self.models))}",
                "model",
                "model_not_found",
                404,
            )
        return self.models[name]
