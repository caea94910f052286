"""The main job: every stage end to end on the tiny preset (what `make run` does)."""

from __future__ import annotations

import argparse

from llmstack.cli.common import (
    add_run_args,
    run_dir,
)
from llmstack.pipeline import run_pipeline


def cmd_run(args: argparse.Namespace) -> int:

    return run_pipeline(
        preset=args.preset,
        run_dir=run_dir(args),
        max_steps=args.max_steps,
        sft_steps=args.sft_steps,
        rl_steps=args.rl_steps,
    )


def register(sub) -> None:
    r = sub.add_parser("run", help="the whole pipeline end to end (what `make run` does)")
    add_run_args(r)
    r.add_argument("--max-steps", type=int, help="override the preset's pretraining steps")
    r.add_argument("--sft-steps", type=int, help="override the SFT steps")
    r.add_argument("--rl-steps", type=int, help="override the GRPO steps (default 30)")
    r.set_defaults(func=cmd_run)
