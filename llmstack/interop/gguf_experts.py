"""Mixtures of experts in GGUF, as llama.cpp stores Mixtral (``general.architecture`` llama).

Per layer: the router as ``blk.N.ffn_gate_inp.weight`` (experts x width), and each projection of all
experts stacked into one 3D tensor: ``ffn_gate_exps`` / ``ffn_up_exps`` (experts, expert width, width) and
``ffn_down_exps`` (experts, width, expert width), as ``convert_hf_to_gguf.py`` merges Mixtral's ``w1`` /
``w3`` / ``w2``. Metadata: ``llama.expert_count`` and ``llama.expert_used_count``; llama.cpp renormalises the
chosen experts' weights, as Mixtral does. What is not covered: Qwen2-MoE's shared expert (llama.cpp's
``qwen2moe`` architecture), refused with its name.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from llmstack.model.config import ModelConfig, MoEConfig

EXPERT_LAYER_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
"""GGUF layer tensor names -> ours; the ``_exps`` ones hold every expert at once."""

PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight")


def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert weights -> one (experts, out, in) tensor per layer and projection; others unchanged."""
    out: dict[str, Any] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        m = PER_EXPERT.fullmatch(name)
        if m is None:
            out[name] = tensor
        else:
            key = f"{m[1]}.{m[3]}.weight"
            out.setdefault(key, None)  # keeps the file's order: first expert's place
            stacks.setdefault(key, {})[int(m[2])] = tensor
    for key, experts in stacks.items():
        out[key] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``stack_experts``: 3D expert tensors -> one weight per expert."""
    out = {}
    for name, tensor in state.items():
        m = STACKED.fullmatch(name)
        if m is None or tensor.ndim != 3:
            out[name] = tensor
            continue
        for e, weight in enumerate(tensor.unbind(0)):
            out[f"{m[1]}.{e}.{m[2]}.weight"] = weight.contiguous()
    return out


def moe_from_metadata(meta: dict[str, Any], arch: str, expert_size: int) -> MoEConfig | None:
    """The file's mixture (llama architecture with ``expert_count``), or None for a dense model."""
    count = meta.get(f"{arch}.expert_count")
    if not count:
        return None
    if arch != "llama" or meta.get(f"{arch}.expert_shared_count"):
        raise ValueError(f"a mixture of experts in GGUF is read for Mixtral's layout only (architecture {arch!r})")
    return MoEConfig(int(count), int(meta.get(f"{arch}.expert_used_count", 2)), expert_size)


def write_experts_metadata(writer: Any, cfg: ModelConfig) -> None:
    if cfg.moe is None:
        return
    if cfg.moe.shared_size or not cfg.moe.norm_topk:
        raise ValueError(
            "GGUF export writes Mixtral's layout: no shared expert, renormalised top-k (this model is Qwen2-MoE)"
        )
    writer.add_expert_count(cfg.moe.n_experts)
    writer.add_expert_used_count(cfg.moe.n_active)
