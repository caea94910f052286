"""Sampling settings and the sampler of one step: temperature / top-k / top-p, seeded.

Works on token ids only; ``stream_text`` turns a stream of ids back into text as it comes, holding
back bytes of a UTF-8 character that is split across tokens. The loop that samples a whole reply
with a KV cache is the engine's (``engine.generate`` for one prompt, ``Engine`` for a batch).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0  # OpenAI's: minus this x how often a token was generated so far
    presence_penalty: float = 0.0  # minus this once a token was generated at all
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def adjusts(self) -> bool:
        """Whether logits are changed before sampling (penalties or a bias)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")


def adjust_logits(logits_1V: torch.Tensor, cfg: SamplingConfig, counts: dict[int, int]) -> torch.Tensor:
    """OpenAI's penalties and ``logit_bias`` on one row's logits (a new tensor): ``counts`` are the
    tokens generated so far (the prompt does not count, as OpenAI's)."""
    out = logits_1V.float().clone()
    if counts and (cfg.frequency_penalty or cfg.presence_penalty):
        ids = torch.tensor(list(counts), device=out.device)
        n = torch.tensor(list(counts.values()), dtype=out.dtype, device=out.device)
        out[:, ids] -= cfg.frequency_penalty * n + cfg.presence_penalty
    if cfg.logit_bias:
        ids = torch.tensor([i for i, _ in cfg.logit_bias], device=out.device)
        out[:, ids] += torch.tensor([b for _, b in cfg.logit_bias], dtype=out.dtype, device=out.device)
        # as OpenAI documents them: -100 bans a token, +100 selects it exclusively (whatever the logits' scale)
        banned = [i for i, b in cfg.logit_bias if b <= -100]
        if banned:
            out[:, banned] = float("-inf")
        chosen = [i for i, b in cfg.logit_bias if b >= 100]
        if chosen:
            keep = out[:, chosen].clone()
            out.fill_(float("-inf"))
            out[:, chosen] = keep
    return out


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from (B, V) logits; returns (B,) ids."""
    if cfg.temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs = sampling_probs(logits_BV, cfg)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits_BV.device)


def sampling_probs(logits_BV: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(B, V) probabilities on the CPU after temperature, top-k and top-p (``cfg.temperature > 0``): rows
    sampled with the same settings share this, each then draws with its own generator."""
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
    probs = logits.softmax(dim=-1).cpu()
    if not bool(torch.isfinite(probs).all()):
        raise FloatingPointError(
            "the model's next-token logits are not finite (NaN or inf): its weights or activations overflowed "
            "(after training, look for a loss or learning rate that diverged; under bf16, try --dtype float32)"
        )
    return probs


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
