"""The reward model: our transformer with a scalar head, trained on preference pairs (Bradley-Terry).

llmstack reward-model --model runs/tiny/sft --preset tiny      # pairs -> runs/tiny/rm (CPU, minutes)

``RewardModel`` is ``GPT`` with the vocabulary head swapped for one linear map to a scalar, named
``score`` as in Hugging Face ``LlamaForSequenceClassification``; it starts from the SFT model's
weights (InstructGPT) and reads the reward at the last token of prompt + reply. Bradley-Terry:
P(chosen beats rejected) = sigmoid(r_chosen - r_rejected), trained by its negative log-likelihood
through the shared loop (``RewardTask``); held-out pairwise accuracy is its evaluation.

What is not here: reward normalisation across prompts, ensembles, margins in the loss.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.chat.conversation import ChatFormat
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT, KVCache
from llmstack.rl.preferences import Pair, PairStream, encode_reply, load_policy, read_pairs
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo

STAGE = "reward_model"


class RewardModel(GPT):
    supports_static_cache = False  # never decodes

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.lm_head = nn.Identity()  # type: ignore[assignment]  # the backbone's normed states pass through
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        nn.init.zeros_(self.score.weight)  # starts neutral: every reward 0, every pair's loss ln 2

    def forward(self, idx_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> the reward after each prefix (B, T)."""
        h_BTC = super().forward(idx_BT, cache)
        return self.score(h_BTC).squeeze(-1)

    @classmethod
    def from_policy(cls, policy: GPT) -> RewardModel:
        """A reward model whose backbone is ``policy``'s (the SFT model), with a fresh head."""
        rm = cls(policy.config)
        state = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head.")}
        missing, unexpected = rm.load_state_dict(state, strict=False)
        assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
        return rm


def load_reward_model(path: str, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    from llmstack.training.checkpoint import load_meta, load_model_weights

    ckpt = load_meta(path)
    if ckpt.meta.get("stage") != STAGE:
        raise ValueError(f"{ckpt.path}: not a reward model (stage {ckpt.meta.get('stage')!r}; `llmstack reward-model`)")
    rm = RewardModel(ckpt.model_config)
    load_model_weights(rm, ckpt)
    return rm.to(device).eval(), ckpt


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected): the negative log-likelihood of the labels."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pad_rows(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the index of each row's last token (B,)."""
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
    return x, torch.tensor([len(r) - 1 for r in rows])


def rewards_of(model: torch.nn.Module, x_BT: torch.Tensor, last_B: torch.Tensor) -> torch.Tensor:
    """The reward of each row at its last token (right padding never reaches it: attention is causal)."""
    r_BT = model(x_BT)
    return r_BT.float()[torch.arange(x_BT.shape[0], device=x_BT.device), last_B]


class RewardScorer:
    """A trained reward model as a reward function: (prompts, replies) -> scores."""

    def __init__(self, rm: RewardModel, tok: Any, batch_size: int = 64) -> None:
        self.rm, self.fmt, self.batch_size = rm, ChatFormat(tok), batch_size
        self.pad = tok.special_id("<|pad|>")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        device = next(self.rm.parameters()).device
        ctx = self.rm.config.max_seq_len
        rows = [encode_reply(self.fmt, p, r)[0][-ctx:] for p, r in zip(prompts, replies, strict=True)]
        out: list[float] = []
        self.rm.eval()
        for i in range(0, len(rows), self.batch_size):
            x, last = pad_rows(rows[i : i + self.batch_size], self.pad)
            out += rewards_of(self.rm, x.to(device), last.to(device)).tolist()
        return out


