"""Running requests on the engines: one worker thread owns the models.

A request is a ``Job`` of one or more rows (``n`` choices are rows). Two schedulers:

* ``ContinuousScheduler`` (the default): each model has a ``Batcher`` (``inference/batcher.py``);
  rows join the running batch between decode steps and leave it when done, prompts are prefilled in
  chunks, prompt prefixes are cached, tools run off the decode thread. The worker steps every model
  that has work, round-robin. At most ``max_queue`` rows wait for a slot: past that, a request gets
  429 with ``Retry-After``.
* ``StaticScheduler``: the oldest job, plus the jobs for the same model that arrived within
  ``batch_wait_s``, run together as one ``Engine.run`` batch from start to end (a request arriving
  mid-batch waits for it). Kept as the baseline ``bench/serve_load.py`` measures against.

Events go back to each job's asyncio queue on the server's event loop. A job whose client went away
is cancelled: its rows drop out of the running batch at the next step. An error inside a batch is sent
to every job in it; the worker carries on.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llmstack.inference.batcher import Batcher, PrefixCache
from llmstack.inference.engine import Event, Request
from llmstack.serve.models import RequestError, ServedModel

DONE = object()


@dataclass
class Job:
    model: ServedModel
    rows: list[Request]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    metrics: Any = None  # serve.metrics.ServeMetrics: tokens and time to first token are counted here
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # seconds from submission to the first event
    ended: int = 0  # rows that ended (continuous scheduling ends rows one by one)
    timeout_s: float | None = None  # the route's reader gives up (and cancels the job) after this long
    info: dict[str, Any] = field(default_factory=dict)  # what the request log says about it
    tokens: int = 0  # sampled tokens delivered
    _buffer: list[Any] = field(default_factory=list)
    _waking: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self) -> None:
        for r in self.rows:
            r.cancelled = True

    @property
    def cancelled(self) -> bool:
        return all(r.cancelled for r in self.rows)

    def put(self, item: Any) -> None:
        if isinstance(item, Event):
            if self.first_token_s is None:
                self.first_token_s = time.perf_counter() - self.started
                if self.metrics is not None:
                    self.metrics.ttft.observe(self.first_token_s)
            if not item.forced:
                self.tokens += 1
                if self.metrics is not None:
                    self.metrics.count_tokens(1)
        with self._lock:  # one wake-up of the event loop carries every item put since the last one
            self._buffer.append(item)
            wake, self._waking = not self._waking, True
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._buffer, self._waking = self._buffer, [], False
        for item in items:
            self.out.put_nowait(item)


class _JobRow:
    """Row ``k`` of a job, as a batcher's ``RowSink``: the job is done when all its rows ended."""

    def __init__(self, job: Job, k: int) -> None:
        self.job, self.k = job, k

    def event(self, ev: Event) -> None:
        ev.row = self.k
        self.job.put(ev)

    def end(self, error: BaseException | None) -> None:
        if error is not None:
            self.job.put(error)
        self.job.ended += 1
        if self.job.ended == len(self.job.rows):
            self.job.put(DONE)


class Scheduler:
    """What the routes need of a scheduler."""

    max_rows: int

    def submit(self, job: Job) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """Gauges for ``/metrics`` and ``/health``: rows queued and running, KV cache bytes, ..."""
        raise NotImplementedError

    def _check(self, job: Job) -> None:
        if len(job.rows) > self.max_rows:
            raise RequestError(f"a request of {len(job.rows)} rows exceeds the batch limit of {self.max_rows}")


