"""An OpenAI-compatible HTTP server over the engine, with a web chat UI.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /health``, ``POST /api/tokenize`` (the UI's token view), and the UI
itself at ``/``. With an API key set, ``/v1/*`` and ``/api/*`` need ``Authorization: Bearer KEY``.
Arena battles (the UI's Battle tab): ``POST /api/arena/battles``, ``POST /api/arena/battles/{id}/vote``,
``GET /api/arena/leaderboard`` (see the arena block at the end).

Security (``ServeConfig``): with ``guard`` (``llmstack serve --guard DIR``, ``security/guard.py``) a chat
whose user messages the safety classifier flags is answered with its refusal, naming the category (a
normal 200 answer, logged), and so is an unstreamed answer it flags. The output filter
(``llmstack.security.output_filter``) removes markdown images and links to hosts off ``allowed_hosts``
from chat answers, streamed or not, on by default
(``llmstack serve --no-output-filter`` turns it off); raw ``/v1/completions`` text is left as is (it is
not rendered, and harnesses score it token by token). ``spotlight`` datamarks tool results and
retrieved passages and tells the model so in the system prompt (``llmstack.security.spotlight``);
our own models get no note, they learn the marking in SFT (``security/hierarchy.py``).

Limits (``ServeConfig``) are checked before anything runs: body size, message count, ``n``,
``max_tokens`` and the context. Every client error is a 4xx JSON error in OpenAI's shape; a client
that disconnects mid-stream has its rows dropped from the running batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmstack.inference.engine import Event
from llmstack.inference.engine import Request as Row
from llmstack.inference.sample import SamplingConfig
from llmstack.security.output_filter import DEFAULT_ALLOWED_HOSTS, LinkFilter
from llmstack.security.spotlight import Spotlight
from llmstack.serve.models import ModelRegistry, RequestError, ServedModel
from llmstack.serve.protocol import (
    ChatRequest,
    Choice,
    CompletionRequest,
    TokenizeRequest,
    _Req,
    error_body,
    new_id,
    parse,
)
from llmstack.serve.scheduler import DONE, Job, Scheduler

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServeConfig:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_tokens_cap: int = 2048
    max_n: int = 8
    max_rows: int = 32
    output_filter: bool = True  # images and links to hosts off allowed_hosts are removed from chat answers
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    spotlight: bool = False  # datamark tool results and retrieved passages; a system note for models not ours
    guard: Any = None  # a security.guard.Guard: flagged user messages or (unstreamed) answers get its refusal

    def links(self) -> LinkFilter | None:
        return LinkFilter(self.allowed_hosts) if self.output_filter else None


def create_app(registry: ModelRegistry, config: ServeConfig = ServeConfig()) -> FastAPI:
    scheduler = Scheduler(max_rows=config.max_rows)
    if config.spotlight:  # tool results are marked where they are made: in each model's toolbox
        for served in registry.models.values():
            if served.toolbox is not None:
                served.toolbox.mark = Spotlight().datamark
    app = FastAPI(title="llmstack", description="OpenAI-compatible API over llmstack models", docs_url="/docs")
    app.state.registry, app.state.scheduler, app.state.config = registry, scheduler, config
    app.router.on_shutdown.append(scheduler.close)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        guarded = path.startswith("/v1") or path.startswith("/api")
        if config.api_key and guarded and request.headers.get("authorization", "") != f"Bearer {config.api_key}":
            return _error(
                RequestError("invalid or missing API key (Authorization: Bearer ...)", None, "invalid_api_key", 401)
            )
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return _error(
                RequestError(
                    f"the request body is over {config.max_body_bytes} bytes", code="body_too_large", status=413
                )
            )
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    async def body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise RequestError(
                    f"the request body is over {config.max_body_bytes} bytes", code="body_too_large", status=413
                )
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": sorted(registry.models),
            "batches": scheduler.batches,
            "rows": scheduler.rows_run,
            "output_filter": config.output_filter,
            "spotlight": config.spotlight,
            "guard": config.guard is not None,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(sm) for sm in registry.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return _model_card(registry.get(name))

    @app.post("/api/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = parse(await body(request), TokenizeRequest)
        tok = registry.get(req.model).bundle.tokenizer
        ids = tok.encode_ordinary(req.text)
        raw = [tok.decode_token_bytes(i) for i in ids]  # a character split over tokens: see "bytes"
        tokens = [
            {"id": i, "text": b.decode("utf-8", errors="replace"), "bytes": list(b)}
            for i, b in zip(ids, raw, strict=True)
        ]
        return {"model": req.model, "count": len(ids), "tokens": tokens}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        req: ChatRequest = parse(await body(request), ChatRequest)
        sm = registry.get(req.model)
        if config.guard is not None:
            flagged = config.guard.check_chat([{"role": m.role, "content": m.text()} for m in req.messages])
            if flagged is not None:
                return _guard_refusal(flagged, sm, req, "input")
        plan = _plan_chat(sm, req, config)
        job = Job(sm, plan.rows, asyncio.get_running_loop())
        scheduler.submit(job)
        choices = [Choice(sm, req.stops(), plan.call_prefix, links=config.links()) for _ in plan.rows]
        meta = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": sm.name}
        if req.stream:
            usage = req.stream_options.include_usage if req.stream_options else False
            return _sse(_chat_chunks(job, choices, meta, plan, usage))
        await _collect(job, choices)
        if config.guard is not None:  # streamed answers are out by now: only the input is checked for them
            for c, v in zip(choices, config.guard.check([c.text for c in choices]), strict=True):
                if v is not None:
                    _guard_log.warning("guard: answer of %s flagged %s (P(unsafe) %.2f)", sm.name, v.code, v.score)
                    c.text = v.refusal()
        return JSONResponse(_chat_response(choices, meta, plan))

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse(await body(request), CompletionRequest)
        sm = registry.get(req.model)
        prompts = _completion_prompts(sm, req)
        meta = {"id": new_id("cmpl"), "created": int(time.time()), "model": sm.name, "object": "text_completion"}
        echo = [_echo(sm, p, req) if req.echo else None for p in prompts]
        if req.max_tokens == 0:
            if not req.echo:
                raise RequestError("max_tokens: 0 generates nothing; use it with echo", "max_tokens")
            if req.stream:
                raise RequestError("stream: max_tokens 0 with echo is not streamed", "stream")
            echoed = [
                {"index": i, "text": e["text"], "logprobs": e["logprobs"], "finish_reason": "length"}
                for i, e in enumerate(echo)
                if e
            ]
            return JSONResponse({**meta, "choices": echoed, "usage": _usage(sum(map(len, prompts)), 0)})
        rows = []
        for p in prompts:
            for k in range(req.n):
                rows.append(_row(sm, p, req, req.max_tokens, k, req.logprobs, "off", config))
        job = Job(sm, rows, asyncio.get_running_loop())
        scheduler.submit(job)
        choices = [Choice(sm, req.stops()) for _ in rows]
        if req.stream:
            return _sse(_completion_chunks(job, choices, meta))
        await _collect(job, choices)
        out = []
        for i, c in enumerate(choices):
            e = echo[i // req.n]
            lp = (
                _completion_logprobs(c, e["logprobs"] if e else None, len(e["text"]) if e else 0)
                if req.logprobs is not None
                else None
            )
            out.append(
                {"index": i, "text": (e["text"] if e else "") + c.text, "logprobs": lp, "finish_reason": c.finish}
            )
        n_out = sum(c.n_tokens for c in choices)
        return JSONResponse({**meta, "choices": out, "usage": _usage(sum(map(len, prompts)) * req.n, n_out)})

    _arena_routes(app, registry, scheduler, config, body)

    if STATIC.is_dir():

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC / "index.html")

        @app.get("/static/{name}", include_in_schema=False)
        async def static(name: str) -> FileResponse:
            path = (STATIC / name).resolve()
            if path.parent != STATIC.resolve() or not path.is_file():
                raise StarletteHTTPException(404, f"no such file: {name}")
            return FileResponse(path)

    return app


# ----------------------------------------------------------------------------- planning requests
@dataclass
class ChatPlan:
    rows: list[Row]
    prompt_tokens: int
    call_prefix: list[int] | None
    sources: list[Any]
    assistant: Any


def _plan_chat(sm: ServedModel, req: ChatRequest, config: ServeConfig) -> ChatPlan:
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
    if choice is not None and not tools and choice != "none":
        raise RequestError("tool_choice needs tools", "tool_choice")
    if tools and not sm.ours:
        raise RequestError(f"model {sm.name!r} has no tool tokens: it does not support tools", "tools")
    prompt = sm.prompt_ids(messages, tools if choice != "none" else None)
    call_prefix: list[int] = []
    if choice == "required" or not isinstance(choice, str | None):
        name = None if isinstance(choice, str) else choice.function.name
        if name is None and tools and len(tools) == 1:
            name = tools[0]["name"]  # "required" with one tool: that tool
        if name is not None and tools and name not in {t["name"] for t in tools}:
            raise RequestError(f"tool_choice: no tool named {name!r} in tools", "tool_choice")
        call_prefix = sm.tool_call_prefix(name)
        prompt = prompt + call_prefix
    mode = ("return" if tools else "run") if choice != "none" else "off"
    max_tokens = req.max_completion_tokens or req.max_tokens
    top = req.top_logprobs if req.logprobs else None
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    if req.logprobs and top is None:
        top = 0
    rows = [_row(sm, prompt, req, max_tokens, k, top, mode, config, default_max) for k in range(req.n)]
    return ChatPlan(
        rows, len(prompt) - len(call_prefix), call_prefix[1:] if call_prefix else None, sources, sm.assistant
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


def _row(
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
    if req.n > config.max_n:
        raise RequestError(f"n: {req.n} is over the limit of {config.max_n}", "n")
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
    cfg = SamplingConfig(
        max_new_tokens=max_tokens,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p if req.top_p < 1 else None,
        seed=seed,
    )
    stops = tuple(s.encode("utf-8") for s in req.stops())
    return Row(prompt, cfg, sm.stop_ids, stops, mode if sm.ours else "off", logprobs)


def _completion_prompts(sm: ServedModel, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        texts: list[Any] = [p]
    elif p and all(isinstance(x, int) for x in p):
        texts = [p]
    else:
        texts = list(p)
    if not texts:
        raise RequestError("prompt: empty", "prompt")
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


def _echo(sm: ServedModel, ids: list[int], req: CompletionRequest) -> dict[str, Any]:
    """The prompt as text, and with ``logprobs`` its tokens' log-probabilities (for harnesses)."""
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
    for i, (lp, top) in zip(ids, per, strict=True):
        if i in sm.special_ids:
            continue
        piece = tok.decode_token_bytes(i).decode("utf-8", errors="replace")
        tokens.append(piece)
        lps.append(lp)
        tops.append(
            None if lp is None else {tok.decode_token_bytes(t).decode("utf-8", errors="replace"): v for t, v in top}
        )
        offsets.append(pos)
        pos += len(piece)
    return {
        "text": text,
        "logprobs": {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets},
    }


