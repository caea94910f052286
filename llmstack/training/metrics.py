"""Metrics: one JSON object per line, and plots of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmstack.io import pyplot, save_png


class MetricsLog:
    """Append-only JSONL. After a resume, steps may repeat; readers keep the last record of a step.

    With ``tensorboard`` (a folder) every numeric field also goes to TensorBoard event files there, as
    ``<kind>/<field>`` scalars against the step (``tensorboard --logdir runs`` shows every run)."""

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: str | Path | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.board: Any = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                raise ValueError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.board = SummaryWriter(str(tensorboard), flush_secs=10)  # a crash loses 10 s at most

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            kind, step = record.get("kind", "train"), record.get("step", 0)
            for key, value in record.items():
                if (
                    key not in ("kind", "step", "time")
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                ):
                    self.board.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        by_key[(rec.get("kind", "train"), rec.get("step", -1))] = rec
    return sorted(by_key.values(), key=lambda r: (r.get("step", -1), r.get("kind", "")))


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path:
    """Training loss and validation bits-per-byte against step, one PNG."""
    plt = pyplot()

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and "loss" in r]
    evals = [r for r in recs if r.get("kind") == "eval"]
    key = next((k for k in ("val_bpb", "val_loss") if any(k in r for r in evals)), "val_bpb")
    val = [(r["step"], r[key]) for r in evals if key in r]
    label = "val bits/byte" if key == "val_bpb" else "val loss (nats/token, assistant tokens)"
    moe = [r for r in recs if r.get("kind") == "train" and "moe_load_max" in r]
    if moe:  # a mixture of experts: its routing balance under the loss
        fig, (ax, ax_moe) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=110, height_ratios=(3, 1.4), sharex=True)
        _plot_routing(ax_moe, moe)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), lw=1, color="tab:blue", alpha=0.8, label="train loss (nats/token)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:red", label=label)
        ax2.set_ylabel(label)
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(title or Path(metrics_path).parent.name)
    fig.tight_layout()
    return save_png(fig, png_path)


def _plot_routing(ax: Any, recs: list[dict[str, Any]]) -> None:
    """The busiest expert's load relative to uniform (1.0: balanced) and the share of slots dropped."""
    steps = [r["step"] for r in recs]
    ax.plot(steps, [r["moe_load_max"] for r in recs], lw=1, color="tab:purple", label="busiest expert / uniform")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    if any(r.get("moe_dropped") for r in recs):
        ax.plot(steps, [1 + r["moe_dropped"] for r in recs], lw=1, color="tab:orange", label="1 + share dropped")
    ax.set_xlabel("step")
    ax.set_ylabel("expert load")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
