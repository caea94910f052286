"""Sampling from a model with a KV cache: the model's "dreams".

Works on token ids only; ``stream_text`` turns a stream of ids back into text as it comes, holding
back bytes of a UTF-8 character that is split across tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llmstack.model.llama import GPT, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from (B, V) logits; returns (B,) ids."""
    if cfg.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    stop_ids: set[int] | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (prefill the prompt once, then decode with the cache)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token (e.g. <|bos|>)")
    ctx = model.config.max_seq_len
    if len(prompt_ids) >= ctx:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {ctx}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    model.eval()
    max_new = min(cfg.max_new_tokens, ctx - len(prompt_ids))
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new, device, dtype)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    logits = model(torch.tensor([prompt_ids], device=device), cache)[:, -1]
    for i in range(max_new):
        nxt = sample_next(logits, cfg, gen)
        tok = int(nxt[0])
        yield tok
        if stop_ids and tok in stop_ids:
            return
        if i + 1 < max_new:
            logits = model(nxt.view(1, 1), cache)[:, -1]


def stream_text(ids: Iterator[int], token_bytes: Callable[[int], bytes]) -> Iterator[str]:
    """Decode ids incrementally to text pieces; a character split over tokens waits for its end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i in ids:
        piece = decoder.decode(token_bytes(i))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
