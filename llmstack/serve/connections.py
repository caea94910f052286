"""The HTTP layer under the app: how many connections stay open, how long a request may take to
arrive, and a log that a flood cannot fill.

Plain uvicorn (h11) keeps a connection for as long as its client does and gives a request all the
time it likes to arrive: some thousands of clients trickling one header byte every few seconds
(slowloris) hold every file descriptor, ``/health`` stops answering, and the accept loop logs "Too
many open files" without end. Here (``ConnectionLimits``, ``llmstack serve --max-connections ...``):

* the soft file-descriptor limit is raised to the hard one at start;
* at most ``max_connections`` connections are open (kept under that limit). Connections over the
  limit close those that have waited longest for a request (slow headers, or idle between
  requests), once they have waited ``GRACE_S`` at least, so that a newcomer's request already
  sent is read first; when every connection is busy with a request, a newcomer gets a 503;
* a request's line and headers must arrive within ``header_timeout_s`` of connecting (or of the
  previous answer on a kept-alive connection), its body within ``body_timeout_s`` of the headers,
  and the headers hold at most ``max_header_bytes``;
* the same log message is written at most once per ``log_every_s`` seconds, the next one with a
  count of those left out (``RateLimitFilter``).

Not covered: many addresses each sending complete requests (that is load, not a protocol trick;
there is no per-address limit, which NAT would make unfair), TLS (terminate it in front), HTTP/2
and websockets (not served). uvicorn's ``limit_concurrency`` is not used: it answers 503 to every
request while slow connections fill it, the very outcome to avoid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmstack.serve.config import ConnectionLimits
from llmstack.serve.protocol import error_body

log = logging.getLogger("llmstack.serve")
GRACE_S = 0.1  # over the limit, a connection waiting for its request this long may be closed for a newcomer
FD_RESERVE = 64  # descriptors kept for everything else: model files, logs, the battle log, the listening socket
_BUSY = json.dumps(error_body("the server is at its connection limit; try again shortly", "server_error")).encode()
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:  # some systems cap it lower than they report
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, want, e)
    return soft


class Gate:
    """One server's connections: the limits, and those waiting for a request, longest-waiting first."""

    def __init__(self, limits: ConnectionLimits, max_open: int) -> None:
        self.limits, self.max_open = limits, max_open
        self.waiting: OrderedDict[LimitedH11Protocol, float] = OrderedDict()  # -> since when; the first waited longest
        self.busy: set[LimitedH11Protocol] = set()  # a request's body on its way, or the app on it
        self.evicted = self.refused = self.timed_out = 0
        self._check: asyncio.TimerHandle | None = None  # a make_room to come

    def admit(self, conn: LimitedH11Protocol) -> bool:
        """A new connection (already counted in ``conn.connections``): False if every other one is busy
        with a request. Over the limit, room is made once the longest-waiting connections have waited
        ``GRACE_S``: a newcomer whose request is already in its socket gets the loop's turn to read it."""
        if len(self.busy) >= self.max_open:
            self.refused += 1
            log.warning("at the connection limit (%d) with every connection busy: refused one", self.max_open)
            return False
        if len(conn.connections) > self.max_open and self._check is None:
            # a timer, not call_soon: due timers run after the I/O callbacks of their turn of the loop
            self._check = conn.loop.call_later(GRACE_S, self.make_room, conn.connections, conn.loop)
        return True

    def make_room(self, connections: set[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections that have waited longest for a request (``GRACE_S`` at least), down to the
        limit; come back when the next one has waited that long if that is not enough."""
        self._check, closed, now = None, 0, loop.time()
        excess = len(connections) - self.max_open
        while closed < excess and self.waiting:
            oldest, since = next(iter(self.waiting.items()))
            if now - since < GRACE_S:
                self._check = loop.call_later(since + GRACE_S - now, self.make_room, connections, loop)
                break
            del self.waiting[oldest]
            oldest.transport.close()
            closed += 1
        self.evicted += closed
        if closed:
            log.warning("at the connection limit (%d): closed the %d waiting longest", self.max_open, closed)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the gate's limits; ``protocol_class`` makes one per server."""

    gate: Gate
    _phase = ""  # "headers" (waiting for a request), "body" (its body), "app" (the app has it)
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.gate.admit(self):
            transport.write(BUSY)
            transport.close()
            return
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.waiting.pop(self, None)
        self.gate.busy.discard(self)
        self._arm(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def _track(self) -> None:
        """Follow the request's progress: each phase starts its own deadline."""
        if self.transport.is_closing():
            return
        theirs, ours = self.conn.their_state, self.conn.our_state
        phase = "headers" if theirs is h11.IDLE and ours is h11.IDLE else "body" if theirs is h11.SEND_BODY else "app"
        if phase == self._phase:
            return
        self._phase = phase
        gate, limits = self.gate, self.gate.limits
        if phase == "headers":
            gate.busy.discard(self)
            gate.waiting[self] = self.loop.time()
            self._arm(limits.header_timeout_s)
        else:
            gate.waiting.pop(self, None)
            gate.busy.add(self)
            self._arm(limits.body_timeout_s if phase == "body" else None)

    def _arm(self, seconds: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if seconds is None else self.loop.call_later(seconds, self._too_slow, self._phase)

    def _too_slow(self, phase: str) -> None:
        self._timer = None
        self.gate.waiting.pop(self, None)
        self.gate.timed_out += 1
        limit = self.gate.limits.header_timeout_s if phase == "headers" else self.gate.limits.body_timeout_s
        log.warning("closed a connection whose request %s did not arrive within %g s", phase, limit)
        self.transport.close()


def protocol_class(gate: Gate) -> type[LimitedH11Protocol]:
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"gate": gate})


class RateLimitFilter(logging.Filter):
    """Lets the same message (logger, level, first line of its text before formatting, exception type)
    through at most once per ``every_s`` seconds; the next one through says how many were left out."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self.seen: dict[tuple[Any, ...], list[float]] = {}  # key -> [when last let through, left out since]

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0][:200], exc)
        now = self.clock()
        last = self.seen.get(key)
        if last is not None and now - last[0] < self.every_s:
            last[1] += 1
            return False
        if len(self.seen) > 1000:  # messages that vary in their template: forget, rather than grow
            self.seen.clear()
        self.seen[key] = [now, 0]
        if last is not None and last[1]:
            record.msg = f"{record.msg} [and {last[1]:.0f} more like it in {now - last[0]:.0f} s, not logged]"
        return True


def run_server(
    app: Any, host: str, port: int, limits: ConnectionLimits = ConnectionLimits(), log_level: str = "warning"
) -> None:
    """Serve ``app`` with uvicorn under ``limits`` until interrupted."""
    fds = raise_fd_limit()
    backlog = min(limits.backlog, fds // 4)  # one accept burst takes up to `backlog` descriptors at once
    max_open = min(limits.max_connections, fds - backlog - FD_RESERVE)
    if max_open < 1:
        raise ValueError(f"the open-file limit ({fds}) leaves no room for connections: raise it (ulimit -n)")
    if max_open < limits.max_connections:
        log.warning("at most %d connections: the open-file limit is %d (raise it with ulimit -n)", max_open, fds)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol_class(Gate(limits, max_open)),
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        backlog=backlog,
        timeout_graceful_shutdown=limits.drain_s,  # in-flight streams finish; then the engine stops
    )
    quiet = RateLimitFilter(limits.log_every_s)
    for name in ("asyncio", "uvicorn.error", "llmstack.serve"):  # not the access log: each line there differs
        logging.getLogger(name).addFilter(quiet)
    uvicorn.Server(config).run()