class ContinuousScheduler(Scheduler):
    def __init__(
        self,
        max_rows: int = 64,
        max_queue: int = 256,
        chunk: int = 256,
        prefix_bytes: int = 256 << 20,
        tool_workers: int = 4,
    ) -> None:
        self.max_rows, self.max_queue, self.chunk = max_rows, max_queue, chunk
        self.prefix_bytes, self.tool_workers = prefix_bytes, tool_workers
        self._batchers: dict[int, Batcher] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False

    def batcher(self, sm: ServedModel) -> Batcher:
        with self._lock:
            b = self._batchers.get(id(sm))
            if b is None:
                prefix = PrefixCache(max_bytes=self.prefix_bytes) if self.prefix_bytes > 0 else None
                b = Batcher(sm.engine, self.max_rows, self.chunk, prefix, self.tool_workers)
                self._batchers[id(sm)] = b
            return b

    def submit(self, job: Job) -> None:
        self._check(job)
        queued = sum(b.queued for b in self._batchers.values())
        if queued + len(job.rows) > self.max_queue:
            raise RequestError(
                f"the server is busy: {queued} rows wait for a slot (limit {self.max_queue}); retry shortly",
                code="rate_limit_exceeded",
                status=429,
            )
        b = self.batcher(job.model)
        with self._lock:  # started on first use, and again after a shutdown (an app can start twice)
            self._stop = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="llmstack-engine", daemon=True)
                self._thread.start()
        for k, row in enumerate(job.rows):
            b.add(row, _JobRow(job, k))
        self._wake.set()

    def _work(self) -> None:
        while not self._stop:
            self._wake.clear()
            batchers = list(self._batchers.values())
            ready = [b for b in batchers if b.busy and not b.stalled]
            if not ready:  # nothing to do, or only tools running: sleep until a submit (or a tool may be done)
                self._wake.wait(0.005 if any(b.busy for b in batchers) else 1.0)
                continue
            for b in ready:
                b.step()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.set()
            if self._thread is not None and self._thread.is_alive():
                self._thread.join(timeout=10)
            for b in self._batchers.values():
                b.close()

    def stats(self) -> dict[str, float]:
        bs = list(self._batchers.values())
        hits = sum(b.prefix.hits for b in bs if b.prefix is not None)
        looked = sum(b.prefix.lookups for b in bs if b.prefix is not None)
        return {
            "queued_rows": sum(b.queued for b in bs),
            "running_rows": sum(b.running for b in bs),
            "kv_cache_bytes": sum(b.cache_bytes for b in bs),
            "prefix_cache_bytes": sum(b.prefix.bytes for b in bs if b.prefix is not None),
            "prefix_cache_hit_ratio": hits / looked if looked else 0.0,
            "steps": sum(b.steps for b in bs),
        }


class StaticScheduler(Scheduler):
    def __init__(self, max_rows: int = 32, batch_wait_s: float = 0.005) -> None:
        self.max_rows = max_rows
        self.batch_wait_s = batch_wait_s
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._pending: list[Job] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.running = 0

    def submit(self, job: Job) -> None:
        self._check(job)
        with self._lock:  # started on first use, and again after a shutdown (an app can start twice)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="llmstack-engine", daemon=True)
                self._thread.start()
        self._q.put(job)

    def close(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._q.put(None)
                self._thread.join(timeout=10)

    def stats(self) -> dict[str, float]:
        queued = self._q.qsize() + len(self._pending)
        return {"queued_rows": queued, "running_rows": self.running, "batches": self.batches}

    def _drain(self, block: bool, timeout: float | None = None) -> bool:
        """Move queued jobs to ``_pending``; False once ``close`` was called."""
        try:
            item = self._q.get(block=block, timeout=timeout)
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            self._pending.append(item)
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return True

    def _take_batch(self) -> list[Job]:
        self._pending = [j for j in self._pending if not j.cancelled]
        if not self._pending:
            return []
        first = self._pending[0]
        batch, longest, budget, n = [first], _longest(first), _budget(first), len(first.rows)
        for job in self._pending[1:]:
            if job.model is not first.model:
                continue
            lo, bu = max(longest, _longest(job)), max(budget, _budget(job))
            if n + len(job.rows) > self.max_rows or lo + bu > first.model.context:
                continue
            batch.append(job)
            longest, budget, n = lo, bu, n + len(job.rows)
        self._pending = [j for j in self._pending if j not in batch]
        return batch

    def _work(self) -> None:
        while True:
            if not self._pending and not self._drain(block=True):
                return
            time.sleep(self.batch_wait_s)  # let requests that arrive together run together
            if not self._drain(block=False):
                return
            batch = self._take_batch()
            if not batch:
                continue
            rows: list[Request] = []
            owner: list[tuple[Job, int]] = []
            for job in batch:
                for k, r in enumerate(job.rows):
                    rows.append(r)
                    owner.append((job, k))
            self.batches += 1
            self.running = len(rows)
            try:
                for ev in batch[0].model.engine.run(rows):
                    job, k = owner[ev.row]
                    ev.row = k
                    job.put(ev)
            except Exception as e:  # one bad batch must not stop the server
                for job in batch:
                    job.put(e)
            self.running = 0
            for job in batch:
                job.put(DONE)


def make_scheduler(kind: str, max_rows: int, max_queue: int = 256) -> Scheduler:
    if kind == "continuous":
        return ContinuousScheduler(max_rows=max_rows, max_queue=max_queue)
    if kind == "static":
        return StaticScheduler(max_rows=max_rows)
    raise ValueError(f"scheduler must be continuous or static (got {kind!r})")


def _longest(job: Job) -> int:
    return max(len(r.prompt) for r in job.rows)


def _budget(job: Job) -> int:
    return max(r.cfg.max_new_tokens for r in job.rows)
