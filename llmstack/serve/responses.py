"""From engine events to OpenAI responses: answers collected or streamed as server-sent events,
chat and completion bodies with their usage and logprobs, model cards, errors, and the guard's
refusal in the shape of a normal answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmstack.inference.engine import Event
from llmstack.serve.metrics import log_request
from llmstack.serve.models import RequestError, ServedModel
from llmstack.serve.planning import ChatPlan
from llmstack.serve.protocol import ChatRequest, Choice, error_body, new_id
from llmstack.serve.scheduler import DONE, Job


async def _events(job: Job) -> AsyncIterator[Event]:
    """The job's events until it is done; past its timeout, a 504 (and the job is cancelled by the
    caller's ``finally``). The request log gets one line when it ends, however it ends."""
    status = "cancelled"  # the client went away (the consumer stopped reading)
    try:
        while True:
            left = None if job.timeout_s is None else job.started + job.timeout_s - time.perf_counter()
            try:
                item = await asyncio.wait_for(job.out.get(), timeout=left)
            except TimeoutError:
                status = "timeout"
                raise RequestError(
                    f"the request ran past the server's limit of {job.timeout_s:g} s", code="timeout", status=504
                ) from None
            if item is DONE:
                status = "ok"
                return
            if isinstance(item, Exception):
                status = f"error: {type(item).__name__}"
                raise item
            yield item
    finally:
        took = time.perf_counter() - job.started
        if job.metrics is not None and status == "ok":
            job.metrics.latency.observe(took)
        if job.info:
            log_request(
                **job.info,
                status=status,
                completion_tokens=job.tokens,
                ttft_s=None if job.first_token_s is None else round(job.first_token_s, 4),
                seconds=round(took, 4),
            )


async def collect_answers(job: Job, choices: list[Choice]) -> None:
    try:
        async for ev in _events(job):
            choices[ev.row].feed(ev)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(str(e)) from None
    finally:
        job.cancel()


def chat_response(choices: list[Choice], meta: dict[str, Any], plan: ChatPlan) -> dict[str, Any]:
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
        "usage": token_usage(plan.prompt_tokens * len(choices), n_out),
    }


async def chat_chunks(
    job: Job, choices: list[Choice], meta: dict[str, Any], plan: ChatPlan, usage: bool
) -> AsyncIterator[dict[str, Any]]:
    base = {**meta, "object": "chat.completion.chunk"}
    try:
        for i in range(len(choices)):
            yield {
                **base,
                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            }
        held: dict[int, str] = {}  # row -> text not sent yet (see below)

        def text_chunk(row: int) -> dict[str, Any]:
            delta = {"content": held.pop(row)}
            return {**base, "choices": [{"index": row, "delta": delta, "finish_reason": None}]}

        async for ev in _events(job):
            c = choices[ev.row]
            deltas = c.feed(ev)
            if c.finish is not None and plan.assistant is not None and plan.sources:
                footer = plan.assistant.cite(c.text, plan.sources)[len(c.text) :]
                if footer:
                    deltas.append({"content": footer})
            for d in deltas:
                if set(d) == {"content"} and plan.rows[ev.row].logprobs is None:
                    held[ev.row] = held.get(ev.row, "") + d["content"]
                    continue
                if ev.row in held:
                    yield text_chunk(ev.row)
                chunk: dict[str, Any] = {"index": ev.row, "delta": d, "finish_reason": None}
                if "content" in d and plan.rows[ev.row].logprobs is not None:
                    # the output filter may hold text back: send every entry not sent yet
                    chunk["logprobs"] = {"content": c.logprobs[c.logprobs_sent :]}
                    c.logprobs_sent = len(c.logprobs)
                yield {**base, "choices": [chunk]}
            if c.finish is not None:
                if ev.row in held:
                    yield text_chunk(ev.row)
                yield {**base, "choices": [{"index": ev.row, "delta": {}, "finish_reason": c.finish}]}
            if job.out.empty():  # nothing more waiting: send the text held; under load, a chunk carries several tokens
                for row in list(held):
                    yield text_chunk(row)
        if usage:
            n_out = sum(c.n_tokens for c in choices)
            yield {**base, "choices": [], "usage": token_usage(plan.prompt_tokens * len(choices), n_out)}
    finally:
        job.cancel()


async def completion_chunks(job: Job, choices: list[Choice], meta: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    held: dict[int, str] = {}  # as in chat_chunks: text of events that arrived together goes out together

    def text_chunk(row: int) -> dict[str, Any]:
        return {**meta, "choices": [{"index": row, "text": held.pop(row), "logprobs": None, "finish_reason": None}]}

    try:
        async for ev in _events(job):
            c = choices[ev.row]
            for d in c.feed(ev):
                if "content" in d:
                    held[ev.row] = held.get(ev.row, "") + d["content"]
            if c.finish is not None:
                if ev.row in held:
                    yield text_chunk(ev.row)
                yield {**meta, "choices": [{"index": ev.row, "text": "", "logprobs": None, "finish_reason": c.finish}]}
            if job.out.empty():
                for row in list(held):
                    yield text_chunk(row)
    finally:
        job.cancel()


def sse_response(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        except Exception as e:  # headers are sent: report in the stream and end it cleanly
            msg = e.message if isinstance(e, RequestError) else f"{type(e).__name__}: {e}"
            yield f"data: {json.dumps(error_body(msg, 'server_error'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def token_usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_card(sm: ServedModel) -> dict[str, Any]:
    info: dict[str, Any] = {
        "kind": "assistant" if sm.assistant is not None else "model",
        "context": sm.context,
        "architecture": sm.bundle.architecture,
        "tools": sorted(sm.toolbox.tools) if sm.toolbox and sm.ours else [],
    }
    if sm.assistant is not None:
        info["description"] = getattr(sm.assistant, "description", "")
    return {"id": sm.name, "object": "model", "created": sm.created, "owned_by": "llmstack", "llmstack": info}


def error_response(e: RequestError) -> JSONResponse:
    kind = {401: "authentication_error", 429: "rate_limit_error", 504: "timeout"}.get(e.status, "invalid_request_error")
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(error_body(e.message, kind, e.param, e.code), status_code=e.status, headers=headers)


def completion_logprobs(c: Choice, echoed: dict[str, Any] | None, offset: int) -> dict[str, Any]:
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
guard_log = logging.getLogger("llmstack.guard")


def guard_refusal(verdict: Any, sm: ServedModel, req: ChatRequest, where: str) -> Response:
    """A flagged chat: a normal chat completion (or stream) whose every choice is the guard's refusal."""
    guard_log.warning("guard: %s to %s flagged %s (P(unsafe) %.2f)", where, sm.name, verdict.code, verdict.score)
    meta = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": sm.name}
    text, extra = verdict.refusal(), {"llmstack_guard": {"category": verdict.code, "score": round(verdict.score, 4)}}
    if req.stream:

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            base = {**meta, "object": "chat.completion.chunk"}
            for i in range(req.n):
                delta = {"role": "assistant", "content": text}
                yield {**base, "choices": [{"index": i, "delta": delta, "finish_reason": None}]}
                yield {**base, "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}], **extra}

        return sse_response(chunks())
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
        for i in range(req.n)
    ]
    return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": token_usage(0, 0), **extra})
