"""Training throughput: llmstack's GPT against transformers' LlamaForCausalLM of the same shape.

Both models get the same weights, batches, loss and optimizer (torch AdamW, fused); only the model
code differs. Runs alternate (ours, HF, ours, HF, ...) so that machine noise hits both alike, and the
median tok/s of each is compared. On CUDA it also prints MFU (bf16 peak of the card).

``--dtype both`` (the default) measures three pairings in one run:
  fp32 vs fp32      identical settings, the anchor's setup (fp32, eager)
  bf16 vs bf16      both under bf16 autocast
  default vs fp32   llmstack's training default on this device (``dtype="auto"``: bf16 autocast on
                    CUDA and on CPUs with AMX/AVX512-BF16) against transformers' default (fp32)

    # CPU, the anchor shape (6 layers x 384, T=256, B=16, vocab 8192):
    python bench/train_throughput.py
    # one GPU, a d20-like shape, bf16 + torch.compile:
    python bench/train_throughput.py --device cuda --layers 20 --dim 1280 --heads 10 --seq 2048 \\
        --batch 16 --vocab 65536 --dtype bfloat16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT
from llmstack.training.config import resolve_dtype
from llmstack.training.pretrain import logits_of

PEAK_BF16 = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}


def build_hf(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def measure(model, args, device, steps: int, dtype: str) -> list[float]:
    """tok/s of each of ``steps`` optimizer steps (after two warm-up steps)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type != "mps")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()
    rates = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with amp:
            logits = logits_of(model, inp)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            rates.append(args.batch * args.seq / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours/HF")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        n_layer=args.layers,
        n_embd=args.dim,
        n_head=args.heads,
        n_kv_head=args.kv_heads or args.heads,
        intermediate_size=args.mlp,
        max_seq_len=args.seq,
        tie_embeddings=True,
    )
    torch.manual_seed(0)
    ours = GPT(cfg).to(device)
    hf = build_hf(cfg).to(device)
    hf.load_state_dict(ours.state_dict(), strict=False)
    models = {"llmstack": ours, "transformers": hf}
    if args.compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    if args.dtype == "both":
        # one process per dtype: measured here, bf16 steps run ~2x slower in a process that ran fp32
        # steps first (allocator/oneDNN state), which would understate both bf16 figures
        default = resolve_dtype("auto", device)
        med_by_dtype = {}
        for d in ("float32", "bfloat16"):
            rest = " ".join(sys.argv[1:]).replace("--dtype both", "").split()
            argv = [sys.executable, __file__, *rest, "--dtype", d]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            print(out, end="")
            med_by_dtype[d] = {
                name: float(m.group(1).replace(",", ""))
                for name in ("llmstack", "transformers")
                if (m := re.search(rf"{name}\s+{d}:\s+([\d,]+) tok/s", out))
            }
        print(
            f"ratio llmstack default ({default}) / transformers default (float32): "
            f"{med_by_dtype[default]['llmstack'] / med_by_dtype['float32']['transformers']:.2f}x"
        )
        return
    dtypes = [args.dtype]
    rates: dict[tuple[str, str], list[float]] = {(k, d): [] for d in dtypes for k in models}
    for _ in range(args.rounds):
        for (name, dtype), r in rates.items():
            r += measure(models[name], args, device, args.steps, dtype)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"shape: {cfg.n_layer} layers x {cfg.n_embd}, heads {cfg.n_head}/{cfg.n_kv_head}, mlp {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}, B={args.batch}, T={args.seq}, params {ours.num_params() / 1e6:.1f}M, "
        f"device {args.device}{', compiled' if args.compile else ''}, threads {torch.get_num_threads()}"
    )
    for (name, dtype), r in med.items():
        line = f"{name:>13} {dtype:>8}: {r:10,.0f} tok/s (median of {len(rates[(name, dtype)])} steps)"
        if device.type == "cuda":
            gpu = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
            if peak:
                line += f"  MFU {cfg.flops_per_token(args.seq) * r / peak:.1%} ({gpu})"
        print(line)
    for d in dtypes:
        print(f"ratio llmstack / transformers, both {d}: {med[('llmstack', d)] / med[('transformers', d)]:.2f}x")


if __name__ == "__main__":
    main()
