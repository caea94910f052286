"""GRPO (DeepSeekMath, DeepSeek-R1) on problems with checkable answers, through the shared training loop.

Each micro-batch is a rollout: ``prompts_per_batch`` training problems, ``group_size`` completions
each, sampled together by the batched engine with the tools answering calls. A verifier scores each
completion; a completion's advantage is its reward minus its group's mean (divided by the group's
std for ``grpo`` and ``dapo``). The loss is the policy gradient on the tokens the model sampled:
prompts, padding and tool results (the engine's forced tokens) are never trained.

Loss variants (``GRPOConfig.loss_type``), over the trained tokens of a batch:

* ``grpo``: mean over each completion's tokens, then mean over completions (DeepSeekMath);
* ``dr_grpo``: sum over all tokens / (completions x max_new_tokens), no std division (Dr. GRPO);
* ``dapo``: sum over all tokens / their number (DAPO's token-level loss).

Optional: the PPO clipped ratio against the rollout policy's log-probabilities (it matters when one
rollout is used for several optimizer steps, ``updates_per_rollout``), and a KL penalty to the frozen
SFT model with the k3 estimator ``exp(ref - logp) - (ref - logp) - 1``.

Not covered: value functions (GRPO has none), DAPO's dynamic sampling (degenerate groups are kept and
contribute no gradient), rollouts on a separate inference server.

    llmstack rl                                              # preset tiny on runs/tiny/sft: 2 CPU cores, minutes
    llmstack rl --run-dir runs/d20 --preset gpu --device cuda  # the policy: --model, default <run>/sft
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.chat.template import format_of
from llmstack.inference.engine import Engine, Request
from llmstack.inference.sample import SamplingConfig
from llmstack.rl.reward_model import RewardScorer, load_reward_model
from llmstack.rl.verifiers import Problem, custom_reward, load_reward_function, reward, tool_found_answer
from llmstack.tools.registry import tool_use
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.metrics import MetricsLog
from llmstack.training.pretrain import logits_of

LossType = Literal["grpo", "dr_grpo", "dapo"]


@dataclass
class GRPOConfig:
    tasks: tuple[str, ...] = ("multiply",)  # problem sets (rl/verifiers.py), interleaved
    group_size: int = 8  # completions per prompt (k)
    prompts_per_batch: int = 8  # prompts per micro-batch: rows = prompts_per_batch x group_size
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_k: int | None = None
    loss_type: LossType = "grpo"
    scale_rewards: bool | None = None  # divide by the group's std; None: yes for grpo/dapo, no for dr_grpo
    clip_eps: float = 0.2  # PPO clip of the ratio to the rollout policy; 0 turns it off
    updates_per_rollout: int = 1  # optimizer steps per rollout batch (DeepSeekMath's mu)
    kl_coef: float = 0.0  # weight of the k3 KL penalty to the reference model
    tools: bool = True  # the calculator / python tools answer calls during rollouts
    tool_credit: float = 0.0  # training reward of a wrong final answer whose tool results hold the right one
    reward_fn: str = ""  # module:function or file.py:function (question, completion, answer) -> float; "" = verifiers
    reward_model: str = ""  # a reward model's run (`llmstack reward-model`) scores completions instead of a verifier
    n_train: int = 4000
    n_heldout: int = 100  # pass@1 (greedy) on these
    eval_k: int = 8  # pass@k: k samples on each of the first eval_k_problems held-out problems
    eval_k_problems: int = 50
    print_every: int = 10  # a rollout line (reward, length, tok/s) in the run log
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.loss_type not in ("grpo", "dr_grpo", "dapo"):
            problems.append(f"loss_type must be grpo, dr_grpo or dapo (got {self.loss_type!r})")
        for name in ("group_size", "prompts_per_batch", "max_new_tokens", "updates_per_rollout", "n_train", "eval_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.clip_eps < 0 or self.kl_coef < 0 or self.temperature <= 0:
            problems.append("clip_eps and kl_coef must be >= 0 and temperature > 0")
        if not self.tasks:
            problems.append("tasks must name at least one problem set")
        if problems:
            raise ValueError("invalid GRPOConfig: " + "; ".join(problems))
        self.tasks = tuple(self.tasks)

    @property
    def scale(self) -> bool:
        return self.scale_rewards if self.scale_rewards is not None else self.loss_type != "dr_grpo"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the pure parts
def group_advantages(rewards_NK: torch.Tensor, scale: bool, eps: float = 1e-6) -> torch.Tensor:
    """(N prompts, K completions) rewards -> advantages: reward - group mean, / group std if ``scale``.

    The std is the population std (defined for K = 1). A group whose rewards are all equal gets
    exactly zero advantage (no NaN, no rounding noise).
    """
    r = rewards_NK.float()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True, correction=0) + eps)
    degenerate = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values).expand_as(adv)
    return torch.where(degenerate, torch.zeros_like(adv), adv)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref - logp; >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    loss_type: LossType,
    clip_eps: float = 0.0,
    ref_logp_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective as a loss to minimise, and statistics (KL, clipped fraction).

    Per token: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * k3``, with
    ``ratio = exp(logp - old_logp)``; ``mask`` is 1 on the tokens the model sampled. ``max_tokens``
    is ``dr_grpo``'s constant (the generation budget; default: the batch's width T).
    """
    mask = mask_BT.float()
    ratio = torch.exp(logp_BT - old_logp_BT)
    adv = adv_B.float().unsqueeze(1)  # (B, 1)
    per_token = -ratio * adv
    clipped = torch.zeros_like(per_token, dtype=torch.bool)
    if clip_eps > 0:
        per_token_clip = -torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
        clipped = per_token_clip > per_token
        per_token = torch.maximum(per_token, per_token_clip)
    stats: dict[str, float] = {}
    n = mask.sum().clamp(min=1)
    if ref_logp_BT is not None:
        kl = kl_k3(logp_BT, ref_logp_BT)
        stats["kl"] = float((kl.detach() * mask).sum() / n)
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    elif kl_coef > 0:
        raise ValueError("a KL penalty needs the reference model's log-probabilities")
    stats["clip_frac"] = float((clipped.float() * mask).sum() / n)
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        loss = per_seq.mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / n
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.size(0) * (max_tokens or mask.size(1)))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return loss, stats


