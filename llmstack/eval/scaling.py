"""Scaling laws: train a grid of model sizes x token budgets, fit L(N, D), predict a bigger run.

    llmstack scaling --preset quick                  # 3 sizes x 3 budgets + a held-out size: 12 min, 2 busy cores
    llmstack scaling                                 # preset cpu: 4 x 4 + held-out (est. 30-40 min, 2 idle cores)
    llmstack scaling --preset gpu --device cuda      # more sizes, up to one epoch of the corpus

Every point is the pretraining Task in the one training loop (``training/loop.py``), shaped by the
presets' depth dial (width 64 x depth, head_dim 64) and trained on the main job's shards. The final
val loss of each (N, D) is fitted with Chinchilla's parametric form (Hoffmann et al. 2022, approach 3)

    L(N, D) = E + A / N^alpha + B / D^beta

by their recipe: Huber loss (delta 1e-3) between log L and logsumexp(log A - alpha log N,
log B - beta log D, log E), minimised by L-BFGS; their grid of 4,500 starts is scored and L-BFGS runs
from the best 8 and from their published constants. The fit then predicts a larger held-out run,
which is written to disk before that run is trained; the report is the prediction's error.

The budgets of one size share their computation: a WSD schedule's learning rate does not depend on
the budget before the decay, so each shorter budget continues a copy of the longest run's checkpoint
at its own decay start (bit-identical to training it alone, since the loop resumes exactly).

Conventions: N counts non-embedding parameters (Kaplan et al. 2020; the 4096-row table would be most
of a one-layer model); D counts training tokens; C = 6ND. The loss is val nats/token on the same
held-out batches at every point (the loop's bits/byte times those batches' bytes per token).

What is not covered: points trained in several processes (a sweep runs in one); tuning the learning
rate per size (every size uses the tiny preset's 3e-3); repeated data (a budget past one epoch of the
shards is flagged: the law assumes fresh tokens).

The law and its fit are in ``scaling_law.py``, the plots in ``scaling_plots.py``.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmstack.data.shards import ShardIndex
from llmstack.eval.scaling_law import Law, bootstrap_prediction, fit_law
from llmstack.eval.scaling_plots import plot_sweep
from llmstack.io import atomic_write, read_json, write_json
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT
from llmstack.tokenizer import Tokenizer
from llmstack.training import checkpoint as ckpt_io
from llmstack.training.config import TrainConfig, resolve_dtype
from llmstack.training.distributed import init_distributed
from llmstack.training.loop import train
from llmstack.training.presets import model_for_depth
from llmstack.training.pretrain import PretrainTask

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- sweeps
@dataclass(frozen=True)
class SweepConfig:
    depths: tuple[int, ...]  # model sizes, from the presets' depth dial
    steps: tuple[int, ...]  # token budgets, in optimizer steps of batch_size x seq_len tokens
    holdout: tuple[int, int]  # (depth, steps) of the run predicted before it is trained
    batch_size: int = 16
    seq_len: int = 256
    warmup_steps: int = 15  # the same for every budget, so shorter budgets branch off the longest run
    eval_batches: int = 32  # val batches of 8 x seq_len tokens, the same ones at every point
    lr: float = 3e-3  # the tiny preset's, at every size (depth 1, 100 steps: 1.5e-3 to 1e-2 within 0.07 bits/byte)
    head_dim: int = 64

    def __post_init__(self) -> None:
        if not self.depths or not self.steps or min(*self.depths, *self.steps, *self.holdout) <= 0:
            raise ValueError(f"a sweep needs positive depths, steps and holdout (got {self})")

    def settings(self) -> dict[str, Any]:
        """What every point must share for their losses to be comparable."""
        keys = ("batch_size", "seq_len", "warmup_steps", "eval_batches", "lr", "head_dim")
        return {k: getattr(self, k) for k in keys}

    def tokens(self, steps: int) -> int:
        return steps * self.batch_size * self.seq_len


def quick() -> SweepConfig:
    """3 sizes x 3 budgets (100k-400k tokens) + depth 4: 12 min measured on 2 cores shared with other jobs."""
    return SweepConfig(
        depths=(1, 2, 3), steps=(50, 100, 200), holdout=(4, 200), batch_size=8, warmup_steps=10, eval_batches=16
    )


def cpu() -> SweepConfig:
    """4 sizes x 4 budgets (0.3M-2.4M tokens: one epoch of the main job's shards) + depth 5.

    Estimated from the quick sweep's throughput (not run yet): ~2 h on 2 cores shared with other
    jobs, ~30-40 min on 2 idle ones."""
    return SweepConfig(depths=(1, 2, 3, 4), steps=(75, 150, 300, 580), holdout=(5, 580))


def gpu() -> SweepConfig:
    """The cpu budgets on bigger sizes, + depth 8 (not run yet)."""
    return SweepConfig(depths=(1, 2, 3, 4, 6), steps=(75, 150, 300, 580), holdout=(8, 580), eval_batches=64)


SWEEPS: dict[str, Callable[[], SweepConfig]] = {"quick": quick, "cpu": cpu, "gpu": gpu}


def point_configs(depth: int, steps: int, vocab_size: int, sweep: SweepConfig) -> tuple[ModelConfig, TrainConfig]:
    model = model_for_depth(depth, vocab_size, sweep.seq_len, head_dim=sweep.head_dim)
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=sweep.batch_size,
        seq_len=sweep.seq_len,
        lr=sweep.lr,
        warmup_steps=sweep.warmup_steps,
        schedule="wsd",  # the last 20% decays: each point's loss is an annealed one
        eval_every=0,
        eval_batches=sweep.eval_batches,
        ckpt_every=100,
        keep_checkpoints=1,
    )
    return model, cfg


def decay_start(cfg: TrainConfig) -> int:
    """The first step of the WSD decay (as ``optim.lr_at`` computes it); before it, every budget's
    learning rate is the same, so a shorter budget is the longer run up to here plus its own decay."""
    return cfg.max_steps - max(1, round(cfg.decay_fraction * cfg.max_steps))


def val_bytes_per_token(task: PretrainTask) -> float:
    """Bytes per (non-special) target token of the val batches the task evaluates on."""
    n_bytes = n_tokens = 0
    for i, (_, y) in enumerate(task.val_loader):
        if i >= task.eval_batches:
            break
        nb = task.byte_lengths[y.reshape(-1)]
        n_bytes, n_tokens = n_bytes + int(nb.sum()), n_tokens + int((nb > 0).sum())
    return n_bytes / max(1, n_tokens)


def _train(depth, steps, sweep, shards, tok, run: Path, device, progress, stop_at=None):
    """One call of the training loop for a (size, budget), resuming ``run``'s checkpoint if any."""
    model_cfg, cfg = point_configs(depth, steps, tok.vocab_size, sweep)
    dist = init_distributed(device)
    if dist.enabled:
        raise ValueError("run a scaling sweep in one process (not under torchrun): its points train one by one")
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    task = PretrainTask(shards, tok, cfg, dist)
    meta = {"stage": "scaling", "tokenizer_fingerprint": tok.fingerprint}
    result = train(model, task, cfg, run, dist, meta=meta, progress=progress, stop_at=stop_at)
    return model, task, cfg, dist, result


def _branch(trunk: Path, run: Path, step: int) -> bool:
    """Start ``run`` from the trunk's checkpoint at ``step`` (copied); False if the trunk is elsewhere."""
    try:
        ckpt = ckpt_io.load_meta(trunk)
    except FileNotFoundError:
        return False
    if ckpt.step != step or (run / "checkpoints").exists():
        return False
    tmp = run / "checkpoints" / f".{ckpt.path.name}.copy"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt.path, tmp)
    tmp.rename(run / "checkpoints" / ckpt.path.name)
    with atomic_write(run / "checkpoints" / "LATEST") as f:
        f.write(ckpt.path.name + "\n")
    return True


