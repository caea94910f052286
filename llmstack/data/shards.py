"""Token shards: documents -> flat arrays of token ids on disk, read back with numpy memmap.

Layout of a shard directory::

    index.json          {"format_version", "dtype", "vocab_size", "bos_id", "tokenizer_fingerprint",
                         "splits": {"train": [{"file", "n_tokens", "n_docs"}, ...], "val": [...]}}
    train_000000.bin    raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val_000000.bin

Every document is written as ``<|bos|> tokens...``; since ordinary text never encodes to the bos id,
document boundaries are exactly the positions of bos in the stream and need no separate index.
Each ``.bin`` is written to a temporary name and renamed, and ``index.json`` is written last, so a
crash mid-way leaves either the old complete directory or no index at all (never a torn one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llmstack.io import atomic_write, read_json, write_json
from llmstack.tokenizer import Tokenizer

FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_of(doc_id: str, val_fraction: float) -> str:
    """Deterministic train/val assignment from the document id (stable when the corpus grows)."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


@dataclass
class ShardIndex:
    path: Path
    dtype: np.dtype
    vocab_size: int
    bos_id: int
    tokenizer_fingerprint: str
    splits: dict[str, list[dict]]

    @classmethod
    def load(cls, directory: str | Path) -> ShardIndex:
        directory = Path(directory)
        index_file = directory / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(
                f"{index_file}: no token shards here; create them with `llmstack tokenize` (or `make run`)"
            )
        meta = read_json(index_file)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{index_file}: unsupported shard format_version {meta.get('format_version')}")
        idx = cls(
            directory,
            np.dtype(meta["dtype"]),
            meta["vocab_size"],
            meta["bos_id"],
            meta["tokenizer_fingerprint"],
            meta["splits"],
        )
        for split, shards in idx.splits.items():
            for s in shards:
                f = directory / s["file"]
                expected = s["n_tokens"] * idx.dtype.itemsize
                actual = f.stat().st_size if f.exists() else -1
                if actual != expected:
                    raise ValueError(
                        f"{f}: {split} shard is {'missing' if actual < 0 else f'{actual} bytes'}, "
                        f"index.json says {expected} bytes; re-run `llmstack tokenize`"
                    )
        return idx

    def arrays(self, split: str) -> list[np.ndarray]:
        if split not in self.splits or not self.splits[split]:
            raise ValueError(f"{self.path}: no '{split}' shards (have: {sorted(self.splits)})")
        return [np.memmap(self.path / s["file"], dtype=self.dtype, mode="r") for s in self.splits[split]]

    def n_tokens(self, split: str) -> int:
        return sum(s["n_tokens"] for s in self.splits.get(split, []))

    def check_tokenizer(self, tok: Tokenizer) -> None:
        if tok.fingerprint != self.tokenizer_fingerprint:
            raise ValueError(
                f"{self.path}: shards were tokenized with tokenizer {self.tokenizer_fingerprint[:12]}, "
                f"not {tok.fingerprint[:12]}; re-run `llmstack tokenize` with this tokenizer"
            )


def write_shards(
    texts: Iterable[tuple[str, str]],
    tok: Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.05,
    shard_tokens: int = 50_000_000,
    progress: bool = True,
) -> ShardIndex:
    """Tokenize ``(doc_id, text)`` pairs into train/val shards under ``out_dir``; returns the index."""
    if tok.bos_id is None:
        raise ValueError("the tokenizer has no <|bos|> token; documents need a boundary token")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    buffers: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    splits: dict[str, list[dict]] = {"train": [], "val": []}

    def flush(split: str) -> None:
        if not buffers[split]:
            return
        arr = np.concatenate(buffers[split]).astype(dtype)
        name = f"{split}_{len(splits[split]):06d}.bin"
        with atomic_write(out_dir / name, "wb") as f:
            f.write(arr.tobytes())
        splits[split].append({"file": name, "n_tokens": int(arr.size), "n_docs": docs[split]})
        buffers[split], counts[split], docs[split] = [], 0, 0

    n_bytes = 0
    bar = tqdm(texts, desc="tokenize", unit="doc", disable=not progress)
    for doc_id, text in bar:
        if not text:
            continue
        split = split_of(doc_id, val_fraction)
        ids = np.asarray([tok.bos_id, *tok.encode_ordinary(text)], dtype=np.int64)
        buffers[split].append(ids)
        counts[split] += ids.size
        docs[split] += 1
        n_bytes += len(text.encode("utf-8"))
        if counts[split] >= shard_tokens:
            flush(split)
    flush("train")
    flush("val")
    if not splits["train"]:
        raise ValueError("the corpus is empty: no document had any text")
    if not splits["val"]:  # tiny corpora: make sure a held-out shard exists
        raise ValueError(
            f"no document landed in the validation split (val_fraction={val_fraction}); "
            "use a larger corpus or a larger --val-fraction"
        )
    write_json(
        out_dir / "index.json",
        {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "tokenizer_fingerprint": tok.fingerprint,
            "splits": splits,
            "n_bytes": n_bytes,
        },
    )
    return ShardIndex.load(out_dir)


def iter_docs(arr: np.ndarray, bos_id: int) -> Iterator[np.ndarray]:
    """The documents of a shard (each starting with bos)."""
    starts = np.flatnonzero(arr == bos_id)
    ends = np.append(starts[1:], arr.size)
    for s, e in zip(starts, ends, strict=True):
        yield arr[s:e]
