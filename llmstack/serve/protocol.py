"""The OpenAI wire format: request schemas (validated with pydantic) and how events become choices.

Requests are parsed by hand from the raw body (size-limited, UTF-8 checked, its nesting depth
measured before ``json.loads`` recurses into it, no lone UTF-16 surrogates in its strings) and
validated here, so every client mistake gets an OpenAI-style ``{"error": {...}}`` with status 400
naming the field. The same schemas describe the request bodies in ``/openapi.json`` (``openapi_body``).
"""

from __future__ import annotations

import codecs
import json
import re
import uuid
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmstack.chat.template import HERMES_TAG, parse_hermes_calls
from llmstack.inference.engine import Event
from llmstack.inference.inspect import MAX_TOP_K
from llmstack.serve.models import RequestError, ServedModel, arguments_json


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Req):
    type: Literal["text"]
    text: str


class ImageURL(_Req):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(_Req):
    """OpenAI's ``image_url`` content part; only ``data:`` URLs are read (``llmstack.vision.images``)."""

    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Req):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = ""


class ToolCall(_Req):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[ContentPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, ContentPart))

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)]


class FunctionDef(_Req):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] | None = None


class ToolDef(_Req):
    type: Literal["function"]
    function: FunctionDef


class _Named(_Req):
    name: str


class NamedToolChoice(_Req):
    type: Literal["function"]
    function: _Named


class StreamOptions(_Req):
    include_usage: bool = False


class JsonSchemaFormat(_Req):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Req):
    # OpenAI refuses arguments it does not know, and so do we: a parameter we do not implement is a 400
    # naming it, never silently ignored (nested objects, such as messages a client echoes back, keep
    # tolerating fields they do not need)
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # an llmstack extension
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    user: str | None = Field(None, max_length=256)  # logged with the request

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (got {key!r})")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100] (got {bias} for {key})")
        if v is not None and len(v) > 300:
            raise ValueError(f"at most 300 biases (got {len(v)})")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # our models write one call per turn (a "return" row ends at the call's end): at most one call either way
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)


class TokenizeRequest(_Req):
    model: str = Field(min_length=1)
    text: str


class InspectRequest(_Req):
    """``POST /api/inspect``: a text read by a model, seen from inside (``llmstack.inference.inspect``).
    ``layers``: the layers whose attention maps come back (None: all; each is heads x tokens^2 numbers);
    ``checkpoints``: also the run's checkpoints (a model served from a run directory)."""

    model: str = Field(min_length=1)
    text: str = Field(min_length=1)
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=1024)
    checkpoints: bool = False


def parse(body: bytes, schema: type[_Req], max_depth: int = 64) -> Any:
    """Raw body -> a validated request, or a ``RequestError`` naming what is wrong."""
    # the count of opening brackets bounds the depth: only a body with many looks closer
    if body.count(b"[") + body.count(b"{") > max_depth and (depth := json_depth(body)) > max_depth:
        raise RequestError(
            f"the request body nests JSON {depth} levels deep; the limit is {max_depth}", code="json_too_deep"
        )
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    where = lone_surrogate(data) if _SURROGATE_ESCAPE.search(body) else None
    if where is not None:
        raise RequestError(
            f"{where or 'a key'}: a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair) is not text",
            where or None,
            "invalid_text",
        )
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise RequestError(f"Unrecognized request argument supplied: {loc}", loc, "unsupported_parameter") from None
        raise RequestError(f"{loc}: {err['msg']}" if loc else err["msg"], loc or None) from None


# A JSON string (possibly unterminated): its brackets do not nest. Unrolled and possessive, so linear.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\Z)', re.DOTALL)
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _STEP)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # UTF-8 itself cannot carry a surrogate: only an escape


