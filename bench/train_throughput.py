"""Training throughput: llmstack's GPT against transformers' LlamaForCausalLM of the same shape, and
llmstack's throughput levers switched on and off.

Both models get the same weights, batches, loss and optimizer; only the model code differs. Runs
alternate (ours, HF, ours, HF, ...) so that machine noise hits both alike, and the median tok/s of
each is compared. On CUDA it also prints MFU (bf16 peak of the card) and peak memory.

``--dtype both`` (the default) measures three pairings in one run:
  fp32 vs fp32      identical settings, the anchor's setup (fp32, eager)
  bf16 vs bf16      both under bf16 autocast
  default vs fp32   llmstack's training default on this device (``dtype="auto"``: bf16 autocast on
                    CUDA and on CPUs with AMX/AVX512-BF16) against transformers' default (fp32)

Levers (each on or off): ``--compile`` (torch.compile of the model), ``--chunked-ce`` (ours: the loss
from ``GPT.forward(x, targets_BT=y)``, chunked linear + cross-entropy, no (B, T, vocab) logits),
``--optimizer adamw|muon`` (``llmstack.training.optim``), ``--ckpt-act`` (activation checkpointing of
every decoder layer: recompute in the backward, for a larger micro-batch).

``--experts 8`` makes both a mixture of experts (8 experts, 2 per token, each half the --mlp width):
ours against transformers' MixtralForCausalLM (its experts fused into 3D tensors, looped per expert).

``--matrix`` measures a list of lever combinations for llmstack alone, one after another in this
process, and writes JSON (after each combination, so a timeout loses only the one running). A
combination is levers joined by '+': ``eager`` or ``compile``, ``chunked``, ``muon``, ``ckpt``, ``b<N>``
(micro-batch N instead of --batch); ';' separates combinations.

    # CPU, the anchor shape (6 layers x 384, T=256, B=16, vocab 8192):
    python bench/train_throughput.py
    python bench/train_throughput.py --experts 8 --dtype float32     # a mixture, against Mixtral
    # one GPU, a d20-like shape, bf16 + torch.compile:
    python bench/train_throughput.py --device cuda --layers 20 --dim 1280 --heads 10 --seq 2048 \\
        --batch 16 --vocab 65536 --dtype bfloat16 --compile
    # one GPU, the d12 shape, a lever matrix into JSON (bench/gpu_session.sh runs this):
    python bench/train_throughput.py --device cuda --layers 12 --dim 768 --heads 6 --mlp 2048 --seq 2048 \\
        --batch 32 --vocab 32768 --dtype bfloat16 --matrix "compile;compile+chunked;compile+chunked+muon" \\
        --json levers.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT
from llmstack.training.config import TrainConfig, resolve_dtype
from llmstack.training.optim import build_optimizer
from llmstack.training.presets import with_experts
from llmstack.training.pretrain import logits_of

PEAK_BF16 = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}


@dataclass(frozen=True)
class Levers:
    compile: bool = False
    chunked_ce: bool = False
    optimizer: str = "adamw"
    ckpt_act: bool = False
    batch: int | None = None  # None: --batch

    @classmethod
    def parse(cls, spec: str) -> Levers:
        levers = cls()
        for word in spec.strip().split("+"):
            if word == "eager":
                levers = replace(levers, compile=False)
            elif word == "compile":
                levers = replace(levers, compile=True)
            elif word == "chunked":
                levers = replace(levers, chunked_ce=True)
            elif word in ("adamw", "muon"):
                levers = replace(levers, optimizer=word)
            elif word == "ckpt":
                levers = replace(levers, ckpt_act=True)
            elif re.fullmatch(r"b\d+", word):
                levers = replace(levers, batch=int(word[1:]))
            else:
                raise ValueError(f"unknown lever {word!r} in {spec!r} (eager|compile, chunked, muon, ckpt, b<N>)")
        return levers


class CheckpointedLayer(nn.Module):
    """A decoder layer whose activations are recomputed in the backward instead of kept."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any) -> torch.Tensor:
        return checkpoint(self.layer, *args, use_reentrant=False)


def build_hf(cfg: ModelConfig) -> torch.nn.Module:
    """transformers' model of ``cfg``'s family: LlamaForCausalLM, or MixtralForCausalLM for a mixture."""
    from transformers import AutoConfig, AutoModelForCausalLM  # optional: only this comparison needs it

    d = cfg.to_hf_dict()
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    hf_cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(hf_cfg)