def token_logprobs(
    model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target under the sampling distribution (logits / temperature), and the
    distribution's entropy (no gradient), both (B, T). Targets < 0 (untrained) read as token 0."""
    logits = logits_of(model, x_BT).float() / temperature  # (B, T, V)
    logp_BTV = logits.log_softmax(dim=-1)
    logp = logp_BTV.gather(-1, y_BT.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_BTV.exp() * logp_BTV).sum(dim=-1)
    return logp, entropy


# ----------------------------------------------------------------------------- rollouts
@dataclass
class Completion:
    tokens: list[int]  # every new token: sampled, and forced tool results
    forced: list[bool]
    text: str = ""  # the decoded turn, stop token left out
    finish: str | None = None

    @property
    def n_sampled(self) -> int:
        return sum(not f for f in self.forced)


@dataclass
class Rollout:
    prompts: list[list[int]]  # one per problem
    completions: list[list[Completion]]  # [problem][k]
    seconds: float = 0.0
    tokens: int = 0  # all new tokens, forced ones included (what the engine produced)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / max(1e-9, self.seconds)


class Sampler:
    """Batched completions of chat prompts: one engine, the tools answering calls."""

    def __init__(self, model: torch.nn.Module, tok: Any, tools: Any | None = None) -> None:
        self.tok, self.fmt = tok, format_of(tok)
        runs_tools = tools is not None and isinstance(self.fmt, ChatFormat)  # a template model runs no tools
        self.engine = Engine(model, tool_use(tok, tools.call) if tools is not None and runs_tools else None)
        self.stop = self.fmt.stop_ids

    def prompt(self, question: str) -> list[int]:
        return self.fmt.prompt(Conversation.of(("user", question)))

    def sample(
        self, questions: list[str], k: int, cfg: SamplingConfig, seeds: list[list[int]] | None = None
    ) -> Rollout:
        """``k`` completions of each question; completion j of question i samples with ``seeds[i][j]``."""
        prompts = [self.prompt(q) for q in questions]
        reqs = [
            Request(p, SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, s), self.stop)
            for i, p in enumerate(prompts)
            for s in (seeds[i] if seeds is not None else [None] * k)
        ]
        comps = [Completion([], []) for _ in reqs]
        t0 = time.perf_counter()
        n = 0
        for ev in self.engine.run(reqs):
            comps[ev.row].tokens.append(ev.token)
            comps[ev.row].forced.append(ev.forced)
            if ev.finish is not None:
                comps[ev.row].finish = ev.finish
            n += 1
        seconds = time.perf_counter() - t0
        for c in comps:
            c.text = self.tok.decode([t for t in c.tokens if t not in self.stop])
        return Rollout(prompts, [comps[i * k : (i + 1) * k] for i in range(len(prompts))], seconds, n)


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) inputs
    y: torch.Tensor  # (B, T) targets
    mask: torch.Tensor  # (B, T) 1 where the target was sampled by the model
    adv: torch.Tensor  # (B,)
    old_logp: torch.Tensor | None = None  # (B, T) the rollout policy's, when a rollout is reused
    ref_logp: torch.Tensor | None = None  # (B, T) the reference model's
    stats: dict[str, float] = field(default_factory=dict)


