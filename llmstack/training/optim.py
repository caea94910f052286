"""Optimizers and the learning-rate schedule shared by every training stage.

``cfg.optimizer`` picks one:

- ``adamw``: torch's fused AdamW; decoupled weight decay on matrices (embeddings included), none on
  norm gains.
- ``muon``: Muon (Keller Jordan, 2024, as in the modded-nanogpt speedrun) for the 2-D hidden matrices
  (attention and MLP projections), AdamW for the rest (token embeddings, an untied ``lm_head``, norm
  gains), in one ``torch.optim.Optimizer``. Muon keeps a Nesterov momentum of the gradient (0.95),
  replaces it by the nearest semi-orthogonal matrix (five quintic Newton-Schulz iterations, bf16 on
  CUDA) and steps along that, scaled by ``sqrt(max(1, rows / cols))``. Its peak rate is ``cfg.muon_lr``
  (0.02, the recipe's; the update's size does not depend on the gradient's scale, so one rate serves
  every width), the AdamW part's is ``cfg.lr``; Muon's matrices get no weight decay (the recipe's).

Every group of ``MuonAdamW`` carries an ``lr_mult``: the step uses ``group["lr"] * group["lr_mult"]``,
so the loop, which writes one scheduled rate into every group, drives both parts with one schedule
(Muon's multiplier is ``muon_lr / lr``), and ``state_dict`` / ``load_state_dict`` are torch's own.

What is not here: sharding Muon's orthogonalisation across data-parallel ranks (every rank computes
all of it, fine at one node), Muon for embeddings or 1-D parameters (not what it is for).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from llmstack.training.config import TrainConfig

OPTIMIZERS = ("adamw", "muon")
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz: pushes every singular value into ~[0.7, 1.2]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return build_adamw(model, cfg, device)
    if cfg.optimizer == "muon":
        return build_muon(model, cfg)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def _unique_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:  # tied weights appear once
            seen.add(id(p))
            out.append((name, p))
    return out


def build_adamw(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices (embeddings included), none on norm gains."""
    params = [p for _, p in _unique_trainable(model)]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    sharded = any(type(p).__name__ == "DTensor" for p in params)  # FSDP2: the foreach kernels take DTensors
    fused = device.type in ("cpu", "cuda") and not sharded
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def build_muon(model: nn.Module, cfg: TrainConfig) -> MuonAdamW:
    """Muon on 2-D hidden matrices; AdamW on embeddings and the output head (by module type and name,
    so an HF ``LlamaForCausalLM`` splits the same way) and on norm gains."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden, embeddings, gains = [], [], []
    for name, p in _unique_trainable(model):
        if p.ndim < 2:
            gains.append(p)
        elif id(p) in embedding_ids or name.endswith("lm_head.weight"):
            embeddings.append(p)
        else:
            hidden.append(p)
    groups = [
        {"params": hidden, "kind": "muon", "lr_mult": cfg.muon_lr / cfg.lr, "weight_decay": 0.0},
        {"params": embeddings, "kind": "adamw", "weight_decay": cfg.weight_decay},
        {"params": gains, "kind": "adamw", "weight_decay": 0.0},
    ]
    return MuonAdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), momentum=cfg.muon_momentum
    )


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T (..., rows, cols), its orthogonal polar factor.

    Normalised to spectral norm <= 1, X is mapped ``steps`` times through X <- aX + b(XX^T)X + c(XX^T)^2 X,
    which moves every singular value towards ~1 without computing an SVD (the coefficients trade exact
    convergence for speed: the results land in ~[0.7, 1.2]). Runs on the short side (X X^T is the smaller
    Gram matrix), in bf16 on CUDA (tensor cores; the iteration tolerates it) and fp32 elsewhere.
    """
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # Frobenius >= spectral norm
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with ``kind="muon"`` (2-D parameters), AdamW for ``kind="adamw"``; see the module doc.

    Muon state per parameter: ``momentum_buffer``. AdamW state: ``step`` (int), ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
    ) -> None:
        defaults = dict(
            lr=lr,
            lr_mult=1.0,
            kind="adamw",
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
        )
        super().__init__(list(params), defaults)
        for group in self.param_groups:
            if group["kind"] not in ("muon", "adamw"):
                raise ValueError(f"param group kind must be 'muon' or 'adamw' (got {group['kind']!r})")
            if group["kind"] == "muon" and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D parameters only; give the others to an AdamW group")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    # Both parts use torch's multi-tensor (``_foreach_*``) kernels, as torch's own optimizers do: a d12
    # model has 84 hidden matrices, and one kernel per tensor per operation costs more host time (tens of
    # ms a step on a slow host) than the Newton-Schulz matmuls themselves.

    def _muon(self, group: dict[str, Any]) -> None:
        lr, mom = group["lr"] * group["lr_mult"], group["momentum"]
        by_shape: dict[torch.Size, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is not None:
                params, grads = by_shape.setdefault(p.shape, ([], []))
                params.append(p)
                grads.append(p.grad)
        for (rows, cols), (params, grads) in by_shape.items():
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - mom)  # buf = mom * buf + (1 - mom) * g
            updates = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
            # matrices of one shape orthogonalised as one batch: a few large matmuls, not many small ones
            ortho = newton_schulz(torch.stack(updates), group["ns_steps"]).to(params[0].dtype)  # (n, rows, cols)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-lr * max(1.0, rows / cols) ** 0.5)

    def _adamw(self, group: dict[str, Any]) -> None:
        lr = group["lr"] * group["lr_mult"]
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]  # (the test again: for the type checker)
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denoms, group["eps"])
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1 - beta1**t) for t in steps])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to ``lr * min_lr_ratio``, or warmup-stable-decay (linear tail)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
    decay_start = cfg.max_steps - decay_steps
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return cfg.lr + (lo - cfg.lr) * progress
