"""Chinchilla's parametric loss law L(N, D) = E + A / N^alpha + B / D^beta and its fit (Hoffmann et al.
2022, approach 3): Huber loss on log L, a grid of starts, L-BFGS from the best; a bootstrap interval
for a prediction. Used by the scaling sweep (``scaling.py``)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N: Any, D: Any) -> Any:
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def compute_optimal(self, C: Any) -> tuple[Any, Any]:
        """(N, D) minimising L on the budget C = 6ND (Hoffmann et al. eq. 4): N = G (C/6)^a, D = (C/6)^b / G."""
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        a, b = self.exponents()
        return G * np.power(np.asarray(C) / 6, a), np.power(np.asarray(C) / 6, b) / G

    def exponents(self) -> tuple[float, float]:
        """(a, b) in N_opt ~ C^a, D_opt ~ C^b; a + b = 1."""
        return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)

    def formula(self) -> str:
        return f"L = {self.E:.3f} + {self.A:.4g}/N^{self.alpha:.3f} + {self.B:.4g}/D^{self.beta:.3f}"


CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al., their tokens and nats

# Hoffmann et al.'s grid of initialisations: (log A, log B, log E, alpha, beta)
_GRID = (range(0, 30, 5), range(0, 30, 5), (-1, -0.5, 0, 0.5, 1), (0, 0.5, 1, 1.5, 2), (0, 0.5, 1, 1.5, 2))


def _theta(law: Law) -> list[float]:
    return [math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta]


Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # log N, log D, log L, each (P,)


def _objective(theta: torch.Tensor, data: Data, delta: float) -> torch.Tensor:
    """Huber loss of log L per row of ``theta`` (S, 5) -> (S,)."""
    logN, logD, logL = data
    a, b, e, alpha, beta = (t[:, None] for t in theta.unbind(-1))  # each (S, 1)
    terms = torch.stack(torch.broadcast_tensors(a - alpha * logN, b - beta * logD, e))  # (3, S, P)
    pred = torch.logsumexp(terms, dim=0)  # (S, P)
    return F.huber_loss(pred, logL.expand_as(pred), delta=delta, reduction="none").sum(-1)


def _lbfgs(theta0: torch.Tensor, data: Data, delta: float) -> tuple[torch.Tensor, float]:
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=300,
        tolerance_grad=1e-12,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _objective(theta[None], data, delta)[0]
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        value = float(_objective(theta[None], data, delta)[0])
    return theta.detach(), value if math.isfinite(value) else math.inf


def _log_data(N: Any, D: Any, L: Any) -> Data:
    n, d, l = (torch.tensor(np.log(np.asarray(v, dtype=np.float64))) for v in (N, D, L))
    return n, d, l


def _law(theta: torch.Tensor) -> Law:
    a, b, e, alpha, beta = theta.tolist()
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def fit_law(
    N: Sequence[float],
    D: Sequence[float],
    L: Sequence[float],
    delta: float = 1e-3,
    refine: int = 8,
    starts: Sequence[Law] = (),
) -> tuple[Law, float]:
    """Fit the law to losses ``L`` at (``N``, ``D``); returns it and its Huber objective.

    Every start of the grid (and ``starts``, and Chinchilla's constants) is scored; L-BFGS runs from
    the ``refine`` best, and the lowest objective wins. A large ``delta`` makes it least squares.
    """
    if not len(N) == len(D) == len(L) or len(L) == 0:
        raise ValueError(f"fit_law needs equally many N, D and L values (got {len(N)}, {len(D)}, {len(L)})")
    data = _log_data(N, D, L)
    grid = torch.tensor(list(itertools.product(*_GRID)), dtype=torch.float64)
    extra = torch.tensor([_theta(s) for s in (CHINCHILLA, *starts)], dtype=torch.float64)
    candidates = torch.cat([extra, grid])
    with torch.no_grad():
        scores = _objective(candidates, data, delta)
    order = torch.argsort(torch.nan_to_num(scores, nan=math.inf))[:refine].tolist()
    best_theta, best = candidates[0], math.inf
    for i in sorted(set(order) | set(range(len(extra)))):
        theta, value = _lbfgs(candidates[i], data, delta)
        if value < best:
            best_theta, best = theta, value
    return _law(best_theta), best


def bootstrap_prediction(
    N: Sequence[float],
    D: Sequence[float],
    L: Sequence[float],
    at: tuple[float, float],
    law: Law,
    n: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """A 90% interval of the law's loss at ``at`` = (N, D): refits on points resampled with
    replacement, each from ``law`` by one L-BFGS run (the grid search is not repeated)."""
    rng = np.random.default_rng(seed)
    preds = []
    for _ in range(n):
        idx = rng.integers(0, len(L), len(L))
        data = _log_data(*(np.asarray(v, dtype=np.float64)[idx] for v in (N, D, L)))
        theta, value = _lbfgs(torch.tensor(_theta(law), dtype=torch.float64), data, 1e-3)
        if math.isfinite(value):
            preds.append(float(_law(theta).loss(*at)))
    preds = [p for p in preds if math.isfinite(p)]
    if not preds:
        return math.nan, math.nan
    lo, hi = np.percentile(preds, [5, 95])
    return float(lo), float(hi)
