"""Logit-level knowledge distillation: the student learns the teacher's next-token distribution on text.

``distill_loss`` is the per-token KL between the two distributions, in fp32, averaged over the masked
positions (p: the teacher's, q: the student's, both softmax(logits / temperature)):

* ``forward``: KL(p || q) = sum_v p_v (log p_v - log q_v). Mass-covering: the student is pushed to give
  probability wherever the teacher does (Hinton et al. 2015; the usual choice on pretraining text).
* ``reverse``: KL(q || p) = sum_v q_v (log q_v - log p_v). Mode-seeking: the student is punished for
  mass where the teacher has little (MiniLLM, Gu et al. 2023).
* ``top_k=K``: both sums run over the teacher's K most likely tokens at that position only. p is the
  teacher's softmax over those K logits (renormalised), q the student's log-probs gathered at the same
  ids and renormalised over them (a softmax of the student's K logits). So the student learns the
  teacher's ranking and odds among its top K and gets no signal about the other V - K tokens;
  ``top_k=V`` is the full KL (up to float rounding).
* ``temperature=T``: both softmaxes of logits / T and the KL times T^2, so gradients keep their
  size as T changes (Hinton et al.).

``DistillTask`` runs the teacher (frozen, eval mode, same device) under no_grad on each packed batch
of token shards, as pretraining reads them; its logits live for that batch only (nothing is
precomputed). Loss = alpha x cross-entropy on the text + (1 - alpha) x KL; alpha = 1 is plain
pretraining (the teacher is not run in training), the baseline a distilled student is measured against.

What is not here: sequence-level distillation (``llmstack synth`` + SFT), teachers with another
tokenizer (cross-tokenizer alignment), on-policy student samples (MiniLLM / GKD generate from the
student; here both read the same fixed text), and cached teacher logits on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from llmstack.data.shards import ShardIndex
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.pretrain import bits_per_byte, logits_of, shard_loaders

KLKind = Literal["forward", "reverse"]


class TextTokenizer(Protocol):
    """What distillation reads of a tokenizer (ours and HF's both have it)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def is_special(self, token_id: int) -> bool: ...

    def decode_token_bytes(self, token_id: int) -> bytes: ...


@dataclass
class DistillConfig:
    kind: KLKind = "forward"
    top_k: int | None = None  # None: the full vocabulary
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the plain next-token cross-entropy; 1.0: no teacher in training

    def __post_init__(self) -> None:
        if self.kind not in ("forward", "reverse"):
            raise ValueError(f"distillation kind must be 'forward' or 'reverse' (got {self.kind!r})")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (got {self.top_k})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (got {self.temperature})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (got {self.alpha})")

    @property
    def uses_teacher(self) -> bool:
        return self.alpha < 1.0


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: KLKind = "forward",
    top_k: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean per-token KL (see the module docstring) over positions where ``mask`` (B, T) is true (all if None).

    Logits are (B, T, V); a scalar fp32 tensor comes back, differentiable in ``student_logits``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ: distillation needs the same vocabulary (one tokenizer, the same logit width)"
        )
    s_BTV = student_logits.float() / temperature
    t_BTV = teacher_logits.float() / temperature
    if top_k is not None and top_k < t_BTV.size(-1):
        t_BTV, ids_BTK = t_BTV.topk(top_k, dim=-1)  # the teacher's K most likely tokens, per position
        s_BTV = s_BTV.gather(-1, ids_BTK)  # the student's logits at those ids; log_softmax renormalises both
    log_p = F.log_softmax(t_BTV, dim=-1)  # teacher
    log_q = F.log_softmax(s_BTV, dim=-1)  # student
    if kind == "forward":
        kl_BT = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "reverse":
        kl_BT = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        raise ValueError(f"distillation kind must be 'forward' or 'reverse' (got {kind!r})")
    kl_BT = kl_BT * temperature**2
    if mask is None:
        return kl_BT.mean()
    m_BT = mask.to(kl_BT.dtype)
    return (kl_BT * m_BT).sum() / m_BT.sum().clamp(min=1.0)


def check_same_tokenizer(teacher: TextTokenizer, student: TextTokenizer, where: str = "") -> None:
    """Logit-level distillation compares distributions id by id: both models must read one tokenizer."""
    if teacher.vocab_size != student.vocab_size or teacher.fingerprint != student.fingerprint:
        raise ValueError(
            f"{where + ': ' if where else ''}the teacher and the student use different tokenizers (teacher: "
            f"{teacher.vocab_size} ids, fingerprint {teacher.fingerprint[:12]}; student: {student.vocab_size} ids, "
            f"fingerprint {student.fingerprint[:12]}); logit distillation needs the teacher's own tokenizer "
            "(train a fresh student of a given depth, or `llmstack synth` for sequence-level distillation)"
        )


def text_byte_lengths(tok: TextTokenizer) -> torch.Tensor:
    """UTF-8 bytes each id stands for, 0 for special tokens: ``bits_per_byte``'s denominator, for any tokenizer."""
    return torch.tensor(
        [0 if tok.is_special(i) else len(tok.decode_token_bytes(i)) for i in range(tok.vocab_size)],
        dtype=torch.int64,
    )


class DistillTask:
    name = "distill"

    def __init__(
        self,
        teacher: torch.nn.Module,
        shards: ShardIndex,
        tok: TextTokenizer,
        distill: DistillConfig,
        cfg: TrainConfig,
        dist: DistInfo,
    ) -> None:
        if shards.tokenizer_fingerprint != tok.fingerprint:
            raise ValueError(
                f"{shards.path}: shards were tokenized with tokenizer {shards.tokenizer_fingerprint[:12]}, not the "
                f"teacher's ({tok.fingerprint[:12]}); tokenize the text with the teacher's tokenizer"
            )
        self.device = dist.device
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.distill = distill
        self.train_loader, self.val_loader = shard_loaders(shards, cfg, dist)
        self.eval_batches = cfg.eval_batches
        self.byte_lengths = text_byte_lengths(tok)
        self.teacher_bpb: float | None = None  # constant (the teacher is frozen): measured once

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.train_loader.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x, y = batch
        logits_BTV = logits_of(model, x)
        d = self.distill
        loss = torch.zeros((), device=logits_BTV.device)
        if d.alpha > 0:
            loss = d.alpha * F.cross_entropy(logits_BTV.float().flatten(0, 1), y.flatten())
        if d.uses_teacher:
            with torch.no_grad():
                teacher_BTV = logits_of(self.teacher, x)
            kl = distill_loss(logits_BTV, teacher_BTV, None, d.kind, d.top_k, d.temperature)
            loss = loss + (1.0 - d.alpha) * kl
        return loss, y.numel()

    def _val_batches(self):
        return (b for i, b in enumerate(self.val_loader) if i < self.eval_batches)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The student's held-out bits per byte, and its forward KL (full vocabulary, T = 1) to the teacher."""
        if self.teacher_bpb is None:
            self.teacher_bpb = bits_per_byte(self.teacher, self._val_batches(), self.byte_lengths, self.device)
        kl_sum, n = 0.0, 0
        for x, _ in self._val_batches():
            x = x.to(self.device)
            kl_sum += float(distill_loss(logits_of(model, x), logits_of(self.teacher, x))) * x.numel()
            n += x.numel()
        return {
            "val_bpb": bits_per_byte(model, self._val_batches(), self.byte_lengths, self.device),
            "val_kl": kl_sum / max(1, n),
            "teacher_bpb": self.teacher_bpb,
            "epoch": self.train_loader.epoch,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self.train_loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_loader.load_state_dict(state["train_loader"])
