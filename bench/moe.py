"""A mixture of experts against dense models on the main job's data: val bits/byte and tokens/s.

Three pretraining runs of the tiny preset, same data, steps, schedule and seed, through ``run_pretrain``:

- ``moe``: 8 experts of width 352 (half the dense width), 2 per token: each token uses the dense model's
  MLP parameters (equal active), the layer holds 4x of them;
- ``dense``: the tiny preset as is (width 704): equal active parameters to ``moe``;
- ``dense-wide``: width 2,816: equal total parameters to ``moe`` (its routers aside).

    python bench/moe.py                                   # runs/tiny's shards and tokenizer (make run)
    python bench/moe.py --run /tmp/main/tiny --plot docs/img/moe.png

Prints one row per run (params, active params, val bits/byte, tokens/s) and the MoE's routing balance.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from llmstack.data.shards import ShardIndex
from llmstack.io import pyplot, save_png
from llmstack.tokenizer import Tokenizer
from llmstack.training.metrics import read_metrics
from llmstack.training.presets import tiny, with_experts
from llmstack.training.pretrain import run_pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/tiny", help="a main-job run: its shards/ and tokenizer/ are used")
    ap.add_argument("--steps", type=int, default=500, help="the tiny preset's own count: the main job's budget")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", help="write val bits/byte against step for the three runs here (PNG)")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    tok = Tokenizer.load(run / "tokenizer")
    shards = ShardIndex.load(run / "shards")
    dense_cfg = tiny(tok.vocab_size)[0]
    width = dense_cfg.intermediate_size
    moe_cfg = with_experts(dense_cfg, args.experts, 2)
    wide = moe_cfg.moe.n_experts * moe_cfg.moe.expert_size if moe_cfg.moe else width
    variants = {"moe": moe_cfg, "dense": dense_cfg, "dense-wide": replace(dense_cfg, intermediate_size=wide)}
    overrides = dict(max_steps=args.steps, eval_every=max(1, args.steps // 6), ckpt_every=args.steps)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-moe-"))
    rows, curves = [], {}
    for name, cfg in variants.items():
        out = root / name
        summary = run_pretrain(out, tok, shards, "tiny", overrides, "cpu", model_cfg=cfg)
        recs = read_metrics(out / "metrics.jsonl")
        curves[name] = [(r["step"], r["val_bpb"]) for r in recs if r.get("kind") == "eval"]
        balance = [r["moe_load_max"] for r in recs if "moe_load_max" in r]
        rows.append(
            dict(
                run=name,
                params=cfg.num_params(include_embedding=False),
                active=cfg.num_params(include_embedding=False, active=True),
                val_bpb=summary["val_bpb"],
                tok_s=summary["tokens_per_second"],
                load_max_last=balance[-1] if balance else None,
            )
        )
    print(f"\n{'run':<11} {'params':>9} {'active':>9} {'val bpb':>8} {'tok/s':>8}")
    for r in rows:
        params, active = f"{r['params'] / 1e6:.2f}M", f"{r['active'] / 1e6:.2f}M"
        print(f"{r['run']:<11} {params:>9} {active:>9} {r['val_bpb']:>8.3f} {r['tok_s']:>8,.0f}")
    moe_row = rows[0]
    print(f"moe: busiest expert at the end {moe_row['load_max_last']:.2f}x uniform; runs in {root}")
    print(json.dumps(rows))
    if args.plot:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        for name, curve in curves.items():
            ax.plot(*zip(*curve, strict=True), "o-", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("val bits/byte")
        ax.set_title(f"tiny preset, {args.steps} steps: mixture of {args.experts} experts (top-2) vs dense")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        print(f"plot: {save_png(fig, args.plot)}")


if __name__ == "__main__":
    main()
