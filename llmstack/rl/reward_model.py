"""The reward model: our transformer with a scalar head, trained on preference pairs (Bradley-Terry).

llmstack reward-model --model runs/tiny/sft --preset tiny      # pairs -> runs/tiny/rm (CPU, minutes)

``RewardModel`` is ``GPT`` with the vocabulary head swapped for one linear map to a scalar, named
``score`` as in Hugging Face ``LlamaForSequenceClassification``; it starts from the SFT model's
weights (InstructGPT). ``pool`` says where the reward is read:

* ``mean`` (default): the head scores every token the model wrote in the reply (tool results and
  the prompt excluded) and the reward is the mean. A mistake is local (one miscopied digit), and a
  per-token score can point at it, as DPO's implicit reward (a sum over tokens) does;
* ``last``: the score at the last token of prompt + reply, as ``LlamaForSequenceClassification``
  reads it. On our arithmetic pairs it must carry a mistake from where it happened to the end, and
  learns it poorly (docs/preferences.md).

``likelihood`` (on by default) adds to each written token's score the log-ratio of that token's
probability under the RM's backbone (read through its tied embedding, the language-model head the
SFT model had) to its probability under a frozen copy of the SFT model, times a learned weight that
starts at 1: DPO's implicit reward, per token (the "implicit PRM" of Yuan et al. 2024, "Free Process
Rewards without Process Labels"). It is 0 before training, so the RM still starts neutral. A
miscopied digit is a token the backbone did not expect; a linear map of one position's state cannot
see that, and from hundreds of pairs the plain head learns it poorly (57-63% held-out); the log-ratio
term learns it as DPO does (docs/preferences.md). The frozen copy is saved in the RM's run
directory (``reference/``), so the RM needs nothing outside it.

Bradley-Terry:
P(chosen beats rejected) = sigmoid(r_chosen - r_rejected), trained by its negative log-likelihood
through the shared loop (``RewardTask``); held-out pairwise accuracy is its evaluation.

What is not here: reward normalisation across prompts, ensembles, margins in the loss.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from llmstack.chat.conversation import ChatFormat
from llmstack.chat.template import TemplateFormat, format_of
from llmstack.interop.load import load_trainable
from llmstack.io import write_json
from llmstack.model.config import ModelConfig
from llmstack.model.llama import GPT, KVCache
from llmstack.paths import data_dir
from llmstack.rl.preferences import (
    HELDOUT_SEED,
    Pair,
    PairStream,
    arithmetic_problems,
    encode_reply,
    hhh_pairs,
    mistake_probe,
    pairs_questions,
    read_pairs,
)
from llmstack.training.checkpoint import CKPT_VERSION, load_meta, load_model_weights, model_state_for_saving
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import train
from llmstack.training.lora import LoRAConfig, apply_lora

STAGE = "reward_model"


POOLS = ("mean", "last")
PROBE_QUESTIONS = 200  # held-out questions whose built mistakes probe a trained RM (``mistake_probe``)


class RewardModel(GPT):
    supports_static_cache = False  # never decodes

    def __init__(self, cfg: ModelConfig, pool: str = "mean", likelihood: bool = True) -> None:
        if pool not in POOLS:
            raise ValueError(f"unknown reward pooling {pool!r}; choose one of {', '.join(POOLS)}")
        if likelihood and not cfg.tie_embeddings:
            raise ValueError("the likelihood input reads the tied embedding; this model has none (likelihood=False)")
        super().__init__(cfg)
        self.pool = pool
        self.lm_head = nn.Identity()  # type: ignore[assignment]  # the backbone's normed states pass through
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        nn.init.zeros_(self.score.weight)  # starts neutral: every reward 0, every pair's loss ln 2
        self.likelihood_weight = nn.Parameter(torch.ones(())) if likelihood else None
        # the frozen SFT model of the log-ratio (a plain list keeps it out of this module's parameters)
        self._reference: list[GPT] = [GPT(cfg).requires_grad_(False).eval()] if likelihood else []

    @property
    def reference(self) -> GPT | None:
        return self._reference[0] if self._reference else None

    def _apply(self, fn: Any, recurse: bool = True) -> RewardModel:  # .to(device) / .float() move the reference too
        super()._apply(fn, recurse)
        for ref in self._reference:
            ref._apply(fn, recurse)
        return self

    def forward(
        self,
        idx_BT: torch.Tensor,
        cache: KVCache | None = None,
        targets_BT: torch.Tensor | None = None,
        last_only: bool = False,
        embeds_BTC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> the reward after each prefix (B, T); a reward model takes no targets."""
        if targets_BT is not None or last_only or embeds_BTC is not None:
            raise ValueError(
                "a reward model scores every prefix of a sequence of tokens: no next-token targets, no last_only, "
                "no input embeddings"
            )
        h_BTC = super().forward(idx_BT, cache)
        r_BT = self.score(h_BTC).squeeze(-1)
        if self.likelihood_weight is None or self.reference is None:
            return r_BT
        # log p(token t | tokens < t), from the state at t - 1 and the tied embedding; token 0 gets 0
        logp = (h_BTC[:, :-1] @ self.model.embed_tokens.weight.T).float().log_softmax(-1)
        tok_logp = logp.gather(-1, idx_BT[:, 1:, None]).squeeze(-1)
        with torch.no_grad():
            ref = self.reference(idx_BT[:, :-1]).float().log_softmax(-1)
            ref_logp = ref.gather(-1, idx_BT[:, 1:, None]).squeeze(-1)
        return r_BT + self.likelihood_weight * F.pad(tok_logp - ref_logp, (1, 0))

    @classmethod
    def from_policy(cls, policy: GPT, pool: str = "mean", likelihood: bool = True) -> RewardModel:
        """A reward model whose backbone is ``policy``'s (the SFT model), with a fresh head."""
        rm = cls(policy.config, pool, likelihood)
        state = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head.")}
        missing, unexpected = rm.load_state_dict(state, strict=False)
        fresh = ["score.weight"] + (["likelihood_weight"] if likelihood else [])
        assert sorted(missing) == sorted(fresh) and not unexpected, (missing, unexpected)
        if rm.reference is not None:
            rm.reference.load_state_dict(policy.state_dict())
        return rm


