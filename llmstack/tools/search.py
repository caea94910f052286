"""Search and browse tools over a local document collection (the pretraining pipeline's output).

``search: query`` returns the top pages by BM25 (``bm25s``) as numbered results, each with its
source URL and the passage that best matches the query; ``browse: URL`` returns that page's text.
Both outputs reach the model inside a tool-result span: data to read, not instructions to follow.
No network is involved: the "web" is the local corpus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from llmstack.data.corpus import Document

_WORD = re.compile(r"\w+")


@dataclass
class Hit:
    url: str
    score: float
    snippet: str


def best_passage(text: str, query: str, max_chars: int = 300) -> str:
    """The paragraph sharing the most query words (ties: the earlier one), cut to ``max_chars``."""
    terms = {w.lower() for w in _WORD.findall(query) if len(w) > 2}
    paragraphs = [p.strip() for p in text.split("\n") if p.strip()] or [text]
    best = max(paragraphs, key=lambda p: len(terms & {w.lower() for w in _WORD.findall(p)}))
    return best if len(best) <= max_chars else best[: max_chars - 3].rsplit(" ", 1)[0] + "..."


class SearchIndex:
    def __init__(self, docs: Iterable[Document]) -> None:
        import bm25s  # heavy: ~0.2 s to import

        self.docs = [d for d in docs if d.text.strip()]
        if not self.docs:
            raise ValueError("the search index needs at least one document with text")
        self.by_url = {d.url: d for d in self.docs}
        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        tokens = bm25s.tokenize([d.text for d in self.docs], stopwords="en", show_progress=False)
        self.retriever.index(tokens, show_progress=False)

    def search(self, query: str, k: int = 3) -> list[Hit]:
        q = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not q.vocab:  # nothing searchable in the query (only stopwords/punctuation)
            return []
        idx, scores = self.retriever.retrieve(q, k=min(k, len(self.docs)), show_progress=False)
        hits = []
        for i, s in zip(idx[0].tolist(), scores[0].tolist(), strict=True):
            if s > 0:
                d = self.docs[i]
                hits.append(Hit(d.url, float(s), best_passage(d.text, query)))
        return hits

    def search_tool(self, query: str) -> str:
        if not query.strip():
            return "error: search needs a query"
        hits = self.search(query)
        if not hits:
            return "no results"
        return "\n".join(f"[{n}] {h.url}\n{h.snippet}" for n, h in enumerate(hits, 1))

    def browse_tool(self, url: str, max_chars: int = 1500) -> str:
        doc = self.by_url.get(url.strip())
        if doc is None:
            return f"error: no page at {url.strip()!r} in the local index"
        text = doc.text
        return text if len(text) <= max_chars else text[:max_chars] + "\n[page truncated]"
