"""DPO: the policy learns from preference pairs directly, without a reward model or sampling.

llmstack dpo --model runs/tiny/sft --pairs runs/tiny/rm/train.jsonl      # -> runs/tiny/dpo

Direct Preference Optimization (Rafailov et al. 2023): with a frozen reference policy (the SFT model),
the implicit reward of a reply is beta * log(pi(y|x) / pi_ref(y|x)), and the loss is Bradley-Terry
on it: -log sigmoid(beta * ((log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)))). Log
probabilities are summed over the tokens the model wrote (tool results are the tool's, not its).
The reference never changes, so its log-probabilities are computed once, before training.

``nll_weight`` adds the chosen replies' negative log-likelihood (per token) to the loss: RPO
(Pang et al. 2024, "Iterative Reasoning Preference Optimization"). Plain DPO can lower both replies'
likelihoods while it widens their margin, and where chosen and rejected differ in one digit the
mass it frees goes to other wrong digits: on our arithmetic pairs, DPO alone lowers the gold score
(docs/LOG.md). The NLL term keeps the chosen replies likely.

What is not here: IPO / KTO / SimPO variants, label smoothing, a reference other than the start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmstack.chat.template import format_of
from llmstack.interop.load import load_trainable
from llmstack.io import write_json
from llmstack.model.llama import GPT
from llmstack.rl.preferences import (
    HELDOUT_SEED,
    ArithmeticProblem,
    Pair,
    PairStream,
    arithmetic_problems,
    encode_reply,
    pairs_questions,
    read_pairs,
    score_policy,
)
from llmstack.training.config import TrainConfig, resolve_dtype
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import train
from llmstack.training.lora import LoRAConfig, apply_lora
from llmstack.training.pretrain import logits_of
from llmstack.training.sft import IGNORE, collate


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities (B,) each -> (mean loss, the implicit reward margins (B,))."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach()


def rpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    chosen_tokens: torch.Tensor,
    nll_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO plus ``nll_weight`` x the chosen replies' negative log-likelihood per token (summed over
    the batch's chosen tokens, divided by their count): (loss, margins)."""
    loss, margin = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if nll_weight:
        loss = loss - nll_weight * policy_chosen.sum() / chosen_tokens.sum().clamp(min=1)
    return loss, margin