def collate_rollout(rollout: Rollout, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + completion rows -> inputs, targets and the mask of sampled targets, each (B, T).

    Rows are right-padded; the mask is 0 on prompt tokens, forced tool-result tokens and padding.
    """
    rows = [(p, c) for p, cs in zip(rollout.prompts, rollout.completions, strict=True) for c in cs]
    T = max(len(p) + len(c.tokens) for p, c in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, (p, c) in enumerate(rows):
        ids = p + c.tokens
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, : len(ids) - 1] = torch.tensor(ids[1:])
        sampled = torch.tensor([not f for f in c.forced], dtype=torch.float32)
        mask[i, len(p) - 1 : len(ids) - 1] = sampled  # target j+1 is predicted at position j
    return x, y, mask


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Codex paper): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------- the task
class GRPOTask:
    """The loop's ``Task`` for GRPO: ``next_batch`` samples and scores a rollout, ``loss`` is the policy gradient."""

    name = "grpo"

    def __init__(
        self,
        model: torch.nn.Module,
        reference: torch.nn.Module | None,
        tok: Any,
        train: list[Problem],
        heldout: list[Problem],
        cfg: GRPOConfig,
        tcfg: TrainConfig,
        dist: DistInfo,
        tools: Any | None = None,
        log: MetricsLog | None = None,
        progress: bool = True,
    ) -> None:
        if cfg.kl_coef > 0 and reference is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        self.model, self.reference, self.tok = model, reference, tok
        self.train, self.heldout, self.cfg, self.grad_accum = train, heldout, cfg, tcfg.grad_accum
        self.rank, self.world, self.device = dist.rank, dist.world_size, dist.device
        self.sampler = Sampler(model, tok, tools if cfg.tools else None)
        self.pad_id = self.sampler.fmt.pad_id
        self.log, self.progress = log, progress
        self.sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, None)
        self.cursor = 0  # problems consumed by all ranks together
        self.micro = 0  # loss() calls so far: micro-batches trained
        self._cached: Batch | None = None
        self._order: tuple[int, np.ndarray] = (-1, np.arange(0))
        self._uses = 0
        self._step_stats: list[dict[str, float]] = []
        self.errors: list[str] = []  # verifier errors (also logged)
        self.reward_fn = load_reward_function(cfg.reward_fn) if cfg.reward_fn else None
        self.reward_model = None
        if cfg.reward_model:
            self.reward_model = RewardScorer(load_reward_model(cfg.reward_model, self.device)[0], tok)

    # --- data
    def _index(self, g: int) -> int:
        epoch, i = divmod(g, len(self.train))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train)))
        return int(self._order[1][i])

    def next_batch(self) -> Batch:
        if self._cached is not None and self._uses < self.cfg.updates_per_rollout:
            self._uses += 1
            return self._cached
        P, k = self.cfg.prompts_per_batch, self.cfg.group_size
        first = self.cursor + self.rank * P
        problems = [self.train[self._index(first + i)] for i in range(P)]
        seeds = [[(self.cfg.seed * 1_000_003 + (first + i) * k + j) % 2**31 for j in range(k)] for i in range(P)]
        self.cursor += self.world * P
        rollout = self.sampler.sample([p.question for p in problems], k, self.sampling, seeds)
        self.model.train()  # the engine leaves it in eval mode
        rewards = torch.zeros(P, k)
        errors = 0
        scored = None
        if self.reward_model is not None:
            asks = [p.question for p, comps in zip(problems, rollout.completions, strict=True) for _ in comps]
            scored = self.reward_model(asks, [c.text for comps in rollout.completions for c in comps])
        for i, (p, comps) in enumerate(zip(problems, rollout.completions, strict=True)):
            for j, c in enumerate(comps):
                if scored is not None:
                    rewards[i, j], err = scored[i * len(comps) + j], None
                elif self.reward_fn is not None:
                    rewards[i, j], err = custom_reward(self.reward_fn, p, c.text)
                else:
                    rewards[i, j], err = reward(p, c.text, self.cfg.tool_credit)
                if err is not None:
                    errors += 1
                    self.errors.append(err)
        adv = group_advantages(rewards, self.cfg.scale).reshape(-1)
        x, y, mask = collate_rollout(rollout, self.pad_id)
        x, y, mask = x.to(self.device), y.to(self.device), mask.to(self.device)
        batch = Batch(x, y, mask, adv.to(self.device))
        with torch.no_grad():
            if self.cfg.updates_per_rollout > 1:
                batch.old_logp = token_logprobs(self.model, x, y, self.cfg.temperature)[0]
            if self.reference is not None:
                batch.ref_logp = token_logprobs(self.reference, x, y, self.cfg.temperature)[0]
        lengths = [c.n_sampled for cs in rollout.completions for c in cs]
        batch.stats = {
            "reward": float(rewards.mean()),
            "solved": float((rewards >= 1).float().mean()),
            "tool_found": float(
                np.mean(
                    [
                        tool_found_answer(p, c.text)
                        for p, cs in zip(problems, rollout.completions, strict=True)
                        for c in cs
                    ]
                )
            ),
            "response_tokens": float(np.mean(lengths)),
            "degenerate_groups": float((rewards.max(1).values == rewards.min(1).values).float().mean()),
            "verifier_errors": float(errors),
            "rollout_tok_per_s": rollout.tok_per_s,
            "rollout_s": rollout.seconds,
        }
        self._cached, self._uses = batch, 1
        return batch

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        cfg = self.cfg
        logp, entropy = token_logprobs(model, batch.x, batch.y, cfg.temperature)
        old = batch.old_logp if batch.old_logp is not None else logp.detach()
        loss, stats = policy_loss(
            logp,
            old,
            batch.adv,
            batch.mask,
            cfg.loss_type,
            cfg.clip_eps,
            batch.ref_logp,
            cfg.kl_coef,
            cfg.max_new_tokens,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"GRPO loss is {loss.item()} at micro-batch {self.micro + 1}; stopped before the update, the last "
                "checkpoint is intact (lower the learning rate or check the rewards)"
            )
        n = int(batch.mask.sum())
        stats["entropy"] = float((entropy * batch.mask).sum() / max(1, n))
        self._step_stats.append({**batch.stats, **stats})
        self.micro += 1
        if self.micro % self.grad_accum == 0:
            self._log_step(self.micro // self.grad_accum)
        return loss, n

    def _log_step(self, step: int) -> None:
        rec = {k: float(np.mean([s[k] for s in self._step_stats])) for k in self._step_stats[0]}
        self._step_stats = []
        if self.log is not None:
            self.log.write({"kind": "rl", "step": step, **rec, "time": time.time()})
        if self.progress and self.rank == 0 and (step % self.cfg.print_every == 0 or step == 1):
            kl = f", kl {rec['kl']:.4f}" if "kl" in rec else ""
            tqdm.write(
                f"step {step}: reward {rec['reward']:.3f}, solved {rec['solved']:.1%}, "
                f"length {rec['response_tokens']:.1f} tokens, entropy {rec['entropy']:.3f}{kl}; "
                f"rollout {rec['rollout_tok_per_s']:,.0f} tok/s"
            )

    # --- held-out
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        out = evaluate_problems(self.sampler, self.heldout, self.cfg)
        self.model.train()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "micro": self.micro, "n_train": len(self.train)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_train") != len(self.train):
            raise ValueError(f"RL problems changed since the checkpoint ({state.get('n_train')} vs {len(self.train)})")
        self.cursor, self.micro = int(state["cursor"]), int(state["micro"])


def evaluate_problems(sampler: Sampler, problems: list[Problem], cfg: GRPOConfig) -> dict[str, float]:
    """pass@1 (greedy, on all problems), pass@k and mean sampled accuracy (``eval_k`` samples at the
    rollout temperature on the first ``eval_k_problems``), per problem set too when there are several."""
    greedy = sampler.sample([p.question for p in problems], 1, SamplingConfig(cfg.max_new_tokens, 0.0, None))
    ok = [reward(p, cs[0].text)[0] >= 1 for p, cs in zip(problems, greedy.completions, strict=True)]
    out = {"pass@1": float(np.mean(ok)), "heldout_response_tokens": float(greedy.tokens / max(1, len(problems)))}
    sub = problems[: min(cfg.eval_k_problems, len(problems))]
    k = cfg.eval_k
    seeds = [[HELD_SEED_BASE + i * k + j for j in range(k)] for i in range(len(sub))]
    sampled = sampler.sample(
        [p.question for p in sub], k, SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k), seeds
    )
    correct = [sum(reward(p, c.text)[0] >= 1 for c in cs) for p, cs in zip(sub, sampled.completions, strict=True)]
    out[f"pass@{k}"] = float(np.mean([pass_at_k(k, c, k) for c in correct]))
    out["sampled_accuracy"] = float(np.mean(correct) / k)
    names = sorted({p.source for p in problems})
    if len(names) > 1:
        for name in names:
            out[f"pass@1/{name}"] = float(np.mean([o for o, p in zip(ok, problems, strict=True) if p.source == name]))
    return out


HELD_SEED_BASE = 7_777_777  # sampling seeds of the held-out pass@k draws (fixed: curves compare like with like)
