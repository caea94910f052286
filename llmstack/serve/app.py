"""An OpenAI-compatible HTTP server over the engine, with a web chat UI.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /health``, ``POST /api/tokenize`` (the UI's token view), ``POST /api/inspect``
(the UI's Inside tab: next-token distributions, attention maps, logit lens, checkpoints), and the UI
itself at ``/``. With an API key set, ``/v1/*`` and ``/api/*`` need ``Authorization: Bearer KEY``.
Arena battles (the UI's Battle tab): ``POST /api/arena/battles``, ``POST /api/arena/battles/{id}/vote``,
``GET /api/arena/leaderboard`` (``routes_arena.py``).

Security (``ServeConfig``): with ``guard`` (``llmstack serve --guard DIR``, ``security/guard.py``) a chat
whose user messages the safety classifier flags is answered with its refusal, naming the category (a
normal 200 answer, logged), and so is an unstreamed answer it flags. The output filter
(``llmstack.security.output_filter``) removes markdown images and links to hosts off ``allowed_hosts``
from chat answers, streamed or not, on by default
(``llmstack serve --no-output-filter`` turns it off); raw ``/v1/completions`` text is left as is (it is
not rendered, and harnesses score it token by token). ``spotlight`` datamarks tool results and
retrieved passages and tells the model so in the system prompt (``llmstack.tools.spotlight``);
our own models get no note, they learn the marking in SFT (``security/hierarchy.py``).

Limits (``ServeConfig``) are checked before anything runs: body size, JSON depth, message count, ``n``
and the rows it makes, ``max_tokens`` and the context. Every client error is a 4xx JSON error in
OpenAI's shape; anything unexpected in a route is logged and answered with a 500 in the same shape
(no traceback to the client). A client that disconnects mid-stream has its rows dropped from the
running batch. ``GET /health`` lists the models only to a client with the key (when one is set). The
HTTP layer's own limits (connections, timeouts) are in ``connections.py``.

Images: a chat with an ``image_url`` content part is answered by a served vision-language model (``--vlm``)
like any chat (its prompt goes to the engine as embeddings, ``planning.py``); only inline ``data:`` URLs
(PNG, JPEG) are read, a remote URL or a model without vision is a 400 naming the problem.

This module holds the routes; a request becomes engine rows in ``planning.py`` (where a chat is
rendered into its prompt), and the engine's events become responses in ``responses.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llmstack.inference.inspect import Checkpoints, InspectError, inspect_text
from llmstack.model.llama import GPT
from llmstack.serve.config import ServeConfig
from llmstack.serve.metrics import ServeMetrics
from llmstack.serve.models import ModelRegistry, RequestError
from llmstack.serve.planning import completion_prompts, echo_prompt, engine_row, plan_chat
from llmstack.serve.protocol import (
    ChatRequest,
    Choice,
    CompletionRequest,
    InspectRequest,
    TokenizeRequest,
    error_body,
    new_id,
    openapi_body,
    parse,
)
from llmstack.serve.responses import (
    chat_chunks,
    chat_response,
    collect_answers,
    completion_chunks,
    completion_logprobs,
    error_response,
    guard_log,
    guard_refusal,
    model_card,
    sse_response,
    token_usage,
)
from llmstack.serve.routes_arena import BattleRequest, VoteRequest, add_arena_routes
from llmstack.serve.scheduler import Job, make_scheduler
from llmstack.tools.spotlight import Spotlight
from llmstack.training.checkpoint import checkpoint_dirs, load_gpt, step_of

STATIC = Path(__file__).parent / "static"
COUNTED_ROUTES = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/api/tokenize",
    "/api/inspect",
    "/api/arena/battles",
}
log = logging.getLogger("llmstack.serve")


def create_app(registry: ModelRegistry, config: ServeConfig = ServeConfig()) -> FastAPI:
    scheduler = make_scheduler(config.scheduler, config.max_rows, config.max_queue)
    metrics = ServeMetrics(scheduler.stats)
    if config.spotlight:  # tool results are marked where they are made: in each model's toolbox
        for served in registry.models.values():
            if served.toolbox is not None:
                served.toolbox.mark = Spotlight().datamark
    app = FastAPI(title="llmstack", description="OpenAI-compatible API over llmstack models", docs_url="/docs")
    app.state.registry, app.state.scheduler, app.state.config = registry, scheduler, config
    app.state.metrics = metrics

    def submit(sm: Any, rows: list[Any], route: str, req: Any, prompt_tokens: int) -> Job:
        """A generation request's job, submitted: counted in the metrics, logged when it ends, and
        cancelled past the request timeout."""
        info = {"id": new_id("req"), "route": route, "model": sm.name, "user": req.user, "prompt_tokens": prompt_tokens}
        j = Job(sm, rows, asyncio.get_running_loop(), metrics=metrics, timeout_s=config.request_timeout_s, info=info)
        metrics.prompt_tokens.inc(prompt_tokens)
        scheduler.submit(j)
        return j

    app.router.on_shutdown.append(scheduler.close)

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "").encode()
        return config.api_key is None or hmac.compare_digest(given, f"Bearer {config.api_key}".encode())

    @app.middleware("http")
    async def gate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        guarded = path.startswith("/v1") or path.startswith("/api")
        if guarded and not authorized(request):
            return error_response(
                RequestError("invalid or missing API key (Authorization: Bearer ...)", None, "invalid_api_key", 401)
            )
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return error_response(
                RequestError(
                    f"the request body is over {config.max_body_bytes} bytes", code="body_too_large", status=413
                )
            )
        try:
            response = await call_next(request)
        except Exception as e:  # a bug, not the client's mistake: logged here, a plain 500 there
            log.error("%s %s failed: %s", request.method, path, type(e).__name__, exc_info=e)
            body = error_body("the server failed on this request (logged)", "server_error", code="internal_error")
            response = JSONResponse(body, status_code=500)
        if guarded:
            metrics.requests.labels(path if path in COUNTED_ROUTES else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    async def read(request: Request, schema: type[Any]) -> Any:
        """The request's JSON body, size-limited as it arrives, parsed and validated as ``schema``."""
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > config.max_body_bytes:
                    raise RequestError(
                        f"the request body is over {config.max_body_bytes} bytes", code="body_too_large", status=413
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            raise RequestError("the client went away before the body arrived", code="client_disconnected") from None
        return parse(b"".join(chunks), schema, config.max_json_depth)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not authorized(request):  # anyone may ask whether it is up; only key holders what it serves
            return {"status": "ok"}
        return {
            "status": "ok",
            "models": sorted(registry.models),
            "scheduler": config.scheduler,
            **scheduler.stats(),
            "output_filter": config.output_filter,
            "spotlight": config.spotlight,
            "guard": config.guard is not None,
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """Prometheus' text format: requests, tokens, time to first token, queue, running rows, caches."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(sm) for sm in registry.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return model_card(registry.get(name))

    @app.post("/api/tokenize", openapi_extra=openapi_body(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        req: TokenizeRequest = await read(request, TokenizeRequest)
        tok = registry.get(req.model).bundle.tokenizer
        ids = tok.encode_ordinary(req.text)
        raw = [tok.decode_token_bytes(i) for i in ids]  # a character split over tokens: see "bytes"
        tokens = [
            {"id": i, "text": b.decode("utf-8", errors="replace"), "bytes": list(b)}
            for i, b in zip(ids, raw, strict=True)
        ]
        return {"model": req.model, "count": len(ids), "tokens": tokens}

    @app.post("/api/inspect", openapi_extra=openapi_body(InspectRequest))
    async def inspect(request: Request) -> dict[str, Any]:
        """The text as the model reads it (after bos where it reads texts so), seen from inside: the JSON of
        ``inspect_text``, plus ``model`` and ``run_checkpoints`` (how many checkpoints the served run has: the
        UI offers the checkpoint view when there are). A read-only forward under no_grad, in a thread: the
        engine's thread keeps decoding with the same weights meanwhile."""
        req: InspectRequest = await read(request, InspectRequest)
        sm = registry.get(req.model)
        saved = run_checkpoints(sm.bundle.source)
        if req.checkpoints and not saved:
            where = sm.bundle.source or "memory"
            raise RequestError(f"checkpoints: {sm.name!r} is not served from a run directory ({where})", "checkpoints")
        ids, rows = sm.text_ids(req.text), saved if req.checkpoints else None
        try:
            result = await asyncio.to_thread(
                inspect_text, sm.bundle.model, ids, sm.bundle.tokenizer, req.top_k, req.layers, rows
            )
        except InspectError as e:
            raise RequestError(str(e), e.field) from None
        return {"model": sm.name, "run_checkpoints": len(saved), **result}

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=openapi_body(ChatRequest))
    async def chat(request: Request) -> Response:
        req: ChatRequest = await read(request, ChatRequest)
        sm = registry.get(req.model)
        if config.guard is not None:
            flagged = config.guard.check_chat([{"role": m.role, "content": m.text()} for m in req.messages])
            if flagged is not None:
                return guard_refusal(flagged, sm, req, "input")
        plan = plan_chat(sm, req, config)
        job = submit(sm, plan.rows, "chat", req, plan.prompt_tokens * len(plan.rows))
        choices = [
            Choice(
                sm, req.stops(), plan.call_prefix, links=config.links(), bare_keys=plan.bare_keys, hermes=plan.hermes
            )
            for _ in plan.rows
        ]
        meta = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": sm.name}
        if req.stream:
            usage = req.stream_options.include_usage if req.stream_options else False
            return sse_response(chat_chunks(job, choices, meta, plan, usage))
        await collect_answers(job, choices)
        if config.guard is not None:  # streamed answers are out by now: only the input is checked for them
            for c, v in zip(choices, config.guard.check([c.text for c in choices]), strict=True):
                if v is not None:
                    guard_log.warning("guard: answer of %s flagged %s (P(unsafe) %.2f)", sm.name, v.code, v.score)
                    c.text = v.refusal()
        return JSONResponse(chat_response(choices, meta, plan))

    @app.post("/v1/completions", response_model=None, openapi_extra=openapi_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await read(request, CompletionRequest)
        sm = registry.get(req.model)
        prompts = completion_prompts(sm, req, config)
        meta = {"id": new_id("cmpl"), "created": int(time.time()), "model": sm.name, "object": "text_completion"}
        echo = [echo_prompt(sm, p, req) if req.echo else None for p in prompts]
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
            return JSONResponse({**meta, "choices": echoed, "usage": token_usage(sum(map(len, prompts)), 0)})
        rows = []
        for p in prompts:
            for k in range(req.n):
                rows.append(engine_row(sm, p, req, req.max_tokens, k, req.logprobs, "off", config))
        job = submit(sm, rows, "completions", req, sum(map(len, prompts)) * req.n)
        choices = [Choice(sm, req.stops(), raw=True) for _ in rows]
        if req.stream:
            return sse_response(completion_chunks(job, choices, meta))
        await collect_answers(job, choices)
        out = []
        for i, c in enumerate(choices):
            e = echo[i // req.n]
            lp = (
                completion_logprobs(c, e["logprobs"] if e else None, len(e["text"]) if e else 0)
                if req.logprobs is not None
                else None
            )
            out.append(
                {"index": i, "text": (e["text"] if e else "") + c.text, "logprobs": lp, "finish_reason": c.finish}
            )
        n_out = sum(c.n_tokens for c in choices)
        return JSONResponse({**meta, "choices": out, "usage": token_usage(sum(map(len, prompts)) * req.n, n_out)})

    add_arena_routes(app, registry, scheduler, config, read)
    _document_bodies(app, [ChatRequest, CompletionRequest, TokenizeRequest, InspectRequest, BattleRequest, VoteRequest])

    if STATIC.is_dir():
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # a fixed list: no path is built from a URL

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(files["index.html"])

        @app.get("/static/{name}", include_in_schema=False)
        async def static(name: str) -> FileResponse:
            if name not in files:
                raise StarletteHTTPException(404, f"no such file: {name!r}")
            return FileResponse(files[name])

    return app


def _document_bodies(app: FastAPI, schemas: list[type[BaseModel]]) -> None:
    """Put the request bodies' schemas in ``/openapi.json``: the routes read their bodies by hand (for
    our own error messages), so FastAPI cannot see them; each route points at its schema (``openapi_body``)."""
    _, top = models_json_schema([(s, "validation") for s in schemas], ref_template="#/components/schemas/{model}")
    build = app.openapi

    def openapi() -> dict[str, Any]:
        doc = build()  # FastAPI's document, made once and kept
        doc.setdefault("components", {}).setdefault("schemas", {}).update(top["$defs"])
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def run_checkpoints(source: str) -> Checkpoints:
    """A served model's run directory's complete checkpoints, oldest first, as (step, loader) for
    ``inspect_text``; empty for any other source (an HF folder, a GGUF file, one checkpoint, an adapter)."""
    if not source:  # a bundle built in memory: not whatever ./checkpoints holds
        return []
    saved = checkpoint_dirs(Path(source) / "checkpoints")[::-1]
    done = [p for p in saved if (p / "meta.json").is_file() and (p / "model.safetensors").is_file()]
    return [(step_of(p), partial(_checkpoint_model, p)) for p in done]


def _checkpoint_model(path: Path) -> GPT:
    return load_gpt(path)[0]  # a GPT-2 run's config is refused (ValueError): inspect_text lists it as skipped
