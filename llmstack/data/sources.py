"""Inputs to the pipeline: trees of HTML pages, WARC files, JSONL and Parquet text, split into tasks.

A task is the unit of parallel work and of restart: a run processes each task once, in any
process, and writes its results under the task's number. Tasks are made in a fixed order from the
sorted inputs, so the same inputs always give the same tasks (and the same output).

Reading never stops on bad input: a record that cannot be read becomes a ``Bad`` with a named
reason (``empty_file``, ``binary_file``, ``undecodable``, ``corrupt_gzip``, ``corrupt_warc``,
``malformed_jsonl_line``, ``corrupt_parquet``, ``read_error``) that the report counts. Nor does it
hold more than one record in memory (files are streamed, see ``llmstack.io.open_capped``): records
and inputs over the caps of ``InputLimits`` are counted as ``oversized_record``, ``oversized_input``
or ``oversized_nesting`` (JSON nested too deep).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llmstack.io import OversizedInput, bounded_lines, json_deeper_than, open_capped, skip

HTML_SUFFIXES = (".html", ".htm", ".xhtml")
WARC_SUFFIXES = (".warc", ".warc.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class InputLimits:
    """Caps on one record and one input file; what is over them is counted (``oversized_*``) and skipped."""

    # A page, WARC record, JSONL line or Parquet text. The largest page of the five Debian manuals is
    # 4.1 MB; Common Crawl truncates bodies at 1 MiB. A text at the cap costs a worker ~0.5 GB in the filters.
    max_record_bytes: int = 8 << 20
    # One input file, decompressed: a Common Crawl WARC is ~5 GB expanded, a FineWeb Parquet file ~4 GB.
    max_input_bytes: int = 16 << 30
    max_json_depth: int = 100  # FineWeb's records nest 2 deep


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


def read_html_files(items: tuple[tuple[str, ...], ...], limits: InputLimits) -> Iterator[Raw | Bad]:
    for path, url in items:
        try:
            with open(path, "rb") as f:
                data = f.read(limits.max_record_bytes + 1)
        except OSError as e:
            yield Bad(url, "read_error", str(e))
            continue
        if len(data) > limits.max_record_bytes:
            yield Bad(url, "oversized_record", f"over {limits.max_record_bytes:,} bytes")
            continue
        yield Raw(doc_id(url), url, html=data)


WARC_MAX_HEADER_BYTES = 64 << 10  # a record's WARC header block; Common Crawl's are under 1 KiB
WARC_MAX_BLANK_LINES = 8  # between two records (the format puts two)


def _warc_header(f: BinaryIO) -> tuple[bytes, dict[str, str]] | None:
    """The next record's WARC header: its bytes and its fields (lower-case names); None at the end."""
    lines: list[bytes] = []
    blank = 0
    while True:
        line = f.readline(WARC_MAX_HEADER_BYTES)
        if not line:
            if lines:
                raise EOFError("the file ends inside a WARC header")
            return None
        if not lines and not line.strip():
            blank += 1
            if blank > WARC_MAX_BLANK_LINES:
                raise ValueError(f"more than {WARC_MAX_BLANK_LINES} blank lines between two records")
            continue
        if not line.endswith(b"\n") or sum(map(len, lines)) + len(line) > WARC_MAX_HEADER_BYTES:
            raise ValueError(f"a WARC header longer than {WARC_MAX_HEADER_BYTES:,} bytes")
        if not lines and not line.startswith(b"WARC/"):
            raise ValueError(f"not a WARC record: {line[:40]!r}")
        lines.append(line)
        if not line.strip():
            break
    fields = {}
    for line in lines[1:-1]:
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    return b"".join(lines), fields


def _warc_response(record: bytes, max_bytes: int) -> Raw | Bad:
    """One response record (its WARC header and block) as a page: warcio parses its HTTP part."""
    from warcio.archiveiterator import ArchiveIterator  # heavy: ~0.05 s to import (with fsspec)

    url = ""
    try:
        rec = next(iter(ArchiveIterator(io.BytesIO(record))))
        url = rec.rec_headers.get_header("WARC-Target-URI") or ""
        ctype = rec.http_headers.get_header("Content-Type", "") if rec.http_headers else ""
        if ctype and "html" not in ctype.lower():
            return Bad(url, "not_html", ctype)
        charset = None
        if "charset=" in ctype.lower():
            charset = ctype.lower().split("charset=")[-1].split(";")[0].strip()
        body = rec.content_stream().read(max_bytes + 1)  # decoded (chunked, gzip...): a bomb stops here
    except Exception as e:  # warcio raises its own errors, zlib/brotli ones, ValueError...
        return Bad(url, "corrupt_warc", f"{type(e).__name__}: {e}")
    if len(body) > max_bytes:
        return Bad(url, "oversized_record", f"a body over {max_bytes:,} bytes once decoded")
    return Raw(doc_id(url), url, html=body, charset=charset)


