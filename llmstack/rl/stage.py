"""The GRPO stage as a command and as the main job calls it: presets, ``run_rl``, the plot.

llmstack rl                                            # tiny: 2 CPU cores, a few minutes; runs/tiny/sft -> runs/tiny/rl
llmstack rl --eval-only                                # held-out pass@1 / pass@k of the SFT model
llmstack rl --run-dir runs/d20 --preset gpu --device cuda   # runs/d20/sft -> runs/d20/rl

``--model`` trains another policy (any model source; default ``<run>/sft``), ``--out`` writes elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from llmstack.interop.load import load_trainable
from llmstack.io import pyplot, save_png, write_json
from llmstack.rl.grpo import GRPOConfig, GRPOTask, Sampler, evaluate_problems
from llmstack.rl.verifiers import heldout_problems, load_reward_function, make_splits
from llmstack.tools.registry import default_toolbox
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import init_distributed, shutdown
from llmstack.training.loop import train
from llmstack.training.lora import LoRAConfig, apply_lora
from llmstack.training.metrics import MetricsLog, read_metrics


def tiny() -> tuple[GRPOConfig, TrainConfig]:
    """The embedded model on 2 CPU cores: reasoning-gym's ``basic_arithmetic`` with two 3-digit numbers
    and one of + - * ("Calculate 505 - 663."), where the SFT model succeeds often enough for groups to
    hold both right and wrong answers (the main job's: 73% greedy, 74% of samples; the one before it:
    34% and 15%). 64 rollouts a step (8 prompts x 8 at temperature 1), 160 steps (7-9 min on two
    cores), lr 1e-4 with a small KL leash, 400 held-out problems (docs/rl.md). The small one- and
    two-digit tasks (``chain_sum``, ``basic_arithmetic``) stay available with ``--tasks``: this model
    solves 2-5% of them when sampling, too rarely for RL to find anything to reinforce."""
    grpo = GRPOConfig(
        tasks=("basic_arithmetic_3d",), group_size=8, prompts_per_batch=8, max_new_tokens=40,
        temperature=1.0, kl_coef=0.02, n_heldout=400, eval_k=8, eval_k_problems=100,
    )  # fmt: skip
    train = TrainConfig(
        max_steps=160, batch_size=64, seq_len=256, lr=1e-4, warmup_steps=5, min_lr_ratio=1.0, weight_decay=0.0,
        eval_every=40, ckpt_every=20, keep_checkpoints=2,
    )  # fmt: skip
    return grpo, train


def gpu() -> tuple[GRPOConfig, TrainConfig]:
    """One GPU: 512 rollouts a step (32 prompts x 16), a KL leash, 400 steps."""
    grpo = GRPOConfig(
        tasks=("basic_arithmetic_3d", "chain_sum"), group_size=16, prompts_per_batch=32, max_new_tokens=128,
        kl_coef=0.01, n_train=20_000, n_heldout=500,
        eval_k=16, eval_k_problems=200,
    )  # fmt: skip
    train = TrainConfig(
        max_steps=400, batch_size=512, seq_len=1024, lr=1e-4, warmup_steps=10, min_lr_ratio=1.0, weight_decay=0.0,
        eval_every=50, ckpt_every=50,
    )  # fmt: skip
    return grpo, train


RL_PRESETS: dict[str, Callable[[], tuple[GRPOConfig, TrainConfig]]] = {"tiny": tiny, "gpu": gpu}


def rl_preset(name: str) -> tuple[GRPOConfig, TrainConfig]:
    if name not in RL_PRESETS:
        raise ValueError(f"unknown RL preset {name!r}; choose one of {sorted(RL_PRESETS)}")
    return RL_PRESETS[name]()


@dataclass
class RLSummary:
    out_dir: str
    checkpoint: str | None
    tasks: list[str]
    steps: int
    minutes: float
    sft: dict[str, float]  # held-out metrics of the starting model (the step-0 evaluation)
    rl: dict[str, float]  # and of the final one
    rollout_tok_per_s: float
    verifier_errors: int
    plot: str

    def lines(self) -> list[str]:
        keys = [k for k in self.rl if k.startswith("pass@")]
        out = [f"{'held-out':<22}{'SFT':>8}{'RL':>8}"]
        out += [f"{k:<22}{self.sft.get(k, float('nan')):8.1%}{self.rl[k]:8.1%}" for k in keys]
        out.append(
            f"{self.steps} steps in {self.minutes:.1f} min; rollouts {self.rollout_tok_per_s:,.0f} tok/s; "
            f"verifier errors {self.verifier_errors}"
        )
        return out


def _load(sft_dir: str | Path, device: torch.device) -> tuple[Any, Any, Any]:
    model, tok, bundle = load_trainable(sft_dir, device)
    return model, bundle, tok


def run_rl(
    sft_dir: str | Path,
    out_dir: str | Path,
    preset: str = "tiny",
    *,
    tasks: tuple[str, ...] | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    grpo_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    lora: LoRAConfig | None = None,
) -> RLSummary:
    """GRPO from the model at ``sft_dir`` (any source: our SFT run, an HF folder, a GGUF, ``smollm2``) into
    ``out_dir`` (checkpoints, tokenizer, metrics.jsonl, rl.png, rl_summary.json), the whole model or a LoRA
    adapter; resumes from ``out_dir``'s latest checkpoint unless ``resume=False``.

    Raises ``FloatingPointError`` if the loss stops being finite (the last checkpoint is kept).
    """
    cfg, tcfg = rl_preset(preset)
    g: dict[str, Any] = {**(grpo_overrides or {}), **({"tasks": tuple(tasks)} if tasks else {})}
    t: dict[str, Any] = {**(train_overrides or {}), **({"max_steps": max_steps} if max_steps else {})}
    cfg, tcfg = replace(cfg, **g), replace(tcfg, **t)
    tcfg = replace(tcfg, batch_size=cfg.prompts_per_batch * cfg.group_size)  # rows per micro-batch, for the record
    if cfg.reward_fn:
        load_reward_function(cfg.reward_fn)  # a bad one is named before any model loads
    out = Path(out_dir)
    dist = init_distributed(device)
    model, bundle, tok = _load(sft_dir, dist.device)
    reference, _, _ = _load(sft_dir, dist.device)  # frozen: the KL penalty and the logged KL
    reference.eval().requires_grad_(False)
    if lora:
        apply_lora(model, lora)
    if dist.is_main:
        bundle.copy_tokenizer(out)
    train_problems, heldout = make_splits(cfg.tasks, cfg.n_train, cfg.n_heldout)
    log = MetricsLog(out / "metrics.jsonl", enabled=dist.is_main)
    task = GRPOTask(
        model,
        reference,
        tok,
        train_problems,
        heldout,
        cfg,
        tcfg,
        dist,
        default_toolbox(),
        log,
        progress and dist.is_main,
    )
    if dist.is_main and progress:
        print(
            f"rl: GRPO ({cfg.loss_type}) on {', '.join(cfg.tasks)} from {bundle.source} -> {out}; "
            f"{tcfg.max_steps} steps "
            f"of {cfg.prompts_per_batch} prompts x {cfg.group_size} completions; {len(heldout)} held-out problems"
        )
    meta = {
        "stage": "rl",
        "tokenizer_fingerprint": tok.fingerprint,
        "sft_checkpoint": str(bundle.checkpoint.path if bundle.checkpoint else bundle.source),
        "base_checkpoint": str(bundle.checkpoint.path if bundle.checkpoint else bundle.source),
        "grpo_config": cfg.to_dict(),
        **bundle.format_meta(),
        **({"lora": asdict(lora)} if lora else {}),
    }
    t0 = time.perf_counter()
    result = train(model, task, tcfg, out, dist, meta=meta, resume=resume, progress=progress)
    minutes = (time.perf_counter() - t0) / 60
    shutdown(dist)
    recs = read_metrics(out / "metrics.jsonl")
    evals = [r for r in recs if r.get("kind") == "eval"]
    rl_recs = [r for r in recs if r.get("kind") == "rl"]

    def metrics_of(r: dict[str, Any] | None) -> dict[str, float]:
        return {k: v for k, v in (r or {}).items() if k not in ("kind", "step")}

    plot = plot_rl(out / "metrics.jsonl", out / "rl.png", f"GRPO ({cfg.loss_type}) on {', '.join(cfg.tasks)}")
    summary = RLSummary(
        out_dir=str(out),
        checkpoint=str(result.checkpoint) if result.checkpoint else None,
        tasks=list(cfg.tasks),
        steps=result.step,
        minutes=minutes,
        sft=metrics_of(next((r for r in evals if r["step"] == 0), None)),
        rl=metrics_of(evals[-1] if evals else None),
        rollout_tok_per_s=sum(r["rollout_tok_per_s"] for r in rl_recs) / max(1, len(rl_recs)),
        verifier_errors=int(sum(r.get("verifier_errors", 0) for r in rl_recs)),
        plot=str(plot),
    )
    if dist.is_main:
        write_json(out / "rl_summary.json", asdict(summary))
    return summary


def evaluate_model(
    model_dir: str | Path,
    tasks: tuple[str, ...] | None = None,
    preset: str = "tiny",
    device: str | None = None,
    n_heldout: int | None = None,
) -> dict[str, float]:
    """Held-out pass@1 (greedy) and pass@k of any of our chat models on the RL problems (default: the
    preset's tasks)."""
    cfg, _ = rl_preset(preset)
    cfg = replace(cfg, tasks=tuple(tasks or cfg.tasks), n_heldout=n_heldout or cfg.n_heldout)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _, tok = _load(model_dir, dev)
    heldout = heldout_problems(cfg.tasks, cfg.n_heldout)
    with torch.no_grad():
        return evaluate_problems(Sampler(model, tok, default_toolbox() if cfg.tools else None), heldout, cfg)


def plot_rl(metrics_path: str | Path, png: str | Path, title: str = "") -> Path:
    """Six panels against step: reward, held-out pass@1 / pass@k, response length, KL, entropy, loss."""
    plt = pyplot()

    recs = read_metrics(metrics_path)
    rl = [r for r in recs if r.get("kind") == "rl"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    tr = [r for r in recs if r.get("kind") == "train"]

    def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=100)
    ax = axes[0, 0]
    ax.plot(*series(rl, "reward"), lw=1, label="mean reward (train rollouts)")
    ax.plot(*series(rl, "solved"), lw=1, alpha=0.6, label="solved (reward = 1)")
    ax.set_title("reward")
    ax = axes[0, 1]
    for key in sorted({k for r in ev for k in r if k.startswith("pass@") and "/" not in k}, key=lambda k: int(k[5:])):
        ax.plot(*series(ev, key), "o-", label=f"held-out {key}")
    ax.plot(*series(ev, "sampled_accuracy"), "s--", alpha=0.6, label="held-out sampled accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("held-out")
    panels = [
        (axes[0, 2], rl, "response_tokens", "response length (sampled tokens)"),
        (axes[1, 0], rl, "kl", "KL to the SFT model (k3)"),
        (axes[1, 1], rl, "entropy", "entropy (nats/token)"),
        (axes[1, 2], tr, "loss", "GRPO loss"),
    ]
    for ax, rows, key, name in panels:
        ax.plot(*series(rows, key), lw=1)
        ax.set_title(name)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or Path(metrics_path).parent.name)
    fig.tight_layout()
    png = Path(png)
    save_png(fig, png)
    return png