def train_point(
    name: str,
    depth: int,
    steps: int,
    sweep: SweepConfig,
    shards: ShardIndex,
    tok: Tokenizer,
    out: Path,
    device: str | None,
    progress: bool,
    trunk: tuple[Path, int] | None = None,
) -> dict[str, Any]:
    """Train one (size, budget) and return its record.

    With ``trunk`` = (run dir, budget) of a longer budget of the same size, that run is advanced to
    this budget's decay start and this one continues from a copy of it: the same steps, data and
    learning rates as training it alone (the loop resumes bit-identically), minus the shared part.
    """
    run = out / "points" / name
    t0 = time.perf_counter()
    branched = None
    if trunk is not None:
        at = decay_start(point_configs(depth, steps, tok.vocab_size, sweep)[1])
        _train(depth, trunk[1], sweep, shards, tok, trunk[0], device, progress, stop_at=at)
        branched = at if _branch(trunk[0], run, at) else None
    model_cfg = point_configs(depth, steps, tok.vocab_size, sweep)[0]
    model, task, cfg, dist, result = _train(depth, steps, sweep, shards, tok, run, device, progress)
    final = [e for e in result.evals if e["step"] == steps]
    if final:
        bpb = final[-1]["val_bpb"]
    else:  # finished before an interruption, not yet recorded: the loop loaded its weights
        model.eval()
        bf16 = resolve_dtype(cfg.dtype, dist.device) == "bfloat16"
        with torch.no_grad(), torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=bf16):
            bpb = task.evaluate(model)["val_bpb"]
    N, D = model_cfg.num_params(include_embedding=False), sweep.tokens(steps)
    return {
        "depth": depth,
        "steps": steps,
        "width": model_cfg.n_embd,
        "N": N,
        "params_total": model_cfg.num_params(),
        "D": D,
        "C": 6.0 * N * D,
        "val_bpb": bpb,
        "val_loss": bpb * math.log(2) * val_bytes_per_token(task),
        "branched_at": branched,
        "seconds": round(time.perf_counter() - t0, 1),
        "metrics": str(run / "metrics.jsonl"),
    }


