"""Commands that train our models: pretrain, sft, interrogate (teaching "I don't know")."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from llmstack.chat.finetune import BUILTIN, is_builtin, mixture_parts, run_sft
from llmstack.chat.mixture import corpus_words, read_conversations
from llmstack.cli.common import (
    FMT,
    add_loop_levers,
    add_lora_args,
    add_resume_fallback,
    add_run_args,
    add_train_overrides,
    load_tokenizer,
    lora_config,
    run_dir,
    train_overrides,
)
from llmstack.data.shards import ShardIndex
from llmstack.hallucination.interrogate import InterrogateConfig, run_interrogation
from llmstack.interop.load import load_ours
from llmstack.paths import runs_dir
from llmstack.security.hierarchy import HIERARCHY_CONVERSATIONS, hierarchy_sets
from llmstack.training.checkpoint import load_meta
from llmstack.training.distributed import DistInfo, pick_device
from llmstack.training.pretrain import run_pretrain


def cmd_pretrain(args: argparse.Namespace) -> int:
    run = run_dir(args)
    tok = load_tokenizer(args.tokenizer, args)
    shards = ShardIndex.load(Path(args.shards) if args.shards else run / "shards")
    experts = None
    if args.experts:
        experts = dict(
            n_experts=args.experts,
            n_active=args.experts_active,
            expert_size=args.expert_size,
            shared_size=args.shared_expert,
            capacity_factor=args.capacity_factor,
            aux_loss_coef=args.balance_coef,
        )
    run_pretrain(run, tok, shards, args.preset, train_overrides(args), args.device, not args.no_resume, experts)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    base = run_dir(args)
    source = args.checkpoint or base
    if args.hierarchy < 0:
        raise ValueError(f"--hierarchy must be >= 0 (got {args.hierarchy})")
    if args.tokenizer:  # a check only: the tokenizer is always the base model's own
        trained_with = load_meta(source).meta.get("tokenizer_fingerprint")
        if load_tokenizer(args.tokenizer, args).fingerprint != trained_with:
            raise ValueError(f"{source} was trained with another tokenizer than {args.tokenizer}")
    for f in args.data:
        if is_builtin(f):
            mixture_parts(f)  # a bad kind is named now, before the model loads
        elif not Path(f).is_file():
            raise FileNotFoundError(f"--data {f}: no such file (or `{BUILTIN}` for the built-in mixture)")
    extra = [c for f in args.extra_conversations for c in read_conversations(f)]  # e.g. from `llmstack synth`
    pages, held_out_pages = hierarchy_sets(args.hierarchy)
    if args.out:
        out = Path(args.out)
    elif args.checkpoint and not (Path(args.checkpoint) / "checkpoints").is_dir():  # not a run of ours
        out = runs_dir() / f"{Path(str(args.checkpoint)).stem}-sft"
    else:
        out = base / "sft"
    run_sft(
        source, out, train_overrides(args), args.device, extra + pages, held_out_pages, not args.no_resume,
        data=args.data, lora=lora_config(args),
    )  # fmt: skip
    return 0


def cmd_interrogate(args: argparse.Namespace) -> int:
    model, tok, bundle = load_ours(args.base or runs_dir() / "tiny" / "sft")
    assert bundle.checkpoint is not None  # load_ours opened one of our runs
    run = bundle.checkpoint.path.parent.parent
    out = Path(args.out) if args.out else run / "interrogate"
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(InterrogateConfig)}  # one flag a field
    cfg = InterrogateConfig(**{k: v for k, v in given.items() if v is not None})
    device = pick_device(args.device)
    meta = {"base_checkpoint": str(bundle.checkpoint.path)}
    report = run_interrogation(
        model.to(device), tok, cfg, out, DistInfo(0, 0, 1, device), corpus_words(), meta,
        progress=not args.no_progress,
    )  # fmt: skip
    print(f"held-out questions ({cfg.held_out_unknown} + {cfg.held_out_taught} people)  stage 1 -> stage 3  (95% CI)")
    for key, r in report.after.results().items():
        lo, hi = r.interval()
        was = report.before.results()[key].accuracy
        print(f"{r.name:<34} {was:6.1%} -> {r.accuracy:6.1%}  [{lo:.1%}, {hi:.1%}]  ({r.correct}/{r.total})")
    verdict = "met" if report.targets_met else "NOT met"
    print(f"targets (>= 80% / >= 80%): {verdict}; {report.seconds['total']:.0f}s")
    print(f"results: {out / 'eval.json'}, {out / 'eval.png'}, {out / 'interrogation.jsonl'}")
    print(f"models: {out / 'knowledge'} (stage 1), {out / 'interrogated'} (stage 3)")
    return 0


def register(sub) -> None:
    pt = sub.add_parser(
        "pretrain",
        help="pretrain a base model on token shards",
        formatter_class=FMT,
        description="""Pretrain a Llama-compatible base model; resumes from <run>/checkpoints if present (a damaged
newest checkpoint is an error; --resume-from-latest-valid resumes from the newest valid one instead).

  llmstack pretrain --preset tiny                                         # CPU
  llmstack pretrain --preset d12 --device cuda                            # one GPU
  torchrun --standalone --nproc_per_node 8 -m llmstack.cli pretrain --preset d20   # 8 GPUs
  torchrun --standalone --nproc_per_node 2 -m llmstack.cli pretrain --preset tiny  # 2 CPU procs
  llmstack pretrain --preset tiny --experts 8 --run-dir runs/tiny-moe    # a mixture of experts (Mixtral's shape)""",
    )
    add_run_args(pt)
    pt.add_argument("--tokenizer")
    pt.add_argument("--shards")
    pt.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    moe = pt.add_argument_group("mixture of experts (every MLP of the preset's model becomes one; docs/moe.md)")
    moe.add_argument("--experts", type=int, default=0, help="experts per layer (0: a dense model)")
    moe.add_argument("--experts-active", type=int, default=2, help="experts each token is routed to")
    moe.add_argument(
        "--expert-size", type=int, default=0, help="each expert's width (0: the dense width / --experts-active)"
    )
    moe.add_argument("--shared-expert", type=int, default=0, help="width of an always-on shared expert (Qwen2-MoE)")
    moe.add_argument(
        "--capacity-factor", type=float, default=0.0, help="cap each expert's tokens in training (0: dropless)"
    )
    moe.add_argument("--balance-coef", type=float, default=0.01, help="weight of the load-balancing loss (0.01)")
    add_train_overrides(pt)
    add_loop_levers(pt, chunked_ce=True)
    add_resume_fallback(pt)
    pt.set_defaults(func=cmd_pretrain)
    sf = sub.add_parser(
        "sft",
        help="supervised finetuning into an assistant (conversations, tool use, identity), full or LoRA",
        formatter_class=FMT,
        description="""Finetune a model on conversations: the built-in mixture (llmstack/chat/mixture.py), your own
files (--data), or both. Any model: our run, a Hugging Face folder, a .gguf file, `smollm2`. Conversations
render in the model's own chat template and only the assistant's turns are trained.

  llmstack sft --run-dir runs/tiny                # base runs/tiny -> runs/tiny/sft (the mixture)
  llmstack sft --extra-conversations data/synth/conversations.jsonl   # + a teacher's (`llmstack synth`)
  llmstack sft --model smollm2 --data mine.jsonl --lora-rank 8 --out runs/smol-mine   # your data, LoRA
  llmstack sft --model path/to/hf-folder --data mine.jsonl --data builtin            # yours + the mixture
  llmstack sft --model smollm2 --lora-rank 8 --lr 1e-3 --max-steps 200 --hierarchy 0 --out runs/smol-assistant \\
      --data builtin:arithmetic=600,identity=600,spelling=600,wording=0.8   # our skills, new wordings too
  torchrun --standalone --nproc_per_node 8 -m llmstack.cli sft --run-dir runs/d20

--data files: JSONL of {"messages": [...]} (OpenAI: system/user/assistant/tool, tool_calls), ShareGPT
{"conversations": [{"from": "human"|"gpt", "value": ...}]}, {"prompt", "completion"} pairs, Alpaca rows,
or .parquet. Bad rows are skipped and counted by reason; 5% of each file is held out for validation.""",
    )
    add_run_args(sf)
    sf.add_argument(
        "--model",
        "--checkpoint",
        dest="checkpoint",
        help="the model to finetune: our run or checkpoint, an HF folder, a .gguf, smollm2 (default: <run>)",
    )
    sf.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE",
        help=f"train on this conversation file (repeatable); `{BUILTIN}` names the built-in mixture, "
        f"`{BUILTIN}:identity,spelling` some of its kinds (arithmetic, identity, spelling, gsm, chitchat, "
        f"reasoning), `{BUILTIN}:arithmetic=600,identity=600` with their numbers of conversations. Without "
        "--data: the mixture alone",
    )
    sf.add_argument("--tokenizer")
    sf.add_argument("--out", help="output run directory (default: <run>/sft)")
    sf.add_argument("--device", default=None)
    sf.add_argument(
        "--extra-conversations",
        action="append",
        default=[],
        metavar="FILE",
        help='JSONL of {"messages": [...]} (OpenAI format, e.g. from `llmstack synth`) added to the training '
        "mixture; repeatable",
    )
    sf.add_argument(
        "--hierarchy",
        type=int,
        default=HIERARCHY_CONVERSATIONS,
        metavar="N",
        help="instruction-hierarchy conversations added to the mixture (llmstack/security/hierarchy.py): pages, "
        "often datamarked, whose injected instructions the assistant answers around instead of following "
        f"(default {HIERARCHY_CONVERSATIONS}; 0 leaves them out); `llmstack redteam` measures the effect",
    )
    add_train_overrides(sf)
    add_loop_levers(sf)
    add_lora_args(sf)
    add_resume_fallback(sf)
    sf.set_defaults(func=cmd_sft)
    it = sub.add_parser(
        "interrogate",
        help="hallucinations: teach a model to say it does not know (interrogation, Llama 3's recipe), measured",
        formatter_class=FMT,
        description="""Stage 1 teaches the model facts about fictional people; stage 2 asks it about them and about
people it was never taught; stage 3 trains "I don't know ..." where it answered wrong and keeps its
own answers where it was right. Printed: on people never interrogated, how often it says it does not
know about those it was never taught, and how often it still answers what it knew. A finished stage
in --out is loaded, not retrained.

  llmstack interrogate                                  # runs/tiny/sft -> runs/tiny/sft/interrogate
  llmstack interrogate --model runs/tiny --out /tmp/idk --unknown 300 --refusal-steps 400
  OMP_NUM_THREADS=1 llmstack interrogate                # on a CPU shared with other jobs
  llmstack chat --model runs/tiny/sft/interrogate/interrogated --prompt "Where does Kalomir live?\"""",
    )
    it.add_argument("--model", "--base", dest="base", help="the model to start from (default: runs/tiny/sft)")
    it.add_argument("--out", help="output directory (default: <run of --base>/interrogate)")
    it.add_argument("--taught", type=int, help="people whose facts stage 1 teaches (default 60)")
    it.add_argument("--unknown", type=int, help="people never taught (default 400)")
    it.add_argument("--held-out-taught", type=int, help="taught people never interrogated: the eval's (default 30)")
    it.add_argument("--held-out-unknown", type=int, help="never-taught people never interrogated (default 100)")
    it.add_argument("--knowledge-steps", type=int, help="stage 1 optimizer steps (default 400)")
    it.add_argument("--refusal-steps", type=int, help="stage 3 optimizer steps (default 500)")
    it.add_argument("--batch-size", type=int, help="conversations per step (default 32)")
    it.add_argument("--lr", type=float, help="stage 1 peak learning rate (default 3e-3)")
    it.add_argument("--refusal-lr", type=float, help="stage 3 peak learning rate (default 1e-3)")
    it.add_argument("--mixture", type=int, help="assistant-mixture conversations kept in each stage (default 200)")
    it.add_argument("--seed", type=int, help="the knowledge source, data order and splits (default 0)")
    it.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    it.add_argument("--no-progress", action="store_true", help="no progress bars")
    it.set_defaults(func=cmd_interrogate)
