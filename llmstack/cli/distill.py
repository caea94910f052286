"""The distill command: logit-level knowledge distillation of a teacher into a student (llmstack/chat/distill.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmstack.chat.distill import run_distill
from llmstack.cli.common import FMT, add_train_overrides, train_overrides
from llmstack.paths import runs_dir
from llmstack.training.distill import DistillConfig


def cmd_distill(args: argparse.Namespace) -> int:
    if args.student is None and args.student_depth < 1:
        raise ValueError(f"--student-depth must be >= 1 (got {args.student_depth})")
    distill = DistillConfig(args.kind, args.top_k or None, args.temperature, 1.0 if args.no_teacher else args.alpha)
    student = args.student if args.student is not None else args.student_depth
    default_out = runs_dir() / ("distill-baseline" if args.no_teacher else "distill")
    run_distill(
        args.teacher, student, Path(args.out) if args.out else default_out,
        shards=Path(args.shards) if args.shards else None, corpus=Path(args.corpus) if args.corpus else None,
        distill=distill, overrides=train_overrides(args), device=args.device, resume=not args.no_resume,
    )  # fmt: skip
    return 0


def register(sub) -> None:
    d = sub.add_parser(
        "distill",
        help="logit distillation: a student learns a teacher's next-token distributions on text",
        formatter_class=FMT,
        description="""Train a student to match the teacher's next-token distribution at every position of the text
(forward or reverse KL, optionally over the teacher's top-k tokens, optionally mixed with plain
cross-entropy). The student is a fresh model of --student-depth with the teacher's tokenizer, or
--student SOURCE with that same tokenizer. The text: --shards made with the teacher's tokenizer, or
--corpus (default: the fetched one) tokenized into --shards (default <out>/shards). --no-teacher trains
the same student on the same text with cross-entropy alone: the baseline. docs/distill.md has figures.

  llmstack distill --teacher smollm2 --student-depth 4 --out runs/smol-kd --max-steps 100
  llmstack distill --teacher smollm2 --student-depth 4 --out runs/smol-ce --max-steps 100 --no-teacher \\
      --shards runs/smol-kd/shards
  OMP_NUM_THREADS=1 llmstack distill --teacher runs/d20 --student runs/d8 --kind reverse --top-k 64
  llmstack distill --teacher smollm2 --student-depth 8 --device cuda --batch-size 32 --max-steps 2000""",
    )
    d.add_argument("--teacher", default="smollm2", help="any model source: a run, an HF folder, a .gguf, smollm2")
    d.add_argument("--student-depth", type=int, default=4, help="depth of a fresh student (width 64 x depth)")
    d.add_argument("--student", help="train this model instead (any source with the teacher's tokenizer)")
    d.add_argument(
        "--kind",
        choices=["forward", "reverse"],
        default="forward",
        help="forward: KL(teacher || student), mass-covering; reverse: KL(student || teacher), mode-seeking",
    )
    d.add_argument("--top-k", type=int, default=0, help="the KL over the teacher's top K tokens, renormalised (0: all)")
    d.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of both (the KL is x T^2)")
    d.add_argument("--alpha", type=float, default=0.0, help="weight of plain cross-entropy in the loss (default 0)")
    d.add_argument("--no-teacher", action="store_true", help="cross-entropy only (alpha 1): the baseline")
    d.add_argument("--shards", help="token shards in the teacher's tokenizer (written there from --corpus if absent)")
    d.add_argument("--corpus", help="JSONL corpus to tokenize when there are no shards (default: the fetched one)")
    d.add_argument("--out", help="output run directory (default: runs/distill, runs/distill-baseline)")
    d.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    add_train_overrides(d)
    d.set_defaults(func=cmd_distill)
