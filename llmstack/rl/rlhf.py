"""RLHF: the policy samples, the reward model scores, a KL penalty keeps it near the SFT model.

llmstack rlhf --model runs/tiny/sft --reward-model runs/tiny/rm          # -> runs/tiny/rlhf
llmstack rlhf --kl-coef 0 --max-steps 300 --out runs/tiny/rlhf-hack      # over-optimisation, made visible

Each step: ``prompts_per_step`` arithmetic questions, ``group`` replies to each sampled by the
batched engine (tools running); reward = RM score - kl_coef * log(pi / pi_ref) summed over the reply
(InstructGPT's KL-penalised reward, estimated on the sample); advantage = reward minus the mean of
its group (a baseline per prompt, as in GRPO / RLOO), divided by the group's std (``scale_rewards``);
loss = -advantage x log-probability of the tokens the model wrote, averaged over those tokens (tool
results are not trained on). The gold judge grades the same replies, for the record only: the policy never sees it.

Reward hacking: the RM is a proxy learnt from a few hundred pairs. Optimised hard (no KL), the
policy drifts where the RM was never taught; ``plot_overoptimisation`` draws the held-out RM and
gold scores over steps and marks the step after which gold falls while the RM still rises.

Iterated RLHF (``refresh_every``, as Llama 2 trained a new RM on each week's comparisons of the
newest policy): every so many steps the gold judge, the labeler, ranks the replies of the rollouts
since the last refresh (``gold_pairs``), and the RM trains on those pairs and on earlier ones drawn
at random, ``refresh_replay`` per new pair (``refresh_reward_model``, ``out/rm-refresh/step_N``). Its
accuracy on the new pairs before training says how far the policy has drifted from what the RM
knew. The policy still sees only the RM; the labels cost what a labeler's time would, and the
summary counts them (``refresh_labels``).

What is not here: PPO's clipped ratio and value head (one gradient step per batch of rollouts, so
the policy that sampled is the one being updated), reward whitening, adaptive KL.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from llmstack.chat.template import format_of
from llmstack.interop.load import load_trainable
from llmstack.io import atomic_write, pyplot, save_png, write_json
from llmstack.model.llama import GPT
from llmstack.rl.dpo import sequence_logprobs
from llmstack.rl.grpo import group_advantages, policy_loss, token_logprobs
from llmstack.rl.preferences import (
    HELDOUT_SEED,
    PREF_SEED,
    ArithmeticProblem,
    arithmetic_problems,
    gold_pairs,
    gold_score,
    mistake_probe,
    read_pairs,
    sample_tokens,
    score_policy,
    write_pairs,
)
from llmstack.rl.reward_model import (
    PROBE_QUESTIONS,
    RewardScorer,
    RewardTask,
    encode_pairs,
    load_reward_model,
    pairwise_accuracy,
    save_reference,
)
from llmstack.rl.reward_model import preset as rm_preset
from llmstack.training.checkpoint import load_meta
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import train
from llmstack.training.lora import LoRAConfig, apply_lora
from llmstack.training.metrics import read_metrics
from llmstack.training.sft import IGNORE, collate

Reward = Callable[[Sequence[str], Sequence[str]], list[float]]


@dataclass
class RLHFConfig:
    prompts_per_step: int = 8
    group: int = 8  # replies sampled per prompt
    temperature: float = 1.0
    kl_coef: float = 0.1
    max_new_tokens: int = 48
    eval_temperature: float = 1.0  # held-out replies are sampled as in training (seeded): what the RM is pushed on
    # divide each group's advantages by its std (GRPO): the RM's margins between replies to one question
    # are small next to the spread of the KL term across questions, and unscaled they barely move the policy
    scale_rewards: bool = True
    # iterated RLHF (Llama 2's rounds, InstructGPT's continued labeling): every `refresh_every` steps the
    # gold judge labels pairs among the last rollouts and the RM trains `refresh_steps` more steps on them
    # (and replayed earlier ones), so it learns the policy's new mistakes before the policy exploits them
    # 0: never
    refresh_every: int = 0
    refresh_steps: int = 100
    refresh_lr: float = 1e-4
    # earlier pairs replayed per new pair at a refresh (drawn at random from the RM's own and earlier
    # refreshes'): the new pairs are a tenth of the pool or less, and 100 steps over all of it barely see them
    refresh_replay: int = 3
    eval_samples: int = 1  # replies sampled per held-out question at each evaluation


def policy_gradient_loss(
    model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor, adv_B: torch.Tensor
) -> torch.Tensor:
    """-advantage x log p(token) over the trained tokens of all rows / their number: GRPO's token-level
    ("dapo") loss on fresh rollouts (one update per rollout, so the ratio is 1 and no clip applies)."""
    logp, _ = token_logprobs(model, x_BT, y_BT)
    loss, _ = policy_loss(logp, logp.detach(), adv_B, y_BT != IGNORE, "dapo")
    return loss


class RLHFTask:
    name = "rlhf"

    def __init__(
        self,
        policy: GPT,
        reward: Reward,
        tok: Any,
        problems: Sequence[ArithmeticProblem],
        heldout: Sequence[ArithmeticProblem],
        cfg: TrainConfig,
        rl: RLHFConfig,
        dist: DistInfo,
    ) -> None:
        if dist.enabled:
            raise ValueError("rlhf runs in one process (its rollouts are not sharded across ranks)")
        self.policy, self.reward, self.tok, self.rl = policy, reward, tok, rl
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False)  # frozen: the SFT model
        self.ctx = policy.config.max_seq_len
        self.problems, self.heldout = list(problems), list(heldout)
        self.fmt = format_of(tok)
        self.pad = self.fmt.pad_id
        self.device, self.seed = dist.device, cfg.seed
        self.cursor = 0  # prompts consumed
        self.history: list[dict[str, float]] = []  # per step: the rollouts' mean RM, gold, KL
        # (step, problem, replies) of the steps since the last refresh boundary: what the next refresh labels
        self.rollouts: list[tuple[int, ArithmeticProblem, list[str]]] = []

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rl, n = self.rl, len(self.problems)
        batch = [self.problems[(self.cursor + i) % n] for i in range(rl.prompts_per_step)]
        prompts = [p.prompt for p in batch]
        seed = self.seed * 1_000_003 + self.cursor  # fresh rollouts each step, reproducible
        sampled = sample_tokens(
            self.policy, self.tok, prompts, rl.group, rl.temperature, seed, rl.max_new_tokens, top_k=None
        )
        self.cursor += rl.prompts_per_step
        flat_prompts = [p for p in prompts for _ in range(rl.group)]
        flat = [self.tok.decode([t for t in gen if t != self.tok.bos_id]) for _, gen, _ in sampled]
        replies = [flat[i : i + rl.group] for i in range(0, len(flat), rl.group)]
        # trained on exactly the tokens sampled (not a re-encoding of their text); tool results masked out
        rows = [(p + g, [0] * len(p) + [0 if f else 1 for f in forced]) for p, g, forced in sampled]
        x, y = collate(rows, self.pad)
        x, y = x[:, : self.ctx].to(self.device), y[:, : self.ctx].to(self.device)  # (B, T): padding past ctx cut
        with torch.no_grad():
            kl = sequence_logprobs(self.policy, x, y) - sequence_logprobs(self.ref, x, y)  # (B,) log pi/pi_ref
        rm = torch.tensor(self.reward(flat_prompts, flat), device=self.device)
        adv = group_advantages((rm - rl.kl_coef * kl).view(-1, rl.group), scale=rl.scale_rewards).reshape(-1)
        gold = [gold_score(p, r).score for p, g in zip(batch, replies, strict=True) for r in g]
        step = self.cursor // rl.prompts_per_step  # this step's number, 1-based, the same after a resume
        if rl.refresh_every:  # kept for the next RM refresh only: the window since the last boundary
            since = (step - 1) // rl.refresh_every * rl.refresh_every
            self.rollouts = [r for r in self.rollouts if r[0] > since]
            self.rollouts += [(step, p, g) for p, g in zip(batch, replies, strict=True)]
        self.history.append(
            {
                "rm": float(rm.mean()),
                "gold": sum(gold) / len(gold),
                "kl": float(kl.mean()),
                "step": step,
            }
        )
        return x, y, adv

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, int]:
        x, y, adv = batch
        return policy_gradient_loss(model, x, y, adv), int((y != IGNORE).sum())

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        rl = self.rl
        s = score_policy(
            model, self.tok, self.heldout, rl.eval_temperature, reward=self.reward, samples=rl.eval_samples
        )
        out = s.as_dict("heldout_")
        if self.history:
            out["rollout_kl"] = self.history[-1]["kl"]
        return out

    def state_dict(self) -> dict[str, Any]:
        # the rollouts since the last refresh go with the checkpoint: a resumed run still labels them
        rollouts = [[step, p.prompt, p.a, p.b, p.op, list(replies)] for step, p, replies in self.rollouts]
        return {"cursor": self.cursor, "rollouts": rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        rows = state.get("rollouts", [])
        self.rollouts = [(int(step), ArithmeticProblem(q, a, b, op), replies) for step, q, a, b, op, replies in rows]


# ----------------------------------------------------------------------------- over-optimisation
def overoptimisation_point(steps: Sequence[int], rm: Sequence[float], gold: Sequence[float]) -> int | None:
    """The step where gold peaks, if after it gold falls while the RM ends higher than it was there
    (Goodhart: the proxy keeps rising, the true objective falls); else None."""
    if len(steps) < 3:
        return None
    peak = max(range(len(gold)), key=lambda i: gold[i])
    if peak == len(gold) - 1:
        return None
    later = range(peak + 1, len(gold))
    gold_falls = min(gold[i] for i in later) < gold[peak] - 0.05 and gold[-1] < gold[peak]
    rm_rises = max(rm[i] for i in later) > rm[peak]
    return steps[peak] if gold_falls and rm_rises else None


def plot_overoptimisation(
    evals: Sequence[dict[str, float]], png_path: str | Path, title: str = "", refreshes: Sequence[int] = ()
) -> int | None:
    """Held-out RM score and gold score against step (two axes); the over-optimisation point marked,
    and the steps after which the RM was refreshed (each RM score is the RM's of its time)."""
    plt = pyplot()

    rows = [e for e in evals if "heldout_rm" in e and "heldout_gold" in e]
    steps = [int(e["step"]) for e in rows]
    rm, gold = [e["heldout_rm"] for e in rows], [e["heldout_gold"] for e in rows]
    mark = overoptimisation_point(steps, rm, gold)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, rm, "o-", color="tab:blue", label="reward model score (the proxy)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward model score", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, gold, "s-", color="tab:red", label="gold score (the rubric)")
    ax2.set_ylabel("gold score (labeling.md rubric)", color="tab:red")
    if mark is not None:
        ax.axvline(mark, color="black", ls="--", lw=1)
        ax.annotate(
            f"step {mark}: gold falls from here\nwhile the RM score keeps rising",
            xy=(mark, ax.get_ylim()[0]),
            xytext=(6, 10),
            textcoords="offset points",
            fontsize=9,
        )
    for i, at in enumerate(refreshes):
        ax.axvline(at, color="tab:green", ls=":", lw=1.2, label="RM refreshed on new rollouts" if i == 0 else None)
    fig.legend(loc="upper left", bbox_to_anchor=(0.08, 0.92), fontsize=9)
    ax.set_title(title or "RLHF against a learnt reward model: held-out scores")
    fig.tight_layout()
    save_png(fig, Path(png_path))
    return mark


