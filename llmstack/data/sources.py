"""Inputs to the pipeline: trees of HTML pages, WARC files, JSONL and Parquet text, split into tasks.

A task is the unit of parallel work and of restart: a run processes each task once, in any
process, and writes its results under the task's number. Tasks are made in a fixed order from the
sorted inputs, so the same inputs always give the same tasks (and the same output).

Reading never stops on bad input: a record that cannot be read becomes a ``Bad`` with a named
reason (``empty_file``, ``binary_file``, ``undecodable``, ``corrupt_gzip``, ``corrupt_warc``,
``malformed_jsonl_line``, ``corrupt_parquet``, ``read_error``) that the report counts.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HTML_SUFFIXES = (".html", ".htm", ".xhtml")
WARC_SUFFIXES = (".warc", ".warc.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Raw:
    """One input document: HTML bytes still to extract, or text that needs no extraction."""

    id: str
    url: str
    html: bytes | None = None
    text: str | None = None
    charset: str | None = None  # from an HTTP header, when the input had one


@dataclass(frozen=True)
class Bad:
    """An input that could not be read, with why; counted and skipped."""

    url: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Task:
    """``kind`` is html (``items`` = (path, url) pairs), warc, jsonl or parquet (``items`` = (path,))."""

    index: int
    kind: str
    items: tuple[tuple[str, ...], ...]


def doc_id(url: str) -> str:
    """The same id as ``corpus.doc_id``: a stable hash of the url."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Decoding HTML bytes
# ---------------------------------------------------------------------------------------------

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_XML_ENCODING = re.compile(rb"""<\?xml[^>]+encoding\s*=\s*["']([A-Za-z0-9_.:-]+)""", re.I)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_CONTROL = bytes(range(0, 9)) + bytes(range(14, 32))


def looks_binary(data: bytes) -> bool:
    """A NUL byte or many control characters in the first 8 KB: an image or archive named .html."""
    head = data[:8192]
    if b"\x00" in head:
        return True
    return sum(head.count(c) for c in _CONTROL) > 0.05 * max(1, len(head))


def _codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name.strip().lower()).name
    except LookupError:
        return None


def decode_html(data: bytes, header_charset: str | None = None) -> tuple[str | None, str]:
    """The page as text and how it was decoded, or (None, reason) when it is not a text page.

    Order: a byte-order mark, the declared charset (HTTP header, then <meta> or <?xml>), UTF-8,
    and last cp1252 with replacement characters: a wrong or missing charset costs a few
    characters, never the page (the "how" says ``fallback`` so the report can count them).
    """
    if not data.strip():
        return None, "empty_file"
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return data.decode(enc, errors="replace"), enc
    if looks_binary(data):
        return None, "binary_file"
    head = data[:4096]
    m = _META_CHARSET.search(head) or _XML_ENCODING.search(head)
    declared = _codec(header_charset) or _codec(m.group(1).decode("ascii", "replace") if m else None)
    for enc in dict.fromkeys(e for e in (declared, "utf-8") if e):
        try:
            return data.decode(enc), enc
        except UnicodeDecodeError:
            continue
    return data.decode("cp1252", errors="replace"), "fallback"


# ---------------------------------------------------------------------------------------------
# Readers, one per kind
# ---------------------------------------------------------------------------------------------


def read_html_files(items: tuple[tuple[str, ...], ...]) -> Iterator[Raw | Bad]:
    for path, url in items:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            yield Bad(url, "read_error", str(e))
            continue
        yield Raw(doc_id(url), url, html=data)