def _completion_logprobs(c: Choice, echoed: dict[str, Any] | None, offset: int) -> dict[str, Any]:
    lp: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if echoed:
        lp = {k: list(v) for k, v in echoed.items()}
    pos = offset
    for e in c.logprobs:
        lp["tokens"].append(e["token"])
        lp["token_logprobs"].append(e["logprob"])
        lp["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        lp["text_offset"].append(pos)
        pos += len(e["token"])
    return lp


# ----------------------------------------------------------------------------- the guard's refusal
_guard_log = logging.getLogger("llmstack.guard")


def _guard_refusal(verdict: Any, sm: ServedModel, req: ChatRequest, where: str) -> Response:
    """A flagged chat: a normal chat completion (or stream) whose every choice is the guard's refusal."""
    _guard_log.warning("guard: %s to %s flagged %s (P(unsafe) %.2f)", where, sm.name, verdict.code, verdict.score)
    meta = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": sm.name}
    text, extra = verdict.refusal(), {"llmstack_guard": {"category": verdict.code, "score": round(verdict.score, 4)}}
    if req.stream:

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            base = {**meta, "object": "chat.completion.chunk"}
            for i in range(req.n):
                delta = {"role": "assistant", "content": text}
                yield {**base, "choices": [{"index": i, "delta": delta, "finish_reason": None}]}
                yield {**base, "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}], **extra}

        return _sse(chunks())
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
        for i in range(req.n)
    ]
    return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": _usage(0, 0), **extra})


# ----------------------------------------------------------------------------- answering
async def _events(job: Job) -> AsyncIterator[Event]:
    while True:
        item = await job.out.get()
        if item is DONE:
            return
        if isinstance(item, Exception):
            raise item
        yield item


async def _collect(job: Job, choices: list[Choice]) -> None:
    try:
        async for ev in _events(job):
            choices[ev.row].feed(ev)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(str(e)) from None
    finally:
        job.cancel()


def _chat_response(choices: list[Choice], meta: dict[str, Any], plan: ChatPlan) -> dict[str, Any]:
    out = []
    for i, c in enumerate(choices):
        text = c.text
        if plan.assistant is not None and plan.sources:
            text = plan.assistant.cite(text, plan.sources)
        msg: dict[str, Any] = {"role": "assistant", "content": text if (text or not c.tool_calls) else None}
        if c.tool_calls:
            msg["tool_calls"] = [{k: v for k, v in tc.items() if k != "index"} for tc in c.tool_calls]
        if c.server_tools:
            msg["llmstack_tools"] = c.server_tools
        choice: dict[str, Any] = {"index": i, "message": msg, "finish_reason": c.finish, "logprobs": None}
        if plan.rows[i].logprobs is not None:
            choice["logprobs"] = {"content": c.logprobs}
        out.append(choice)
    n_out = sum(c.n_tokens for c in choices)
    return {
        **meta,
        "object": "chat.completion",
        "choices": out,
        "usage": _usage(plan.prompt_tokens * len(choices), n_out),
    }


async def _chat_chunks(
    job: Job, choices: list[Choice], meta: dict[str, Any], plan: ChatPlan, usage: bool
) -> AsyncIterator[dict[str, Any]]:
    base = {**meta, "object": "chat.completion.chunk"}
    try:
        for i in range(len(choices)):
            yield {
                **base,
                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            }
        async for ev in _events(job):
            c = choices[ev.row]
            deltas = c.feed(ev)
            if c.finish is not None and plan.assistant is not None and plan.sources:
                footer = plan.assistant.cite(c.text, plan.sources)[len(c.text) :]
                if footer:
                    deltas.append({"content": footer})
            for d in deltas:
                chunk: dict[str, Any] = {"index": ev.row, "delta": d, "finish_reason": None}
                if "content" in d and plan.rows[ev.row].logprobs is not None:
                    # the output filter may hold text back: send every entry not sent yet
                    chunk["logprobs"] = {"content": c.logprobs[c.logprobs_sent :]}
                    c.logprobs_sent = len(c.logprobs)
                yield {**base, "choices": [chunk]}
            if c.finish is not None:
                yield {**base, "choices": [{"index": ev.row, "delta": {}, "finish_reason": c.finish}]}
        if usage:
            n_out = sum(c.n_tokens for c in choices)
            yield {**base, "choices": [], "usage": _usage(plan.prompt_tokens * len(choices), n_out)}
    finally:
        job.cancel()


async def _completion_chunks(job: Job, choices: list[Choice], meta: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    try:
        async for ev in _events(job):
            c = choices[ev.row]
            for d in c.feed(ev):
                if "content" in d:
                    yield {
                        **meta,
                        "choices": [{"index": ev.row, "text": d["content"], "logprobs": None, "finish_reason": None}],
                    }
            if c.finish is not None:
                yield {**meta, "choices": [{"index": ev.row, "text": "", "logprobs": None, "finish_reason": c.finish}]}
    finally:
        job.cancel()


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        except Exception as e:  # headers are sent: report in the stream and end it cleanly
            msg = e.message if isinstance(e, RequestError) else f"{type(e).__name__}: {e}"
            yield f"data: {json.dumps(error_body(msg, 'server_error'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _model_card(sm: ServedModel) -> dict[str, Any]:
    info: dict[str, Any] = {
        "kind": "assistant" if sm.assistant is not None else "model",
        "context": sm.context,
        "architecture": sm.bundle.architecture,
        "tools": sorted(sm.toolbox.tools) if sm.toolbox and sm.ours else [],
    }
    if sm.assistant is not None:
        info["description"] = getattr(sm.assistant, "description", "")
    return {"id": sm.name, "object": "model", "created": sm.created, "owned_by": "llmstack", "llmstack": info}


def _error(e: RequestError) -> JSONResponse:
    kind = "authentication_error" if e.status == 401 else "invalid_request_error"
    return JSONResponse(error_body(e.message, kind, e.param, e.code), status_code=e.status)


# ----------------------------------------------------------------------------- arena battles (issue #7)
# Two anonymous models answer one prompt side by side (a and b); the person votes; only then are the
# names revealed and the battle appended to the battle log (``app.state.arena_log``, by default
# data/arena/battles.jsonl). The two answers stream in one SSE stream, each event tagged with its
# side; the scheduler runs one model's batch at a time, so side b usually starts after side a.
# Battles waiting for a vote live in memory (the newest PENDING_BATTLES): a restart forgets them.
PENDING_BATTLES = 1000
BATTLE_MAX_TOKENS = 256  # the default answer budget (a request's max_tokens overrides it)


class BattleRequest(_Req):
    prompt: str = Field(min_length=1)
    system: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)


class VoteRequest(_Req):
    winner: Literal["a", "b", "tie", "both_bad"]


@dataclass
class PendingBattle:
    models: tuple[str, str]
    prompt: str
    answers: list[str] = field(default_factory=lambda: ["", ""])
    done: list[bool] = field(default_factory=lambda: [False, False])


def _arena_routes(
    app: FastAPI,
    registry: ModelRegistry,
    scheduler: Scheduler,
    config: ServeConfig,
    body: Callable[[Request], Awaitable[bytes]],
) -> None:
    from llmstack.eval.arena import Battle, RatingConfig, append_battles, default_log, leaderboard, read_battles

    app.state.arena_log = default_log()
    pending: OrderedDict[str, PendingBattle] = OrderedDict()
    rng = random.Random()

    @app.post("/api/arena/battles", response_model=None)
    async def battle(request: Request) -> Response:
        req: BattleRequest = parse(await body(request), BattleRequest)
        names = sorted(registry.models)
        if len(names) < 2:
            raise RequestError(f"a battle needs two models; this server has {len(names)}", code="too_few_models")
        pair = rng.sample(names, 2)
        messages = [{"role": "system", "content": req.system}] if req.system else []
        messages.append({"role": "user", "content": req.prompt})
        extra = {k: v for k, v in (("temperature", req.temperature), ("max_tokens", req.max_tokens)) if v is not None}
        sides = []
        for side, name in zip("AB", pair, strict=True):
            sm = registry.get(name)
            chat = ChatRequest.model_validate({"model": name, "messages": messages, "stream": True, **extra})
            try:
                plan = _plan_chat(sm, chat, config)
            except RequestError as e:  # the message names the model: keep it anonymous
                raise RequestError(e.message.replace(repr(name), f"model {side}"), e.param, e.code, e.status) from None
            if req.max_tokens is None:
                for row in plan.rows:
                    row.cfg = replace(row.cfg, max_new_tokens=min(row.cfg.max_new_tokens, BATTLE_MAX_TOKENS))
            sides.append((sm, plan))
        bid = new_id("battle")
        state = PendingBattle((pair[0], pair[1]), req.prompt)
        pending[bid] = state
        while len(pending) > PENDING_BATTLES:
            pending.popitem(last=False)
        loop = asyncio.get_running_loop()
        streams = []
        for side, (sm, plan) in zip("ab", sides, strict=True):
            job = Job(sm, plan.rows, loop)
            scheduler.submit(job)
            meta = {"id": bid, "created": int(time.time()), "model": side}
            choice = Choice(sm, [], plan.call_prefix, links=config.links())
            streams.append(_chat_chunks(job, [choice], meta, plan, False))
        return _sse(_battle_events(bid, state, streams))

    @app.post("/api/arena/battles/{bid}/vote")
    async def vote(bid: str, request: Request) -> dict[str, Any]:
        req: VoteRequest = parse(await body(request), VoteRequest)
        state = pending.get(bid)
        if state is None:
            raise RequestError(
                f"no battle {bid!r} is waiting for a vote (unknown, voted on already, or forgotten)",
                code="battle_not_found",
                status=404,
            )
        if not all(state.done):
            raise RequestError("the answers are not finished: vote once both are in", code="battle_running", status=409)
        del pending[bid]  # no await since the lookup: a second vote on this battle finds nothing
        a, b = state.models
        record = Battle(a, b, req.winner, "human", state.prompt, state.answers[0], state.answers[1], id=bid)
        await asyncio.to_thread(append_battles, app.state.arena_log, [record])
        return {"id": bid, "model_a": a, "model_b": b, "winner": req.winner}

    @app.get("/api/arena/leaderboard")
    async def arena_leaderboard(request: Request) -> dict[str, Any]:
        """Ratings from the battle log (200 bootstrap resamples); ``?prior=`` and ``?judge=`` as the CLI's."""
        try:
            prior = float(request.query_params.get("prior", "0"))
        except ValueError:
            raise RequestError("prior: a number of tied games (0 or more)", "prior") from None
        if not prior >= 0:
            raise RequestError("prior: a number of tied games (0 or more)", "prior")
        judge = request.query_params.get("judge", "")
        path = Path(app.state.arena_log)

        def compute() -> dict[str, Any]:
            if not path.exists():
                return {"rows": [], "message": "no battles yet", "problems": []}
            log = read_battles(path)
            battles = [b for b in log.battles if b.judge.startswith(judge)]
            try:
                board = leaderboard(battles, RatingConfig(prior=prior, rounds=200))
                return {**board.to_json(), "problems": log.problems}
            except ValueError as e:  # no battles yet, or no finite ratings yet
                return {"rows": [], "message": str(e), "problems": log.problems}

        return await asyncio.to_thread(compute)


async def _battle_events(
    bid: str, state: PendingBattle, streams: list[AsyncIterator[dict[str, Any]]]
) -> AsyncIterator[dict[str, Any]]:
    """Both sides' chat chunks as one stream: ``{"battle": id}``, then ``{"side", "delta", "finish_reason"}``."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
            await queue.put((i, None))
        except Exception as e:  # handed to the merged stream, which reports it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        yield {"battle": bid}
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                state.done[i], left = True, left - 1
                continue
            for choice in item["choices"]:
                delta = choice["delta"]
                state.answers[i] += delta.get("content") or ""
                tool = delta.get("llmstack_tool")
                if tool:  # as the arena's automatic battles write tools: ⟦call → result⟧
                    state.answers[i] += f"⟦{tool['text']}" if tool["type"] == "call" else f" → {tool['text']}⟧ "
                yield {"side": "ab"[i], "delta": delta, "finish_reason": choice["finish_reason"]}
    finally:
        for t in tasks:
            t.cancel()
