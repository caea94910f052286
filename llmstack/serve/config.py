"""``ServeConfig``: the server's limits (checked before anything runs) and its security settings
(API key, output filter, spotlighting, the safety guard)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmstack.security.output_filter import DEFAULT_ALLOWED_HOSTS, LinkFilter


@dataclass(frozen=True)
class ServeConfig:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_tokens_cap: int = 2048
    max_n: int = 8
    max_rows: int = 32
    output_filter: bool = True  # images and links to hosts off allowed_hosts are removed from chat answers
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    spotlight: bool = False  # datamark tool results and retrieved passages; a system note for models not ours
    guard: Any = None  # a security.guard.Guard: flagged user messages or (unstreamed) answers get its refusal

    def links(self) -> LinkFilter | None:
        return LinkFilter(self.allowed_hosts) if self.output_filter else None
