"""The server's settings: ``ServeConfig`` for the app (request limits, checked before anything runs,
and security: API key, output filter, spotlighting, the safety guard) and ``ConnectionLimits`` for the
HTTP layer under it (``connections.py``: how many connections, how long a request may take to arrive)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmstack.security.output_filter import DEFAULT_ALLOWED_HOSTS, LinkFilter


@dataclass(frozen=True)
class ServeConfig:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_json_depth: int = 64  # brackets nested deeper are refused before the body is parsed
    max_messages: int = 256
    max_tokens_cap: int = 2048
    max_n: int = 8
    max_rows: int = 64  # engine rows decoded together; a request's prompts x n must fit
    scheduler: str = "continuous"  # or "static": whole batches from start to end (serve/scheduler.py)
    max_queue: int = 256  # rows waiting for a slot; past it a request gets 429 with Retry-After
    constrain: bool = True  # response_format and declared tools' calls are grammar-constrained (off: measured only)
    request_timeout_s: float = 600.0  # a generation request running longer is cancelled (504, or an error event)
    output_filter: bool = True  # images and links to hosts off allowed_hosts are removed from chat answers
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    spotlight: bool = False  # datamark tool results and retrieved passages; a system note for models not ours
    guard: Any = None  # a security.guard.Guard: flagged user messages or (unstreamed) answers get its refusal

    def links(self) -> LinkFilter | None:
        return LinkFilter(self.allowed_hosts) if self.output_filter else None


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024  # open at once (also kept under the file-descriptor limit); see connections.py
    header_timeout_s: float = 10.0  # from connecting (or the previous answer) to the end of the request headers
    body_timeout_s: float = 30.0  # from the end of the headers to the end of the body
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16 * 1024  # request line + headers
    backlog: int = 2048  # connections the kernel queues before they are accepted
    log_every_s: float = 10.0  # the same log message at most once per this many seconds, then with a count
    drain_s: int = 30  # on shutdown (SIGTERM, Ctrl-C), streams still running get this long to finish
