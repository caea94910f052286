"""The FineWeb-style pipeline: raw pages -> clean, deduplicated, PII-scrubbed documents.

Stages, in FineWeb's order (each a small piece in its own module, FineWeb's thresholds by default)::

    read -> url_filter -> extract (trafilatura) -> language -> gopher_repetition -> gopher_quality
         -> c4 -> fineweb -> exact_dedup -> near_dedup (MinHash) -> pii -> output shards

It runs in three phases, so that everything but the dedup's clustering is parallel:

1. per task (on every core): read, filter, and compute each kept document's MinHash signature;
2. once: exact and near-duplicate clustering over all signatures (first document of a cluster wins);
3. per task (on every core): drop the duplicates, scrub PII, write the output shard.

Layout of an output directory::

    config.json                  settings and inputs; a run with other ones refuses to reuse the dir
    work/filtered/NNNNN.*        phase 1: kept docs (.jsonl), signatures (.npz), stats (.json, last)
    work/dedup.json              phase 2
    output/NNNNN.jsonl|parquet   phase 3: the documents (text, id, url, language, language_score)
    work/final/NNNNN.json        phase 3 stats, written after its shard (the shard's done marker)
    corpus.jsonl                 all output shards in order (what the tokenizer reads)
    report.md, *.png             the report

Every file is written atomically and a task's stats file is written last, so a restart redoes
only unfinished tasks and a crash never loses a finished one. Output depends only on the inputs
and settings (not on the number of processes or the order they finish in).

Its settings and profiles are in ``refine_config.py``, its per-stage statistics in ``refine_stats.py``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmstack.data.dedup import exact_key, near_duplicate_clusters
from llmstack.data.extract import extract_html_text
from llmstack.data.pii import scrub
from llmstack.data.refine_config import PROFILES as PROFILES  # re-exported for the pipeline's callers
from llmstack.data.refine_config import PipelineConfig
from llmstack.data.refine_stats import EXAMPLE_CHARS, STAGES, StageMeter, merge_stats, new_stats
from llmstack.data.sources import Bad, Raw, Task, decode_html, read_task
from llmstack.io import atomic_write, read_json, write_json

_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")


# ---------------------------------------------------------------------------------------------
# Phase 1: read, extract, filter (one task)
# ---------------------------------------------------------------------------------------------


def extract(raw: Raw, m: StageMeter) -> str | None:
    """Main text of a page, or None (with the reason recorded) when there is none."""
    if raw.text is not None:
        return raw.text
    assert raw.html is not None
    html, how = decode_html(raw.html, raw.charset)
    if html is None:
        m.drop("extract", how, raw.url)
        return None
    if how == "fallback":
        m.note("charset_fallback")
    try:
        text = extract_html_text(_XML_DECL.sub("", html, count=1))
    except Exception as e:  # lxml/trafilatura on hostile markup: one page, never the run
        m.drop("extract", "extract_error", raw.url, f"{type(e).__name__}: {e}")
        return None
    if not text:
        m.drop("extract", "no_main_text", raw.url, html[:EXAMPLE_CHARS])
        return None
    return text


def filter_document(raw: Raw, cfg: PipelineConfig, m: StageMeter) -> dict[str, Any] | None:
    """Run one document through every per-document filter; the kept record, or None."""
    n_in = len(raw.html) if raw.html is not None else len((raw.text or "").encode())
    m.keep("read", n_in)
    verdict = m.run("url_filter", n_in, lambda: cfg.url_filter(raw.url))
    if verdict:
        m.drop("url_filter", verdict, raw.url)
        return None
    m.keep("url_filter", n_in)
    text = m.run("extract", n_in, lambda: extract(raw, m))
    if text is None:
        return None
    size = len(text.encode("utf-8"))
    m.keep("extract", size)
    reason, lang, score = m.run("language", size, lambda: cfg.language(text))
    m.stats.setdefault("languages", Counter())[lang] += 1
    if reason:
        m.drop("language", reason, raw.url, f"[{lang} {score:.2f}] {text}")
        return None
    m.keep("language", size)
    for stage, check in (
        ("gopher_repetition", cfg.gopher_repetition),
        ("gopher_quality", cfg.gopher_quality),
    ):
        verdict = m.run(stage, size, lambda check=check: check(text))  # type: ignore[misc]
        if verdict:
            m.drop(stage, verdict, raw.url, text)
            return None
        m.keep(stage, size)
    verdict, text = m.run("c4", size, lambda: cfg.c4(text))
    if verdict:
        m.drop("c4", verdict, raw.url, text)
        return None
    size = len(text.encode("utf-8"))
    m.keep("c4", size)
    verdict = m.run("fineweb", size, lambda: cfg.fineweb(text))
    if verdict:
        m.drop("fineweb", verdict, raw.url, text)
        return None
    m.keep("fineweb", size)
    return {"id": raw.id, "url": raw.url, "text": text, "language": lang, "language_score": round(score, 4)}


def _task_paths(out: Path, i: int) -> dict[str, Path]:
    w = out / "work"
    return {
        "docs": w / "filtered" / f"{i:05d}.jsonl",
        "sigs": w / "filtered" / f"{i:05d}.npz",
        "stats": w / "filtered" / f"{i:05d}.json",
        "final": w / "final" / f"{i:05d}.json",
    }


def filter_task(task: Task, cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """Phase 1 for one task; returns its stats (also written, last, as the task's done marker)."""
    paths = _task_paths(out, task.index)
    if paths["stats"].exists():
        return read_json(paths["stats"])
    stats = new_stats()
    stats["languages"] = Counter()
    m = StageMeter(stats)
    lengths: list[int] = []
    sigs: list[np.ndarray] = []
    keys: list[str] = []
    t0 = time.perf_counter()
    with atomic_write(paths["docs"]) as f:  # kept documents go to disk as they come: memory holds one
        for item in read_task(task, cfg.limits):
            m.run("read", 0, lambda: None)
            if isinstance(item, Bad):
                m.drop("read", item.reason, item.url, item.detail)
                continue
            try:
                doc = filter_document(item, cfg, m)
            except Exception as e:  # a bug or a pathological page must cost one document, not the run
                m.drop("read", "error", item.url, f"{type(e).__name__}: {e}")
                continue
            if doc is not None:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                lengths.append(len(doc["text"]))
                sigs.append(cfg.minhash.signature(doc["text"]))
                keys.append(exact_key(doc["text"]))
    stats["stages"]["read"]["seconds"] = 0.0
    stats["stages"]["read"]["bytes_in"] = stats["stages"]["read"]["bytes_out"]  # (bad records: unknown size)
    stats["seconds"] = time.perf_counter() - t0
    stats["lengths"] = lengths
    sig_arr = np.stack(sigs) if sigs else np.zeros((0, cfg.minhash.n_hashes), dtype=np.uint32)
    with atomic_write(paths["sigs"], "wb") as f:
        np.savez(f, sigs=sig_arr, keys=np.array(keys, dtype="S40"))
    stats["languages"] = dict(stats["languages"])
    write_json(paths["stats"], stats)
    return stats


# ---------------------------------------------------------------------------------------------
# Phase 2: deduplication (all tasks at once)
# ---------------------------------------------------------------------------------------------


def dedup_all(out: Path, n_tasks: int, n_buckets: int) -> dict[str, Any]:
    """Exact then near-duplicate removal over every kept document; writes ``work/dedup.json``."""
    path = out / "work" / "dedup.json"
    if path.exists():
        return read_json(path)
    t0 = time.perf_counter()
    sigs: list[np.ndarray] = []
    keys: list[bytes] = []
    owner: list[tuple[int, int]] = []
    for i in range(n_tasks):
        with np.load(_task_paths(out, i)["sigs"]) as z:
            sigs.append(z["sigs"])
            keys.extend(z["keys"].tolist())
            owner.extend((i, j) for j in range(len(z["sigs"])))
    all_sigs = np.concatenate(sigs) if sigs else np.zeros((0, 0), dtype=np.uint32)
    seen: dict[bytes, int] = {}
    exact_dup = [seen.setdefault(k, g) != g for g, k in enumerate(keys)]
    survivors = [g for g, dup in enumerate(exact_dup) if not dup]
    roots = near_duplicate_clusters(all_sigs[survivors], n_buckets) if survivors else np.zeros(0, dtype=np.int64)
    removed: dict[str, dict[str, str]] = {}
    for g, dup in enumerate(exact_dup):
        if dup:
            i, j = owner[g]
            removed.setdefault(str(i), {})[str(j)] = "exact_duplicate"
    cluster_sizes = Counter(int(r) for r in roots)
    for local, root in enumerate(roots):
        if int(root) != local:
            i, j = owner[survivors[local]]
            removed.setdefault(str(i), {})[str(j)] = "near_duplicate"
    result = {
        "removed": removed,
        "n_exact": sum(exact_dup),
        "n_near": int(sum(int(r) != k for k, r in enumerate(roots))),
        "cluster_sizes": sorted((n for n in cluster_sizes.values() if n > 1), reverse=True),
        "seconds": time.perf_counter() - t0,
    }
    write_json(path, result)
    return result


# ---------------------------------------------------------------------------------------------
# Phase 3: drop duplicates, scrub PII, write the output shard (one task)
# ---------------------------------------------------------------------------------------------


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


OUTPUT_GROUP_ROWS = 1000  # a Parquet shard is written a row group at a time


def write_output_shard(records: Iterable[dict[str, Any]], path: Path, fmt: str) -> None:
    """Write records as they come: memory holds one row group, not the shard."""
    if fmt != "parquet":
        with atomic_write(path) as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return
    import pyarrow as pa  # heavy: ~0.1 s to import; only Parquet output needs it
    import pyarrow.parquet as pq

    it = iter(records)
    with atomic_write(path, "wb") as f:
        writer = None
        while group := list(islice(it, OUTPUT_GROUP_ROWS)):
            table = pa.Table.from_pylist(group, schema=writer.schema if writer else None)
            writer = writer or pq.ParquetWriter(f, table.schema)
            writer.write_table(table)
        if writer is None:
            pq.write_table(pa.table({"text": pa.array([], pa.string())}), f)
        else:
            writer.close()


def output_path(out: Path, i: int, fmt: str) -> Path:
    return out / "output" / f"{i:05d}.{'parquet' if fmt == 'parquet' else 'jsonl'}"


def finalize_task(i: int, out: Path, removed: dict[str, str], fmt: str) -> dict[str, Any]:
    """Phase 3 for task ``i``; returns its stats (written after the shard, as its done marker)."""
    paths = _task_paths(out, i)
    if paths["final"].exists():
        return read_json(paths["final"])
    stats = new_stats()
    m = StageMeter(stats)
    lengths: list[int] = []
    pii = {"emails": 0, "ips": 0}

    def survivors() -> Iterator[dict[str, Any]]:
        for j, rec in enumerate(_read_records(paths["docs"])):
            size = len(rec["text"].encode("utf-8"))
            reason = removed.get(str(j))
            for stage, why in (("exact_dedup", "exact_duplicate"), ("near_dedup", "near_duplicate")):
                m.run(stage, size, lambda: None)
                if reason == why:
                    m.drop(stage, why, rec["url"], rec["text"])
                    break
                m.keep(stage, size)
            else:
                text, e, p = m.run("pii", size, lambda rec=rec: scrub(rec["text"]))  # type: ignore[misc]
                pii["emails"], pii["ips"] = pii["emails"] + e, pii["ips"] + p
                rec["text"] = text
                m.keep("pii", len(text.encode("utf-8")))
                lengths.append(len(text))
                yield rec

    write_output_shard(survivors(), output_path(out, i, fmt), fmt)
    stats["pii"] = pii
    stats["lengths"] = lengths
    write_json(paths["final"], stats)
    return stats


def read_output_shard(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # heavy: ~0.1 s to import; only Parquet output needs it

        for batch in pq.ParquetFile(path).iter_batches(batch_size=OUTPUT_GROUP_ROWS):
            yield from batch.to_pylist()
    else:
        yield from _read_records(path)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    out: Path
    corpus: Path
    stats: dict[str, Any]
    dedup: dict[str, Any]
    seconds: float


def _check_config(out: Path, cfg: PipelineConfig, tasks: list[Task]) -> None:
    """Refuse to mix outputs of different settings or inputs in one directory."""
    want: dict[str, Any] = {"config": cfg.to_json(), "tasks": [[t.kind, [list(x) for x in t.items]] for t in tasks]}
    path = out / "config.json"
    if path.exists():
        have = read_json(path)
        if isinstance(have, dict) and isinstance(have.get("config"), dict) and "limits" not in have["config"]:
            have["config"]["limits"] = want["config"]["limits"]  # written before the input limits: the defaults held
        if have != json.loads(json.dumps(want)):
            raise ValueError(
                f"{out} holds a run with other settings or inputs; use another --out or delete it to start over"
            )
        return
    write_json(path, want)


def _bars(names: Iterable[str], total: int | None, progress: bool) -> dict[str, Any]:
    return {
        n: tqdm(total=total, desc=f"{n:>17}", unit="doc", position=k, leave=True, disable=not progress)
        for k, n in enumerate(names)
    }


def _map(fn: Callable[..., Any], args: list[tuple[Any, ...]], workers: int) -> Iterator[dict[str, Any]]:
    """Results as they finish, on ``workers`` processes (in this process when 1)."""
    if workers <= 1 or len(args) <= 1:
        for a in args:
            yield fn(*a)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        for fut in as_completed(futures):
            yield fut.result()


def run(
    tasks: list[Task],
    out: Path,
    cfg: PipelineConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> RunResult:
    """Run (or finish) the pipeline over ``tasks`` into ``out``; returns the merged stats."""
    cfg = cfg or PipelineConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg, tasks)
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    done = sum(_task_paths(out, t.index)["stats"].exists() for t in tasks)
    if done:
        log(f"resuming: {done}/{len(tasks)} tasks already filtered")
    bars = _bars(STAGES[:8], None, progress)
    parts: dict[int, dict[str, Any]] = {}
    for stats in _map(filter_task, [(t, cfg, out) for t in tasks], workers):
        parts[len(parts)] = stats
        for stage, bar in bars.items():
            bar.update(stats["stages"][stage]["docs_in"])
    for bar in bars.values():
        bar.close()
    phase1 = merge_stats(read_json(_task_paths(out, t.index)["stats"]) for t in tasks)
    dedup = dedup_all(out, len(tasks), cfg.minhash.n_buckets)
    bars = _bars(
        STAGES[8:], sum(len(read_json(_task_paths(out, t.index)["stats"])["lengths"]) for t in tasks), progress
    )
    args = [(t.index, out, dedup["removed"].get(str(t.index), {}), cfg.output_format) for t in tasks]
    for stats in _map(finalize_task, args, workers):
        for stage, bar in bars.items():
            bar.update(stats["stages"][stage]["docs_in"])
    for bar in bars.values():
        bar.close()
    finals = [read_json(_task_paths(out, t.index)["final"]) for t in tasks]
    phase3 = merge_stats(finals)
    for stage in STAGES[8:]:
        phase1["stages"][stage] = phase3["stages"][stage]
        phase1["drops"][stage] = phase3["drops"][stage]
        phase1["examples"][stage] = phase3["examples"][stage]
    phase1["stages"]["near_dedup"]["seconds"] += dedup["seconds"]
    phase1["languages"] = dict(
        sum((Counter(read_json(_task_paths(out, t.index)["stats"]).get("languages", {})) for t in tasks), Counter())
    )
    phase1["lengths_filtered"] = [n for t in tasks for n in read_json(_task_paths(out, t.index)["stats"])["lengths"]]
    phase1["lengths_final"] = [n for s in finals for n in s["lengths"]]
    phase1["pii"] = {k: sum(s["pii"][k] for s in finals) for k in ("emails", "ips")}
    corpus = out / "corpus.jsonl"
    with atomic_write(corpus) as f:
        for t in tasks:
            for r in read_output_shard(output_path(out, t.index, cfg.output_format)):
                f.write(json.dumps({"id": r["id"], "url": r["url"], "text": r["text"]}, ensure_ascii=False) + "\n")
    seconds = time.perf_counter() - t0
    phase1["dedup"] = {k: v for k, v in dedup.items() if k != "removed"}
    write_json(out / "stats.json", phase1)
    return RunResult(out, corpus, phase1, dedup, seconds)
