"""Muon against AdamW at d12: validation loss against wall-clock and against tokens.

Both optimizers train one model from the same initial weights on the same sequence of batches
(``data/gpu_bench``, made by ``bench/make_gpu_data.py``; nothing else is read), under bf16 autocast
and torch.compile with the chunked linear + cross-entropy loss, for the same training time each. A
few calibration steps measure each optimizer's step time first; its step budget is then the time
budget over that, and the learning-rate schedule (``optim.lr_at``: 2% warmup, warmup-stable-decay
with the last 20% decaying, as the presets) spans that many steps, so each run ends decayed when its
time is up. Evaluations (val loss in nats/token and bits/byte on a fixed held-out set) pause the clock.

Writes ``race.json`` (per evaluation: step, tokens, training seconds, val loss, val bpb, mean train loss,
lr, epochs of the data seen) and ``race.png`` (val loss against seconds and against tokens) to --out.
``--deadline-s`` bounds the whole script: the per-run time shrinks to fit it (the same for both).

    python bench/make_gpu_data.py                                         # once: data/gpu_bench/
    PYTHONPATH=. python bench/optimizer_race.py --device cuda --seconds 150 --out out/race
    PYTHONPATH=. python bench/optimizer_race.py --smoke --out /tmp/race    # CPU, 2 layers, 10 s each

What is not here: tuning either optimizer (AdamW at the d12 preset's rate, Muon at the recipe's 0.02),
several seeds, data that is not repeated (the shards hold ~7M tokens: a d12 run on one H200 sees them
several times, so late val losses show overfitting as much as optimisation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from llmstack.data.loader import PackedLoader
from llmstack.data.shards import ShardIndex
from llmstack.io import pyplot, read_json, save_png, write_json
from llmstack.model.llama import GPT
from llmstack.tokenizer import Tokenizer
from llmstack.training.config import TrainConfig
from llmstack.training.optim import build_optimizer, lr_at
from llmstack.training.presets import d12, model_for_depth
from llmstack.training.pretrain import bits_per_byte, token_byte_lengths

GPU = dict(device="cuda", depth=12, head_dim=128, batch=32, seq=2048, seconds=150.0, compile=True)
GPU.update(evals=20, eval_batches=8, eval_batch=8, calib_steps=6)
SMOKE = dict(device="cpu", depth=2, head_dim=64, batch=4, seq=64, seconds=10.0, compile=False)
SMOKE.update(evals=5, eval_batches=2, eval_batch=4, calib_steps=3)


class Race:
    """One model, its initial weights, the data and the evaluation set, shared by every run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        data = Path(args.data)
        self.shards = ShardIndex.load(data)
        tok = Tokenizer.load(data / "tokenizer")
        self.shards.check_tokenizer(tok)
        self.byte_lengths = token_byte_lengths(tok)
        self.source = read_json(data / "source.json") if (data / "source.json").exists() else {}
        self.mcfg = model_for_depth(args.depth, tok.vocab_size, args.seq, head_dim=args.head_dim)
        self.base = replace(d12(tok.vocab_size)[1], batch_size=args.batch, seq_len=args.seq, lr=args.lr)
        self.base = replace(self.base, muon_lr=args.muon_lr, compile=args.compile)
        torch.manual_seed(self.base.seed)
        self.model = GPT(self.mcfg).to(self.device)
        self.init = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.fwd: Any = torch.compile(self.model) if args.compile else self.model
        val = PackedLoader(self.shards.arrays("val"), self.shards.bos_id, args.seq, args.eval_batch, shuffle=False)
        self.val = [(x.to(self.device), y.to(self.device)) for x, y in list(val)[: args.eval_batches]]
        self.amp = args.device != "cpu" or args.bf16_cpu

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def loader(self, seed: int) -> PackedLoader:
        train = self.shards.arrays("train")
        return PackedLoader(train, self.shards.bos_id, self.args.seq, self.args.batch, seed=seed)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, loader: PackedLoader) -> torch.Tensor:
        """One optimizer step as the training loop takes it (schedule, autocast, clipping); no host sync."""
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = loader.next_batch()
        if self.device.type == "cuda":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        with self.autocast():
            loss = self.fwd(x, targets_BT=y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        with self.autocast():
            losses = [float(self.model(x, targets_BT=y)) for x, y in self.val]
            bpb = bits_per_byte(self.model, self.val, self.byte_lengths, self.device)
        return {"val_loss": statistics.fmean(losses), "val_bpb": bpb}

    def reset(self, optimizer: str, max_steps: int) -> tuple[torch.optim.Optimizer, TrainConfig]:
        self.model.load_state_dict(self.init)  # in place: the compiled graph keeps its parameters
        self.model.zero_grad(set_to_none=True)
        cfg = replace(self.base, optimizer=optimizer, max_steps=max_steps, warmup_steps=max(1, round(0.02 * max_steps)))
        return build_optimizer(self.model, cfg, self.device), cfg

    def calibrate(self, optimizer: str, n: int) -> float:
        """Median seconds per step of this optimizer (after one untimed step); the weights are reset after."""
        opt, cfg = self.reset(optimizer, 1000)
        loader, times = self.loader(seed=12345), []
        for i in range(n + 1):
            t0 = time.perf_counter()
            self.step(opt, cfg, i, loader)
            self.sync()
            if i:
                times.append(time.perf_counter() - t0)
        self.model.load_state_dict(self.init)
        return statistics.median(times)

    def run(self, optimizer: str, seconds: float, step_s: float, first_eval: dict[str, float]) -> dict[str, Any]:
        max_steps = max(10, int(seconds / step_s))
        opt, cfg = self.reset(optimizer, max_steps)
        loader = self.loader(seed=cfg.seed)
        tokens_per_step = self.args.batch * self.args.seq
        every = max(1, max_steps // self.args.evals)
        evals = [{"step": 0, "tokens": 0, "seconds": 0.0, **first_eval, "lr": 0.0, "epoch": 0.0}]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_s, acc, n_acc, step = 0.0, torch.zeros((), device=self.device), 0, 0
        self.sync()
        t0 = time.perf_counter()
        while step < max_steps:
            acc += self.step(opt, cfg, step, loader)
            n_acc, step = n_acc + 1, step + 1
            if step % every and step != max_steps:
                continue
            self.sync()
            train_s += time.perf_counter() - t0
            record = {"step": step, "tokens": step * tokens_per_step, "seconds": round(train_s, 3)}
            record.update(self.evaluate(), train_loss=float(acc) / n_acc, lr=lr_at(step - 1, cfg), epoch=loader.epoch)
            evals.append(record)
            print(
                f"  {optimizer} step {step} tokens {record['tokens'] / 1e6:.1f}M {train_s:.1f} s: val loss "
                f"{record['val_loss']:.4f} bpb {record['val_bpb']:.4f} train {record['train_loss']:.4f} "
                f"epoch {loader.epoch:.2f}",
                flush=True,
            )
            if not math.isfinite(record["val_loss"]):
                break
            if train_s > 1.3 * seconds:  # the calibration was off: stop rather than overrun the session
                print(f"  {optimizer}: over time at step {step} of {max_steps}; stopping", flush=True)
                break
            acc, n_acc = torch.zeros((), device=self.device), 0
            t0 = time.perf_counter()
        out = {
            "optimizer": optimizer,
            "lr": cfg.lr,
            "muon_lr": cfg.muon_lr if optimizer == "muon" else None,
            "max_steps": max_steps,
            "steps_done": step,
            "calib_step_s": step_s,
            "train_seconds": train_s,
            "tokens": step * tokens_per_step,
            "tok_per_s": step * tokens_per_step / max(train_s, 1e-9),
            "final_val_loss": evals[-1]["val_loss"],
            "final_val_bpb": evals[-1]["val_bpb"],
            "evals": evals,
        }
        if self.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out


def plot(result: dict[str, Any], path: Path, epoch_tokens: float) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in result["runs"].items():
        ev = run["evals"][1:]  # the untrained model's loss would squash the scale
        label = f"{name} (final {run['final_val_loss']:.3f})"
        axes[0].plot([e["seconds"] for e in ev], [e["val_loss"] for e in ev], marker=".", label=label)
        axes[1].plot([e["tokens"] / 1e6 for e in ev], [e["val_loss"] for e in ev], marker=".", label=label)
    top = max(run["tokens"] for run in result["runs"].values()) / 1e6
    for k in range(1, int(top * 1e6 // epoch_tokens) + 1):
        axes[1].axvline(k * epoch_tokens / 1e6, color="grey", lw=0.6, ls=":")
    axes[0].set_xlabel("training seconds (evaluations excluded)")
    axes[1].set_xlabel("tokens (M); dotted: each pass over the data")
    for ax in axes:
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    m = result["model"]
    fig.suptitle(
        f"{m['n_layer']} layers x {m['n_embd']}, vocab {m['vocab_size']}, B={result['batch']} T={result['seq']}, "
        f"{result['seconds_per_run']:.0f} s each on {result['device']}"
    )
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, a 2-layer model, 10 s per run: checks the script")
    ap.add_argument("--data", default="data/gpu_bench")
    ap.add_argument("--out", required=True)
    ap.add_argument("--optimizers", default="adamw,muon")
    ap.add_argument("--seconds", type=float, default=None, help="training seconds per optimizer")
    ap.add_argument("--deadline-s", type=float, default=0, help="the whole script's budget (0: none)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW's peak rate (and Muon's embeddings/gains)")
    ap.add_argument("--muon-lr", type=float, default=0.02, help="Muon's peak rate for hidden matrices")
    for name in ("device", "depth", "head_dim", "batch", "seq", "evals", "eval_batches", "eval_batch", "calib_steps"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(GPU[name]), default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    ap.add_argument("--bf16-cpu", action="store_true", help="bf16 autocast on CPU too")
    args = ap.parse_args()
    for k, v in (SMOKE if args.smoke else GPU).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    race = Race(args)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    print(f"model {race.mcfg.n_layer} x {race.mcfg.n_embd}, {race.model.num_params() / 1e6:.1f}M params", flush=True)

    t0 = time.perf_counter()
    compile_error = None
    try:
        step_s = {names[0]: race.calibrate(names[0], args.calib_steps)}  # compiles the model too
    except Exception as e:  # a compiler failure should not cost the race: run it eagerly, and say so
        if not args.compile:
            raise
        compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"torch.compile failed ({compile_error}); racing eagerly", flush=True)
        race.fwd, args.compile = race.model, False
        step_s = {names[0]: race.calibrate(names[0], args.calib_steps)}
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_eval = race.evaluate()  # the same initial weights for every run
    eval_s = time.perf_counter() - t0
    seconds = args.seconds
    if args.deadline_s:
        per_run = (args.evals + 2) * eval_s + 3.0
        left = args.deadline_s - (time.perf_counter() - t_start) - 10.0  # 10 s for the files
        left -= len(names) * per_run + (len(names) - 1) * min(warm_s, 15.0)
        seconds = max(5.0, min(seconds, left / len(names)))
    print(f"warm-up/compile {warm_s:.1f} s, one evaluation {eval_s:.2f} s: {seconds:.0f} s per run", flush=True)

    result: dict[str, Any] = {
        "model": race.mcfg.to_dict(),
        "params_M": race.model.num_params() / 1e6,
        "batch": args.batch,
        "seq": args.seq,
        "requested_seconds": args.seconds,
        "seconds_per_run": seconds,
        "warmup_compile_s": warm_s,
        "eval_s": eval_s,
        "compile": args.compile,
        "compile_error": compile_error,
        "device": torch.cuda.get_device_name() if race.device.type == "cuda" else args.device,
        "torch": torch.__version__,
        "data": {
            **race.source,
            "val_tokens_used": sum(y.numel() for _, y in race.val),
        },
        "runs": {},
    }
    epoch_tokens = len(race.loader(0).rows) * args.seq
    for name in names:
        if name not in step_s:
            step_s[name] = race.calibrate(name, args.calib_steps)
        print(f"{name}: {step_s[name] * 1000:.1f} ms/step -> {int(seconds / step_s[name])} steps", flush=True)
        result["runs"][name] = race.run(name, seconds, step_s[name], first_eval)
        write_json(out / "race.json", result)  # after each run: a session cut short keeps what it finished
        try:
            plot(result, out / "race.png", epoch_tokens)
        except ImportError as e:
            print(f"no plot ({e}); race.json has the figures")
    keys = ("final_val_loss", "final_val_bpb", "steps_done", "tok_per_s")
    print(json.dumps({n: {k: r[k] for k in keys} for n, r in result["runs"].items()}), flush=True)


if __name__ == "__main__":
    main()
