"""Hostile inputs through the data pipeline: peak memory, seconds, and what each bad input is counted as.

Usage::

    python bench/hostile_data.py                      # a 1 GiB gzip bomb and 1 GiB records, 2 workers
    python bench/hostile_data.py --bomb-mib 64 --workers 1

Builds a folder of hostile inputs in a temporary directory (removed afterwards), next to a few good
documents, and runs the pipeline's library entry point (``llmstack.data.crawl.run_pipeline``) on it
in a subprocess. Prints the peak RSS of that subprocess and its workers (``ru_maxrss`` of
``RUSAGE_CHILDREN``), the seconds, and the read stage's counts by reason. The inputs (name: what
it should be counted as):

- ``bomb.warc.gz``: gzip of ``--bomb-mib`` MiB of zeros (corrupt_warc: no WARC header in it)
- ``huge-page.warc.gz``: one WARC response whose HTML page is ``--bomb-mib`` MiB (oversized_record)
- ``huge-line.jsonl.gz``: one gzipped JSONL record of ``--bomb-mib`` MiB on one line (oversized_record)
- ``huge-line.jsonl``: the same, ``--line-mib`` MiB, not compressed (oversized_record)
- ``deep.jsonl``: ``[`` x 200,000 and ``{"a":`` x 100,000 (oversized_nesting x 2), then a good record
- ``truncated.jsonl.gz``, ``truncated.warc.gz``: gzip cut in the middle (corrupt_gzip, corrupt_warc)
- ``random.warc.gz``, ``random.parquet``, ``random.jsonl``: 1 MiB of random bytes (corrupt_warc,
  corrupt_parquet, and one undecodable or malformed_jsonl_line per "line")
- ``invalid-utf8.jsonl``: a record with a Latin-1 byte (undecodable)
- ``empty.jsonl``: 0 bytes (empty_file); ``nul.jsonl``, ``nul.warc.gz``: ``--line-mib`` MiB of NUL
  bytes (oversized_record: one long "line"; corrupt_warc)
- ``good.warc.gz``, ``good.jsonl``: 3 pages and 3 records that pass every filter
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

MIB = 1 << 20
CHILD = """
import json, resource, sys, time
from pathlib import Path
from llmstack.data.crawl import run_pipeline

t0 = time.perf_counter()
files = tuple(sorted(Path(sys.argv[1]).iterdir()))
r = run_pipeline([], Path(sys.argv[2]), files, workers=int(sys.argv[3]), progress=False, log=lambda _: None)
rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
kept = sum(1 for _ in r.corpus.open())
print(json.dumps({"read": r.stats["drops"]["read"], "kept": kept, "peak_rss_kib": rss,
                  "seconds": time.perf_counter() - t0}))
"""

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_refine import prose  # noqa: E402 - the tests' filter-passing English, one seed one text


def gzip_repeat(chunk: bytes, n: int, head: bytes = b"", tail: bytes = b"") -> bytes:
    """gzip of head + chunk * n + tail, compressed a chunk at a time (never held expanded)."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [c.compress(head)] + [c.compress(chunk) for _ in range(n)] + [c.compress(tail), c.flush()]
    return b"".join(parts)


def warc_head(url: str, body_len: int, more_http_headers: bytes = b"") -> bytes:
    """A WARC response record's header and HTTP header, for an HTML body of ``body_len`` bytes."""
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n" + more_http_headers + b"\r\n"
    return (
        f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\n"
        f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http) + body_len}\r\n\r\n"
    ).encode() + http


def warc_record(url: str, html: bytes) -> bytes:
    return gzip.compress(warc_head(url, len(html)) + html + b"\r\n\r\n")


