"""A policy's replies to user prompts, sampled through the one chat answerer (``chat/answer.py``) with
tools running: what the preference and RLHF stages label and train on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmstack.chat.answer import our_chat
from llmstack.inference.sample import SamplingConfig
from llmstack.tools.registry import default_toolbox


def sample_replies(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    k: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    top_k: int | None = 50,
) -> list[list[str]]:
    """``k`` replies to each prompt (tools running), through the batched engine; ``temperature`` 0 is greedy."""
    rows = sample_tokens(model, tok, prompts, k, temperature, seed, max_new_tokens, batch_size, top_k)
    texts = [tok.decode([t for t in gen if t != tok.bos_id]) for _, gen, _ in rows]
    return [texts[j * k : (j + 1) * k] for j in range(len(prompts))]


def sample_tokens(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    k: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    top_k: int | None = None,
) -> list[tuple[list[int], list[int], list[bool]]]:
    """(prompt ids, generated ids, forced?) per reply, ``k`` per prompt in order: what RL trains on
    (the sampled tokens themselves; forced ones are the tool's results)."""
    chat = our_chat(model, tok, default_toolbox().call)
    rows = [chat.prompt(chat.ask(p)) for p in prompts for _ in range(k)]
    out: list[tuple[list[int], list[int], list[bool]]] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed + i)
        gen: list[list[int]] = [[] for _ in chunk]
        forced: list[list[bool]] = [[] for _ in chunk]
        for ev in chat.events(chunk, cfg):
            gen[ev.row].append(ev.token)
            forced[ev.row].append(ev.forced)
        out += [(p, g, f) for p, g, f in zip(chunk, gen, forced, strict=True)]
    return out
