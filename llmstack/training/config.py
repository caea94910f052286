"""Typed configuration of one training run (any stage: pretraining, SFT, RL)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run several times faster than fp32 (measured ~2x per step)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> bfloat16 autocast on CUDA and on CPUs with fast bf16, else float32.

    Weights, optimizer state and the loss stay float32 either way (mixed precision).
    """
    if dtype != "auto":
        return dtype
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return "bfloat16"
    return "float32"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16  # rows per micro-batch, per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    parallel: Literal["ddp", "fsdp"] = "ddp"  # several processes: replicated (DDP) or sharded weights (FSDP2)
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on hidden matrices + AdamW on the rest (optim.py)
    muon_lr: float = 0.02  # muon: peak rate of the hidden matrices (lr drives the AdamW part); same schedule
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the hidden matrices
    grad_clip: float = 1.0  # 0 disables clipping
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast dtype of the forward pass (see resolve_dtype)
    compile: bool = False
    chunked_ce: bool = False  # pretraining loss over row chunks: no B x T x V logits tensor (model/llama.py)
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 20
    log_every: int = 1
    ckpt_every: int = 200  # 0: only at the end
    keep_checkpoints: int = 2
    resume_from_latest_valid: bool = False  # resume past a damaged newest checkpoint (checkpoint.py)
    seed: int = 1337
    log: Literal["jsonl", "tensorboard"] = (
        "jsonl"  # metrics.jsonl always; tensorboard: + event files in <run>/tensorboard
    )

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be positive (got {getattr(self, name)})"
            for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "log_every")
            if getattr(self, name) <= 0
        ]
        if self.lr <= 0:
            problems.append(f"lr must be positive (got {self.lr})")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.schedule not in ("cosine", "wsd"):
            problems.append(f"schedule must be 'cosine' or 'wsd' (got {self.schedule!r})")
        if self.parallel not in ("ddp", "fsdp"):
            problems.append(f"parallel must be 'ddp' or 'fsdp' (got {self.parallel!r})")
        if self.parallel == "fsdp" and self.optimizer == "muon":
            problems.append("muon orthogonalises whole matrices: use it with parallel 'ddp', not 'fsdp'")
        if self.log not in ("jsonl", "tensorboard"):
            problems.append(f"log must be 'jsonl' or 'tensorboard' (got {self.log!r})")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            problems.append(f"dtype must be 'auto', 'float32' or 'bfloat16' (got {self.dtype!r})")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


TRAIN_OVERRIDES = (
    "max_steps",
    "batch_size",
    "grad_accum",
    "seq_len",
    "lr",
    "warmup_steps",
    "schedule",
    "dtype",
    "eval_every",
    "ckpt_every",
    "seed",
    "compile",
    "chunked_ce",
    "optimizer",
    "parallel",
    "resume_from_latest_valid",
    "log",
)
"""TrainConfig fields a command line (or a caller) may override; None leaves the preset's value."""


def with_overrides(base: TrainConfig, overrides: dict[str, Any] | None) -> TrainConfig:
    """``base`` with the given fields replaced (None values ignored), validated again."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown training settings: {', '.join(unknown)}")
    cfg = replace(base, **given)
    cfg.__post_init__()
    return cfg