def build(root: Path, bomb_mib: int, line_mib: int) -> dict[str, tuple[str, ...]]:
    """Write the hostile folder under ``root``; returns {file name: the reasons its records should be counted under}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    (root / "bomb.warc.gz").write_bytes(gzip_repeat(bytes(MIB), bomb_mib))
    page = b"word " * (MIB // 5)
    head = warc_head("https://bomb.example/page", bomb_mib * len(page))
    (root / "huge-page.warc.gz").write_bytes(gzip_repeat(page, bomb_mib, head, b"\r\n\r\n"))
    (root / "huge-line.jsonl.gz").write_bytes(gzip_repeat(page, bomb_mib, b'{"text": "', b'"}\n'))
    with (root / "huge-line.jsonl").open("wb") as f:
        f.write(b'{"text": "')
        for _ in range(line_mib):
            f.write(page)
        f.write(b'"}\n')
    good = json.dumps({"text": prose(99), "url": "https://good.example/deep"})
    (root / "deep.jsonl").write_text(
        "[" * 200_000 + "\n" + '{"a":' * 100_000 + "1" + "}" * 100_000 + "\n" + good + "\n"
    )
    (root / "truncated.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 10_000)[:200])
    (root / "truncated.warc.gz").write_bytes(warc_record("https://cut.example/", prose(98).encode() * 20)[:300])
    for name in ("random.warc.gz", "random.parquet", "random.jsonl"):
        (root / name).write_bytes(rng.randbytes(MIB))
    (root / "invalid-utf8.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    (root / "empty.jsonl").write_bytes(b"")
    (root / "nul.jsonl").write_bytes(bytes(line_mib * MIB))
    (root / "nul.warc.gz").write_bytes(bytes(line_mib * MIB))
    pages = [
        f"<html><body><article><p>{prose(i).replace(chr(10), '</p><p>')}</p></article></body></html>" for i in range(3)
    ]
    (root / "good.warc.gz").write_bytes(
        b"".join(warc_record(f"https://good.example/{i}", p.encode()) for i, p in enumerate(pages))
    )
    (root / "good.jsonl").write_text(
        "".join(json.dumps({"text": prose(10 + i), "url": f"https://good.example/j{i}"}) + "\n" for i in range(3))
    )
    return {
        "bomb.warc.gz": ("corrupt_warc",),
        "huge-page.warc.gz": ("oversized_record",),
        "huge-line.jsonl.gz": ("oversized_record",),
        "huge-line.jsonl": ("oversized_record",),
        "deep.jsonl": ("oversized_nesting",),
        "truncated.jsonl.gz": ("corrupt_gzip",),
        "truncated.warc.gz": ("corrupt_warc",),
        "random.warc.gz": ("corrupt_warc",),
        "random.parquet": ("corrupt_parquet",),
        "random.jsonl": ("undecodable", "malformed_jsonl_line"),
        "invalid-utf8.jsonl": ("undecodable",),
        "empty.jsonl": ("empty_file",),
        "nul.jsonl": ("oversized_record",),
        "nul.warc.gz": ("corrupt_warc",),
    }


def run_child(folder: Path, out: Path, workers: int) -> dict:
    """The pipeline over every file of ``folder`` in a fresh Python process; its counts, kept documents,
    its own peak RSS (KiB, with its workers') and seconds."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(out), str(workers)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the pipeline failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bomb-mib", type=int, default=1024, help="expanded size of the gzip bomb and huge records")
    ap.add_argument("--line-mib", type=int, default=64, help="size of the uncompressed one-line record")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        t0 = time.perf_counter()
        expected = build(Path(tmp) / "in", args.bomb_mib, args.line_mib)
        on_disk = sum(p.stat().st_size for p in (Path(tmp) / "in").iterdir())
        print(f"built {len(expected) + 2} inputs, {on_disk / MIB:.1f} MiB on disk, in {time.perf_counter() - t0:.1f}s")
        r = run_child(Path(tmp) / "in", Path(tmp) / "out", args.workers)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(f"pipeline: {r['seconds']:.1f}s, {args.workers} workers, peak RSS {peak / 1024:.0f} MiB (RUSAGE_CHILDREN)")
    print(f"kept documents: {r['kept']} of 7 good ones")
    print("read stage, counts by reason:")
    for reason, n in sorted(r["read"].items()):
        inputs = ", ".join(name for name, why in expected.items() if reason in why)
        print(f"  {reason:<22} {n:>6}   ({inputs})")


if __name__ == "__main__":
    main()
