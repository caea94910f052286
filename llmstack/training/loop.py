"""The one training loop. Pretraining, SFT and RL differ only in their ``Task``.

A task supplies micro-batches, turns a batch into a scalar loss, evaluates, and carries its own
resumable state (a data cursor). The loop owns everything else: optimizer and schedule, gradient
accumulation, clipping, autocast, ``torch.compile``, DDP, checkpoints, metrics, progress bar.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from llmstack.model.llama import GPT
from llmstack.training import checkpoint as ckpt_io
from llmstack.training import lora, sharding
from llmstack.training.config import TrainConfig, resolve_dtype
from llmstack.training.distributed import DistInfo, all_reduce_mean, barrier
from llmstack.training.metrics import MetricsLog, plot_metrics
from llmstack.training.optim import build_optimizer, lr_at


class Task(Protocol):
    name: str

    def next_batch(self) -> Any:
        """The next micro-batch for this rank."""

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Mean loss over the batch and the number of tokens it was computed on."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics, e.g. {"val_bpb": ...}; run on rank 0 with the unwrapped model."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step run in this call
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    checkpoint: Path | None = None


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


RESUME_HINT = (
    "nothing was deleted; pretrain and sft resume from the newest valid checkpoint with --resume-from-latest-valid"
)


def _tidy_checkpoints(run_dir: Path, fallback: bool) -> None:
    """Before training: remove what killed checkpoint writes left; with ``fallback``, point LATEST at the newest
    valid checkpoint (damaged newer ones are renamed aside, never deleted)."""
    removed = ckpt_io.remove_temp_files(run_dir)
    if removed:
        print(f"removed {len(removed)} leftovers of killed checkpoint writes: {', '.join(p.name for p in removed)}")
    if fallback:
        for note in ckpt_io.use_newest_valid(run_dir)[1]:
            print(note)


def _resume(
    model: GPT, optimizer: torch.optim.Optimizer, task: Task, run_dir: Path, meta: dict, announce: bool, sharded: bool
) -> int:
    """Load the latest checkpoint (weights, optimizer and RNG states, the task's data cursor); its step, or 0 for
    a run with no checkpoints. A damaged one raises ModelFileError: training never silently starts over."""
    try:
        ckpt = ckpt_io.latest_checkpoint(run_dir)
        if ckpt is None:
            return 0
        if ckpt.meta.get("tokenizer_fingerprint") != meta.get("tokenizer_fingerprint"):
            raise ValueError(
                f"{ckpt.path}: checkpoint was trained with tokenizer "
                f"{str(ckpt.meta.get('tokenizer_fingerprint'))[:12]}, this run uses "
                f"{str(meta.get('tokenizer_fingerprint'))[:12]}; use a new run directory"
            )
        if ckpt.meta["model_config"] != model.config.to_dict():
            raise ValueError(f"{ckpt.path}: checkpoint model config differs from this run's; use a new run directory")
        if sharded:  # every process reads the whole files and keeps its shards
            saved = ckpt_io.read_training_state(ckpt)
            sharding.load_full_state(model, optimizer, ckpt_io.read_weights(ckpt), saved["optimizer"])
            torch.set_rng_state(saved["rng"]["torch"])
        elif lora.lora_layers(model):  # the frozen base came from the source; the adapter is what trained
            lora.set_adapter_weights(model, ckpt.path / lora.ADAPTER_DIR)
            others = {n: p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
            if others:  # trained beside the adapter (a reward model's head): saved under their own names
                saved = ckpt_io.read_weights(ckpt)
                with torch.no_grad():
                    for name, p in others.items():
                        p.copy_(saved[name])
        else:
            ckpt_io.load_model_weights(model, ckpt)
        if not sharded:
            ckpt_io.load_training_state(ckpt, optimizer)
    except ckpt_io.ModelFileError as e:
        raise ckpt_io.ModelFileError(e.path, f"{e.reason}; {RESUME_HINT}") from None
    task.load_state_dict(ckpt.meta["task_state"])
    if announce:
        print(f"resumed from {ckpt.path} at step {ckpt.step}")
    return ckpt.step


def train(
    model: GPT,
    task: Task,
    cfg: TrainConfig,
    run_dir: str | Path,
    dist: DistInfo,
    *,
    meta: dict[str, Any],
    resume: bool = True,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainResult:
    """Train ``model`` on ``task`` to ``cfg.max_steps``; resume from ``run_dir``'s latest checkpoint if any.

    ``meta`` (model config, tokenizer fingerprint, stage name, ...) is stored with each checkpoint.
    ``stop_at`` ends this call early (with a checkpoint) while the schedule still spans ``max_steps``:
    a long run done in pieces.
    """
    run_dir = Path(run_dir)
    device = dist.device
    amp_dtype = resolve_dtype(cfg.dtype, device)
    model.to(device)
    sharded = dist.enabled and cfg.parallel == "fsdp"
    if sharded:
        if lora.lora_layers(model):
            raise ValueError("LoRA adapters are small: train them with --parallel ddp, not fsdp")
        sharding.shard_model(model)  # before the optimizer: it is built on the shards
    optimizer = build_optimizer(model, cfg, device)
    if dist.is_main:
        _tidy_checkpoints(run_dir, fallback=resume and cfg.resume_from_latest_valid)
    barrier(dist)
    announce = dist.is_main and progress
    step = _resume(model, optimizer, task, run_dir, meta, announce, sharded) if resume else 0
    # checkpoints newer than the start were left by another run (e.g. before --no-resume): rotation keeps them
    foreign = {p.name for p in ckpt_io.checkpoint_dirs(run_dir / "checkpoints") if ckpt_io.step_of(p) > step}
    model.train()
    fwd_model: Any = model  # possibly compiled and/or DDP-wrapped
    if cfg.compile:
        fwd_model = torch.compile(fwd_model)
    if dist.enabled and not sharded:
        fwd_model = DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None)

    board = run_dir / "tensorboard" if cfg.log == "tensorboard" else None
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main, tensorboard=board)
    result = TrainResult(step=step)

    def checkpoint_now(at: int) -> None:
        gathered, optim_state = None, None
        if sharded:  # collective: every process gathers, rank 0 writes
            gathered, optim_state = sharding.full_model_state(model), sharding.full_optimizer_state(model, optimizer)
        if dist.is_main:
            full_meta = {
                **meta,
                "model_config": model.config.to_dict(),
                "train_config": cfg.to_dict(),
                "task_state": task.state_dict(),
            }
            state, extra = gathered, None
            if lora.lora_layers(model):  # the merged model (any stage opens it) + the adapter in PEFT's layout
                adapter = lora.LoRAConfig(**meta["lora"])
                state = lora.merged_state_dict(model)
                base = str(meta.get("base_checkpoint") or "")

                def extra(folder: Path) -> None:
                    lora.save_adapter(model, adapter, folder / lora.ADAPTER_DIR, base or None)

            result.checkpoint = ckpt_io.save_checkpoint(
                run_dir,
                at,
                model,
                optimizer,
                full_meta,
                cfg.keep_checkpoints,
                protect=foreign,
                state=state,
                extra=extra,
                optimizer_state=optim_state,
            )
        barrier(dist)

    def evaluate_now(at: int) -> None:
        if dist.is_main or sharded:  # a sharded model runs on every process (each gathers its layers' weights)
            model.eval()
            with torch.no_grad(), _autocast(device, amp_dtype):
                metrics = task.evaluate(model)
            model.train()
        if dist.is_main:
            result.evals.append({"step": at, **metrics})
            log.write({"kind": "eval", "step": at, **metrics})
            if progress:
                tqdm.write(f"step {at}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        barrier(dist)

    if step >= cfg.max_steps:
        log.close()
        return result
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc=task.name,
        unit="step",
        disable=not (progress and dist.is_main),
        dynamic_ncols=True,
    )
    if step == 0:  # the untrained baseline, so the curve shows how far training moved
        evaluate_now(0)
    tokens_done, train_time = 0, 0.0
    end = min(cfg.max_steps, stop_at) if stop_at else cfg.max_steps
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = task.next_batch()
            sync = micro == cfg.grad_accum - 1 or not dist.enabled
            if sharded:  # FSDP2: gradients reduce-scattered on the last micro-batch only
                model.set_requires_gradient_sync(sync)  # type: ignore[operator]
            with contextlib.nullcontext() if sync or sharded else fwd_model.no_sync(), _autocast(device, amp_dtype):
                loss, n_tokens = task.loss(fwd_model, batch)
                loss = loss + getattr(model, "balancing", float)()  # a mixture's balancing gradient; value 0
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            step_tokens += n_tokens
        grad_norm = 0.0
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step_loss = all_reduce_mean(step_loss, dist)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became {step_loss} at step {step}; lower the learning rate")
        tok_s = step_tokens * dist.world_size / dt
        tokens_done += step_tokens * dist.world_size
        train_time += dt
        result.losses.append(step_loss)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.write(
                {
                    "kind": "train",
                    "step": step,
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tok_per_s": tok_s,
                    "dt": dt,
                    "time": time.time(),
                    **getattr(model, "train_stats", dict)(),  # a mixture's routing since the last record (GPT2: none)
                }
            )
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}")
        bar.update(1)
        last = step == end
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            evaluate_now(step)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last:
            checkpoint_now(step)
    bar.close()
    log.close()
    result.step = step
    result.tokens_per_second = tokens_done / max(1e-9, train_time)
    if dist.is_main:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{task.name}: {run_dir.name}")
    return result
