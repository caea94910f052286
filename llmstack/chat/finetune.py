"""The SFT stage: a model + conversations -> an assistant. Any model: ours, an HF folder, a GGUF file.

    llmstack sft --run-dir runs/tiny                   # runs/tiny's base checkpoint -> runs/tiny/sft
    llmstack sft --model smollm2 --data my.jsonl --lora-rank 8 --out runs/smol-mine
    torchrun --standalone --nproc_per_node 8 -m llmstack.cli sft --run-dir runs/d20

The data are named datasets: each ``--data`` file (``datafiles.py`` reads OpenAI messages, ShareGPT,
prompt/completion and parquet; bad rows are counted, never fatal) and ``builtin``, the mixture
(``mixture.py``: the chat format, tool calls, identity and spelling; extra conversations from
``llmstack synth`` and instruction-hierarchy pages join it). Conversations render in the model's own
chat format (``template.py``), so the loss covers the assistant's turns as its template writes them.
Training is the shared loop with ``training/sft.py``'s batches, on the whole model or a LoRA adapter.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.chat.datafiles import read_data_file
from llmstack.chat.mixture import KINDS, MixtureConfig, build_mixture, corpus_words
from llmstack.chat.template import TemplateFormat, chat_format, is_ours
from llmstack.interop.bundle import Bundle
from llmstack.interop.load import load_trainable
from llmstack.training.config import TrainConfig, with_overrides
from llmstack.training.distributed import init_distributed, shutdown
from llmstack.training.loop import train
from llmstack.training.lora import LoRAConfig, apply_lora
from llmstack.training.presets import sft_config
from llmstack.training.sft import SFTTask

BUILTIN = "builtin"
"""The ``--data`` name of the built-in mixture (arithmetic with the calculator, identity, spelling, ...)."""


@dataclass
class SFTResult:
    checkpoint: Path | None
    val_loss: float | None
    conversations: int


@dataclass
class SFTData:
    """One named dataset: its training and validation conversations (ours, or OpenAI-style message lists)."""

    name: str
    train: list[Any]
    val: list[Any]
    note: str = ""


def is_builtin(spec: str | Path) -> bool:
    """``--data builtin`` or ``builtin:kinds`` names the mixture (a file of that name wins)."""
    return str(spec).split(":")[0] == BUILTIN and not Path(spec).exists()


def mixture_parts(spec: str) -> MixtureConfig:
    """``builtin`` (the whole mixture), ``builtin:identity,spelling`` (those kinds only, in their amounts),
    ``builtin:arithmetic=600,identity`` (a kind with its own number of conversations: a balanced mixture for
    a model that needs only a few hundred of each); ``wording=0.8`` words that share of the arithmetic and
    letter-count questions from the trained families (``chat/wording.py``) instead of the classic templates."""
    full = MixtureConfig()
    _, _, kinds = spec.partition(":")
    if not kinds:
        return full
    wanted: dict[str, int] = {}
    share = full.wording_share
    for part in (k.strip() for k in kinds.split(",")):
        if not part:
            continue
        name, eq, amount = (x.strip() for x in part.partition("="))
        if name == "wording":
            try:
                share = float(amount)
            except ValueError:
                share = -1.0
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"--data {spec}: {part!r}: the wording share must be a number from 0 to 1")
            continue
        if name not in KINDS:
            raise ValueError(f"--data {spec}: unknown mixture kind {name!r}; choose among {', '.join(KINDS)}")
        if eq and not (amount.isdigit() and int(amount) > 0):
            raise ValueError(f"--data {spec}: {part!r}: the number of conversations must be a positive integer")
        wanted[name] = int(amount) if eq else getattr(full, name)
    if not wanted:
        raise ValueError(f"--data {spec}: no mixture kinds; choose among {', '.join(KINDS)}")
    return MixtureConfig(**{n: wanted.get(n, 0) for n in KINDS}, wording_share=share)


def sft_mixtures(
    extra: Sequence[Conversation] = (),
    val_extra: Sequence[Conversation] = (),
    seed: int = 1,
    mix: MixtureConfig | None = None,
) -> tuple[list[Conversation], list[Conversation]]:
    """The training and validation conversations: the mixture (a twentieth of it held out, other seeds) + extras."""
    mix, words = mix or MixtureConfig(), corpus_words()
    train_convs = build_mixture(mix, seed=seed, words=words, extra=list(extra))
    small = replace(mix, **{k: -(-getattr(mix, k) // 20) for k in KINDS})
    return train_convs, build_mixture(small, seed=seed + 1, words=words, extra=list(val_extra))


def split_heldout(rows: Sequence[Any], seed: int, share: float = 0.05, cap: int = 200) -> tuple[list[Any], list[Any]]:
    """(train, validation): a seeded ``share`` of ``rows`` held out (at least 1 when there are 2 or more, at
    most ``cap``)."""
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    n_val = min(cap, max(1 if len(rows) > 1 else 0, round(len(rows) * share)))
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def sft_datasets(
    data: Sequence[str | Path],
    extra: Sequence[Conversation] = (),
    val_extra: Sequence[Conversation] = (),
    seed: int = 1,
    fmt: ChatFormat | TemplateFormat | None = None,
) -> list[SFTData]:
    """The named datasets of a run: each ``--data`` file (5% held out for validation), and ``builtin`` for the
    mixture with its extras. No ``data`` at all means the mixture alone (what the main job trains)."""
    out: list[SFTData] = []
    for item in data or [BUILTIN]:
        if is_builtin(item):
            train_convs, val_convs = sft_mixtures(extra, val_extra, seed, mixture_parts(str(item)))
            out.append(SFTData(str(item), train_convs, val_convs, f"{item}: {len(train_convs)} conversations"))
            continue
        read = read_data_file(Path(item))
        rows = read.conversations
        if fmt is not None:  # rows this chat format cannot render are counted as the file's other bad rows are
            rows = []
            for i, c in enumerate(read.conversations):
                try:
                    fmt.render(c)
                    rows.append(c)
                except (ValueError, KeyError, TypeError) as e:
                    read.skip(f"not renderable in this chat format ({e})"[:120], f"conversation {i + 1}")
            if not rows:
                raise ValueError(f"{read.summary()}: no conversation left to train on")
        train_rows, val_rows = split_heldout(rows, seed)
        out.append(SFTData(read.name, train_rows, val_rows, read.summary()))
    return out


def sft_defaults(bundle: Bundle, n_train: int, lora: LoRAConfig | None) -> TrainConfig:
    """Our models: the tuned SFT preset. Others (an imported open model): a short run sized to the data: two
    epochs at batch 8 (50 to 1000 steps), 512-token rows, the usual fine-tuning rates (2e-4 with LoRA,
    2e-5 for the full model)."""
    ctx = bundle.model.config.max_seq_len
    if is_ours(bundle):
        return sft_config(ctx)
    steps = max(50, min(1000, 2 * n_train // 8))
    return TrainConfig(
        max_steps=steps,
        batch_size=8,
        seq_len=min(512, ctx),
        lr=2e-4 if lora else 2e-5,
        warmup_steps=min(20, steps // 10),
        schedule="cosine",
        min_lr_ratio=0.1,
        eval_every=max(10, steps // 5),
        eval_batches=4,
        ckpt_every=max(10, steps // 2),
        weight_decay=0.0,
    )


def run_sft(
    source: str | Path,
    out: Path,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    extra: Sequence[Conversation] = (),
    val_extra: Sequence[Conversation] = (),
    resume: bool = True,
    data: Sequence[str | Path] = (),
    lora: LoRAConfig | None = None,
    log: Callable[[str], None] = print,
) -> SFTResult:
    """Finetune the model at ``source`` (our run, an HF folder, a GGUF file, ``smollm2``) into ``out``, on
    ``data`` (files, or ``builtin``; default the built-in mixture), the whole model or a LoRA adapter."""
    model, tok, bundle = load_trainable(source)
    fmt = chat_format(bundle)
    datasets = sft_datasets(data, extra, val_extra, fmt=fmt)
    train_convs = [c for d in datasets for c in d.train]
    val_convs = [c for d in datasets for c in d.val]
    cfg = with_overrides(sft_defaults(bundle, len(train_convs), lora), overrides)
    dist = init_distributed(device)
    try:
        wrapped = apply_lora(model, lora) if lora else []
        task = SFTTask(train_convs, val_convs, fmt, fmt.pad_id, cfg, dist)
        where = bundle.checkpoint.path if bundle.checkpoint else source
        if dist.is_main:
            bundle.copy_tokenizer(out)
            for d in datasets:
                log(f"sft data: {d.note}")
            how = f"LoRA r={lora.r} on {len(wrapped)} layers" if lora else "the whole model"
            log(f"sft: {len(task.train)} conversations from {where} -> {out}; {cfg.max_steps} steps, {how}")
        meta = {
            "stage": "sft",
            "tokenizer_fingerprint": tok.fingerprint,
            "base_checkpoint": str(where),
            "datasets": {d.name: len(d.train) for d in datasets},
            **bundle.format_meta(),
            **({"lora": asdict(lora)} if lora else {}),
        }
        result = train(model, task, cfg, out, dist, meta=meta, resume=resume)
    finally:
        shutdown(dist)
    val = result.evals[-1]["val_loss"] if result.evals else None
    if dist.is_main and val is not None:
        first = result.evals[0]["val_loss"] if result.evals else val
        log(f"sft done: val loss {first:.3f} -> {val:.3f}, checkpoint {result.checkpoint}")
    return SFTResult(result.checkpoint, val, len(task.train))
