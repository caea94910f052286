"""The quality filters of FineWeb, in its order, each a small function of one document's text.

Every filter returns ``None`` to keep a document or the name of the rule that dropped it; the C4
filter also returns the text with its bad lines removed (C4 edits documents, the others only judge).
Defaults are the thresholds FineWeb published (datatrove 0.10's ``GopherRepetitionFilter``,
``GopherQualityFilter``, ``C4QualityFilter(filter_no_terminal_punct=False)`` and
``FineWebQualityFilter``); the rule names are datatrove's, so drop counts compare one to one.

What differs from datatrove, on purpose: words come from one regex (``split_words``) instead
of spaCy's English tokenizer, and sentences from a punctuation regex instead of NLTK's Punkt,
which keeps spaCy (~100 MB) out of the dependencies; ``bench/data_pipeline.py`` compares the kept
counts with datatrove's. The URL filter ships a small block-list, not datatrove's big one (not on
PyPI); pass ``--url-blocklist FILE`` for another.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Verdict = str | None  # None: keep; otherwise the name of the rule that dropped the document

_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~’‘“”—–…«»¿¡·•")
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
END_PUNCTUATION = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")


def split_words(text: str) -> list[str]:
    """Words and runs of punctuation, roughly what spaCy's English tokenizer gives the Gopher rules."""
    return _WORD.findall(text)


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


def _duplicates(items: Sequence[str]) -> tuple[int, int]:
    """How many items repeat an earlier one, and how many characters those repeats hold."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


# ---------------------------------------------------------------------------------------------
# URL filter
# ---------------------------------------------------------------------------------------------

DEFAULT_BLOCKED_WORDS = ("porn", "xxx", "casino", "escort", "viagra", "hentai", "camgirl")


@dataclass(frozen=True)
class URLFilter:
    """Drop pages by domain, by a banned word in the URL, or by a path pattern (navigation pages)."""

    blocked_domains: frozenset[str] = frozenset()
    blocked_words: tuple[str, ...] = DEFAULT_BLOCKED_WORDS
    blocked_paths: tuple[str, ...] = ()  # regexes matched against the URL path

    def __call__(self, url: str) -> Verdict:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        labels = host.split(".")
        if any(".".join(labels[i:]) in self.blocked_domains for i in range(len(labels))):
            return "domain_blocklist"
        lowered = url.lower()
        if any(w in lowered for w in self.blocked_words):
            return "banned_word"
        if any(re.search(p, parts.path) for p in self.blocked_paths):
            return "blocked_path"
        return None


# ---------------------------------------------------------------------------------------------
# Gopher (Rae et al. 2021, "Scaling Language Models", appendix A)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GopherRepetition:
    """Drop documents that repeat lines, paragraphs or n-grams: spam, menus, generated pages."""

    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

    def __call__(self, text: str) -> Verdict:
        if not text:
            return "empty"
        paragraphs = re.split(r"\n{2,}", text.strip())
        n, chars = _duplicates(paragraphs)
        if n / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if chars / len(text) > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = re.split(r"\n+", text)
        n, chars = _duplicates(lines)
        if n / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if chars / len(text) > self.dup_line_char_frac:
            return "dup_line_char_frac"
        words = split_words(text)
        for k, frac in self.top_n_grams:
            grams = [" ".join(words[i : i + k]) for i in range(len(words) - k + 1)]
            if grams:
                top, count = Counter(grams).most_common(1)[0]
                if len(top) * count / len(text) > frac:
                    return f"top_{k}_gram"
        for k, frac in self.dup_n_grams:
            if _repeated_ngram_chars(words, k) / len(text) > frac:
                return f"duplicated_{k}_n_grams"
        return None


def _repeated_ngram_chars(words: list[str], n: int) -> int:
    """Characters in n-grams seen before, counting each repeated span once (Gopher's definition)."""
    seen: set[str] = set()
    repeated = i = 0
    while i < len(words) - n + 1:
        gram = "".join(words[i : i + n])
        if gram in seen:
            repeated += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


@dataclass(frozen=True)
class GopherQuality:
    """Drop documents that do not look like prose: too short or long, odd word lengths, symbol soup."""

    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: frozenset[str] = STOP_WORDS

    def __call__(self, text: str) -> Verdict:
        words = split_words(text)
        real = [w for w in words if any(c not in PUNCTUATION for c in w)]
        if len(real) < self.min_doc_words:
            return "gopher_short_doc"
        if len(real) > self.max_doc_words:
            return "gopher_long_doc"
        avg = sum(len(w) for w in real) / len(real)
        if avg < self.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if avg > self.max_avg_word_length:
            return "gopher_above_avg_threshold"
        n_words = len(words)
        if text.count("#") / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines() or [""]
        bullets = sum(line.lstrip().startswith(("•", "-")) for line in lines)
        if bullets / len(lines) > self.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        ellipsis_end = sum(line.rstrip().endswith(("...", "…")) for line in lines)
        if ellipsis_end / len(lines) > self.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        if sum(any(c.isalpha() for c in w) for w in words) / n_words < self.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if sum(w in self.stop_words for w in words) < self.min_stop_words:
            return "gopher_enough_stop_words"  # datatrove's (inverted) name for "too few stop words"
        return None


# ---------------------------------------------------------------------------------------------
# C4 (Raffel et al. 2019), as FineWeb ran it: without the terminal-punctuation line rule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class C4Quality:
    """Remove boilerplate lines (javascript notices, cookie policies, short lines); drop whole
    documents with lorem ipsum, a curly bracket (code or templates) or fewer than 5 sentences."""

    filter_no_terminal_punct: bool = False  # FineWeb turned this C4 rule off: it removed too much
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    def __call__(self, text: str) -> tuple[Verdict, str]:
        kept: list[str] = []
        n_sentences = 0
        for raw in text.splitlines():
            line = raw.strip()
            words = line.split()
            if any(len(w) > self.max_word_length for w in words):
                continue
            line = _CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                continue
            if len(words) < self.min_words_per_line:
                continue
            lowered = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lowered:
                return "lorem_ipsum", text
            if self.filter_javascript and "javascript" in lowered:
                continue
            if self.filter_curly_bracket and "{" in line:
                return "curly_bracket", text
            if self.filter_policy and any(p in lowered for p in POLICY_SUBSTRINGS):
                continue
            n_sentences += len(split_sentences(line))
            kept.append(line)
        if n_sentences < self.min_num_sentences:
            return "too_few_sentences", text
        return None, "\n".join(kept).strip()


# ---------------------------------------------------------------------------------------------
# FineWeb's own three rules (Penedo et al. 2024, section 3.3)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FineWebQuality:
    """Drop list-like pages: few lines ending in punctuation, mostly short lines, repeated lines,
    or many newlines per word."""

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    stop_chars: tuple[str, ...] = field(default=END_PUNCTUATION)

    def __call__(self, text: str) -> Verdict:
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        ratio = sum(line.endswith(self.stop_chars) for line in lines) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(len(line) <= self.short_line_length for line in lines) / len(lines) > self.short_line_thr:
            return "short_line_ratio"
        if _duplicates(lines)[1] / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(1, len(split_words(text))) > self.new_line_ratio:
            return "list_ratio"
        return None