def preset(name: str) -> tuple[TrainConfig, RLHFConfig]:
    """``tiny``: 100 steps of 8 x 8 rollouts, the RM refreshed every 25, ~7 min on 2 CPU cores (docs/preferences.md:
    without the refreshes, at this lr and KL, the policy hacks the RM by step 100); ``gpu``: 32 x 16
    rollouts, 500 steps, a refresh every 100."""
    if name == "tiny":
        train = TrainConfig(
            max_steps=100, batch_size=64, seq_len=256, lr=5e-5, warmup_steps=5, weight_decay=0.0, min_lr_ratio=1.0,
            eval_every=25, ckpt_every=0, eval_batches=1, grad_clip=1.0,
        )  # fmt: skip
        return train, RLHFConfig(kl_coef=0.05, refresh_every=25)
    if name == "gpu":
        train = TrainConfig(
            max_steps=500, batch_size=512, seq_len=512, lr=5e-5, warmup_steps=10, weight_decay=0.0, min_lr_ratio=1.0,
            eval_every=25, ckpt_every=100, eval_batches=1, dtype="bfloat16",
        )  # fmt: skip
        return train, RLHFConfig(prompts_per_step=32, group=16, refresh_every=100)
    raise ValueError(f"unknown preset {name!r}; choose tiny or gpu")