def load_reward_model(path: str, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    ckpt = load_meta(path)
    if ckpt.meta.get("stage") != STAGE:
        raise ValueError(f"{ckpt.path}: not a reward model (stage {ckpt.meta.get('stage')!r}; `llmstack reward-model`)")
    # checkpoints from before pooling and the likelihood input read the last token's plain score
    rm = RewardModel(ckpt.model_config, ckpt.meta.get("pool", "last"), ckpt.meta.get("likelihood", False))
    load_model_weights(rm, ckpt)
    if rm.reference is not None:
        ref_dir = ckpt.path.parent.parent / "reference"
        if not (ref_dir / "model.safetensors").exists():
            raise FileNotFoundError(f"{ref_dir}: the reward model's frozen SFT copy is missing (retrain the RM)")
        load_model_weights(rm.reference, load_meta(ref_dir))
    return rm.to(device).eval(), ckpt


def save_reference(sft: Any, out: Path, meta: dict[str, Any] | None = None) -> None:
    """The frozen SFT model into ``out/reference`` (atomically: a whole copy or none): a checkpoint's files are
    copied; a model that has none (an HF folder, a GGUF) is written with ``meta``."""
    dst = out / "reference"  # rewritten each run: a new RM in an old folder must not keep another SFT model
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".reference-", dir=out))
    if isinstance(sft, GPT):
        cfg = sft.config
        save_file(model_state_for_saving(sft, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "meta.json", {**(meta or {}), "model_config": cfg.to_dict(), "step": 0,
                                       "format_version": CKPT_VERSION})  # fmt: skip
    else:
        for name in ("model.safetensors", "meta.json"):
            shutil.copy2(sft.path / name, tmp / name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected): the negative log-likelihood of the labels."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


Encoded = tuple[list[int], list[int]]  # a prompt + reply's ids and its reply mask (``encode_reply``)


def pad_rows(rows: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T), the index of each row's last token (B,) and the reply mask (B, T)."""
    T = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    m = torch.zeros(len(rows), T)
    for i, (ids, mask) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        m[i, : len(mask)] = torch.tensor(mask, dtype=torch.float)
    return x, torch.tensor([len(ids) - 1 for ids, _ in rows]), m


def rewards_of(model: torch.nn.Module, x_BT: torch.Tensor, last_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """The reward of each row: at its last token, or the mean over its reply tokens (``model.pool``).
    Right padding never reaches either: attention is causal and the mask is 0 there."""
    r_BT = model(x_BT).float()
    if getattr(model, "pool", "last") == "mean":
        if bool((mask_BT.sum(1) == 0).any()):
            raise ValueError("a reply has no tokens the model wrote (empty reply): nothing to score")
        return (r_BT * mask_BT).sum(1) / mask_BT.sum(1)
    return r_BT[torch.arange(x_BT.shape[0], device=x_BT.device), last_B]


class RewardScorer:
    """A trained reward model as a reward function: (prompts, replies) -> scores."""

    def __init__(self, rm: RewardModel, tok: Any, batch_size: int = 64) -> None:
        self.rm, self.fmt, self.batch_size = rm, format_of(tok), batch_size
        self.pad = self.fmt.pad_id

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        device = next(self.rm.parameters()).device
        ctx = self.rm.config.max_seq_len
        rows = []
        for p, r in zip(prompts, replies, strict=True):
            ids, mask = encode_reply(self.fmt, p, r)
            rows.append((ids[-ctx:], mask[-ctx:]))
        out: list[float] = []
        self.rm.eval()
        for i in range(0, len(rows), self.batch_size):
            x, last, m = pad_rows(rows[i : i + self.batch_size], self.pad)
            out += rewards_of(self.rm, x.to(device), last.to(device), m.to(device)).tolist()
        return out


def encode_pairs(
    pairs: Sequence[Pair], fmt: ChatFormat | TemplateFormat, max_len: int
) -> tuple[list[tuple[Encoded, Encoded]], int]:
    """(chosen, rejected) encodings of each pair that fits the context, and how many did not."""
    out = []
    for p in pairs:
        c, r = encode_reply(fmt, p.prompt, p.chosen), encode_reply(fmt, p.prompt, p.rejected)
        if max(len(c[0]), len(r[0])) <= max_len:
            out.append((c, r))
    return out, len(pairs) - len(out)


@torch.no_grad()
def pairwise_accuracy(
    rm: torch.nn.Module, encoded: Sequence[tuple[Encoded, Encoded]], pad_id: int, batch_size: int = 32
) -> tuple[float, float]:
    """Fraction of pairs where the chosen reply gets the higher reward (ties count half), and the mean loss."""
    device = next(rm.parameters()).device
    wins, loss, n = 0.0, 0.0, 0
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        x, last, m = pad_rows([c for c, _ in chunk] + [r for _, r in chunk], pad_id)
        r = rewards_of(rm, x.to(device), last.to(device), m.to(device))
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
        fmt = format_of(tok)
        self.pad = fmt.pad_id
        self.train, self.skipped = encode_pairs(train, fmt, max_len)
        self.val, _ = encode_pairs(val, fmt, max_len)
        self._start(len(self.train), cfg, dist)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chunk = [self.train[i] for i in self._next_indices()]
        x, last, m = pad_rows([c for c, _ in chunk] + [r for _, r in chunk], self.pad)  # (2B, T): chosen, rejected
        return x.to(self.device), last.to(self.device), m.to(self.device)

    def loss(
        self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        x, last, m = batch
        r = rewards_of(model, x, last, m)
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
    try:
        pairs = hhh_pairs(data_dir() / "eval" / "bigbench")
    except FileNotFoundError as e:
        return {"note": str(e)}
    encoded, skipped = encode_pairs(pairs, format_of(tok), rm.config.max_seq_len)
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
    pool: str = "mean",
    likelihood: bool = True,
    lora: LoRAConfig | None = None,
) -> dict[str, Any]:
    """Train a reward model from ``policy`` (any model source) on ``pairs/train.jsonl``, judged on
    ``pairs/heldout.jsonl`` and on hhh_alignment; writes ``out/summary.json``. ``pool``: where the reward is
    read (module doc). With ``lora`` the backbone gets an adapter and the score head trains whole."""
    out, pairs = Path(out), Path(pairs)
    model, tok, bundle = load_trainable(policy)
    where = str(bundle.checkpoint.path if bundle.checkpoint else bundle.source)
    train_pairs = [p for p in read_pairs(pairs / "train.jsonl") if p.source in sources]
    val_pairs = read_pairs(pairs / "heldout.jsonl")
    rm = RewardModel.from_policy(model, pool, likelihood)
    if lora:  # on the backbone only: the frozen reference inside the RM stays as it is
        apply_lora(rm.model, lora)
    if likelihood and dist.is_main:
        save_reference(bundle.checkpoint or model, out, {"stage": "reference", "source": where})
    bundle.copy_tokenizer(out)
    task = RewardTask(train_pairs, val_pairs, tok, cfg, dist, rm.config.max_seq_len)
    log(f"reward model: {len(task.train)} training pairs ({', '.join(sources)}), {len(task.val)} held out; "
        f"reward read at {'the mean of the reply tokens' if pool == 'mean' else 'the last token'}"
        f"{' with their log-likelihood as an input' if likelihood else ''}; "
        f"{cfg.max_steps} steps -> {out}")  # fmt: skip
    questions = pairs_questions(pairs)  # the question set the pairs were drawn on: RLHF and the probe use it
    meta = {"stage": STAGE, "tokenizer_fingerprint": tok.fingerprint, "base_checkpoint": where, "pool": pool,
            "likelihood": likelihood, "questions": questions, "pairs": str(pairs.resolve()),
            **bundle.format_meta(), **({"lora": asdict(lora)} if lora else {})}  # fmt: skip
    result = train(rm, task, cfg, out, dist, meta=meta, resume=resume)
    summary: dict[str, Any] = {"train_pairs": len(task.train), "heldout_pairs": len(task.val), "pool": pool}
    summary["likelihood"] = likelihood
    if dist.is_main:
        rm.eval()
        acc, loss = pairwise_accuracy(rm, task.val, task.pad)
        summary |= {"heldout_accuracy": acc, "heldout_loss": loss, "hhh_alignment": hhh_accuracy(rm, tok, task.pad)}
        probe = arithmetic_problems(PROBE_QUESTIONS, HELDOUT_SEED, questions)
        summary["mistake_probe"] = mistake_probe(RewardScorer(rm, tok), probe)
        if rm.likelihood_weight is not None:
            summary["likelihood_weight"] = float(rm.likelihood_weight.detach())
        summary["evals"] = result.evals
        write_json(out / "summary.json", summary)
        hhh = summary["hhh_alignment"]
        log(f"reward model: held-out pairwise accuracy {acc:.1%} against the gold judge ({len(task.val)} pairs)")
        if "accuracy" in hhh:
            log(f"reward model: hhh_alignment {hhh['accuracy']:.1%} of {hhh['pairs']} pairs (chance 50%)")
        rates = ", ".join(f"{k} {v:.0%}" for k, v in summary["mistake_probe"].items())
        log(f"reward model: a built mistake outscores the right reply ({PROBE_QUESTIONS} held-out questions; 0% is "
            f"perfect, 50% a coin): {rates}")  # fmt: skip
    return summary
