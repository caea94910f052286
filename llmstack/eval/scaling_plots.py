"""The scaling sweep's plots: fit.png (loss against tokens, one curve per size) and frontier.png (loss
and the compute-optimal N and D against compute), from the content of ``scaling.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmstack.eval.scaling_law import Law
from llmstack.io import pyplot, save_png


def _style(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_sweep(state: dict[str, Any], out: Path) -> list[str]:
    """fit.png (loss against tokens, one curve per size) and frontier.png (loss and the optimal N, D
    against compute); the held-out run drawn as its prediction and, once trained, its loss."""
    plt = pyplot()

    fit, h = state["fit"], state.get("holdout") or {}
    law = Law(**{k: fit[k] for k in ("E", "A", "B", "alpha", "beta")})
    pts = list(state["points"].values())
    sizes = sorted({p["N"] for p in pts} | ({h["N"]} if h else set()))
    colors = {n: plt.get_cmap("viridis")(i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}
    Ds = [p["D"] for p in pts] + ([h["D"]] if h else [])
    d_grid = np.geomspace(min(Ds) / 1.5, max(Ds) * 1.5, 100)

    def holdout_markers(ax: Any, x: float) -> None:
        if not h:
            return
        ax.plot([x, x], h["interval_90"], "_-", ms=10, color="crimson", lw=1.5)  # the bootstrap interval
        ax.plot(
            [x], [h["predicted_loss"]], "D", mfc="none", color="crimson", label="held-out: predicted (90% interval)"
        )
        if h.get("actual_loss") is not None:
            ax.plot([x], [h["actual_loss"]], "*", ms=14, color="crimson", label="held-out: trained")

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for n in sizes:
        mine = sorted((p["D"], p["val_loss"]) for p in pts if p["N"] == n)
        ax.plot(d_grid, law.loss(n, d_grid), "-", color=colors[n], lw=1.2, alpha=0.8)
        if mine:
            ax.plot(*zip(*mine, strict=True), "o", color=colors[n], label=f"N = {n / 1e6:.3g}M")
        else:
            ax.plot([], [], "-", color=colors[n], label=f"N = {n / 1e6:.3g}M (held out)")
    holdout_markers(ax, h.get("D", 0))
    _style(ax, "training tokens D", "val loss (nats/token)", f"{law.formula()}\n(lines: the fit; N = non-embedding)")
    fig.tight_layout()
    save_png(fig, out / "fit.png")

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    Cs = [p["C"] for p in pts] + ([6.0 * h["N"] * h["D"]] if h else [])
    c_grid = np.geomspace(min(Cs) / 2, max(Cs) * 4, 100)
    for n in sizes:  # each size over the token range of the sweep
        mine = sorted((p["C"], p["val_loss"]) for p in pts if p["N"] == n)
        ax.plot(6 * n * d_grid, law.loss(n, d_grid), "-", color=colors[n], lw=1, alpha=0.7)
        if mine:
            ax.plot(*zip(*mine, strict=True), "o", color=colors[n], label=f"N = {n / 1e6:.3g}M")
    n_opt, d_opt = law.compute_optimal(c_grid)
    ax.plot(c_grid, law.loss(n_opt, d_opt), "k--", lw=1.5, label="compute-optimal frontier")
    holdout_markers(ax, 6.0 * h["N"] * h["D"] if h else 0)
    seen = [p["val_loss"] for p in pts] + [v for v in (h.get("predicted_loss"), h.get("actual_loss")) if v]
    pad = 0.2 * (max(seen) - min(seen)) + 0.05
    ax.set_ylim(min(seen) - pad, max(seen) + pad)
    _style(ax, "compute C = 6ND (FLOPs)", "val loss (nats/token)", "loss against compute")
    a, b = law.exponents()
    ax2.plot(c_grid, n_opt, "-", color="tab:blue", label=f"N_opt ~ C^{a:.2f}")
    ax2.plot(c_grid, d_opt, "-", color="tab:orange", label=f"D_opt ~ C^{b:.2f}")
    ax2.plot([p["C"] for p in pts], [p["N"] for p in pts], "o", color="tab:blue", alpha=0.5, label="sweep N")
    ax2.plot([p["C"] for p in pts], [p["D"] for p in pts], "s", color="tab:orange", alpha=0.5, label="sweep D")
    ax2.set_yscale("log")
    _style(ax2, "compute C = 6ND (FLOPs)", "parameters N / tokens D", "compute-optimal model size and data")
    fig.tight_layout()
    save_png(fig, out / "frontier.png")
    return [str(out / "fit.png"), str(out / "frontier.png")]