def read_warc(path: str) -> Iterator[Raw | Bad]:
    """HTML responses from a WARC (plain or per-record gzip, as Common Crawl ships them).

    A corrupt record ends the file: WARC has no resync marker, so the rest is counted as one
    ``corrupt_warc`` and the records before it are kept.
    """
    from warcio.archiveiterator import ArchiveIterator  # heavy: ~0.05 s to import (with fsspec)

    try:
        with open(path, "rb") as f:
            for record in ArchiveIterator(f):
                if record.rec_type != "response":
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI") or ""
                ctype = record.http_headers.get_header("Content-Type", "") if record.http_headers else ""
                if ctype and "html" not in ctype.lower():
                    yield Bad(url, "not_html", ctype)
                    continue
                charset = None
                if "charset=" in ctype.lower():
                    charset = ctype.lower().split("charset=")[-1].split(";")[0].strip()
                yield Raw(doc_id(url), url, html=record.content_stream().read(), charset=charset)
    except Exception as e:  # warcio raises ArchiveLoadFailed, zlib/gzip/EOF errors, ValueError...
        yield Bad(path, "corrupt_warc", f"{type(e).__name__}: {e}")


def _text_record(obj: object, where: str) -> Raw | Bad:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return Bad(where, "malformed_jsonl_line", "no 'text' string")
    url = str(obj.get("url") or "")
    ident = str(obj.get("id") or doc_id(url or obj["text"]))
    return Raw(ident, url or f"id:{ident}", text=obj["text"])


def read_jsonl_text(path: str) -> Iterator[Raw | Bad]:
    """FineWeb-layout JSONL (``text``, ``id``, ``url``; other fields ignored), optionally gzipped."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    yield Bad(f"{path}:{lineno}", "malformed_jsonl_line", str(e))
                    continue
                yield _text_record(obj, f"{path}:{lineno}")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        yield Bad(path, "corrupt_gzip", f"{type(e).__name__}: {e}")


def read_parquet(path: str) -> Iterator[Raw | Bad]:
    """FineWeb-layout Parquet: ``text`` required, ``id`` and ``url`` used when present."""
    import pyarrow.parquet as pq  # heavy: ~0.1 s to import; only Parquet input needs it

    try:
        pf = pq.ParquetFile(path)
        columns = [c for c in ("text", "id", "url") if c in pf.schema_arrow.names]
        if "text" not in columns:
            yield Bad(path, "corrupt_parquet", "no 'text' column")
            return
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            for row in batch.to_pylist():
                yield _text_record(row, path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
        yield Bad(path, "corrupt_parquet", f"{type(e).__name__}: {e}")


def read_task(task: Task) -> Iterator[Raw | Bad]:
    if task.kind == "html":
        yield from read_html_files(task.items)
    elif task.kind == "warc":
        yield from read_warc(task.items[0][0])
    elif task.kind == "jsonl":
        yield from read_jsonl_text(task.items[0][0])
    elif task.kind == "parquet":
        yield from read_parquet(task.items[0][0])
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")


# ---------------------------------------------------------------------------------------------
# Making tasks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HtmlTree:
    """A directory of pages and the address its root is served at (a page's URL = base + path)."""

    root: Path
    base_url: str


def _is_page(rel: Path) -> bool:
    """Pages only: not ``_static``/``_sources``-like folders of a documentation build."""
    return rel.name.lower().endswith(HTML_SUFFIXES) and not any(p.startswith("_") for p in rel.parts[:-1])


def html_pages(tree: HtmlTree) -> list[tuple[str, str]]:
    """(path, url) of every page under the tree, sorted by relative path."""
    root = Path(tree.root)
    pages = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if _is_page(rel) and p.is_file():
            pages.append((rel.as_posix(), str(p)))
    pages.sort()
    return [(path, tree.base_url + rel) for rel, path in pages]


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (
        ("warc", WARC_SUFFIXES),
        ("jsonl", JSONL_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return kind
    return None


def make_tasks(trees: list[HtmlTree], files: list[Path], pages_per_task: int = 100) -> list[Task]:
    """Tasks in a fixed order: HTML trees in chunks of ``pages_per_task`` pages, then one per file."""
    tasks: list[Task] = []
    for tree in trees:
        pages = html_pages(tree)
        for start in range(0, len(pages), pages_per_task):
            tasks.append(Task(len(tasks), "html", tuple(pages[start : start + pages_per_task])))
    for f in sorted(Path(f) for f in files):
        kind = _file_kind(f)
        if kind is None:
            raise ValueError(f"{f}: unknown input type (expected {WARC_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES})")
        tasks.append(Task(len(tasks), kind, ((str(f),),)))
    return tasks