@dataclass
class Refresh:
    """One RM refresh of iterated RLHF: the pairs the gold judge made from the last rollouts, and how
    the RM ranked them before and after (before: how far the policy had drifted from what it knew)."""

    step: int
    new_pairs: int
    pool: int  # pairs the refreshed RM trained on: the new ones and earlier ones replayed
    accuracy_before: float  # the previous RM on the new pairs
    accuracy_after: float  # the refreshed RM on them (training data: a check that it learnt them)
    heldout_accuracy: float  # the refreshed RM on the original held-out pairs
    path: str
    probe: dict[str, float] = field(default_factory=dict)  # the refreshed RM's ``mistake_probe``


def refresh_reward_model(
    prev: str | Path,
    step: int,
    rollouts: Sequence[tuple[ArithmeticProblem, Sequence[str]]],
    base_pairs: str | Path,
    out: Path,
    cfg: TrainConfig,
    tok: Any,
    dist: DistInfo,
    log: Callable[[str], None] = print,
    replay: int = 3,
    probe: Sequence[ArithmeticProblem] = (),
) -> Refresh | None:
    """Label pairs among ``rollouts`` with the gold judge (``gold_pairs``), then train the RM at ``prev``
    ``cfg.max_steps`` more steps on them plus ``replay`` times as many drawn from ``base_pairs/train.jsonl``
    and every earlier refresh's pairs under ``out``; the new RM is ``out/step_<step>``. Resumable: the
    pairs are written before training, and a refresh that finished is only loaded. None when there is
    nothing to label. ``probe``: questions whose built mistakes the new RM is probed with."""
    here = out / f"step_{step:06d}"
    if not (here / "pairs.jsonl").exists():
        if not rollouts:
            log(f"rlhf: no rollouts since the last refresh to label at step {step} (a resumed run); RM kept")
            return None
        problems, replies = zip(*rollouts, strict=True)
        new = gold_pairs(problems, replies, seed=step)
        if not new:
            log(f"rlhf: the gold judge found no pair among the rollouts at step {step}; RM kept")
            return None
        write_pairs(here / "pairs.jsonl", new)
    new = read_pairs(here / "pairs.jsonl")
    earlier = sorted(p for p in out.glob("step_*/pairs.jsonl") if p.parent.name < here.name)
    old = [*read_pairs(Path(base_pairs) / "train.jsonl"), *(x for f in earlier for x in read_pairs(f))]
    pool = [*random.Random(step).sample(old, min(len(old), replay * len(new))), *new]
    val = read_pairs(Path(base_pairs) / "heldout.jsonl")
    rm, prev_ckpt = load_reward_model(str(prev), dist.device)
    fmt = format_of(tok)
    fmt_new, _ = encode_pairs(new, fmt, rm.config.max_seq_len)
    pad = fmt.pad_id
    before, _ = pairwise_accuracy(rm, fmt_new, pad)
    if rm.reference is not None and not (here / "reference" / "model.safetensors").exists():
        save_reference(load_meta(prev_ckpt.path.parent.parent / "reference"), here)  # the same frozen SFT copy
    fitting, _ = encode_pairs(pool, fmt, rm.config.max_seq_len)
    if not fitting:
        log(f"rlhf: no pair of the refresh at step {step} fits the RM's context; RM kept")
        return None
    cfg = replace(cfg, batch_size=min(cfg.batch_size, len(fitting)))  # a small run's refresh: few pairs
    task = RewardTask(pool, val, tok, cfg, dist, rm.config.max_seq_len)
    meta = {**prev_ckpt.meta, "refreshed_at_rlhf_step": step, "refresh_pairs": len(new)}
    for key in ("model_config", "train_config", "task_state", "step"):
        meta.pop(key, None)
    rm.train()
    train(rm, task, cfg, here, dist, meta=meta, resume=True)
    rm.eval()
    after, _ = pairwise_accuracy(rm, fmt_new, pad)
    held, _ = pairwise_accuracy(rm, task.val, pad)
    rates = mistake_probe(RewardScorer(rm, tok), probe) if probe else {}
    r = Refresh(step, len(new), len(task.train), before, after, held, str(here), rates)
    log(f"rlhf: RM refresh at step {step}: {r.new_pairs} new gold pairs from the rollouts (+ {r.pool - r.new_pairs} "
        f"earlier), ranked right by the RM {before:.0%} before and {after:.0%} after; held-out {held:.1%} "
        f"-> {here}")  # fmt: skip
    if rates:
        log("rlhf: a built mistake outscores the right reply: " + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()))
    return r


