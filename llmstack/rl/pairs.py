"""Preference pairs: the ``Pair`` record and its JSONL files, the stored text of a reply (tool tokens
written out by name) parsed into parts and encoded as ids and a loss mask, and ``PairStream``, the
shuffled, resumable walk over pairs that the pair tasks (reward model, DPO) train on."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmstack.chat.conversation import ChatFormat, Conversation, Part
from llmstack.chat.template import TemplateFormat
from llmstack.io import atomic_write, jsonl_objects
from llmstack.tokenizer import special as S


# ----------------------------------------------------------------------------- pairs and files
@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    source: str = "gold"  # gold | llm | hhh_alignment
    scores: tuple[float, float] | None = None  # the labeler's grades of chosen and rejected, when it has them


def write_pairs(path: str | Path, pairs: Sequence[Pair]) -> None:
    with atomic_write(path) as f:
        for p in pairs:
            row: dict[str, Any] = {k: v for k, v in asdict(p).items() if v is not None}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_pairs(path: str | Path) -> list[Pair]:
    """JSONL of ``{"prompt", "chosen", "rejected"}`` (+ optional ``source``, ``scores``); errors name the line."""
    missing = "no preference file (make one with `llmstack preferences`)"
    example = '{"prompt": ..., "chosen": ..., "rejected": ...}'
    out = [_pair(where, obj) for where, obj in jsonl_objects(path, example, missing)]
    if not out:
        raise ValueError(f"{path}: no preference pairs")
    return out


def _pair(where: str, obj: dict) -> Pair:
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ValueError(f'{where}: "{key}" must be a non-empty string')
    if obj["chosen"] == obj["rejected"]:
        raise ValueError(f"{where}: chosen and rejected are the same reply")
    scores = obj.get("scores")
    if scores is not None and not (
        isinstance(scores, list) and len(scores) == 2 and all(isinstance(s, int | float) for s in scores)
    ):
        raise ValueError(f'{where}: "scores" must be two numbers')
    source = obj.get("source", "gold")
    if not isinstance(source, str):
        raise ValueError(f'{where}: "source" must be a string')
    return Pair(obj["prompt"], obj["chosen"], obj["rejected"], source, tuple(scores) if scores else None)


# ----------------------------------------------------------------------------- replies as parts and tokens
_TOOL = re.compile(
    re.escape(S.TOOL_CALL_START)
    + r"(.*?)"
    + re.escape(S.TOOL_CALL_END)
    + "|"
    + re.escape(S.TOOL_RESULT_START)
    + r"(.*?)"
    + re.escape(S.TOOL_RESULT_END),
    re.S,
)


@dataclass
class Reply:
    parts: list[Part]
    finished: bool  # the turn ended with <|assistant_end|> (not cut off by the token budget)

    @property
    def text(self) -> str:
        """What the user sees: the text parts."""
        return "".join(p.text for p in self.parts if p.kind == "text")


def parse_reply(text: str) -> Reply:
    """The stored text of an assistant turn -> its parts. Tool tokens without their partner stay text."""
    finished = text.endswith(S.ASSISTANT_END)
    body = text.removesuffix(S.ASSISTANT_END)
    parts: list[Part] = []
    pos = 0
    for m in _TOOL.finditer(body):
        if m.start() > pos:
            parts.append(Part("text", body[pos : m.start()]))
        parts.append(Part("tool_call", m[1]) if m[1] is not None else Part("tool_result", m[2]))
        pos = m.end()
    if pos < len(body):
        parts.append(Part("text", body[pos:]))
    return Reply(parts, finished)


def encode_reply(fmt: ChatFormat | TemplateFormat, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of the user's prompt and the assistant's reply; mask 1 on the tokens the model wrote
    (its text, tool calls and ``<|assistant_end|>``), 0 on the prompt and on tool results.

    Under a model's own template (``TemplateFormat``) a reply is text that may end with one of its stop
    tokens written out (``<|im_end|>``): the prompt's ids, the text's, then that token's."""
    if isinstance(fmt, TemplateFormat):
        ask = fmt.prompt([{"role": "user", "content": prompt}])
        stop = next((t for t in sorted(fmt.stop_ids) if reply.endswith(fmt.tok.decode([t]))), None)
        body = reply.removesuffix(fmt.tok.decode([stop])) if stop is not None else reply
        said = fmt.tok.encode_ordinary(body) + ([stop] if stop is not None else [])
        return ask + said, [0] * len(ask) + [1] * len(said)
    r = parse_reply(reply)
    prompt_ids = fmt.prompt(Conversation.of(("user", prompt)))
    ids = fmt.prompt(Conversation.of(("user", prompt), ("assistant", r.parts)))
    if r.finished:
        ids = [*ids, fmt.end["assistant"]]
    mask, in_result = [0] * len(prompt_ids), False
    for t in ids[len(prompt_ids) :]:
        in_result = in_result or t == fmt.result[0]
        mask.append(0 if in_result else 1)
        in_result = in_result and t != fmt.result[1]
    return ids, mask


# ----------------------------------------------------------------------------- pairs for the loop
class PairStream:
    """The data side of a pair task for the shared loop (``RewardTask``, ``DPOTask``): a shuffled walk
    over ``self.train`` that each epoch reshuffles, split across ranks, resumable from its cursor."""

    train: Sequence[Any]

    def _start(self, train_size: int, cfg: Any, dist: Any) -> None:
        if train_size < cfg.batch_size * dist.world_size:
            raise ValueError(f"{train_size} training pairs are fewer than one global batch ({cfg.batch_size})")
        self.batch_size, self.rank, self.world = cfg.batch_size, dist.rank, dist.world_size
        self.seed, self.device = cfg.seed, dist.device
        self.cursor = 0  # pairs consumed by all ranks together

    def _index(self, g: int) -> int:
        epoch, i = divmod(g, len(self.train))
        return int(np.random.default_rng([self.seed, epoch]).permutation(len(self.train))[i])

    def _next_indices(self) -> list[int]:
        first = self.cursor + self.rank * self.batch_size
        self.cursor += self.world * self.batch_size
        return [self._index(first + i) for i in range(self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "n_train": len(self.train)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_train") != len(self.train):
            raise ValueError(
                f"preference data changed since the checkpoint ({state.get('n_train')} vs {len(self.train)})"
            )
        self.cursor = int(state["cursor"])
