"""The inference engine: batched prefill + KV-cache decode over token ids, with tool use.

* Prompts of different lengths run together: they are left-padded and the padding is masked out
  of attention (``KVCache.key_valid``); RoPE makes the shift harmless.
* Each row samples with its own seeded generator: the same prompt and seed give the same tokens.
* Tool use is a small state machine per row: tokens between ``<|tool_call_start|>`` and
  ``<|tool_call_end|>`` are collected; at the end token the call is run (``ToolUse.run``) and the
  row is then *forced* through ``<|tool_result_start|> result <|tool_result_end|>``, one token per
  step, before sampling resumes. A malformed call yields an ``error: ...`` result, never a crash.

The engine sees ids only; ``ToolUse`` holds the encode/decode functions that turn a call into text
and a result back into ids.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llmstack.inference.sample import SamplingConfig, sample_next
from llmstack.model.config import ModelConfig
from llmstack.model.llama import KVCache


@dataclass
class ToolUse:
    call_start: int
    call_end: int
    result_start: int
    result_end: int
    run: Callable[[str], str]  # "name: argument" -> result text
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    max_result_tokens: int = 256

    @classmethod
    def from_tokenizer(cls, tok, run: Callable[[str], str]) -> ToolUse:
        from llmstack.tokenizer.special import TOOL_CALL_END, TOOL_CALL_START, TOOL_RESULT_END, TOOL_RESULT_START

        return cls(
            tok.special_id(TOOL_CALL_START),
            tok.special_id(TOOL_CALL_END),
            tok.special_id(TOOL_RESULT_START),
            tok.special_id(TOOL_RESULT_END),
            run,
            tok.encode_ordinary,
            tok.decode,
        )

    def result_tokens(self, call_ids: list[int]) -> list[int]:
        result = self.run(self.decode(call_ids))
        ids = self.encode(result)[: self.max_result_tokens]
        return [self.result_start, *ids, self.result_end]


@dataclass
class Event:
    """One token of one row: sampled by the model, or forced (a tool result)."""

    row: int
    token: int
    forced: bool


@dataclass
class _Row:
    gen: torch.Generator | None
    forced: deque[int] = field(default_factory=deque)
    in_call: bool = False
    call_ids: list[int] = field(default_factory=list)
    n_new: int = 0
    done: bool = False
    tokens: list[int] = field(default_factory=list)


class Engine:
    def __init__(self, model: torch.nn.Module, tools: ToolUse | None = None) -> None:
        self.model = model
        self.tools = tools
        self.config: ModelConfig = model.config  # type: ignore[assignment]

    @torch.no_grad()
    def stream(
        self,
        prompts: list[list[int]],
        cfg: SamplingConfig,
        stop_ids: set[int] | frozenset[int] = frozenset(),
    ) -> Iterator[Event]:
        """Yield events as rows produce tokens; a row stops at a stop id or ``cfg.max_new_tokens``."""
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        ctx = self.config.max_seq_len
        longest = max(len(p) for p in prompts)
        if longest >= ctx:
            raise ValueError(f"a prompt has {longest} tokens; the model's context is {ctx}")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        B = len(prompts)
        max_new = min(cfg.max_new_tokens, ctx - longest)
        cache = KVCache(self.config, B, longest + max_new, device, dtype)
        idx = torch.zeros(B, longest, dtype=torch.long)
        if any(len(p) != longest for p in prompts):
            cache.key_valid = torch.ones(B, longest + max_new, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):  # left-pad
            idx[i, longest - len(p) :] = torch.tensor(p)
            if cache.key_valid is not None:
                cache.key_valid[i, : longest - len(p)] = False
        rows = [_Row(torch.Generator().manual_seed(cfg.seed + i) if cfg.seed is not None else None) for i in range(B)]
        self.model.eval()
        logits = self.model(idx.to(device), cache)[:, -1]  # (B, V)
        for _ in range(max_new):
            next_ids = []
            greedy = logits.argmax(dim=-1).tolist() if cfg.temperature == 0 else None  # one call for all rows
            for i, row in enumerate(rows):
                if row.done:
                    next_ids.append(0)  # a finished row keeps decoding a dummy token; it is never shown
                    continue
                forced = bool(row.forced)
                if forced:
                    tok = row.forced.popleft()
                elif greedy is not None:
                    tok = greedy[i]
                else:
                    tok = int(sample_next(logits[i : i + 1], cfg, row.gen)[0])
                next_ids.append(tok)
                row.tokens.append(tok)
                row.n_new += 1
                yield Event(i, tok, forced)
                self._advance_state(row, tok, forced, stop_ids)
                if row.n_new >= max_new:
                    row.done = True
            if all(r.done for r in rows):
                return
            step = torch.tensor(next_ids, device=device).view(B, 1)
            logits = self.model(step, cache)[:, -1]

    def _advance_state(self, row: _Row, tok: int, forced: bool, stop_ids: set[int] | frozenset[int]) -> None:
        if forced:
            return
        tools = self.tools
        if tools is not None and tok == tools.call_start and not row.in_call:
            row.in_call, row.call_ids = True, []
        elif tools is not None and row.in_call and tok == tools.call_end:
            row.in_call = False
            row.forced.extend(tools.result_tokens(row.call_ids))
        elif row.in_call:
            row.call_ids.append(tok)
        elif tok in stop_ids:
            row.done = True

    def generate(
        self, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: set[int] | frozenset[int] = frozenset()
    ) -> list[list[int]]:
        """All new tokens of every row (tool results included, stop token included)."""
        out: list[list[int]] = [[] for _ in prompts]
        for ev in self.stream(prompts, cfg, stop_ids):
            out[ev.row].append(ev.token)
        return out
