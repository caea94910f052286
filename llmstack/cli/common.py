"""What several commands share: the run directory, training overrides, sampling flags, tokenizer lookup."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llmstack.data.corpus import find_default_corpus
from llmstack.inference.sample import SamplingConfig
from llmstack.paths import data_dir, runs_dir
from llmstack.tokenizer import Tokenizer
from llmstack.training.config import TRAIN_OVERRIDES
from llmstack.training.lora import LLAMA_PROJECTIONS, LoRAConfig

FMT = argparse.RawDescriptionHelpFormatter


def add_run_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--preset", default="tiny", help="model/training preset: tiny (CPU), d12, d20 (GPU)")
    sp.add_argument("--run-dir", default=None, help="run directory (default: runs/<preset>)")


def run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else runs_dir() / args.preset


def add_train_overrides(sp: argparse.ArgumentParser) -> None:
    """Flags that override a stage's TrainConfig (read back by ``train_overrides``)."""
    sp.add_argument("--max-steps", type=int)
    sp.add_argument("--batch-size", type=int, help="rows per micro-batch per process")
    sp.add_argument("--grad-accum", type=int)
    sp.add_argument("--seq-len", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--warmup-steps", type=int)
    sp.add_argument("--schedule", choices=["cosine", "wsd"])
    sp.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], help="autocast dtype (auto: bf16 on CUDA and AMX CPUs)"
    )
    sp.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    sp.add_argument("--eval-every", type=int)
    sp.add_argument("--ckpt-every", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument(
        "--log",
        choices=["jsonl", "tensorboard"],
        help="metrics.jsonl always; tensorboard also writes <run>/tensorboard (`tensorboard --logdir runs`; "
        "pip install tensorboard)",
    )
    sp.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")


def add_loop_levers(sp: argparse.ArgumentParser, chunked_ce: bool = False) -> None:
    """--optimizer for the stages on the shared loop (pretrain, sft); --chunked-ce for pretraining."""
    sp.add_argument("--optimizer", choices=["adamw", "muon"], help="muon: Muon on hidden matrices, AdamW on the rest")
    sp.add_argument(
        "--parallel",
        choices=["ddp", "fsdp"],
        help="under torchrun: ddp replicates the weights and optimizer state on every process; fsdp (FSDP2) "
        "shards them, 1/N each (default ddp)",
    )
    if chunked_ce:
        sp.add_argument(
            "--chunked-ce",
            action="store_true",
            default=None,
            help="compute the loss in row chunks, never the whole B x T x V logits (less memory; faster with "
            "--compile on a GPU; on by default in the d12/d20 presets)",
        )


def add_lora_args(sp: argparse.ArgumentParser) -> None:
    """--lora-rank and its companions, for every post-training stage (read back by ``lora_config``)."""
    g = sp.add_argument_group("LoRA (train a low-rank adapter instead of the whole model)")
    g.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="train a LoRA adapter of rank R on the frozen model (0: the whole model). Checkpoints hold the merged "
        "model and the adapter in PEFT's layout (adapter/: adapter_config.json + adapter_model.safetensors)",
    )
    g.add_argument("--lora-alpha", type=float, default=None, help="the update's scale is alpha / R (default: 2 x R)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input (default 0)")
    g.add_argument(
        "--lora-targets",
        default=",".join(LLAMA_PROJECTIONS),
        metavar="NAMES",
        help=f"comma-separated projections to adapt (default: all of {','.join(LLAMA_PROJECTIONS)})",
    )


def lora_config(args: argparse.Namespace) -> LoRAConfig | None:
    """The LoRA configuration the flags ask for; None for full fine-tuning."""
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (got {args.lora_rank})")
    if not args.lora_rank:
        return None
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    return LoRAConfig(r=args.lora_rank, alpha=alpha, dropout=args.lora_dropout, target_modules=targets)


def add_resume_fallback(sp: argparse.ArgumentParser) -> None:
    """--resume-from-latest-valid, for the stages whose config ``train_overrides`` builds (pretrain, sft)."""
    sp.add_argument(
        "--resume-from-latest-valid",
        action="store_true",
        default=None,
        help="if the newest checkpoint (or checkpoints/LATEST) is damaged, resume from the newest one that reads "
        "back whole; damaged ones are renamed step_N.damaged, never deleted (without it: an error, exit 2)",
    )


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (absent flags are not overrides)."""
    if getattr(args, "no_resume", False) and getattr(args, "resume_from_latest_valid", None):
        raise ValueError("--no-resume and --resume-from-latest-valid contradict each other; pick one")
    return {k: getattr(args, k) for k in TRAIN_OVERRIDES if getattr(args, k, None) is not None}


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """--max-new-tokens, --temperature, --top-k (0: off), --top-p and --seed."""
    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.seed)


def load_tokenizer(spec: str | None, args: argparse.Namespace) -> Tokenizer:
    """A tokenizer directory, ``gpt2`` (the fetched GPT-2 ranks), or the run's own."""
    if spec == "gpt2":
        path = data_dir() / "assets" / "gpt2.tiktoken"
        if not path.exists():
            raise FileNotFoundError(f"{path}: GPT-2 ranks not fetched; run `llmstack data fetch`")
        return Tokenizer.from_tiktoken_file(path, special_tokens={"<|endoftext|>": 50256})
    return Tokenizer.load(Path(spec) if spec else run_dir(args) / "tokenizer")


def corpus_path(args: argparse.Namespace) -> Path:
    if args.corpus:
        p = Path(args.corpus)
        if not p.exists():
            raise FileNotFoundError(f"{p}: corpus file not found (fetch the default one with `llmstack data fetch`)")
        return p
    return find_default_corpus()


def add_rl_args(sp: argparse.ArgumentParser, out: str) -> None:
    sp.add_argument("--preset", default="tiny", choices=["tiny", "gpu"], help="tiny: 2 CPU cores in minutes")
    sp.add_argument("--run-dir", default=None, help="the main job's run (default: runs/tiny)")
    sp.add_argument("--model", help="the SFT policy: any model source (default: <run>/sft)")
    sp.add_argument("--out", help=f"output directory (default: <run>/{out})")
    sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def rl_base(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else runs_dir() / "tiny"


def policy_path(args: argparse.Namespace) -> Path:
    return Path(args.model) if args.model else rl_base(args) / "sft"


def out_dir(args: argparse.Namespace, default: Path) -> Path:
    return Path(args.out) if getattr(args, "out", None) else default