def _check_rounds(out: Path, rl: RLHFConfig, questions: str) -> None:
    """A run in rounds resumes only with the rounds it was started with: other boundaries would label
    the wrong rollouts and chain refreshed RMs the policy never trained against."""
    meta = load_meta(out).meta
    was = meta.get("rlhf", {})
    for key in ("refresh_every", "refresh_replay", "refresh_steps"):
        if was.get(key, getattr(rl, key)) != getattr(rl, key):
            raise ValueError(f"{out} was run with {key} {was[key]}, not {getattr(rl, key)}: resume it with the same, "
                             f"or give a new --out")  # fmt: skip
    if meta.get("questions", questions) != questions:
        raise ValueError(f"{out} was run on {meta['questions']} questions, not {questions}; give a new --out")


def _write_history(path: Path, history: Sequence[dict[str, float]]) -> None:
    """Each step's rollout statistics; a resumed run keeps the steps it did not redo."""
    first = min((h["step"] for h in history), default=float("inf"))
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(row, dict) and row.get("step", first) < first:
                kept.append(row)
    with atomic_write(path) as f:
        f.writelines(json.dumps(h) + "\n" for h in [*kept, *history])


def run_rlhf(
    policy: str | Path,
    reward_model: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    rl: RLHFConfig,
    dist: DistInfo,
    heldout: int = 200,
    resume: bool = True,
    log: Callable[[str], None] = print,
    questions: str | None = None,
    pairs: str | Path | None = None,
    lora: LoRAConfig | None = None,
) -> dict[str, Any]:
    """RLHF from ``policy`` (any model source; the whole model or a LoRA adapter) against ``reward_model``;
    held-out RM and gold scores every ``cfg.eval_every`` steps, ``out/overoptimisation.png``,
    ``out/rollouts.jsonl``, ``out/summary.json``. ``questions``: the question set (``QUESTION_SETS``); by
    default the one the RM's pairs were drawn on. With ``rl.refresh_every``, the RM is retrained every so
    many steps (``refresh_reward_model``) on ``pairs`` (default: the RM's own) and the gold judge's pairs of
    the rollouts; ``out/rm-refresh``."""
    out = Path(out)
    if min(rl.refresh_every, rl.refresh_replay) < 0 or min(rl.refresh_steps, rl.eval_samples) < 1:
        raise ValueError(
            f"refresh_every and refresh_replay must be >= 0, refresh_steps and eval_samples >= 1 (got "
            f"{rl.refresh_every}, {rl.refresh_replay}, {rl.refresh_steps}, {rl.eval_samples})"
        )
    model, tok, bundle = load_trainable(policy, dist.device)
    base = str(bundle.checkpoint.path if bundle.checkpoint else bundle.source)
    if lora:
        apply_lora(model, lora)
    rm, rm_ckpt = load_reward_model(str(reward_model), dist.device)
    if rm_ckpt.meta.get("tokenizer_fingerprint") != tok.fingerprint:
        raise ValueError(f"{rm_ckpt.path}: the reward model uses another tokenizer than {base}")
    base_pairs = Path(pairs or rm_ckpt.meta.get("pairs", ""))
    if 0 < rl.refresh_every < cfg.max_steps and not (base_pairs / "train.jsonl").exists():
        raise FileNotFoundError(
            f"{base_pairs / 'train.jsonl'}: refreshing the reward model needs the pairs it was trained on (--pairs)"
        )
    bundle.copy_tokenizer(out)
    questions = questions or rm_ckpt.meta.get("questions", "mixture")
    problems = arithmetic_problems(max(1000, rl.prompts_per_step * cfg.max_steps), PREF_SEED + 1, questions)
    held = arithmetic_problems(heldout, HELDOUT_SEED, questions)
    task = RLHFTask(model, RewardScorer(rm, tok), tok, problems, held, cfg, rl, dist)
    refresh = f", the RM refreshed every {rl.refresh_every} steps" if rl.refresh_every else ""
    log(f"rlhf: {rl.prompts_per_step} x {rl.group} rollouts a step on {questions} questions, kl_coef {rl.kl_coef}, "
        f"{cfg.max_steps} steps, reward model {rm_ckpt.path}{refresh} -> {out}")  # fmt: skip
    meta = {"stage": "rlhf", "tokenizer_fingerprint": tok.fingerprint, "base_checkpoint": base,
            "reward_model": str(rm_ckpt.path), "rlhf": asdict(rl), "questions": questions,
            **bundle.format_meta(), **({"lora": asdict(lora)} if lora else {})}  # fmt: skip
    if rl.refresh_every and (out / "checkpoints").exists():
        if not resume:
            raise ValueError(f"{out} holds an RLHF run already; a run in rounds resumes it, or give a new --out")
        _check_rounds(out, rl, questions)
    rm_cfg = replace(
        rm_preset("tiny"), max_steps=rl.refresh_steps, lr=rl.refresh_lr, warmup_steps=10, eval_every=0,
        dtype=cfg.dtype, seed=cfg.seed,
    )  # fmt: skip
    ends = [*range(rl.refresh_every, cfg.max_steps, rl.refresh_every), cfg.max_steps] if rl.refresh_every else []
    ends = ends or [cfg.max_steps]
    current, refreshes, evals = Path(reward_model), [], []
    for i, end in enumerate(ends):
        evals += train(model, task, cfg, out, dist, meta=meta, resume=resume or i > 0, stop_at=end).evals
        if end < cfg.max_steps:
            where = out / "rm-refresh"
            # the rollouts of this round only; none when the run resumed past it (its refresh is reused,
            # or, if it found no pair then, the RM stays what the policy was trained against)
            todo = [(p, g) for step, p, g in task.rollouts if end - rl.refresh_every < step <= end]
            r = refresh_reward_model(
                current, end, todo, base_pairs, where, rm_cfg, tok, dist, log, rl.refresh_replay,
                held[:PROBE_QUESTIONS],
            )  # fmt: skip
            if r is not None:
                refreshes.append(r)
                current = Path(r.path)
                task.reward = RewardScorer(load_reward_model(r.path, dist.device)[0], tok)
    _write_history(out / "rollouts.jsonl", task.history)
    if not evals or evals[0]["step"] > 0:  # resumed: the evaluations before are in the metrics log
        first_new = evals[0]["step"] if evals else cfg.max_steps + 1
        done = [e for e in read_metrics(out / "metrics.jsonl") if e.get("kind") == "eval" and e["step"] < first_new]
        evals = [{k: v for k, v in e.items() if k != "kind"} for e in done] + evals
    evals = [e for e in evals if e["step"] <= cfg.max_steps]  # resumed with fewer steps: what was asked
    if not evals:
        raise ValueError(f"{out}: no evaluations recorded (metrics.jsonl is missing); rerun with --no-resume")
    title = f"RLHF, kl_coef {rl.kl_coef}{refresh}: {out.name}"
    mark = plot_overoptimisation(evals, out / "overoptimisation.png", title, [r.step for r in refreshes])
    first, last = evals[0], evals[-1]
    summary = {
        "rm_before": first["heldout_rm"],
        "rm_after": last["heldout_rm"],
        "gold_before": first["heldout_gold"],
        "gold_after": last["heldout_gold"],
        "best_gold": max(e["heldout_gold"] for e in evals),
        "correct_before": first["heldout_correct"],
        "correct_after": last["heldout_correct"],
        "questions": questions,
        "overoptimisation_step": mark,
        "evals": evals,
        "refreshes": [asdict(r) for r in refreshes],
        "refresh_labels": sum(r.new_pairs for r in refreshes),  # pairs the labeler made during the run
    }
    write_json(out / "summary.json", summary)
    before = f"RM score {first['heldout_rm']:.3f}, gold score {first['heldout_gold']:.3f} (step {first['step']})"
    after = f"RM score {last['heldout_rm']:.3f}, gold score {last['heldout_gold']:.3f} (step {last['step']})"
    log(f"rlhf: held-out {before} -> {after}")
    seen = "no gold fall while the RM rises"
    if mark is not None:  # step 0 too: the SFT model's gold was never beaten
        seen = f"gold peaks at step {mark}, then falls as the RM rises"
    log(f"rlhf: {out / 'overoptimisation.png'} ({seen})")
    return summary
