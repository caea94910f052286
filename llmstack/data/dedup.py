"""Deduplication: exact (a hash of the normalized text) and near (MinHash + LSH, FineWeb's settings).

FineWeb: word 5-grams of the normalized text, 112 hash functions in 14 bands of 8; two documents
that agree on all 8 values of any band are duplicates (P = 1-(1-s^8)^14: 77% at Jaccard 0.75,
92% at 0.8, 1% at 0.5), and each cluster keeps one document. We keep the first in input order,
which makes the result independent of how the work was split across processes.

Signatures are computed per document in the worker processes (the costly part); the banding and
clustering need every signature at once and run in one process (a few seconds per million docs).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_GRAM = 5
N_BUCKETS = 14
HASHES_PER_BUCKET = 8
SEED = 1

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lowercase, no punctuation or accents, single spaces: what both dedups compare."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(_PUNCT.sub(" ", text).split())


def exact_key(text: str) -> str:
    return hashlib.sha1(normalize(text).encode("utf-8")).hexdigest()


def _word_hashes(words: Sequence[str]) -> np.ndarray:
    """64-bit hashes of words, stable across processes and runs (unlike Python's ``hash``)."""
    cache: dict[str, int] = {}
    out = np.empty(len(words), dtype=np.uint64)
    for i, w in enumerate(words):
        h = cache.get(w)
        if h is None:
            h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        out[i] = h
    return out


@dataclass(frozen=True)
class MinHasher:
    """Signatures from multiply-shift hashing (a*x+b mod 2^64, top 32 bits): a universal family."""

    n_gram: int = N_GRAM
    n_buckets: int = N_BUCKETS
    per_bucket: int = HASHES_PER_BUCKET
    seed: int = SEED

    @property
    def n_hashes(self) -> int:
        return self.n_buckets * self.per_bucket

    def _params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, 2**63, size=self.n_hashes, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        b = rng.integers(0, 2**63, size=self.n_hashes, dtype=np.uint64)
        mix = rng.integers(1, 2**63, size=self.n_gram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        return a, b, mix

    def shingles(self, text: str) -> np.ndarray:
        """One 64-bit hash per word n-gram (the whole text is one shingle if it is shorter)."""
        words = normalize(text).split()
        wh = _word_hashes(words)
        _, _, mix = self._params()
        n = min(self.n_gram, max(1, len(wh)))
        if len(wh) == 0:
            return np.zeros(1, dtype=np.uint64)
        out = np.zeros(len(wh) - n + 1, dtype=np.uint64)
        for k in range(n):  # sum of word hashes times odd constants: order-sensitive, wraps mod 2^64
            out += wh[k : len(wh) - n + 1 + k] * mix[k]
        return np.unique(out)

    def signature(self, text: str) -> np.ndarray:
        """(n_hashes,) uint32 minimum of each hash function over the shingles."""
        a, b, _ = self._params()
        sh = self.shingles(text)
        sig = np.full(self.n_hashes, np.iinfo(np.uint32).max, dtype=np.uint32)
        for start in range(0, len(sh), 4096):  # (S, H) at a time, bounded memory on long pages
            block = sh[start : start + 4096, None] * a[None, :] + b[None, :]
            np.minimum(sig, (block >> np.uint64(32)).astype(np.uint32).min(axis=0), out=sig)
        return sig


def near_duplicate_clusters(signatures: np.ndarray, n_buckets: int = N_BUCKETS) -> np.ndarray:
    """For each row of (N, H) signatures, the index of its cluster's first row (itself if unique)."""
    n = signatures.shape[0]
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    rows = signatures.shape[1] // n_buckets
    for band in range(n_buckets):
        keys = signatures[:, band * rows : (band + 1) * rows]
        first: dict[bytes, int] = {}
        for i in range(n):
            key = keys[i].tobytes()
            j = first.setdefault(key, i)
            if j != i:
                ri, rj = find(i), find(j)
                if ri != rj:  # the smaller index becomes the root: "keep the first" stays true
                    parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)], dtype=np.int64)
