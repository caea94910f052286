"""The arena's routes (the web UI's Battle tab): ``POST /api/arena/battles``, ``POST
/api/arena/battles/{id}/vote`` and ``GET /api/arena/leaderboard``."""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import Field

from llmstack.eval.arena import Battle, RatingConfig, append_battles, default_log, leaderboard, read_battles
from llmstack.serve.config import ServeConfig
from llmstack.serve.models import ModelRegistry, RequestError
from llmstack.serve.planning import plan_chat
from llmstack.serve.protocol import ChatRequest, Choice, _Req, new_id, openapi_body
from llmstack.serve.responses import chat_chunks, sse_response
from llmstack.serve.scheduler import Job, Scheduler

# Two anonymous models answer one prompt side by side (a and b); the person votes; only then are the
# names revealed and the battle appended to the battle log (``app.state.arena_log``, by default
# data/arena/battles.jsonl). The two answers stream in one SSE stream, each event tagged with its
# side; the scheduler runs one model's batch at a time, so side b usually starts after side a.
# Battles waiting for a vote live in memory (the newest PENDING_BATTLES): a restart forgets them.
PENDING_BATTLES = 1000
BATTLE_MAX_TOKENS = 256  # the default answer budget (a request's max_tokens overrides it)


LEADERBOARD_QUERY = [  # read by hand (our error messages); documented for /openapi.json
    {"name": "prior", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0, "default": 0}},
    {"name": "judge", "in": "query", "required": False, "schema": {"type": "string", "default": ""}},
]


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


def add_arena_routes(
    app: FastAPI,
    registry: ModelRegistry,
    scheduler: Scheduler,
    config: ServeConfig,
    read: Callable[[Request, type[Any]], Awaitable[Any]],
) -> None:
    """The routes, on ``app``; ``read(request, schema)`` reads a request's body as the app's own routes do."""
    app.state.arena_log = default_log()
    pending: OrderedDict[str, PendingBattle] = OrderedDict()
    rng = random.Random()

    @app.post("/api/arena/battles", response_model=None, openapi_extra=openapi_body(BattleRequest))
    async def battle(request: Request) -> Response:
        req: BattleRequest = await read(request, BattleRequest)
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
                plan = plan_chat(sm, chat, config)
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
            streams.append(chat_chunks(job, [choice], meta, plan, False))
        return sse_response(_battle_events(bid, state, streams))

    @app.post("/api/arena/battles/{bid}/vote", openapi_extra=openapi_body(VoteRequest))
    async def vote(bid: str, request: Request) -> dict[str, Any]:
        req: VoteRequest = await read(request, VoteRequest)
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

    @app.get("/api/arena/leaderboard", openapi_extra={"parameters": LEADERBOARD_QUERY})
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
