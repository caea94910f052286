"""The data pipeline's settings (``PipelineConfig``) and its named profiles: plain functions
returning configs (``fineweb_config``, ``docs_config``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from llmstack.data.dedup import MinHasher
from llmstack.data.filters import C4Quality, FineWebQuality, GopherQuality, GopherRepetition, URLFilter
from llmstack.data.langid import LanguageFilter
from llmstack.data.sources import InputLimits


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of a run; its JSON form is stored in ``config.json``."""

    url_filter: URLFilter = field(default_factory=URLFilter)
    language: LanguageFilter = field(default_factory=LanguageFilter)
    gopher_repetition: GopherRepetition = field(default_factory=GopherRepetition)
    gopher_quality: GopherQuality = field(default_factory=GopherQuality)
    c4: C4Quality = field(default_factory=C4Quality)
    fineweb: FineWebQuality = field(default_factory=FineWebQuality)
    minhash: MinHasher = field(default_factory=MinHasher)
    limits: InputLimits = field(default_factory=InputLimits)  # caps on one record and one input file
    output_format: str = "jsonl"  # or "parquet"

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=lambda o: sorted(o) if isinstance(o, frozenset) else o))


def fineweb_config(url_filter: URLFilter | None = None, language: LanguageFilter | None = None) -> PipelineConfig:
    """FineWeb's published settings (the default of ``llmstack data pipeline``)."""
    return PipelineConfig(url_filter=url_filter or URLFilter(), language=language or LanguageFilter())


def docs_config(url_filter: URLFilter | None = None, language: LanguageFilter | None = None) -> PipelineConfig:
    """FineWeb's settings minus its three rules against code, for technical manuals (the main job).

    Measured on the Python manual: FineWeb's settings keep about 1 page in 10 (56 of 497 pages),
    because code samples fail Gopher's "80% of words have a letter" rule and C4's "no curly
    bracket" rule, C4's line rule deletes every code line of fewer than 3 words, and repeated
    code lines (``>>>``, ``import x``) trip Gopher's duplicated 5..10-gram rules and FineWeb's 1%
    duplicated-line-characters rule. Those are right for web pages (code there is mostly menus and
    scripts) and wrong for a manual whose code is the content, so this profile relaxes exactly them.
    """
    return PipelineConfig(
        url_filter=url_filter or URLFilter(),
        language=language or LanguageFilter(),
        gopher_repetition=GopherRepetition(dup_n_grams=()),
        gopher_quality=GopherQuality(max_non_alpha_words_ratio=0.5),
        c4=C4Quality(filter_curly_bracket=False, min_words_per_line=1),
        fineweb=FineWebQuality(char_duplicates_ratio=0.1),
    )


PROFILES: dict[str, Callable[..., PipelineConfig]] = {"fineweb": fineweb_config, "docs": docs_config}
