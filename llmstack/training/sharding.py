"""FSDP2: the model's weights, gradients and optimizer state sharded across processes (``--parallel fsdp``).

DDP keeps a whole copy of the weights and of AdamW's two moments on every process; FSDP2
(``torch.distributed.fsdp.fully_shard``) keeps 1/N of each and gathers a layer's weights just before
it runs. Each decoder layer is its own unit (gathered, used and freed in turn), then the root (the
embeddings, final norm and head). Parameters become ``DTensor`` shards; the optimizer is built on them.

Checkpoints stay the same files as with DDP or one process (``model.safetensors`` of whole tensors,
any stage opens them): every process takes part in gathering the full state dicts
(``torch.distributed.checkpoint.state_dict``), rank 0 writes them. On resume every process reads the
whole files and keeps its shard. The optimizer file holds the full optimizer state keyed by parameter
name (DDP's is keyed by index): a run resumes under the parallelism it was saved with.

Works with gloo on CPU (tested with 2 processes against DDP and one process) and NCCL on GPUs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from llmstack.model.llama import GPT

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: GPT) -> None:
    """``fully_shard`` each decoder layer, then the whole model (in place, before the optimizer is built)."""
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU, as one process would save it (collective: every rank calls it)."""
    state = get_model_state_dict(model, options=FULL)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the embedding, saved once
    return {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


def full_optimizer_state(model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name (collective)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_state(
    model: GPT, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor], optim_state: dict[str, Any]
) -> None:
    """Each process keeps its shards of whole weights and optimizer state read from a checkpoint."""
    if model.config.tie_embeddings and "lm_head.weight" not in weights:
        weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    full: dict[str, Any] = dict(weights)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
