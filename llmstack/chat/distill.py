"""The logit-distillation stage: a student trained to match a teacher's next-token distributions on text.

    llmstack distill --teacher smollm2 --student-depth 4 --out runs/smol-kd                  # SmolLM2 -> d4
    llmstack distill --teacher smollm2 --student-depth 4 --no-teacher --out runs/smol-ce     # the baseline
    llmstack distill --teacher runs/d20 --student runs/d8 --kind reverse --top-k 64 --out runs/d8-kd

The student is a fresh model of a given depth (``model_for_depth``, the teacher's vocabulary, the
teacher's tokenizer saved beside its checkpoints) or any trainable source that reads the teacher's
tokenizer. The text is token shards in the teacher's tokenizer: a shard directory, or a corpus
(default: the fetched one) tokenized into ``<out>/shards``. The loss and the task are in
``training/distill.py``; this module opens the models and the data and writes the run.
Sequence-level distillation (a teacher writes conversations) is ``chat/synth.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from llmstack.data.corpus import find_default_corpus, read_jsonl
from llmstack.data.shards import ShardIndex, write_shards
from llmstack.interop.bundle import Bundle, check_vocab
from llmstack.interop.load import load_model, load_trainable
from llmstack.interop.tokenizer import AnyTokenizer, HFTokenizer
from llmstack.model.llama import GPT
from llmstack.tokenizer import Tokenizer
from llmstack.training.config import TrainConfig, with_overrides
from llmstack.training.distill import DistillConfig, DistillTask, check_same_tokenizer
from llmstack.training.distributed import barrier, init_distributed, shutdown
from llmstack.training.loop import train
from llmstack.training.presets import model_for_depth

DOCUMENT_SEPARATOR = "<|endoftext|>"


@dataclass
class DistillResult:
    checkpoint: Path | None
    step: int
    val_bpb: float | None
    val_kl: float | None
    teacher_bpb: float | None


def distill_defaults() -> TrainConfig:
    """The tiny preset's rates for a fresh small student; short, as the teacher's forward pass dominates a
    step on a CPU (SmolLM2-135M: ~4 s for 8 x 256 tokens on one thread)."""
    return TrainConfig(
        max_steps=300,
        batch_size=8,
        seq_len=256,
        lr=3e-3,
        warmup_steps=20,
        schedule="wsd",
        eval_every=0,
        eval_batches=8,
        ckpt_every=100,
    )


def boundary_tokenizer(tok: AnyTokenizer) -> AnyTokenizer:
    """``tok`` with the document separator its model was pretrained with as bos, for the shards: an instruct
    model's bos is often a chat-turn opener (SmolLM2-Instruct's is ``<|im_start|>``), while GPT-2-style
    pretraining (SmolLM2, StarCoder) separates documents with ``<|endoftext|>``. Same ids, same fingerprint."""
    if isinstance(tok, HFTokenizer) and DOCUMENT_SEPARATOR in tok.special_tokens:
        return HFTokenizer(tok.raw, DOCUMENT_SEPARATOR, tok.eos_token, tok.gguf_pre)
    return tok


def teacher_shards(
    tok: AnyTokenizer, directory: Path, corpus: Path | None = None, log: Callable[[str], None] = print
) -> ShardIndex:
    """The shards in ``directory``, or ``corpus`` (default: the fetched one) tokenized there with ``tok``."""
    if (directory / "index.json").exists():
        return ShardIndex.load(directory)
    corpus = corpus or find_default_corpus()
    log(f"distill: tokenizing {corpus} with the teacher's tokenizer -> {directory}")
    docs = ((d.id, d.text) for d in read_jsonl(corpus))
    # write_shards reads only bos_id, encode_ordinary, vocab_size and fingerprint, which an HF tokenizer has too
    return write_shards(docs, cast(Tokenizer, boundary_tokenizer(tok)), directory)


def _student(spec: int | str | Path, teacher: Bundle, seq_len: int) -> tuple[GPT, AnyTokenizer, Bundle]:
    """A fresh model of depth ``spec`` with the teacher's tokenizer, or the model at source ``spec``."""
    width = teacher.model.config.vocab_size
    if isinstance(spec, int):
        model = GPT(model_for_depth(spec, width, seq_len, head_dim=64))
        return model, teacher.tokenizer, teacher
    model, tok, bundle = load_trainable(spec)
    check_same_tokenizer(teacher.tokenizer, tok, f"{spec}")
    if model.config.vocab_size != width:
        raise ValueError(
            f"{spec}: the student's logits have {model.config.vocab_size} entries, the teacher's {width}; "
            "logit distillation compares them id by id"
        )
    return model, tok, bundle


def run_distill(
    teacher_source: str | Path,
    student: int | str | Path,
    out: Path,
    shards: Path | None = None,
    corpus: Path | None = None,
    distill: DistillConfig | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> DistillResult:
    """Distill ``teacher_source`` (any model source) into ``student`` (a depth for a fresh model, or a source)
    on ``shards`` (default ``<out>/shards``, tokenized from ``corpus`` when absent) into the run ``out``."""
    distill = distill or DistillConfig()
    cfg = with_overrides(distill_defaults(), overrides)
    teacher = load_model(teacher_source)
    check_vocab(teacher.model.config.vocab_size, teacher.tokenizer, str(teacher_source))
    dist = init_distributed(device)
    try:
        torch.manual_seed(cfg.seed)  # a fresh student starts from the same weights with and without the teacher
        model, tok, bundle = _student(student, teacher, cfg.seq_len)
        shard_dir = shards or out / "shards"
        if dist.is_main:
            teacher_shards(teacher.tokenizer, shard_dir, corpus, log)
        barrier(dist)
        task = DistillTask(teacher.model, ShardIndex.load(shard_dir), teacher.tokenizer, distill, cfg, dist)
        where = bundle.checkpoint.path if bundle.checkpoint else bundle.source
        if dist.is_main:
            bundle.copy_tokenizer(out)
            how = f"{distill.kind} KL" + (f" over the teacher's top {distill.top_k}" if distill.top_k else "")
            how = f"{how}, alpha {distill.alpha}" if distill.uses_teacher else "cross-entropy only (no teacher)"
            log(
                f"distill: {teacher_source} -> {'a fresh depth-' + str(student) if isinstance(student, int) else where}"
                f" student ({model.num_params() / 1e6:.1f}M params), {how}; {cfg.max_steps} steps of "
                f"{cfg.batch_size * cfg.grad_accum * dist.world_size} x {cfg.seq_len} tokens -> {out}"
            )
        meta = {
            "stage": "distill",
            "tokenizer_fingerprint": tok.fingerprint,
            "teacher": str(teacher_source),
            "distill": asdict(distill),
            **({} if isinstance(student, int) else {"base_checkpoint": str(where)}),
            **bundle.format_meta(),
        }
        result = train(model, task, cfg, out, dist, meta=meta, resume=resume)
    finally:
        shutdown(dist)
    last = result.evals[-1] if result.evals else {}
    summary = DistillResult(
        result.checkpoint, result.step, last.get("val_bpb"), last.get("val_kl"), last.get("teacher_bpb")
    )
    if dist.is_main and last:
        log(
            f"distill done at step {summary.step}: student {summary.val_bpb:.4f} bits/byte (teacher "
            f"{summary.teacher_bpb:.4f}), KL to the teacher {summary.val_kl:.4f} nats/token; {summary.checkpoint}"
        )
    return summary
