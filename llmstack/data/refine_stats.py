"""The data pipeline's per-stage statistics: documents and bytes in and out, seconds, drop reasons
with a few examples each; counted per task, then summed (``merge_stats``) for the report."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

# The stages in FineWeb's order; the first eight run per document, the last three after the dedup
STAGES = (
    "read",
    "url_filter",
    "extract",
    "language",
    "gopher_repetition",
    "gopher_quality",
    "c4",
    "fineweb",
    "exact_dedup",
    "near_dedup",
    "pii",
)
N_EXAMPLES = 3  # dropped examples kept per (stage, reason) for the report
EXAMPLE_CHARS = 400


def new_stats() -> dict[str, Any]:
    stages = {s: {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "seconds": 0.0} for s in STAGES}
    return {"stages": stages, "drops": {s: {} for s in STAGES}, "examples": {s: {} for s in STAGES}, "notes": {}}


class StageMeter:
    """Counts one document through one stage: in, then out or dropped (with reason and example)."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def run(self, stage: str, n_bytes: int, fn: Callable[[], Any]) -> Any:
        s = self.stats["stages"][stage]
        s["docs_in"] += 1
        s["bytes_in"] += n_bytes
        t = time.perf_counter()
        try:
            return fn()
        finally:
            s["seconds"] += time.perf_counter() - t

    def keep(self, stage: str, n_bytes: int) -> None:
        s = self.stats["stages"][stage]
        s["docs_out"] += 1
        s["bytes_out"] += n_bytes

    def drop(self, stage: str, reason: str, url: str, text: str = "") -> None:
        drops = self.stats["drops"][stage]
        drops[reason] = drops.get(reason, 0) + 1
        examples = self.stats["examples"][stage].setdefault(reason, [])
        if len(examples) < N_EXAMPLES:
            examples.append({"url": url, "text": text[:EXAMPLE_CHARS]})

    def note(self, name: str) -> None:
        self.stats["notes"][name] = self.stats["notes"].get(name, 0) + 1


def merge_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-task stats (examples: the first few in task order)."""
    total = new_stats()
    for part in parts:
        for stage, s in part["stages"].items():
            for k, v in s.items():
                total["stages"][stage][k] += v
        for stage, drops in part["drops"].items():
            for reason, n in drops.items():
                total["drops"][stage][reason] = total["drops"][stage].get(reason, 0) + n
        for stage, by_reason in part["examples"].items():
            for reason, exs in by_reason.items():
                have = total["examples"][stage].setdefault(reason, [])
                have.extend(exs[: N_EXAMPLES - len(have)])
        for k, v in part["notes"].items():
            total["notes"][k] = total["notes"].get(k, 0) + v
    return total