def json_depth(raw: bytes) -> int:
    """How deep the brackets of a JSON text nest, without parsing it (``json.loads`` recurses once per
    level and dies of RecursionError near 1,000)."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def lone_surrogate(data: Any) -> str | None:
    """The dotted path of a string holding a lone surrogate (for a key: its object's path), else None."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not _encodes(v):
                return path
        elif isinstance(v, dict):
            for k, x in v.items():
                if not _encodes(k):
                    return path
                stack.append((f"{path}.{k}" if path else k, x))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v))
    return None


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def openapi_body(schema: type[_Req]) -> dict[str, Any]:
    """A route's ``openapi_extra``: its JSON body is ``schema`` (read by hand, so FastAPI cannot see it);
    the schema itself is added to the document's components by ``app.document_bodies``."""
    ref = {"$ref": f"#/components/schemas/{schema.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class StopFilter:
    """Holds back text that may be the start of a stop sequence; cuts the text at the first stop. What
    came from the stop on is kept in ``after`` (a Hermes ``<tool_call>`` block, when the "stop" is its tag)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.buf, self.stopped, self.after = stops, "", False, ""

    def feed(self, text: str) -> str:
        if self.stopped:
            self.after += text
            return ""
        if not self.stops:
            return text
        self.buf += text
        hits = [self.buf.find(s) for s in self.stops if s in self.buf]
        if hits:
            out, self.after, self.buf, self.stopped = self.buf[: min(hits)], self.buf[min(hits) :], "", True
            return out
        hold = max((k for s in self.stops for k in range(len(s) - 1, 0, -1) if self.buf.endswith(s[:k])), default=0)
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(out) :]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


@dataclass
class Choice:
    """Turns one row's events into what the client sees: text, tool calls, log-probabilities.

    ``feed`` returns the deltas of this event (for streaming); the choice also keeps everything for
    the non-streamed answer. Server-run tools show up as ``llmstack_tool`` deltas ({type: call |
    result, text}), an llmstack extension OpenAI clients ignore.
    """

    sm: ServedModel
    stops: list[str]
    call_prefix: list[int] | None = None  # a forced call's name tokens: the row starts inside a call
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    server_tools: list[dict[str, str]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish: str | None = None
    n_tokens: int = 0
    links: Any = None  # an output filter (llmstack.security.output_filter.LinkFilter) over the text, or None
    logprobs_sent: int = 0  # how many of ``logprobs`` went out in stream chunks
    raw: bool = False  # /v1/completions: every token is text (special ones by name) and has its logprob
    bare_keys: dict[str, str] = field(default_factory=dict)  # tool -> its one string parameter (bare-text calls)
    hermes: frozenset[str] | None = None  # a model without tool tokens, these tools declared: calls in the text

    def __post_init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = StopFilter(self.stops)
        # a model without tool tokens: text from a <tool_call> tag on is held, parsed when the reply ends
        self._split = StopFilter([HERMES_TAG]) if self.hermes is not None else None
        self._call: list[int] | None = None if self.call_prefix is None else list(self.call_prefix)
        self._result: list[int] | None = None
        tu = self.sm.engine.tools
        self._ids = (tu.call_start, tu.call_end, tu.result_start, tu.result_end) if tu and not self.raw else None

    def feed(self, ev: Event) -> list[dict[str, Any]]:
        self.n_tokens += 1
        out: list[dict[str, Any]] = []
        tok, ids = ev.token, self._ids
        if ev.forced and ids is not None:
            if tok == ids[2]:
                self._result = []
            elif tok == ids[3] and self._result is not None:
                result = self.sm.bundle.tokenizer.decode(self._result)
                self.server_tools.append({"type": "result", "text": result})
                out.append({"llmstack_tool": {"type": "result", "text": result}})
                self._result = None
            elif self._result is not None:
                self._result.append(tok)
        elif ids is not None and tok == ids[0] and self._call is None:
            self._call = []
        elif ids is not None and self._call is not None and tok == ids[1]:
            call = self.sm.bundle.tokenizer.decode(self._call)
            self._call = None
            if ev.finish == "tool_calls":
                name, _, argument = call.partition(":")
                name = name.strip()
                out.append(self._tool_call(name, arguments_json(argument.strip(), self.bare_keys.get(name, "input"))))
            else:
                self.server_tools.append({"type": "call", "text": call})
                out.append({"llmstack_tool": {"type": "call", "text": call}})
        elif self._call is not None:
            self._call.append(tok)
        elif self.raw or tok not in self.sm.special_ids:
            # raw text shows a special token by name, except the stop token that ends the reply (it is in
            # the logprobs and the token count, as OpenAI's <|endoftext|>, but not in the text)
            ends = ev.finish == "stop" and tok in self.sm.stop_ids and tok in self.sm.special_ids
            raw = b"" if ends else self.sm.bundle.tokenizer.decode_token_bytes(tok)
            piece = self._stop.feed(self._utf8.decode(raw))
            if self._split is not None:
                piece = self._split.feed(piece)
            if self.links is not None:
                piece = self.links.feed(piece)
            if ev.logprob is not None and not self._stop.stopped:
                self.logprobs.append(self._lp_entry(tok, ev.logprob, ev.top))
            if piece:
                self.text += piece
                out.append({"content": piece})
        if ev.finish is not None:
            tail = self._stop.feed(self._utf8.decode(b"", final=True)) + self._stop.flush()
            calls: list[dict[str, Any]] = []
            if self._split is not None:  # the held <tool_call> text: declared calls out, the rest is text
                tail = self._split.feed(tail) + self._split.flush()
                assert self.hermes is not None
                rest, calls = parse_hermes_calls(self._split.after, self.hermes)
                tail += rest
            if self.links is not None:
                tail = self.links.feed(tail) + self.links.flush()
            if tail:
                self.text += tail
                out.append({"content": tail})
            out += [self._tool_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
            self.finish = "tool_calls" if calls else ev.finish
        return out

    def _tool_call(self, name: str, arguments: str) -> dict[str, Any]:
        """A client tool call (OpenAI's shape), kept for the answer; returns its stream delta."""
        tc = {"index": len(self.tool_calls), "id": new_id("call"), "type": "function"}
        tc["function"] = {"name": name, "arguments": arguments}
        self.tool_calls.append(tc)
        return {"tool_calls": [tc]}

    def _lp_entry(self, tok: int, lp: float, top: list[tuple[int, float]] | None) -> dict[str, Any]:
        def one(t: int, v: float) -> dict[str, Any]:
            b = self.sm.bundle.tokenizer.decode_token_bytes(t)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": v, "bytes": list(b)}

        return {**one(tok, lp), "top_logprobs": [one(t, v) for t, v in (top or [])]}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
