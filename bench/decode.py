"""Decode throughput: llmstack's engine against transformers' ``generate()`` on the same weights.

Greedy decoding of ``--new`` tokens after a ``--prompt``-token prompt, at batch 1 and batch 32, both
with a KV cache; runs alternate between the two implementations. Prints prefill tok/s, decode tok/s
and the ratios.

    python bench/decode.py                                       # CPU, the tiny shape
    python bench/decode.py --device cuda --layers 20 --dim 1280 --heads 10 --vocab 65536 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from llmstack.inference.engine import Engine
from llmstack.inference.sample import SamplingConfig
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(prompts: torch.Tensor, new: int, device: torch.device, engine: Engine) -> tuple[float, float]:
    """(prefill seconds, total seconds) for greedy decoding of ``new`` tokens (a CUDA graph's capture
    happens at the first decode step, so it is counted in the decode time)."""
    rows = prompts.tolist()
    sync(device)
    t0 = time.perf_counter()
    list(engine.stream(rows, SamplingConfig(max_new_tokens=1, temperature=0.0)))
    sync(device)
    t1 = time.perf_counter()
    list(engine.stream(rows, SamplingConfig(max_new_tokens=new, temperature=0.0)))
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def time_hf(hf, prompts: torch.Tensor, new: int, device: torch.device) -> tuple[float, float]:
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    sync(device)
    t0 = time.perf_counter()
    hf.generate(prompts, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(device)
    t1 = time.perf_counter()
    hf.generate(prompts, max_new_tokens=new, min_new_tokens=new, **kw)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention (default: --heads)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's static decode step")
    ap.add_argument(
        "--static",
        choices=["auto", "on", "off"],
        default="auto",
        help="engine decode steps: fixed-shape + CUDA graph (on; auto = on for CUDA) or dynamic (off)",
    )
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    static = {"auto": None, "on": True, "off": False}[args.static]
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        n_layer=args.layers,
        n_embd=args.dim,
        n_head=args.heads,
        n_kv_head=args.kv_heads or args.heads,
        intermediate_size=-(-8 * args.dim // 3 // 64) * 64,
        max_seq_len=args.prompt + args.new + 8,
    )
    torch.manual_seed(0)
    ours = GPT(cfg).to(device, dtype).eval()
    hf = LlamaForCausalLM(LlamaConfig(**cfg.to_hf_dict())).to(device, dtype).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.generation_config.eos_token_id = None
    print(
        f"shape: {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, {ours.num_params() / 1e6:.1f}M params, "
        f"prompt {args.prompt}, new {args.new}, {args.dtype} on {args.device}, threads {torch.get_num_threads()}, "
        f"engine steps: {args.static}{' + compile' if args.compile else ''}"
    )
    with torch.inference_mode():
        for B in (int(b) for b in args.batches.split(",")):
            prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt), device=device)
            res: dict[str, list[tuple[float, float]]] = {"llmstack": [], "transformers": []}
            engine = Engine(ours, static=static, compile=args.compile)
            time_ours(prompts, 4, device, engine)  # warm-up (a CUDA graph is captured here, once)
            time_hf(hf, prompts, 4, device)
            for _ in range(args.rounds):
                res["llmstack"].append(time_ours(prompts, args.new, device, engine))
                res["transformers"].append(time_hf(hf, prompts, args.new, device))
            rate = {}
            for name, r in res.items():
                prefill = statistics.median(p for p, _ in r)
                total = statistics.median(t for _, t in r)
                decode = B * (args.new - 1) / max(1e-9, total - prefill)
                rate[name] = decode
                print(
                    f"batch {B:>3} {name:>13}: prefill {B * args.prompt / prefill:10,.0f} tok/s, "
                    f"decode {decode:9,.0f} tok/s ({1000 * (total - prefill) / (args.new - 1):.2f} ms/step)"
                )
            print(f"batch {B:>3} decode ratio llmstack / transformers: {rate['llmstack'] / rate['transformers']:.2f}x")


if __name__ == "__main__":
    main()
