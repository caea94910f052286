"""Batching concurrent requests onto the engine.

One worker thread owns the models. Requests (jobs of one or more rows: ``n`` choices are rows) wait
in a queue; the worker takes the oldest, waits ``batch_wait_s`` for others to arrive, and runs every
waiting job for the same model together as one engine batch, up to ``max_rows`` rows and only while
the longest prompt plus the largest token budget fits the context (so batching never cuts a
request's ``max_tokens``). Events go back to each job's asyncio queue on the server's event loop.

A job whose client went away is cancelled: its rows drop out of the running batch at the next step.
An error inside a batch is sent to every job in it; the worker carries on with the next batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llmstack.inference.engine import Request
from llmstack.serve.models import ServedModel

DONE = object()


@dataclass
class Job:
    model: ServedModel
    rows: list[Request]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    def cancel(self) -> None:
        for r in self.rows:
            r.cancelled = True

    @property
    def cancelled(self) -> bool:
        return all(r.cancelled for r in self.rows)

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Scheduler:
    def __init__(self, max_rows: int = 32, batch_wait_s: float = 0.005) -> None:
        self.max_rows = max_rows
        self.batch_wait_s = batch_wait_s
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._pending: list[Job] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.rows_run = 0

    def submit(self, job: Job) -> None:
        if len(job.rows) > self.max_rows:
            raise ValueError(f"a request of {len(job.rows)} rows exceeds the batch limit of {self.max_rows}")
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
            self.rows_run += len(rows)
            try:
                for ev in batch[0].model.engine.run(rows):
                    job, k = owner[ev.row]
                    ev.row = k
                    job.put(ev)
            except Exception as e:  # one bad batch must not stop the server
                for job in batch:
                    job.put(e)
            for job in batch:
                job.put(DONE)


def _longest(job: Job) -> int:
    return max(len(r.prompt) for r in job.rows)


def _budget(job: Job) -> int:
    return max(r.cfg.max_new_tokens for r in job.rows)
