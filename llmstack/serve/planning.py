"""From an OpenAI request to engine rows: the chat rendered into a prompt (roles, tools and
``tool_choice``, an assistant's retrieval and defaults, the spotlight note), completion prompts and
their echo, and every row checked against the server's limits and the model's context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llmstack.inference.constrain import bare_key
from llmstack.inference.engine import Request as Row
from llmstack.inference.sample import SamplingConfig
from llmstack.serve import constraints
from llmstack.serve.config import ServeConfig
from llmstack.serve.models import RequestError, ServedModel
from llmstack.serve.protocol import ChatRequest, CompletionRequest
from llmstack.tools.spotlight import Spotlight

MIN_TEMPERATURE = 1e-6


@dataclass
class ChatPlan:
    rows: list[Row]
    prompt_tokens: int
    call_prefix: list[int] | None
    sources: list[Any]
    assistant: Any
    bare_keys: dict[str, str] = field(default_factory=dict)  # declared tool -> its one string parameter
    hermes: frozenset[str] | None = None  # a model without tool tokens offered these tools: calls come as text


def _prompt(
    sm: ServedModel, req: ChatRequest, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[list[int], torch.Tensor | None]:
    """The prompt ids, and for a chat with an image (a vision-language model's) their input embeddings."""
    images = [(i, url) for i, m in enumerate(req.messages) for url in m.image_urls()]
    if not images:
        return sm.prompt_ids(messages, tools), None
    (at, url), where = images[0], f"messages.{images[0][0]}.content"
    if len(images) > 1:
        raise RequestError(f"messages: {len(images)} images; a vision-language model here reads one per chat", where)
    if req.messages[at].role != "user":
        raise RequestError(f"{where}: images go in user messages", where)
    if tools:
        raise RequestError("tools: not supported in a chat with an image", "tools")
    turn = sum(m.role == "user" for m in req.messages[:at])
    return sm.image_prompt(messages, url, turn, where)


def plan_chat(sm: ServedModel, req: ChatRequest, config: ServeConfig) -> ChatPlan:
    check_rows(1, req.n, config)
    if len(req.messages) > config.max_messages:
        raise RequestError(f"messages: {len(req.messages)} messages; the limit is {config.max_messages}", "messages")
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role == "tool" and m.content is None:
            raise RequestError(f"messages.{i}.content: a tool message needs content", f"messages.{i}.content")
        d: dict[str, Any] = {"role": role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        messages.append(d)
    sources: list[Any] = []
    default_max = None
    spot = Spotlight() if config.spotlight else None
    if spot is not None and not sm.ours:  # ours (tool tokens) learn the marking in SFT, not from a note
        messages.insert(0, {"role": "system", "content": spot.notice()})
        if len(messages) > 1 and messages[1]["role"] == "system":  # one system message: ours allows no other
            messages[:2] = [{"role": "system", "content": f"{messages[1]['content']}\n\n{spot.notice()}"}]
    if sm.assistant is not None:
        prepared = sm.assistant.prepare(messages, spotlight=spot)
        messages, sources = prepared.messages, prepared.sources
        req, default_max = _assistant_defaults(sm.assistant, req)
    tools = [t.function.model_dump() for t in req.tools] if req.tools else None
    choice = req.tool_choice
    named = None if isinstance(choice, str | None) else choice.function.name
    builtin = named is not None and not any(t["name"] == named for t in tools or []) and sm.runs_tool(named)
    if choice is not None and not tools and choice != "none" and not builtin:
        raise RequestError("tool_choice needs tools (or the name of one of the server's own tools)", "tool_choice")
    if named is not None and not builtin and tools and named not in {t["name"] for t in tools}:
        raise RequestError(f"tool_choice: no tool named {named!r} in tools", "tool_choice")
    offered = None if choice == "none" or builtin else tools
    prompt, embeds = _prompt(sm, req, messages, offered)
    # the client's tools: each call is constrained to a declared name and its arguments' schema
    narrowed = [t for t in offered or [] if named in (None, t["name"])]
    call_grammar = constraints.tool_calls(sm, narrowed) if narrowed and config.constrain and sm.ours else None
    grammar = constraints.response_format(sm, req.response_format) if config.constrain else None
    call_prefix: list[int] = []
    forced = choice == "required" or named is not None
    if grammar is not None and forced:
        raise RequestError("response_format with a forced tool call: the reply is the call", "response_format")
    if not sm.ours and narrowed and forced and config.constrain:
        grammar = constraints.hermes_calls(sm, narrowed)  # no call tokens to force: the whole reply is the call
    elif sm.ours and forced:
        if named is None and offered and len(offered) == 1:
            named = offered[0]["name"]  # "required" with one tool: that tool
        call_prefix = sm.tool_call_prefix(named)  # the call grammar is advanced over it (engine.open_row)
        prompt = prompt + call_prefix
    mode = ("return" if tools and not builtin else "run") if choice != "none" else "off"
    max_tokens = req.max_completion_tokens or req.max_tokens
    top = req.top_logprobs if req.logprobs else None
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    if req.logprobs and top is None:
        top = 0
    rows = [engine_row(sm, prompt, req, max_tokens, k, top, mode, config, default_max) for k in range(req.n)]
    for row in rows:
        row.grammar, row.call_grammar, row.embeds = grammar, call_grammar, embeds
    bare = {t["name"]: k for t in tools or [] if (k := bare_key(t.get("parameters"))) is not None}
    hermes = None if sm.ours or not offered else frozenset(t["name"] for t in offered)
    return ChatPlan(
        rows,
        len(prompt) - len(call_prefix),
        call_prefix[1:] if call_prefix else None,
        sources,
        sm.assistant,
        bare,
        hermes,
    )


def _assistant_defaults(assistant: Any, req: ChatRequest) -> tuple[ChatRequest, int | None]:
    """An assistant's generation defaults fill what the request left unset; its ``max_tokens`` is a
    default budget (cut to the room the context leaves), not a demand."""
    gen = getattr(assistant, "generation", None)
    updates = {
        key: getattr(gen, key)
        for key in ("temperature", "top_p")
        if key not in req.model_fields_set and getattr(gen, key, None) is not None
    }
    return (req.model_copy(update=updates) if updates else req), getattr(gen, "max_tokens", None)


def check_rows(prompts: int, n: int, config: ServeConfig) -> None:
    """``n`` choices of each prompt are ``prompts x n`` engine rows: all must fit in one batch."""
    if n > config.max_n:
        raise RequestError(f"n: {n} is over the limit of {config.max_n}", "n")
    if prompts * n > config.max_rows:
        raise RequestError(
            f"{prompts} prompt(s) x n {n} = {prompts * n} rows; the server decodes at most {config.max_rows} together",
            "n" if n > 1 else "prompt",
        )


def engine_row(
    sm: ServedModel,
    prompt: list[int],
    req: Any,
    max_tokens: int | None,
    k: int,
    logprobs: int | None,
    mode: str,
    config: ServeConfig,
    default_max: int | None = None,
) -> Row:
    room = sm.context - len(prompt)
    if room < 1:
        raise RequestError(
            f"the prompt has {len(prompt)} tokens; model {sm.name!r} has a context of {sm.context}",
            "messages",
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(room, config.max_tokens_cap, default_max or room)
    if max_tokens > config.max_tokens_cap:
        raise RequestError(f"max_tokens: {max_tokens} is over the limit of {config.max_tokens_cap}", "max_tokens")
    if max_tokens > room:
        raise RequestError(
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds "
            f"model {sm.name!r}'s context of {sm.context}",
            "max_tokens",
            "context_length_exceeded",
        )
    seed = None if req.seed is None else (req.seed + k) % (1 << 63)
    vocab = sm.bundle.model.config.vocab_size
    bias = tuple((int(key), float(b)) for key, b in (req.logit_bias or {}).items())
    bad = [t for t, _ in bias if t >= vocab]
    if bad:
        raise RequestError(f"logit_bias: token id {bad[0]} is not in the vocabulary (size {vocab})", "logit_bias")
    cfg = SamplingConfig(
        max_new_tokens=max_tokens,
        # greedy in all but name: dividing the logits by a smaller temperature overflows them
        temperature=req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0,
        top_k=req.top_k,
        top_p=req.top_p if req.top_p < 1 else None,
        seed=seed,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        logit_bias=bias,
    )
    stops = tuple(s.encode("utf-8") for s in req.stops())
    return Row(prompt, cfg, sm.stop_ids, stops, mode if sm.ours else "off", logprobs)


def completion_prompts(sm: ServedModel, req: CompletionRequest, config: ServeConfig) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        texts: list[Any] = [p]
    elif p and all(isinstance(x, int) for x in p):
        texts = [p]
    else:
        texts = list(p)
    if not texts:
        raise RequestError("prompt: empty", "prompt")
    check_rows(len(texts), req.n, config)
    vocab = sm.bundle.model.config.vocab_size
    out = []
    for t in texts:
        ids = sm.text_ids(t) if isinstance(t, str) else list(t)
        if not ids:
            raise RequestError("prompt: an empty prompt on a model without a BOS token", "prompt")
        if any(i < 0 or i >= vocab for i in ids):
            raise RequestError(f"prompt: token ids must be in [0, {vocab})", "prompt")
        out.append(ids)
    return out


def echo_prompt(sm: ServedModel, ids: list[int], req: CompletionRequest) -> dict[str, Any]:
    """The prompt as text (special tokens left out), and with ``logprobs`` every prompt token's
    log-probability, special ones included (for harnesses, which count tokens)."""
    tok = sm.bundle.tokenizer
    shown = [i for i in ids if i not in sm.special_ids]
    text = tok.decode(shown)
    if req.logprobs is None:
        return {"text": text, "logprobs": None}
    if len(ids) > sm.context:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; the context is {sm.context}", "prompt", "context_length_exceeded"
        )
    scored = sm.engine.prompt_logprobs(ids, req.logprobs)
    per: list[tuple[float | None, list[tuple[int, float]]]] = [(None, []), *scored]
    tokens, lps, tops, offsets, pos = [], [], [], [], 0
    for i, (lp, top) in zip(ids, per, strict=True):  # every token, BOS included: one entry per prompt token
        piece = tok.decode_token_bytes(i).decode("utf-8", errors="replace")
        tokens.append(piece)
        lps.append(lp)
        tops.append(
            None if lp is None else {tok.decode_token_bytes(t).decode("utf-8", errors="replace"): v for t, v in top}
        )
        offsets.append(pos)
        if i not in sm.special_ids:  # a special token is not in the echoed text: it takes no room there
            pos += len(piece)
    return {
        "text": text,
        "logprobs": {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets},
    }