def sequence_logprobs(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(target) where the target is not IGNORE: (B,)."""
    logp_BTV = logits_of(model, x_BT).float().log_softmax(dim=-1)
    trained = y_BT != IGNORE
    tok_logp = logp_BTV.gather(-1, y_BT.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (tok_logp * trained).sum(dim=-1)


Encoded = tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]  # (chosen (ids, mask), rejected)


class DPOTask(PairStream):
    """DPO for the shared loop: a batch is ``batch_size`` pairs (chosen rows, then rejected rows)."""

    name = "dpo"

    def __init__(
        self,
        model: GPT,
        train: Sequence[Pair],
        val: Sequence[Pair],
        tok: Any,
        cfg: TrainConfig,
        dist: DistInfo,
        beta: float = 0.1,
        problems: Sequence[ArithmeticProblem] = (),
        nll_weight: float = 1.0,
    ) -> None:
        if nll_weight < 0 or beta <= 0:
            raise ValueError(f"DPO needs beta > 0 and nll_weight >= 0 (got beta {beta}, nll_weight {nll_weight})")
        fmt = format_of(tok)
        self.tok, self.beta, self.problems, self.nll_weight = tok, beta, list(problems), nll_weight
        self.pad = fmt.pad_id
        ctx = self.ctx = model.config.max_seq_len

        def encode(pairs: Sequence[Pair]) -> list[Encoded]:
            rows = [(encode_reply(fmt, p.prompt, p.chosen), encode_reply(fmt, p.prompt, p.rejected)) for p in pairs]
            return [r for r in rows if max(len(r[0][0]), len(r[1][0])) <= ctx]

        self.train, self.val = encode(train), encode(val)
        self._start(len(self.train), cfg, dist)
        # the frozen reference: the starting model's log-probabilities, (chosen, rejected) per pair
        model.to(self.device).eval()
        amp = resolve_dtype(cfg.dtype, self.device)  # the loop's autocast, so that step 0's margins are 0
        with torch.autocast(self.device.type, torch.bfloat16) if amp == "bfloat16" else contextlib.nullcontext():
            self.ref_train = self._logprobs(model, self.train)
            self.ref_val = self._logprobs(model, self.val)

    def _batch(self, rows: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = collate([c for c, _ in rows] + [r for _, r in rows], self.pad)
        x, y = x[:, : self.ctx], y[:, : self.ctx]  # collate's bucketing may pad past the context
        return x.to(self.device), y.to(self.device)

    @torch.no_grad()
    def _logprobs(self, model: torch.nn.Module, rows: Sequence[Encoded]) -> torch.Tensor:
        out = []
        for i in range(0, len(rows), 32):
            chunk = rows[i : i + 32]
            lp = sequence_logprobs(model, *self._batch(chunk)).cpu()
            out.append(torch.stack([lp[: len(chunk)], lp[len(chunk) :]], dim=1))
        return torch.cat(out) if out else torch.zeros(0, 2)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self._next_indices()
        x, y = self._batch([self.train[i] for i in idx])
        return x, y, self.ref_train[idx].to(self.device)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, int]:
        x, y, ref = batch
        lp = sequence_logprobs(model, x, y)
        B = x.shape[0] // 2
        loss, _ = rpo_loss(lp[:B], lp[B:], ref[:, 0], ref[:, 1], self.beta, (y[:B] != IGNORE).sum(1), self.nll_weight)
        return loss, int((y != IGNORE).sum())

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out pairs: how often the implicit reward ranks them as the labeler did; held-out problems:
        the gold score of the greedy replies, and of one reply sampled at temperature 1 (seeded, as RLHF
        scores its policy): what the policy gives when it is sampled."""
        lp = self._logprobs(model, self.val)
        metrics: dict[str, float] = {}
        if len(lp):
            loss, margin = dpo_loss(lp[:, 0], lp[:, 1], self.ref_val[:, 0], self.ref_val[:, 1], self.beta)
            metrics |= {"val_loss": float(loss), "val_accuracy": float((margin > 0).float().mean())}
        if self.problems:
            metrics |= score_policy(model, self.tok, self.problems).as_dict("heldout_")
            sampled = score_policy(model, self.tok, self.problems, temperature=1.0, seed=HELDOUT_SEED)
            metrics |= sampled.as_dict("heldout_sampled_")
        return metrics


def preset(name: str) -> TrainConfig:
    """``tiny``: ~2 min on 2 CPU cores (held-out gold scored every 50 steps); ``gpu``: larger batches."""
    if name == "tiny":
        return TrainConfig(
            max_steps=200, batch_size=16, seq_len=256, lr=1e-4, warmup_steps=10, weight_decay=0.0,
            eval_every=50, ckpt_every=0, eval_batches=1,
        )  # fmt: skip
    if name == "gpu":
        return TrainConfig(
            max_steps=1000, batch_size=64, seq_len=512, lr=5e-5, warmup_steps=50, weight_decay=0.0,
            eval_every=100, ckpt_every=500, eval_batches=1, dtype="bfloat16",
        )  # fmt: skip
    raise ValueError(f"unknown preset {name!r}; choose tiny or gpu")


def run_dpo(
    policy: str | Path,
    pairs: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    dist: DistInfo,
    beta: float = 0.1,
    heldout: int = 100,
    sources: Sequence[str] = ("gold", "llm"),
    resume: bool = True,
    log: Callable[[str], None] = print,
    nll_weight: float = 1.0,
    lora: LoRAConfig | None = None,
) -> dict[str, Any]:
    """DPO from ``policy`` (any model source; also the frozen reference) on ``pairs/train.jsonl``, the whole
    model or a LoRA adapter; the gold score of ``heldout`` held-out questions' replies, greedy and sampled
    at T 1, before and after; ``out/summary.json``."""
    out, pairs = Path(out), Path(pairs)
    model, tok, bundle = load_trainable(policy)
    where = str(bundle.checkpoint.path if bundle.checkpoint else bundle.source)
    if lora:
        apply_lora(model, lora)  # B = 0: the starting model (the reference) exactly
    train_pairs = [p for p in read_pairs(pairs / "train.jsonl") if p.source in sources]
    val_pairs = read_pairs(pairs / "heldout.jsonl")
    bundle.copy_tokenizer(out)
    problems = arithmetic_problems(heldout, HELDOUT_SEED, pairs_questions(pairs))  # the pairs' question set
    task = DPOTask(model, train_pairs, val_pairs, tok, cfg, dist, beta, problems if dist.is_main else (), nll_weight)
    log(f"dpo: {len(task.train)} pairs, beta {beta}, NLL weight {nll_weight}, {cfg.max_steps} steps "
        f"from {where} -> {out}{f'; LoRA r={lora.r}' if lora else ''}")  # fmt: skip
    meta = {"stage": "dpo", "tokenizer_fingerprint": tok.fingerprint, "base_checkpoint": where, "beta": beta,
            "nll_weight": nll_weight, **bundle.format_meta(), **({"lora": asdict(lora)} if lora else {})}  # fmt: skip
    result = train(model, task, cfg, out, dist, meta=meta, resume=resume)
    summary: dict[str, Any] = {"train_pairs": len(task.train), "beta": beta, "nll_weight": nll_weight}
    summary["evals"] = result.evals
    gold = [e for e in result.evals if "heldout_gold" in e]
    if dist.is_main and gold:
        first, last = gold[0], gold[-1]
        for key, name in (("heldout_", ""), ("heldout_sampled_", "sampled_")):
            for what in ("gold", "correct"):
                summary |= {f"{name}{what}_before": first[key + what], f"{name}{what}_after": last[key + what]}
        write_json(out / "summary.json", summary)
        for key, how in (("heldout_", "greedy"), ("heldout_sampled_", "sampled at T 1")):
            log(f"dpo: held-out gold score, {how}: {first[f'{key}gold']:.3f} (step {first['step']}) -> "
                f"{last[f'{key}gold']:.3f} (step {last['step']}); right answers {first[f'{key}correct']:.0%} -> "
                f"{last[f'{key}correct']:.0%} of {heldout}")  # fmt: skip
    return summary