def _arrays(points: dict[str, dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    rows = list(points.values())
    return [r["N"] for r in rows], [r["D"] for r in rows], [r["val_loss"] for r in rows]


def run_sweep(
    sweep: SweepConfig,
    shards: ShardIndex,
    tok: Tokenizer,
    out: str | Path,
    device: str | None = None,
    progress: bool = True,
    log: Log = print,
    bootstrap: int = 100,
) -> dict[str, Any]:
    """Train every point not yet in ``out/scaling.json``, fit, predict the held-out run, train it.

    Per size, the longest budget still missing is the trunk the shorter ones branch off. The JSON is
    rewritten (atomically) after every point, so a restart trains only what is missing; a recorded
    point's checkpoints are deleted (its record and metrics.jsonl stay). Returns the JSON's content.
    """
    out = Path(out)
    path = out / "scaling.json"
    settings = {**sweep.settings(), "tokenizer_fingerprint": tok.fingerprint}
    state: dict[str, Any] = read_json(path) if path.exists() else {"points": {}, "holdout": None}
    if state.setdefault("settings", settings) != settings:
        raise ValueError(
            f"{path}: its points were trained with {state['settings']}, this sweep uses {settings}; use another --out"
        )
    state["sweep"] = asdict(sweep)
    train_tokens = shards.n_tokens("train")
    if max(sweep.tokens(s) for s in (*sweep.steps, sweep.holdout[1])) > train_tokens:
        log(f"note: the largest budget passes one epoch of the {train_tokens:,} train tokens (data repeats)")

    # the plan: (name, depth, steps, trunk, steps trained by this call) in training order
    plan: list[tuple[str, int, int, tuple[Path, int] | None, int]] = []
    for depth in sweep.depths:
        missing = [s for s in sorted(sweep.steps) if f"d{depth}_s{s}" not in state["points"]]
        done_to = 0  # where the trunk (the longest missing budget) will be
        for s in missing[:-1]:
            start = decay_start(point_configs(depth, s, tok.vocab_size, sweep)[1])
            longest = (out / "points" / f"d{depth}_s{missing[-1]}", missing[-1])
            plan.append((f"d{depth}_s{s}", depth, s, longest, max(0, start - done_to) + s - start))
            done_to = max(done_to, start)
        if missing:
            plan.append((f"d{depth}_s{missing[-1]}", depth, missing[-1], None, missing[-1] - done_to))
    log(f"{len(state['points'])} points done, {len(plan)} to train, then the held-out d{sweep.holdout[0]}")

    def cost(depth: int, steps: int) -> float:  # ~ FLOPs/6 of those steps, the head's matmul included
        m = model_for_depth(depth, tok.vocab_size, sweep.seq_len, head_dim=sweep.head_dim)
        return sweep.tokens(steps) * (m.num_params(include_embedding=False) + tok.vocab_size * m.n_embd)

    cost_done = seconds_done = 0.0
    for i, (name, depth, steps, trunk, work) in enumerate(plan):
        rec = train_point(name, depth, steps, sweep, shards, tok, out, device, progress, trunk)
        state["points"][name] = rec
        write_json(path, state)
        shutil.rmtree(out / "points" / name / "checkpoints", ignore_errors=True)
        cost_done, seconds_done = cost_done + cost(depth, work), seconds_done + rec["seconds"]
        left = sum(cost(d, w) for _, d, _, _, w in plan[i + 1 :]) + cost(*sweep.holdout)
        log(
            f"[{i + 1}/{len(plan)}] {name}: N {rec['N']:,} D {rec['D']:,} -> val loss {rec['val_loss']:.4f} "
            f"nats/token ({rec['val_bpb']:.4f} bits/byte), {rec['seconds']:.0f}s; "
            f"~{left * seconds_done / cost_done / 60:.1f} min left"
        )

    points = {f"d{d}_s{s}": state["points"][f"d{d}_s{s}"] for d in sweep.depths for s in sweep.steps}
    N, D, L = _arrays(points)
    law, objective = fit_law(N, D, L)
    state["fit"] = {
        **asdict(law),
        "huber_delta": 1e-3,
        "objective": objective,
        "points": sorted(points),
        "exponents": dict(zip(("N_opt", "D_opt"), law.exponents(), strict=True)),
        "residuals": {k: float(law.loss(p["N"], p["D"]) / p["val_loss"] - 1) for k, p in points.items()},
    }
    log(f"fit on {len(points)} points: {law.formula()} (N_opt ~ C^{law.exponents()[0]:.3f})")

    hd, hs = sweep.holdout
    at = (point_configs(hd, hs, tok.vocab_size, sweep)[0].num_params(include_embedding=False), sweep.tokens(hs))
    holdout = state.get("holdout") or {}
    if holdout.get("actual_loss") is None or holdout.get("depth") != hd or holdout.get("steps") != hs:
        lo, hi = bootstrap_prediction(N, D, L, at, law, n=bootstrap)
        holdout = {
            "depth": hd,
            "steps": hs,
            "N": at[0],
            "D": at[1],
            "predicted_loss": float(law.loss(*at)),
            "interval_90": [lo, hi],
            "predicted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "fit": {k: state["fit"][k] for k in ("E", "A", "B", "alpha", "beta")},
        }
        state["holdout"] = holdout
        write_json(path, state)  # the prediction is on disk before the run starts
        plot_sweep(state, out)
        log(
            f"prediction for the held-out d{hd} (N {at[0]:,}, D {at[1]:,}): {holdout['predicted_loss']:.4f} "
            f"nats/token (90% bootstrap interval {lo:.4f}-{hi:.4f}); training it"
        )
        name = f"holdout_d{hd}_s{hs}"
        rec = train_point(name, hd, hs, sweep, shards, tok, out, device, progress)
        holdout.update(
            actual_loss=rec["val_loss"],
            actual_bpb=rec["val_bpb"],
            seconds=rec["seconds"],
            error=holdout["predicted_loss"] - rec["val_loss"],
            relative_error=holdout["predicted_loss"] / rec["val_loss"] - 1,
        )
        write_json(path, state)
        shutil.rmtree(out / "points" / name / "checkpoints", ignore_errors=True)
    state["plots"] = plot_sweep(state, out)
    write_json(path, state)
    return state


def summary_lines(state: dict[str, Any]) -> list[str]:
    """The sweep as a table, the fit, and the held-out prediction against the truth."""
    lines = [f"{'point':<10} {'N':>10} {'D':>10} {'C':>9} {'val loss':>9} {'fit':>8} {'bits/byte':>9} {'s':>5}"]
    fit = state.get("fit") or {}
    for name, p in sorted(state["points"].items(), key=lambda kv: (kv[1]["N"], kv[1]["D"])):
        res = fit.get("residuals", {}).get(name)
        fitted = f"{p['val_loss'] * (1 + res):.4f}" if res is not None else "-"
        lines.append(
            f"{name:<10} {p['N']:>10,} {p['D']:>10,} {p['C']:>9.2e} {p['val_loss']:>9.4f} {fitted:>8} "
            f"{p['val_bpb']:>9.4f} {p['seconds']:>5.0f}"
        )
    if fit:
        law = Law(**{k: fit[k] for k in ("E", "A", "B", "alpha", "beta")})
        a, b = law.exponents()
        lines.append(f"fit: {law.formula()}  (Huber objective {fit['objective']:.3g})")
        lines.append(f"compute-optimal: N_opt ~ C^{a:.3f}, D_opt ~ C^{b:.3f} (Chinchilla: ~C^0.45, C^0.55)")
    h = state.get("holdout") or {}
    if h.get("actual_loss") is not None:
        lines.append(
            f"held-out d{h['depth']} (N {h['N']:,}, D {h['D']:,}): predicted {h['predicted_loss']:.4f} "
            f"[{h['interval_90'][0]:.4f}, {h['interval_90'][1]:.4f}], trained {h['actual_loss']:.4f} nats/token: "
            f"error {h['error']:+.4f} ({h['relative_error']:+.2%})"
        )
    return lines
