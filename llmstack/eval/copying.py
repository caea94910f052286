"""Does a model copy from its context? The loss on a random span's second telling against its first.

Every tool call an assistant makes copies: operands into the calculator, a word into a Python call, a
result into the answer. Language models do it with *induction heads* (a head that marks each position
with the token before it, and one that finds the earlier place whose previous token is the current one
and copies what followed), which grow after some hundreds of millions of training tokens. On a span of
random tokens said twice, the first telling cannot be predicted (about ln V nats a token) and a model
that copies predicts the second almost perfectly; one that does not scores the same twice.

    score = copy_score(model, tok)   # the main job's base: 11.16 -> 11.18, copies nothing from context

SmolLM2-135M scores 14.40 -> 3.20 (``bench/smollm2_posttrain.py`` prints it). The tiny model of the main
job scores the same on both (docs/assistant.md): every copy it makes it has
learnt by position for the trained wordings, which is why a new wording breaks its tool calls.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmstack.training.pretrain import logits_of


@dataclass(frozen=True)
class CopyScore:
    first: float  # mean loss (nats) on the first telling
    second: float  # on the second
    vocab: int

    @property
    def copies(self) -> bool:
        """The second telling costs less than half the first: the model copies from its context."""
        return self.second < 0.5 * self.first

    def line(self) -> str:
        verdict = "copies from its context" if self.copies else "does not copy from its context"
        return (
            f"a random span said twice: {self.first:.2f} -> {self.second:.2f} nats a token on its second telling "
            f"(uniform guess {math.log(self.vocab):.2f}): {verdict}"
        )


@torch.no_grad()
def copy_score(model: torch.nn.Module, tok, n: int = 32, span: int = 40, seed: int = 0) -> CopyScore:
    """Mean loss on the first and second tellings of ``n`` spans of ``span`` random ordinary tokens, each
    after the beginning-of-text token when the tokenizer has one."""
    if span < 2 or n < 1:
        raise ValueError(f"copy_score needs n >= 1 spans of at least 2 tokens (got n={n}, span={span})")
    rng = random.Random(seed)
    vocab = int(getattr(tok, "n_ranks", None) or tok.vocab_size)
    start = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    device = next(model.parameters()).device
    rows = []
    for _ in range(n):
        s = [rng.randrange(vocab) for _ in range(span)]
        rows.append(start + s + s)
    ids = torch.tensor(rows, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = logits_of(model, ids[:, :-1]).float()
    finally:
        model.train(was_training)
    loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (n, T)
    k = len(start)
    first = loss[:, k : k + span - 1].mean()  # predicting the first telling's tokens after its first
    second = loss[:, k + span :].mean()  # the second telling after its first token
    return CopyScore(float(first), float(second), vocab)
