"""Named presets: plain functions that derive a model and a training config from one depth dial.

    depth d -> n_embd = 64 * d (tiny: 64 * d as well), head_dim 64 (tiny) or 128 (GPU sizes),
               SwiGLU width ~ 8/3 * n_embd rounded up to a multiple of 64, lr scaled ~ 1/sqrt(n_embd)

``tiny`` is sized to pretrain on 2 CPU cores in a few minutes; ``d12`` and ``d20`` are GPU shapes
(nanochat's depth-12 and depth-20 models, GPT-2-small-like and ~0.5B). ``with_experts`` turns any of them
into a mixture of experts (``pretrain --experts N``): the same preset, its MLPs replaced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from llmstack.model.config import ModelConfig, MoEConfig
from llmstack.training.config import TrainConfig


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def model_for_depth(depth: int, vocab_size: int, seq_len: int, head_dim: int = 128, kv_ratio: int = 1) -> ModelConfig:
    n_embd = 64 * depth
    n_head = max(1, n_embd // head_dim)
    return ModelConfig(
        vocab_size=vocab_size,
        n_layer=depth,
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=max(1, n_head // kv_ratio),
        intermediate_size=_round_up(8 / 3 * n_embd, 64),
        max_seq_len=seq_len,
        tie_embeddings=True,
    )


def tiny(vocab_size: int = 4096) -> tuple[ModelConfig, TrainConfig]:
    """~3M non-embedding params, 4 layers x 256; a few minutes on 2 CPU cores."""
    model = model_for_depth(4, vocab_size, seq_len=256, head_dim=64)
    train = TrainConfig(
        max_steps=500,
        batch_size=16,
        seq_len=256,
        lr=3e-3,
        warmup_steps=30,
        schedule="wsd",
        eval_every=100,
        eval_batches=16,
        ckpt_every=200,
    )
    return model, train


def d12(vocab_size: int = 65536) -> tuple[ModelConfig, TrainConfig]:
    """GPT-2-small-like (768 wide, 12 layers); one GPU, bf16 + torch.compile."""
    model = model_for_depth(12, vocab_size, seq_len=2048)
    train = TrainConfig(
        max_steps=5000,
        batch_size=32,
        seq_len=2048,
        lr=1e-3,
        warmup_steps=200,
        schedule="wsd",
        dtype="bfloat16",
        compile=True,
        chunked_ce=True,  # +14.5% tok/s and 40% less memory at d12 on an H200 (bench/RESULTS.md)
        eval_every=250,
        ckpt_every=1000,
    )
    return model, train


def d20(vocab_size: int = 65536) -> tuple[ModelConfig, TrainConfig]:
    """~0.5B params (1280 wide, 20 layers): the nanochat speedrun shape; 8 GPUs under torchrun."""
    model = model_for_depth(20, vocab_size, seq_len=2048)
    train = TrainConfig(
        max_steps=20000,
        batch_size=32,
        seq_len=2048,
        lr=6e-4,
        warmup_steps=500,
        schedule="wsd",
        dtype="bfloat16",
        compile=True,
        chunked_ce=True,  # +14.5% tok/s and 40% less memory at d12 on an H200 (bench/RESULTS.md)
        eval_every=500,
        ckpt_every=2000,
    )
    return model, train


def sft_config(max_seq_len: int) -> TrainConfig:
    """SFT: short conversations, a third of the pretraining learning rate with a cosine decay, 2000 steps of
    length-grouped batches (~6 min on 2 cores). At the pretraining rate (3e-3) the outcome swung by 10-20
    points with the seed or the mixture; at 1e-3 identity held at 18/18 in every run (docs/assistant.md)."""
    return TrainConfig(
        max_steps=2000,
        batch_size=16,
        seq_len=min(192, max_seq_len),
        lr=1e-3,
        warmup_steps=20,
        schedule="cosine",
        min_lr_ratio=0.05,
        eval_every=100,
        eval_batches=8,
        ckpt_every=250,
        weight_decay=0.0,
    )


def with_experts(
    cfg: ModelConfig,
    n_experts: int,
    n_active: int = 2,
    expert_size: int = 0,
    shared_size: int = 0,
    capacity_factor: float = 0.0,
    aux_loss_coef: float = 0.01,
) -> ModelConfig:
    """``cfg`` with every MLP a mixture of ``n_experts`` experts, ``n_active`` per token. ``expert_size`` 0: the
    dense width / ``n_active``, so a token uses as many MLP parameters as in the dense model (equal active
    parameters, ``n_experts / n_active`` times the total). Mixtral's family, or Qwen2-MoE's with a shared expert."""
    moe = MoEConfig(
        n_experts=n_experts,
        n_active=n_active,
        expert_size=expert_size or max(1, cfg.intermediate_size // max(1, n_active)),
        shared_size=shared_size,
        capacity_factor=capacity_factor,
        aux_loss_coef=aux_loss_coef,
    )
    family = "qwen2_moe" if shared_size else "mixtral"
    return replace(cfg, family=family, moe=moe, intermediate_size=moe.expert_size)


PRESETS: dict[str, Callable[..., tuple[ModelConfig, TrainConfig]]] = {"tiny": tiny, "d12": d12, "d20": d20}


def get_preset(name: str, vocab_size: int) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](vocab_size)
