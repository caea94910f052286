"""A mixture-of-experts feed-forward block: a router picks ``n_active`` of ``n_experts`` SwiGLU experts per token.

It replaces a decoder layer's ``MLP`` when ``ModelConfig.moe`` is set, under the same name (``mlp``), with
Qwen2-MoE's weight names: ``mlp.gate.weight`` (the router, E x C), ``mlp.experts.{e}.{gate,up,down}_proj.weight``
and, with a shared expert, ``mlp.shared_expert.*`` and its sigmoid gate ``mlp.shared_expert_gate.weight``.
Mixtral names the same weights ``block_sparse_moe.gate`` and ``experts.{e}.w1/w3/w2`` (``interop/hf.py`` renames).

Routing as transformers computes it: softmax over all experts in float32, the top ``n_active`` kept, and
(``norm_topk``: Mixtral, Qwen2-MoE's option) renormalised to sum to 1. The mixture is the weighted sum of
the chosen experts' outputs, plus the shared expert's. Tokens are grouped by expert (one matmul per expert
over its tokens), so a step costs ``n_active`` experts, not all of them; while a CUDA graph is being
captured (data-dependent shapes are not allowed there) every expert runs on every token and the
unchosen ones are weighted 0: the same sum.

Balancing: the load-balancing loss of Switch Transformer / Mixtral, ``n_experts * sum_e f_e * P_e`` (f_e: the
share of routed slots expert e received; P_e: its mean router probability), minimal (1 per chosen slot)
when the load is uniform. ``aux_loss_coef`` scales it into the training gradient (the training loop adds
``GPT.balancing()`` to every stage's loss, as a term of value 0, so the loss reads as the cross-entropy).
With ``capacity_factor`` > 0 an expert takes at most ``ceil(capacity_factor * tokens * n_active /
n_experts)`` slots per forward, in token order; the rest are dropped (that expert's share of those tokens
is 0; the residual still carries them). 0 is dropless, as transformers runs it. Load, drops and the
auxiliary loss accumulate while training and are read (and reset) by ``GPT.train_stats``.

What is not here: expert parallelism (experts on different devices), aux-loss-free bias balancing, and
routing groups (DeepSeek-V3); these would be new pieces beside this one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.model.config import ModelConfig


class Expert(nn.Module):
    """One SwiGLU expert (the dense ``MLP``'s shape at width ``size``)."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, size, bias=False)
        self.up_proj = nn.Linear(dim, size, bias=False)
        self.down_proj = nn.Linear(size, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    experts: list[Expert]  # an nn.ModuleList at run time

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.n_experts, self.n_active = moe.n_experts, moe.n_active
        self.norm_topk, self.capacity_factor = moe.norm_topk, moe.capacity_factor
        self.gate = nn.Linear(cfg.n_embd, moe.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.n_embd, moe.expert_size) for _ in range(moe.n_experts))  # type: ignore[assignment]
        self.shared_expert: Expert | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if moe.shared_size:
            self.shared_expert = Expert(cfg.n_embd, moe.shared_size)
            self.shared_expert_gate = nn.Linear(cfg.n_embd, 1, bias=False)
        self.aux_loss: torch.Tensor | None = None  # the last training forward's balancing loss (with its graph)
        self._load = torch.zeros(moe.n_experts, dtype=torch.float64)  # slots routed per expert, since the last read
        self._dropped = 0
        self._slots = 0
        self._aux_sum, self._aux_n = 0.0, 0

    def forward(self, x_BTC: torch.Tensor, fused: bool = False) -> torch.Tensor:
        B, T, C = x_BTC.shape
        x_NC = x_BTC.reshape(-1, C)
        N, E, K = x_NC.shape[0], self.n_experts, self.n_active
        probs_NE = self.gate(x_NC).float().softmax(dim=-1)
        weight_NK, expert_NK = probs_NE.topk(K, dim=-1)
        if self.norm_topk:
            weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
        weight_NK = weight_NK.to(x_NC.dtype)
        if x_NC.is_cuda and torch.cuda.is_current_stream_capturing():
            out_NC = self._dense(x_NC, weight_NK, expert_NK)
        else:
            out_NC = self._routed(x_NC, weight_NK, expert_NK)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out_NC = out_NC + torch.sigmoid(self.shared_expert_gate(x_NC)) * self.shared_expert(x_NC)
        if self.training:
            # Switch / Mixtral balancing loss: E * sum_e (share of slots routed to e) * (mean probability of e)
            share_E = F.one_hot(expert_NK, E).sum(dim=(0, 1)).float() / (N * K)
            self.aux_loss = E * (share_E * probs_NE.mean(dim=0)).sum()
            self._load += torch.bincount(expert_NK.flatten(), minlength=E).double().cpu()
            self._slots += N * K
            self._aux_sum += float(self.aux_loss.detach())
            self._aux_n += 1
        return out_NC.view(B, T, C)

    def capacity(self, n_tokens: int) -> int | None:
        """Slots one expert takes per forward; None when dropless."""
        if self.capacity_factor <= 0:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.n_active / self.n_experts)

    def _routed(self, x_NC: torch.Tensor, weight_NK: torch.Tensor, expert_NK: torch.Tensor) -> torch.Tensor:
        """Each expert on the tokens routed to it, its output scaled and added back at their rows."""
        out_NC = torch.zeros_like(x_NC)
        cap = self.capacity(x_NC.shape[0]) if self.training else None  # inference is dropless
        order = torch.argsort(expert_NK.flatten(), stable=True)  # slots grouped by expert, in token order
        counts = torch.bincount(expert_NK.flatten(), minlength=self.n_experts).tolist()
        start = 0
        for e, count in enumerate(counts):
            slots = order[start : start + count]
            start += count
            if cap is not None and count > cap:
                if self.training:
                    self._dropped += count - cap
                slots = slots[:cap]
            if slots.numel() == 0:
                continue
            rows = slots // self.n_active
            y = self.experts[e](x_NC[rows]) * weight_NK.flatten()[slots, None]
            out_NC.index_add_(0, rows, y)
        return out_NC

    def _dense(self, x_NC: torch.Tensor, weight_NK: torch.Tensor, expert_NK: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted 0 where not chosen: fixed shapes (CUDA graph capture).
        Capacity limits are not applied here (capture happens at decode, one token per row)."""
        dense_NE = torch.zeros(x_NC.shape[0], self.n_experts, dtype=x_NC.dtype, device=x_NC.device)
        dense_NE.scatter_(1, expert_NK, weight_NK)
        out_NC = torch.zeros_like(x_NC)
        for e, expert in enumerate(self.experts):
            out_NC = out_NC + expert(x_NC) * dense_NE[:, e : e + 1]
        return out_NC

    def read_stats(self) -> tuple[list[float], float, float] | None:
        """Routing since the last read (training forwards only): each expert's share of the routed slots, the
        share of slots dropped over capacity, and the mean balancing loss; None if nothing was routed.
        Resets the counters."""
        if not self._slots:
            return None
        stats = (self._load / self._slots).tolist(), self._dropped / self._slots, self._aux_sum / max(1, self._aux_n)
        self._load.zero_()
        self._dropped = self._slots = self._aux_n = 0
        self._aux_sum = 0.0
        return stats
