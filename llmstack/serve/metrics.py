"""What the server is doing, for Prometheus (``GET /metrics``) and for people (one JSON log line per
request on the ``llmstack.serve.requests`` logger).

Counters and histograms are updated where things happen (a job counts its tokens and its time to first
token; the routes count requests by route and status); gauges (rows queued and running, KV cache and
prefix cache use) are read from the scheduler when ``/metrics`` is scraped. ``tokens_per_second`` is
the generation rate over the last ``window_s`` seconds, for a person reading the page; Prometheus
users take ``rate(llmstack_generated_tokens_total[1m])``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

request_log = logging.getLogger("llmstack.serve.requests")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self, stats: Callable[[], dict[str, float]], window_s: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmstack_requests", "HTTP API requests answered", ["route", "status"], registry=r)
        self.tokens = Counter("llmstack_generated_tokens", "tokens sampled by the models", registry=r)
        self.prompt_tokens = Counter("llmstack_prompt_tokens", "prompt tokens of generation requests", registry=r)
        self.ttft = Histogram(
            "llmstack_time_to_first_token_seconds",
            "from a request's submission to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "llmstack_request_seconds", "from a request's submission to its last token", registry=r
        )
        self._stats = stats
        self._names = {
            "queued_rows": "rows waiting for a slot in a running batch",
            "running_rows": "rows in running batches",
            "kv_cache_bytes": "bytes of KV cache allocated",
            "prefix_cache_bytes": "bytes of cached prompt prefixes",
            "prefix_cache_hit_ratio": "share of prompt tokens served from the prefix cache",
        }
        for name, doc in self._names.items():
            Gauge(f"llmstack_{name}", doc, registry=r).set_function(self._gauge(name))
        Gauge("llmstack_tokens_per_second", "tokens generated per second, last window", registry=r).set_function(
            self.tokens_per_second
        )
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def _gauge(self, name: str) -> Callable[[], float]:
        return lambda: float(self._stats().get(name, 0.0))

    def count_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def render(self) -> bytes:
        return generate_latest(self.registry)


def log_request(**fields: Any) -> None:
    """One JSON line per finished generation request (id, model, route, status, tokens, timings, user)."""
    if request_log.isEnabledFor(logging.INFO):
        request_log.info(json.dumps({k: v for k, v in fields.items() if v is not None}, default=str))