def read_warc(path: str, limits: InputLimits) -> Iterator[Raw | Bad]:
    """HTML responses from a WARC (plain, or gzipped per record as Common Crawl ships them).

    The records are framed here with bounded reads (warcio's reader holds a header line whole, and a
    gzip bomb is one endless line), each response then parsed by warcio. A record over
    ``max_record_bytes`` is skipped as ``oversized_record``; a framing or gzip error ends the file:
    WARC has no resync marker, so the rest is counted as one ``corrupt_warc`` and the records before
    it are kept.
    """
    max_bytes = limits.max_record_bytes
    try:
        with open_capped(path, limits.max_input_bytes) as f:
            while (header := _warc_header(f)) is not None:
                head, fields = header
                length = int(fields.get("content-length", ""))  # ValueError when missing or not a number
                if length < 0:
                    raise ValueError(f"Content-Length {length}")
                url = fields.get("warc-target-uri", "")
                if fields.get("warc-type") != "response" or length > max_bytes:
                    skip(f, length)
                    if fields.get("warc-type") == "response":
                        yield Bad(url, "oversized_record", f"a WARC block of {length:,} bytes")
                    continue
                block = f.read(length)
                if len(block) < length:
                    raise EOFError(f"the file ends inside a record ({len(block):,} of {length:,} bytes)")
                yield _warc_response(head + block + b"\r\n\r\n", max_bytes)
    except OversizedInput as e:
        yield Bad(path, "oversized_input", str(e))
    except (OSError, EOFError, ValueError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        yield Bad(path, "corrupt_warc", f"{type(e).__name__}: {e}")


def _text_record(obj: object, where: str) -> Raw | Bad:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return Bad(where, "malformed_jsonl_line", "no 'text' string")
    url = str(obj.get("url") or "")
    ident = str(obj.get("id") or doc_id(url or obj["text"]))
    return Raw(ident, url or f"id:{ident}", text=obj["text"])


def _jsonl_record(line: bytes, where: str, limits: InputLimits) -> Raw | Bad:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:  # JSON is UTF-8; other bytes mean a damaged or mislabelled file
        return Bad(where, "undecodable", f"{e.reason} at byte {e.start}")
    if json_deeper_than(text, limits.max_json_depth):
        return Bad(where, "oversized_nesting", f"JSON nested more than {limits.max_json_depth} deep")
    try:
        return _text_record(json.loads(text), where)
    except ValueError as e:
        return Bad(where, "malformed_jsonl_line", str(e))


def read_jsonl_text(path: str, limits: InputLimits) -> Iterator[Raw | Bad]:
    """FineWeb-layout JSONL (``text``, ``id``, ``url``; other fields ignored), optionally gzipped."""
    try:
        with open_capped(path, limits.max_input_bytes) as f:
            for lineno, line in enumerate(bounded_lines(f, limits.max_record_bytes), 1):
                where = f"{path}:{lineno}"
                if line is None:
                    yield Bad(where, "oversized_record", f"a line over {limits.max_record_bytes:,} bytes")
                elif line.strip():
                    yield _jsonl_record(line, where, limits)
    except OversizedInput as e:
        yield Bad(path, "oversized_input", str(e))
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        yield Bad(path, "corrupt_gzip", f"{type(e).__name__}: {e}")


PARQUET_BATCH_ROWS = 64  # rows decoded at a time: 64 records at the cap are 0.5 GB


def read_parquet(path: str, limits: InputLimits) -> Iterator[Raw | Bad]:
    """FineWeb-layout Parquet: ``text`` required, ``id`` and ``url`` used when present.

    Read one row group at a time in small batches; the row groups' declared (uncompressed) sizes count
    against ``max_input_bytes``, and a text over ``max_record_bytes`` is an ``oversized_record``.
    """
    import pyarrow.parquet as pq  # heavy: ~0.1 s to import; only Parquet input needs it

    try:
        pf = pq.ParquetFile(path, buffer_size=1 << 20)  # pages streamed, not whole column chunks
        columns = [c for c in ("text", "id", "url") if c in pf.schema_arrow.names]
        if "text" not in columns:
            yield Bad(path, "corrupt_parquet", "no 'text' column")
            return
        expanded = 0
        for i in range(pf.num_row_groups):
            group = pf.metadata.row_group(i)
            expanded += sum(group.column(j).total_uncompressed_size for j in range(group.num_columns))
            if expanded > limits.max_input_bytes:
                yield Bad(path, "oversized_input", f"row groups over {limits.max_input_bytes:,} bytes")
                return
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[i], columns=columns):
                for row in batch.to_pylist():
                    text = row["text"]
                    if isinstance(text, str) and len(text.encode("utf-8")) > limits.max_record_bytes:
                        yield Bad(path, "oversized_record", f"a text over {limits.max_record_bytes:,} bytes")
                    else:
                        yield _text_record(row, path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
        yield Bad(path, "corrupt_parquet", f"{type(e).__name__}: {e}")


READERS: dict[str, Callable[[str, InputLimits], Iterator[Raw | Bad]]] = {
    "warc": read_warc,
    "jsonl": read_jsonl_text,
    "parquet": read_parquet,
}


def read_task(task: Task, limits: InputLimits) -> Iterator[Raw | Bad]:
    """The task's records in order. Never raises on bad input: an error no reader foresaw ends that
    input as one ``read_error``, the records before it kept."""
    if task.kind != "html" and task.kind not in READERS:
        raise ValueError(f"unknown task kind {task.kind!r}")
    where = task.items[0][0] if task.items else f"task {task.index}"
    try:
        if task.kind == "html":
            yield from read_html_files(task.items, limits)
        elif os.path.getsize(where) == 0:
            yield Bad(where, "empty_file")
        else:
            yield from READERS[task.kind](where, limits)
    except Exception as e:  # a reader's bug on hostile input costs the rest of that input, not the run
        yield Bad(where, "read_error", f"{type(e).__name__}: {e}")


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
