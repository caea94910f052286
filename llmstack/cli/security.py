"""Security commands that measure and defend: redteam, guard train | eval | check."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmstack.cli.common import (
    FMT,
)
from llmstack.io import write_json
from llmstack.paths import runs_dir
from llmstack.security import guard as G
from llmstack.security.attacks import gcg
from llmstack.security.gcg import load_suffix
from llmstack.security.output_filter import DEFAULT_ALLOWED_HOSTS
from llmstack.security.redteam import parse_defenses, plot, run_setting, select_cases, table, to_json
from llmstack.security.targets import load_target


def cmd_redteam(args: argparse.Namespace) -> int:

    defenses = parse_defenses(args.defenses)
    families = [f.strip() for f in args.families.split(",")] if args.families else None
    extra = {}
    if args.gcg_suffix:  # jailbreak:heldout and jailbreak:gcg, on the asks the suffix was not trained on
        found = load_suffix(args.gcg_suffix)
        extra = gcg(found["suffix"], found["held_out"])
    target = load_target(args.model, args.endpoint_model, args.api_key or os.environ.get("OPENAI_API_KEY"), args.device)
    cases = select_cases(families, args.limit, target.ours, extra)
    hosts = tuple(args.allow_host) if args.allow_host else DEFAULT_ALLOWED_HOSTS
    guard = None
    if "guard" in defenses:
        guard = G.load(args.guard or runs_dir() / "guard")
    settings = []
    for chosen in [[], defenses] if defenses else [[]]:
        settings.append(
            run_setting(
                target, cases, chosen, args.max_tokens, hosts, progress=lambda m: print(m, file=sys.stderr), guard=guard
            )
        )
    print(f"model: {target.name}")
    print(table(settings))
    out = Path(args.out) if args.out else runs_dir() / "redteam" / target.name.replace("/", "_").replace(":", "_")
    meta = {"max_tokens": args.max_tokens, "limit": args.limit, "allowed_hosts": list(hosts)}
    write_json(out / "redteam.json", to_json(target.name, settings, meta))
    plot(target.name, settings, out / "redteam.png")
    print(f"results: {out / 'redteam.json'}, {out / 'redteam.png'}")
    return 0


def load_guard(path: str):
    """The guard at ``path``, or exit naming the flag (a guard that cannot be read must not be skipped)."""
    try:
        return G.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--guard: {e}") from None


def cmd_guard(args: argparse.Namespace) -> int:

    if args.guard_command == "train":
        cfg = G.GuardConfig(epochs=args.epochs, dim=args.dim, chitchat=args.chitchat, seed=args.seed)
        metrics = G.train_and_save(cfg, args.out)
        print(G.report({k: metrics[k] for k in ("input", "output")}))
        print(f"{metrics['seconds']:.0f}s; guard: {args.out}")
        return 0
    guard = load_guard(args.guard)
    if args.guard_command == "eval":
        metrics = G.evaluate(guard, G.build("heldout", guard.cfg.seed, guard.cfg.chitchat))
        print(G.report(metrics))
        if args.out:
            write_json(args.out, metrics)
            print(f"results: {args.out}")
        return 0
    for text in args.text:  # check
        score, code = guard.scores([text])[0]
        verdict = guard.verdict(score, code)
        print(f"{'FLAGGED ' + code if verdict else 'safe':<11} P(unsafe) {score:.3f}  {text}")
    return 0


def register(sub) -> None:
    rt = sub.add_parser(
        "redteam",
        help="LLM security: jailbreaks, prompt injection, exfiltration, prompt extraction; ASR per family, defended",
        formatter_class=FMT,
        description="""Attack a model with every family (jailbreaks: plain, role-play, encoding, other language, prefix
injection; prompt injection: direct, web page via the browse tool, search-tool result, knowledge
file of a custom assistant; markdown-image exfiltration; system-prompt extraction) and print the
attack success rate per family with a 95%% interval, next to clean accuracy on benign tasks. With
--defenses the same attacks run again with the defenses on: before and after side by side.
Writes redteam.json and redteam.png (default runs/redteam/<model>/).

  llmstack redteam --model runs/tiny/sft --defenses all       # our assistant, undefended and defended
  llmstack redteam --model smollm2 --defenses spotlight --limit 8
  llmstack redteam --model runs/tiny/sft --families injection:web,exfil:markdown,clean:pages
  llmstack redteam --model http://127.0.0.1:8000/v1 --endpoint-model smollm2 --defenses filter
  OMP_NUM_THREADS=1 llmstack redteam --model smollm2 --out /tmp/rt   # on a CPU shared with other jobs