def encode_pairs(pairs: Sequence[Pair], fmt: ChatFormat, max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(chosen ids, rejected ids) of each pair that fits the context, and how many did not."""
    out = []
    for p in pairs:
        c, r = encode_reply(fmt, p.prompt, p.chosen)[0], encode_reply(fmt, p.prompt, p.rejected)[0]
        if max(len(c), len(r)) <= max_len:
            out.append((c, r))
    return out, len(pairs) - len(out)


@torch.no_grad()
def pairwise_accuracy(
    rm: torch.nn.Module, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 32
) -> tuple[float, float]:
    """Fraction of pairs where the chosen reply gets the higher reward (ties count half), and the mean loss."""
    device = next(rm.parameters()).device
    wins, loss, n = 0.0, 0.0, 0
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        x, last = pad_rows([c for c, _ in chunk] + [r for _, r in chunk], pad_id)
        r = rewards_of(rm, x.to(device), last.to(device))
        rc, rr = r[: len(chunk)], r[len(chunk) :]
        wins += float((rc > rr).sum() + 0.5 * (rc == rr).sum())
        loss += float(bradley_terry_loss(rc, rr)) * len(chunk)
        n += len(chunk)
    return wins / max(1, n), loss / max(1, n)


class RewardTask(PairStream):
    """Bradley-Terry on preference pairs for the shared loop: a batch is ``batch_size`` pairs, both
    replies in one forward pass."""

    name = "reward_model"

    def __init__(
        self, train: Sequence[Pair], val: Sequence[Pair], tok: Any, cfg: TrainConfig, dist: DistInfo, max_len: int
    ) -> None:
        fmt = ChatFormat(tok)
        self.pad = tok.special_id("<|pad|>")
        self.train, self.skipped = encode_pairs(train, fmt, max_len)
        self.val, _ = encode_pairs(val, fmt, max_len)
        self._start(len(self.train), cfg, dist)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = [self.train[i] for i in self._next_indices()]
        x, last = pad_rows([c for c, _ in chunk] + [r for _, r in chunk], self.pad)  # (2B, T): chosen, rejected
        return x.to(self.device), last.to(self.device)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x, last = batch
        r = rewards_of(model, x, last)
        B = x.shape[0] // 2
        return bradley_terry_loss(r[:B], r[B:]), int((last + 1).sum())

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        acc, loss = pairwise_accuracy(model, self.val, self.pad)
        return {"val_accuracy": acc, "val_loss": loss}


def preset(name: str) -> TrainConfig:
    """``tiny``: ~1-2 min on 2 CPU cores; ``gpu``: more steps and pairs per batch."""
    if name == "tiny":
        return TrainConfig(
            max_steps=300, batch_size=16, seq_len=256, lr=3e-4, warmup_steps=20, weight_decay=0.0,
            eval_every=50, ckpt_every=0, eval_batches=1, min_lr_ratio=0.1,
        )  # fmt: skip
    if name == "gpu":
        return TrainConfig(
            max_steps=2000, batch_size=64, seq_len=512, lr=1e-4, warmup_steps=100, weight_decay=0.0,
            eval_every=200, ckpt_every=500, eval_batches=1, dtype="bfloat16",
        )  # fmt: skip
    raise ValueError(f"unknown preset {name!r}; choose tiny or gpu")


def hhh_accuracy(rm: RewardModel, tok: Any, pad_id: int) -> dict[str, Any]:
    """Pairwise accuracy on BIG-bench hhh_alignment (held out: never trained on); chance is 50%."""
    from llmstack.paths import data_dir
    from llmstack.rl.preferences import hhh_pairs

    try:
        pairs = hhh_pairs(data_dir() / "eval" / "bigbench")
    except FileNotFoundError as e:
        return {"note": str(e)}
    encoded, skipped = encode_pairs(pairs, ChatFormat(tok), rm.config.max_seq_len)
    acc, _ = pairwise_accuracy(rm, encoded, pad_id)
    return {"accuracy": acc, "pairs": len(encoded), "too_long": skipped}


def run_reward_model(
    policy: str | Path,
    pairs: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    dist: DistInfo,
    sources: Sequence[str] = ("gold", "llm"),
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a reward model from ``policy`` (the SFT run) on ``pairs/train.jsonl``, judged on ``pairs/heldout.jsonl``
    and on hhh_alignment; writes ``out/summary.json``."""
    from llmstack.io import write_json
    from llmstack.training.loop import train

    out, pairs = Path(out), Path(pairs)
    model, ckpt, tok = load_policy(policy)
    train_pairs = [p for p in read_pairs(pairs / "train.jsonl") if p.source in sources]
    val_pairs = read_pairs(pairs / "heldout.jsonl")
    rm = RewardModel.from_policy(model)
    if not (out / "tokenizer" / "tokenizer.json").exists():
        shutil.copytree(ckpt.path.parent.parent / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    task = RewardTask(train_pairs, val_pairs, tok, cfg, dist, rm.config.max_seq_len)
    log(f"reward model: {len(task.train)} training pairs ({', '.join(sources)}), {len(task.val)} held out; "
        f"{cfg.max_steps} steps -> {out}")  # fmt: skip
    meta = {"stage": STAGE, "tokenizer_fingerprint": tok.fingerprint, "base_checkpoint": str(ckpt.path)}
    result = train(rm, task, cfg, out, dist, meta=meta, resume=resume)
    summary: dict[str, Any] = {"train_pairs": len(task.train), "heldout_pairs": len(task.val)}
    if dist.is_main:
        rm.eval()
        acc, loss = pairwise_accuracy(rm, task.val, task.pad)
        summary |= {"heldout_accuracy": acc, "heldout_loss": loss, "hhh_alignment": hhh_accuracy(rm, tok, task.pad)}
        summary["evals"] = result.evals
        write_json(out / "summary.json", summary)
        hhh = summary["hhh_alignment"]
        log(f"reward model: held-out pairwise accuracy {acc:.1%} against the gold judge ({len(task.val)} pairs)")
        if "accuracy" in hhh:
            log(f"reward model: hhh_alignment {hhh['accuracy']:.1%} of {hhh['pairs']} pairs (chance 50%)")
    return summary
