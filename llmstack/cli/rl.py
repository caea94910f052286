"""Commands for reinforcement learning on verifiable problems: rl (GRPO), ttc (test-time compute)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmstack.cli.common import (
    FMT,
    add_lora_args,
    add_rl_args,
    add_train_overrides,
    lora_config,
    rl_base,
)
from llmstack.rl.stage import evaluate_model, run_rl
from llmstack.rl.ttc import run_ttc, ttc_table


def cmd_rl(args: argparse.Namespace) -> int:

    base = rl_base(args)
    policy = Path(args.model) if args.model else base / "sft"
    tasks = tuple(args.tasks.split(",")) if args.tasks else None
    if args.eval_only:
        metrics = evaluate_model(policy, tasks, args.preset, args.device, args.n_heldout)
        print(f"{policy}: " + ", ".join(f"{k} {v:.1%}" if k.startswith(("pass@", "sampled")) else f"{k} {v:.1f}"
                                        for k, v in metrics.items()))  # fmt: skip
        return 0
    keys = ("group_size", "prompts_per_batch", "temperature", "kl_coef", "clip_eps", "loss_type", "max_new_tokens",
            "tool_credit", "n_train", "n_heldout", "reward_fn", "eval_k_problems", "reward_model")  # fmt: skip
    grpo = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.updates_per_rollout is not None:
        grpo["updates_per_rollout"] = args.updates_per_rollout
    if getattr(args, "seed", None) is not None:  # the problems' order and the rollouts' sampling seeds too
        grpo["seed"] = args.seed
    tkeys = ("max_steps", "grad_accum", "lr", "warmup_steps", "schedule", "dtype", "eval_every", "ckpt_every", "seed")
    train = {k: getattr(args, k) for k in tkeys if getattr(args, k, None) is not None}
    if args.compile:
        train["compile"] = True
    out = Path(args.out) if args.out else base / "rl"
    try:
        summary = run_rl(policy, out, args.preset, tasks=tasks, device=args.device, resume=not args.no_resume,
                         grpo_overrides=grpo, train_overrides=train, lora=lora_config(args))  # fmt: skip
    except FloatingPointError as e:
        print(f"llmstack: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    print(f"results: {out / 'rl_summary.json'}, plot: {summary.plot}, checkpoint: {summary.checkpoint}")
    return 0


def cmd_ttc(args: argparse.Namespace) -> int:

    base = rl_base(args)
    model = Path(args.model) if args.model else base / "sft"
    out = Path(args.out) if args.out else model / "ttc"
    result = run_ttc(
        model, out, tuple(args.tasks.split(",")), n=args.n, n_problems=args.problems, temperature=args.temperature,
        scorers=tuple(args.scorers.split(",")), device=args.device,
    )  # fmt: skip
    print(ttc_table(result))
    print(f"{result.seconds:.0f}s, sampling {result.tok_per_s:,.0f} tok/s; results: {out / 'ttc.json'}, ttc.png")
    return 0


def register(sub) -> None:
    rlp = sub.add_parser(
        "rl",
        help="GRPO on problems with checkable answers (calculator products, reasoning-gym), tools in the rollouts",
        formatter_class=FMT,
        description="""GRPO (DeepSeekMath / R1) through the shared loop: each step samples a group of completions per