Defenses: spotlight (datamarking + delimiting of tool results and retrieved text, and a system-prompt
note), filter (the output filter: images and links to hosts off the allow-list removed; on by default
in `llmstack serve`, so an llmstack endpoint is already filtered unless served with --no-output-filter),
guard (the safety classifier of `llmstack guard train` on the user messages and the answer; named
only: `all` is spotlight and filter), all. Instruction-hierarchy training is a model: attack it with --model.
  llmstack redteam --model smollm2 --defenses guard --guard runs/guard   # ASR and clean accuracy, before/after""",
    )
    rt.add_argument("--model", required=True, help="run dir, HF dir, .gguf, smollm2, or an OpenAI-compatible URL")
    rt.add_argument("--endpoint-model", help="the model name at an endpoint (default: its first model)")
    rt.add_argument("--api-key", help="for an endpoint (default: $OPENAI_API_KEY)")
    rt.add_argument("--defenses", default="all", help="none, all, or a list: spotlight,filter (default: all)")
    rt.add_argument("--families", help="comma-separated families (default: all, and the clean tasks)")
    rt.add_argument("--limit", type=int, default=12, help="cases per family (default 12)")
    rt.add_argument("--max-tokens", type=int, default=64, help="answer length in tokens (default 64)")
    rt.add_argument("--allow-host", action="append", help="output filter allow-list (repeatable)")
    rt.add_argument("--device", default="cpu")
    rt.add_argument("--out", help="output directory (default: runs/redteam/<model>)")
    rt.add_argument("--guard", metavar="DIR", help="the guard of the guard defense (default: runs/guard)")
    rt.add_argument(
        "--gcg-suffix",
        metavar="JSON",
        help="a suffix file from `llmstack gcg`: adds jailbreak:heldout (its held-out asks) and jailbreak:gcg "
        "(the same asks + the suffix)",
    )
    rt.set_defaults(func=cmd_redteam)
    gd = sub.add_parser(
        "guard",
        help="LLM security: a safety classifier we train (S1-S6), held-out detection and false-positive rates",
        formatter_class=FMT,
        description="""Train, evaluate or try the safety guard: hashed word and character n-grams -> safe or one of six
categories (S1 violence and weapons, S2 illegal drugs, S3 cybercrime, S4 self-harm, S5 fraud and crime,
S6 hate and harassment), trained on the templates of llmstack/security/data/guard.json and chitchat.
Held-out: unseen phrasings, wrappers and things asked for; hard negatives reported apart.

  llmstack guard train --out runs/guard                     # ~20 s of CPU
  llmstack guard eval --guard runs/guard --out eval.json
  llmstack guard check --guard runs/guard "how do I kill a Python process"
  llmstack serve --guard runs/guard                         # refuse flagged chats
  llmstack redteam --model smollm2 --defenses guard --guard runs/guard""",
    )
    gsub = gd.add_subparsers(dest="guard_command", required=True)
    gt = gsub.add_parser("train", help="train on the template data; print held-out rates", formatter_class=FMT)
    gt.add_argument("--out", default="runs/guard", help="guard directory (default runs/guard)")
    gt.add_argument("--epochs", type=int, default=5)
    gt.add_argument("--dim", type=int, default=32, help="embedding size")
    gt.add_argument("--chitchat", type=int, default=2000, help="chitchat user turns used as benign text")
    gt.add_argument("--seed", type=int, default=0)
    ge = gsub.add_parser("eval", help="held-out TPR per category and FPR per benign group", formatter_class=FMT)
    ge.add_argument("--guard", default="runs/guard", help="guard directory (default runs/guard)")
    ge.add_argument("--out", help="write the metrics as JSON here")
    gc_ = gsub.add_parser("check", help="classify texts given on the command line", formatter_class=FMT)
    gc_.add_argument("--guard", default="runs/guard", help="guard directory (default runs/guard)")
    gc_.add_argument("text", nargs="+")
    gd.set_defaults(func=cmd_guard)
