"""An assistant's knowledge files -> passages -> a BM25 index over them.

Files are read as text (.txt/.md as UTF-8, .html/.htm through trafilatura with a plain lxml text
fallback, .pdf through pypdf), split into paragraph-aware passages of about ``chunk_chars``
characters, and indexed with the search tool's BM25 index (``llmstack.tools.search``). Everything
lives in memory and is rebuilt when an assistant is loaded: nothing is cached on disk.
What is not here: OCR of scanned PDFs, embeddings, passages that overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import lxml.etree
import lxml.html

from llmstack.data.corpus import Document
from llmstack.data.extract import extract_html_text
from llmstack.tools.search import SearchIndex

SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf")
"""The knowledge file types an assistant can hold."""

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Passage:
    file: str  # the file's path relative to the assistant folder, e.g. "knowledge/faq.md"
    text: str


def read_text(path: Path) -> str:
    """The plain text of one knowledge file ("" when it has none)."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        return path.read_text(encoding="utf-8-sig", errors="replace")
    if suffix in (".html", ".htm"):
        return _html_text(path.read_text(encoding="utf-8", errors="replace"))
    if suffix == ".pdf":
        return _pdf_text(path)
    raise ValueError(f"{path}: unsupported knowledge file type {suffix!r} (supported: {', '.join(SUFFIXES)})")


def _html_text(html: str) -> str:
    """trafilatura's main text; where it finds none (a short page, a fragment), all of lxml's text."""
    try:
        text = extract_html_text(html)
    except (lxml.etree.ParserError, ValueError):
        text = ""
    if text or not html.strip():
        return text
    try:
        tree = lxml.html.fromstring(html)
    except (lxml.etree.ParserError, ValueError):
        return ""
    for el in tree.xpath("//script | //style"):
        el.drop_tree()
    return "\n".join(line.strip() for line in tree.text_content().splitlines()).strip()


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader  # heavy: ~0.1 s to import (with Pillow and fontTools); only PDFs need it
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValueError(f"{path}: the PDF is encrypted")
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()
    except PdfReadError as e:
        raise ValueError(f"{path}: not a readable PDF ({e})") from None


def split_passages(text: str, chunk_chars: int = 800) -> list[str]:
    """Pack whole paragraphs into passages of at most ``chunk_chars`` characters.

    A paragraph longer than that is cut between sentences, and a sentence longer than that
    between words, so that no passage is longer than ``chunk_chars`` (unless one word is).
    """
    pieces: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")):
        paragraph = "\n".join(line.rstrip() for line in paragraph.strip("\n").splitlines()).strip()
        if paragraph:
            pieces.extend(_split_long(paragraph, chunk_chars))
    return _pack(pieces, chunk_chars, "\n\n")


def _split_long(paragraph: str, limit: int) -> list[str]:
    if len(paragraph) <= limit:
        return [paragraph]
    parts: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        while len(sentence) > limit:
            cut = sentence.rfind(" ", 0, limit + 1)
            cut = cut if cut > limit // 2 else limit
            parts.append(sentence[:cut].rstrip())
            sentence = sentence[cut:].lstrip()
        if sentence:
            parts.append(sentence)
    return _pack(parts, limit, " ")


def _pack(parts: list[str], limit: int, sep: str) -> list[str]:
    """Join consecutive parts with ``sep`` while the result stays within ``limit``."""
    out: list[str] = []
    for part in parts:
        if out and len(out[-1]) + len(sep) + len(part) <= limit:
            out[-1] += sep + part
        else:
            out.append(part)
    return out


class Knowledge:
    """The passages of an assistant's files and a BM25 index over them (none when there are none)."""

    def __init__(self, passages: list[Passage]) -> None:
        self.passages = passages
        # The search tool's index ranks documents by url; one document per passage, keyed "file#i".
        self._by_key = {f"{p.file}#{i}": p for i, p in enumerate(passages)}
        docs = [Document(key, key, p.text) for key, p in self._by_key.items()]
        self._index = SearchIndex(docs) if docs else None

    @classmethod
    def from_files(cls, folder: Path, files: list[Path], chunk_chars: int) -> Knowledge:
        passages = []
        for path in files:
            label = path.relative_to(folder).as_posix()
            passages += [Passage(label, text) for text in split_passages(read_text(path), chunk_chars)]
        return cls(passages)

    def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
        """The ``k`` best passages for ``query`` with their BM25 scores, best first; only scores > 0."""
        if self._index is None or k < 1:
            return []
        return [(self._by_key[hit.url], hit.score) for hit in self._index.search(query, k)]