training problem with the batched engine (tool calls answered, tool results never trained), rewards
them with a verifier, and takes a policy-gradient step on reward minus the group mean. Held-out
pass@1 (greedy) and pass@k at every --eval-every steps; step 0 is the SFT model. Writes <out>/rl.png
(reward, pass@1/pass@k, response length, KL to the SFT model, entropy), metrics.jsonl, rl_summary.json.
Tasks: basic_arithmetic_3d (reasoning-gym, two 3-digit numbers and + - *; the presets' default), chain_sum,
basic_arithmetic (reasoning-gym, two terms of 1-2 digits), multiply, add (3-digit, calculator).

  llmstack rl                                            # runs/tiny/sft -> runs/tiny/rl (tiny: 2 CPU cores, minutes)
  llmstack rl --eval-only --model runs/tiny/sft          # held-out pass@1 / pass@k of any model, no training
  llmstack rl --eval-only --model runs/tiny/rl
  llmstack rl --tasks multiply,chain_sum --loss dr_grpo --kl-coef 0.02 --out /tmp/rl-drgrpo
  llmstack rl --preset gpu --device cuda --run-dir runs/d20
  llmstack rl --model smollm2 --tasks basic_arithmetic --lora-rank 8 --out runs/smol-rl   # any model, LoRA
  llmstack rl --model runs/tiny/sft --reward-fn my_rewards.py:score                      # your own reward""",
    )
    add_rl_args(rlp, "rl")
    rlp.add_argument("--tasks", help="comma-separated problem sets (default: the preset's; tiny: basic_arithmetic_3d)")
    rlp.add_argument("--eval-only", action="store_true", help="print held-out pass@1 / pass@k of --model and stop")
    rlp.add_argument("--loss", dest="loss_type", choices=["grpo", "dr_grpo", "dapo"], help="loss normalisation")
    rlp.add_argument("--group-size", type=int, help="completions per prompt (default 8)")
    rlp.add_argument("--prompts-per-step", dest="prompts_per_batch", type=int, help="prompts per micro-batch")
    rlp.add_argument("--temperature", type=float, help="rollout temperature (default 1.0)")
    rlp.add_argument("--max-new-tokens", type=int, help="generation budget per completion")
    rlp.add_argument("--kl-coef", type=float, help="k3 KL penalty to the SFT model (default 0: logged only)")
    rlp.add_argument("--clip-eps", type=float, help="PPO ratio clip (default 0.2; 0: off)")
    rlp.add_argument("--updates-per-rollout", type=int, help="optimizer steps per rollout batch (default 1)")
    rlp.add_argument("--tool-credit", type=float, help="reward of a wrong answer after the right tool result")
    rlp.add_argument("--train-problems", dest="n_train", type=int, help="training problems (default 4000)")
    rlp.add_argument("--heldout", dest="n_heldout", type=int, help="held-out problems for pass@1 (default 100)")
    rlp.add_argument(
        "--pass-k-problems", dest="eval_k_problems", type=int, help="held-out problems sampled k times for pass@k"
    )
    rlp.add_argument(
        "--reward-model", metavar="RUN", help="a reward model's run (`llmstack reward-model`) scores the completions"
    )
    rlp.add_argument(
        "--reward-fn",
        metavar="MODULE:FUNCTION",
        help="your reward instead of the verifiers: module:function or file.py:function, called as "
        "function(question, completion, answer) -> float",
    )
    add_train_overrides(rlp)
    add_lora_args(rlp)
    rlp.set_defaults(func=cmd_rl)

    tc = sub.add_parser(
        "ttc",
        help="test-time compute: majority vote and best-of-n against n samples, plotted",
        formatter_class=FMT,
        description="""Sample n completions of held-out problems; accuracy against n for self-consistency (majority
vote over final answers) and best-of-n with each scorer: oracle (the verifier: pass@n, the ceiling)
and logprob (the model's mean log-probability of its own tokens). Writes <out>/ttc.json, ttc.png.

  llmstack ttc                                           # runs/tiny/sft -> runs/tiny/sft/ttc
  llmstack ttc --model runs/tiny/rl --tasks multiply --n 32 --problems 100
  llmstack ttc --model runs/tiny/sft --tasks chain_sum --temperature 0.7 --scorers logprob""",
    )
    add_rl_args(tc, "sft/ttc")
    tc.add_argument("--tasks", default="multiply", help="comma-separated problem sets (default: multiply)")
    tc.add_argument("--n", type=int, default=16, help="samples per problem; curves at powers of two up to n")
    tc.add_argument("--problems", type=int, default=50, help="held-out problems")
    tc.add_argument("--temperature", type=float, default=1.0)
    tc.add_argument("--scorers", default="oracle,logprob", help="best-of-n scorers: oracle, logprob")
    tc.set_defaults(func=cmd_ttc)
