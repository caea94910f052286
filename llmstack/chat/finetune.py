"""The SFT stage: a base model + the assistant mixture (and your conversations) -> an assistant.

    llmstack sft --run-dir runs/tiny                   # runs/tiny's base checkpoint -> runs/tiny/sft
    torchrun --standalone --nproc_per_node 8 -m llmstack.cli sft --run-dir runs/d20

The mixture (``mixture.py``) teaches the chat format, tool calls, identity and spelling; extra
conversations (a teacher's from ``llmstack synth``, instruction-hierarchy pages) are added to it.
Training is the shared loop with ``training/sft.py``'s batches: only what the assistant writes is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.chat.mixture import MixtureConfig, build_mixture, corpus_words
from llmstack.interop.load import load_trainable
from llmstack.tokenizer import special
from llmstack.training.config import with_overrides
from llmstack.training.distributed import init_distributed, shutdown
from llmstack.training.loop import train
from llmstack.training.presets import sft_config
from llmstack.training.sft import SFTTask


@dataclass
class SFTResult:
    checkpoint: Path | None
    val_loss: float | None
    conversations: int


def sft_mixtures(
    extra: Sequence[Conversation] = (), val_extra: Sequence[Conversation] = (), seed: int = 1
) -> tuple[list[Conversation], list[Conversation]]:
    """The training and validation conversations: the mixture (a twentieth of it held out, other seeds) + extras."""
    mix, words = MixtureConfig(), corpus_words()
    train_convs = build_mixture(mix, seed=seed, words=words, extra=list(extra))
    small = MixtureConfig(*(max(1, getattr(mix, f.name) // 20) for f in fields(mix)))
    return train_convs, build_mixture(small, seed=seed + 1, words=words, extra=list(val_extra))


def run_sft(
    source: str | Path,
    out: Path,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    extra: Sequence[Conversation] = (),
    val_extra: Sequence[Conversation] = (),
    resume: bool = True,
) -> SFTResult:
    """Finetune the model at ``source`` (any source our tokenizer reads) into ``out``."""
    model, tok, bundle = load_trainable(source)
    bundle.copy_tokenizer(out)
    cfg = with_overrides(sft_config(model.config.max_seq_len), overrides)
    train_convs, val_convs = sft_mixtures(extra, val_extra)
    dist = init_distributed(device)
    try:
        task = SFTTask(train_convs, val_convs, ChatFormat(tok), tok.special_id(special.PAD), cfg, dist)
        where = bundle.checkpoint.path if bundle.checkpoint else source
        if dist.is_main:
            print(f"sft: {len(task.train)} conversations from {where} -> {out}; {cfg.max_steps} steps")
        meta = {"stage": "sft", "tokenizer_fingerprint": tok.fingerprint, "base_checkpoint": str(where)}
        result = train(model, task, cfg, out, dist, meta=meta, resume=resume)
    finally:
        shutdown(dist)
    val = result.evals[-1]["val_loss"] if result.evals else None
    if dist.is_main and val is not None:
        print(f"sft done: val loss {val:.3f}, checkpoint {result.checkpoint}")
    return SFTResult(result.checkpoint, val, len(task.train))
