"""The pretraining stage: next-token prediction on packed token shards, evaluated in bits per byte.

llmstack pretrain --preset tiny                          # one CPU process
torchrun --standalone --nproc_per_node 2 -m llmstack.cli pretrain --preset tiny   # 2 CPU processes (gloo)
torchrun --standalone --nproc_per_node 8 -m llmstack.cli pretrain --preset d20    # 8 GPUs (NCCL)
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmstack.data.loader import PackedLoader
from llmstack.data.shards import ShardIndex
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT
from llmstack.tokenizer import Tokenizer
from llmstack.training.config import TrainConfig, with_overrides
from llmstack.training.distributed import DistInfo, init_distributed, shutdown
from llmstack.training.loop import train
from llmstack.training.presets import get_preset, with_experts


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def shard_loaders(shards: ShardIndex, cfg: TrainConfig, dist: DistInfo) -> tuple[PackedLoader, PackedLoader]:
    """Packed rows of ``cfg.seq_len`` over the shards: this rank's shuffled training walk, and the validation
    split in order (at most 8 rows a batch)."""
    train = PackedLoader(
        shards.arrays("train"),
        shards.bos_id,
        cfg.seq_len,
        cfg.batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.seed,
    )
    val = PackedLoader(shards.arrays("val"), shards.bos_id, cfg.seq_len, min(cfg.batch_size, 8), shuffle=False)
    return train, val


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for; 0 for special tokens (they are not text)."""
    lengths = torch.zeros(tok.vocab_size, dtype=torch.int64)
    for i in range(tok.n_ranks):
        lengths[i] = len(tok.decode_token_bytes(i))
    return lengths


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, batches, byte_lengths: torch.Tensor, device: torch.device) -> float:
    """Tokenizer-independent loss: total nats over targets / (ln 2 x bytes of those targets).

    Targets that are special tokens (document boundaries) carry no bytes and are left out of both sums.
    """
    nats, n_bytes = 0.0, 0
    byte_lengths = byte_lengths.to(device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = logits_of(model, x).float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        nb = byte_lengths[y.reshape(-1)]
        mask = nb > 0
        nats += float(loss[mask].sum())
        n_bytes += int(nb.sum())
    return nats / (math.log(2) * max(1, n_bytes))


class PretrainTask:
    name = "pretrain"

    def __init__(self, shards: ShardIndex, tok: Tokenizer, cfg: TrainConfig, dist: DistInfo) -> None:
        shards.check_tokenizer(tok)
        if tok.bos_id is None:
            raise ValueError("pretraining needs a tokenizer with a <|bos|> document-boundary token")
        self.device = dist.device
        self.chunked_ce = cfg.chunked_ce
        self.train_loader, self.val_loader = shard_loaders(shards, cfg, dist)
        self.eval_batches = cfg.eval_batches
        self.byte_lengths = token_byte_lengths(tok)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.train_loader.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x, y = batch
        if self.chunked_ce:  # our GPT computes the loss itself, chunk by chunk
            return model(x, targets_BT=y), y.numel()
        logits = logits_of(model, x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)), y.numel()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        batches = (b for i, b in enumerate(self.val_loader) if i < self.eval_batches)
        return {
            "val_bpb": bits_per_byte(model, batches, self.byte_lengths, self.device),
            "epoch": self.train_loader.epoch,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self.train_loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_loader.load_state_dict(state["train_loader"])


def run_pretrain(
    run: Path,
    tok: Tokenizer,
    shards: ShardIndex,
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    resume: bool = True,
    experts: dict[str, Any] | None = None,
    model_cfg: ModelConfig | None = None,
) -> dict[str, Any]:
    """Pretrain the preset's model on ``shards`` into ``run`` (resuming from its checkpoints); prints and returns
    the summary. ``experts``: ``with_experts``' keywords, to make the preset's model a mixture of experts;
    ``model_cfg``: another shape than the preset's (the preset still gives the training config)."""
    preset_cfg, base = get_preset(preset, tok.vocab_size)
    model_cfg = model_cfg or preset_cfg
    if experts:
        model_cfg = with_experts(model_cfg, **experts)
    cfg = with_overrides(base, overrides)
    if cfg.seq_len > model_cfg.max_seq_len:
        model_cfg = replace(model_cfg, max_seq_len=cfg.seq_len)
    dist = init_distributed(device)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    if dist.is_main:
        print(
            f"model: {model_cfg.n_layer} layers x {model_cfg.n_embd}, {model.num_params() / 1e6:.2f}M params"
            f"{_moe_note(model_cfg)}; "
            f"{shards.n_tokens('train'):,} train tokens; {cfg.max_steps} steps of "
            f"{cfg.batch_size * cfg.grad_accum * dist.world_size * cfg.seq_len:,} tokens on {dist.device}"
            f"{f' x {dist.world_size}' if dist.enabled else ''}"
        )
    task = PretrainTask(shards, tok, cfg, dist)
    meta = {"stage": "pretrain", "tokenizer_fingerprint": tok.fingerprint, "preset": preset}
    result = train(model, task, cfg, run, dist, meta=meta, resume=resume)
    summary = {
        "step": result.step,
        "final_train_loss": result.losses[-1] if result.losses else None,
        "val_bpb": result.evals[-1]["val_bpb"] if result.evals else None,
        "tokens_per_second": result.tokens_per_second,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "loss_plot": str(run / "loss.png"),
    }
    if dist.is_main:
        print(json.dumps(summary, indent=2), flush=True)
    shutdown(dist)  # under torchrun this ends the process (see distributed.shutdown)
    return summary


def _moe_note(cfg: ModelConfig) -> str:
    if cfg.moe is None:
        return ""
    active = cfg.num_params(active=True) / 1e6
    return f" ({active:.2f}M active: {cfg.moe.n_active} of {cfg.moe.n_experts} experts of width {cfg.moe.expert_size})"