def hf_state(ours: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' in-memory names: a mixture's experts fused into 3D tensors
    (``experts.gate_up_proj`` (E, 2I, C), ``experts.down_proj`` (E, C, I)), as transformers 5 holds them."""
    state, out = ours.state_dict(), {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for k, v in state.items():
        if m := re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight", k):
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = v
        else:
            out[k] = v
    for prefix, by_e in experts.items():
        ordered = [by_e[e] for e in range(len(by_e))]
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat((w["gate_proj"], w["up_proj"])) for w in ordered])
        out[f"{prefix}.down_proj"] = torch.stack([w["down_proj"] for w in ordered])
    return out


def prepare(model: nn.Module, levers: Levers) -> nn.Module:
    """Apply the model-side levers from outside, as the training code would."""
    if levers.ckpt_act:
        if isinstance(model, GPT):
            model.model.layers = nn.ModuleList(CheckpointedLayer(layer) for layer in model.model.layers)  # type: ignore[assignment]
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    return torch.compile(model) if levers.compile else model


def measure(
    model: nn.Module, levers: Levers, args: argparse.Namespace, device: torch.device, steps: int
) -> list[float]:
    """tok/s of each of ``steps`` optimizer steps (after ``args.warmup`` warm-up steps)."""
    batch = levers.batch or args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (batch, args.seq + 1), generator=g).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]
    raw = getattr(model, "_orig_mod", model)
    opt = build_optimizer(raw, TrainConfig(lr=1e-4, optimizer=levers.optimizer), device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()
    rates = []
    for i in range(steps + args.warmup):
        t0 = time.perf_counter()
        with amp:
            if levers.chunked_ce:
                loss = model(inp, targets_BT=tgt)
            else:
                logits = logits_of(model, inp)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            rates.append(batch * args.seq / (time.perf_counter() - t0))
    return rates


def mfu(cfg: ModelConfig, seq: int, tok_s: float, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)
    return cfg.flops_per_token(seq) * tok_s / peak if peak else None


def run_matrix(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> None:
    """Each combination on a fresh model (same seed), results appended to ``args.json`` as they come."""
    specs = [s for s in args.matrix.split(";") if s.strip()]
    out: dict[str, Any] = {
        "shape": {**cfg.to_dict(), "batch": args.batch, "seq": args.seq, "dtype": args.dtype},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else args.device,
        "torch": torch.__version__,
        "steps": args.steps,
        "results": [],
    }
    # static shapes (a second batch size would otherwise recompile with a dynamic batch dimension), and
    # room for every combination's graph: past the recompile limit a model would silently run eagerly
    torch._dynamo.config.automatic_dynamic_shapes = False
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    start, cost_of = time.perf_counter(), {False: 0.0, True: 0.0}  # cheapest combination so far, by compile
    for spec in specs:
        levers = Levers.parse(spec)
        row: dict[str, Any] = {"combo": spec, **asdict(levers), "batch": levers.batch or args.batch}
        if args.budget_s and time.perf_counter() - start + cost_of[levers.compile] > args.budget_s:
            row["skipped"] = "out of time budget"
        else:
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                torch.manual_seed(0)
                model = prepare(GPT(cfg).to(device), levers)
                rates = measure(model, levers, args, device, args.steps)
                tok_s = statistics.median(rates)
                row.update(tok_s=round(tok_s), step_ms=round(1000 * row["batch"] * args.seq / tok_s, 2))
                row["mfu"] = mfu(cfg, args.seq, tok_s, device)
                if device.type == "cuda":
                    row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            except Exception as e:  # an OOM or a compile failure is a result too; the next combination runs
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            model = None  # type: ignore[assignment]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            seen = cost_of[levers.compile]
            cost_of[levers.compile] = min(seen, row["wall_s"]) if seen else row["wall_s"]
        out["results"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


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
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round (per combination with --matrix)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours/HF")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--chunked-ce", action="store_true", help="ours: chunked linear + cross-entropy")
    ap.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    ap.add_argument("--ckpt-act", action="store_true", help="activation checkpointing of every layer")
    ap.add_argument("--matrix", default=None, help="lever combinations, e.g. 'eager;compile+chunked+muon'")
    ap.add_argument("--json", default=None, help="--matrix: write the results here")
    ap.add_argument("--budget-s", type=float, default=0, help="--matrix: skip combinations that would pass this")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--experts", type=int, default=0, help="a mixture of experts (against MixtralForCausalLM)")
    ap.add_argument("--experts-active", type=int, default=2)
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
    if args.experts:  # each expert --mlp / active wide: a token uses as many MLP parameters as the dense shape
        cfg = with_experts(cfg, args.experts, args.experts_active)
    if args.matrix:
        if args.dtype == "both":
            args.dtype = resolve_dtype("auto", device)
        run_matrix(cfg, args, device)
        return
    levers = Levers(args.compile, args.chunked_ce, args.optimizer, args.ckpt_act)
    torch.manual_seed(0)
    ours = GPT(cfg).to(device)
    hf = build_hf(cfg).to(device)
    missing, _ = hf.load_state_dict(hf_state(ours), strict=False)
    assert not [k for k in missing if "rotary" not in k], missing  # the same weights in both
    models = {"llmstack": prepare(ours, levers), "transformers": prepare(hf, levers)}
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
    rates: dict[str, list[float]] = {k: [] for k in models}
    lever_of = {"llmstack": levers, "transformers": replace(levers, chunked_ce=False)}
    for _ in range(args.rounds):
        for name, r in rates.items():
            r += measure(models[name], lever_of[name], args, device, args.steps)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"shape: {cfg.n_layer} layers x {cfg.n_embd}, heads {cfg.n_head}/{cfg.n_kv_head}, mlp {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}, B={args.batch}, T={args.seq}, params {ours.num_params() / 1e6:.1f}M, "
        f"device {args.device}, levers {levers}, threads {torch.get_num_threads()}"
    )
    for name, r in med.items():
        line = f"{name:>13} {args.dtype:>8}: {r:10,.0f} tok/s (median of {len(rates[name])} steps)"
        if (u := mfu(cfg, args.seq, r, device)) is not None:
            line += f"  MFU {u:.1%} ({torch.cuda.get_device_name()})"
        print(line)
    print(f"ratio llmstack / transformers, both {args.dtype}: {med['llmstack'] / med['transformers']:.2f}x")


if __name__ == "__main__":
    main()
