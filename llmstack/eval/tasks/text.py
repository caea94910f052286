"""Held-out text for bits per byte: the documents of the default corpus that pretraining never saw.

The token shards put a document in ``val`` by a hash of its id (``shards.split_of``, 5% by default), and
``llmstack pretrain`` trains on ``train`` only; these are the same ``val`` documents as text, so that
any model, with any tokenizer, is measured on the same bytes (nats over every token / (ln 2 x UTF-8
bytes), the formula of ``training.pretrain.bits_per_byte``). Or any UTF-8 text file, cut into
documents at blank lines. Each document is cut to its first ``max_chars`` characters, so that a
135M-parameter model on two CPU cores measures the default set in about a minute. A uniform guess
over bytes scores 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmstack.data.corpus import find_default_corpus, read_jsonl
from llmstack.data.shards import split_of
from llmstack.eval.tasks.base import Document, Examples, Kind, Mode, subsample

VAL_FRACTION = 0.05  # write_shards' default split


def _paragraph_documents(text: str, min_chars: int = 2000) -> list[str]:
    docs, cur = [], ""
    for block in text.split("\n\n"):
        cur = f"{cur}\n\n{block}" if cur else block
        if len(cur) >= min_chars:
            docs.append(cur)
            cur = ""
    return [*docs, cur] if cur.strip() else docs


@dataclass
class HeldOutText:
    name: str = "heldout_bpb"
    path: Path | None = None  # a corpus JSONL (its val split) or a text file; None: the default corpus
    max_chars: int | None = 4000
    kind: Kind = "bpb"
    modes: tuple[Mode, ...] = ()

    @property
    def about(self) -> str:
        where = self.path.name if self.path else "the default corpus"
        return f"bits per byte on held-out text ({where})"

    def examples(self, limit: int | None, seed: int) -> Examples[Document]:
        try:
            path = self.path or find_default_corpus()
        except FileNotFoundError as e:
            return Examples([], note=str(e))
        if not path.is_file():
            return Examples([], note=f"{path}: no such file")
        if path.suffix == ".jsonl":
            docs = [Document(d.id, d.text) for d in read_jsonl(path) if split_of(d.id, VAL_FRACTION) == "val"]
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            docs = [Document(f"{path.name}#{i}", t) for i, t in enumerate(_paragraph_documents(text))]
        cut = self.max_chars
        found = Examples([Document(d.id, d.text[:cut] if cut else d.text) for d in docs if d.text.strip()])
        if len(found.items) < len(docs):
            found.skipped["empty document"] = len(docs) - len(found.items)
        return subsample(found, limit, seed)
