"""copy_score: a model that copies from its context scores far lower on a span's second telling."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from llmstack.eval.copying import copy_score


class _Model(torch.nn.Module):
    """Uniform logits, or (``lag``) a sure bet on the token ``lag`` places back: a perfect copier of a span
    of length ``lag`` said twice."""

    def __init__(self, vocab: int, lag: int = 0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.lag = vocab, lag

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        if self.lag:
            for t in range(self.lag - 1, ids.shape[1]):
                logits[torch.arange(ids.shape[0]), t, ids[:, t - self.lag + 1]] = 30.0
        return logits


def test_a_copier_scores_near_zero_on_the_second_telling_and_a_guesser_the_same_twice():
    tok = SimpleNamespace(n_ranks=50, vocab_size=52, bos_id=51)
    copier = copy_score(_Model(52, lag=12), tok, n=6, span=12)
    assert copier.second < 1e-3 and copier.first > 1.0 and copier.copies
    guesser = copy_score(_Model(52), tok, n=6, span=12)
    assert guesser.first == pytest.approx(math.log(52)) == pytest.approx(guesser.second) and not guesser.copies
    assert "does not copy" in guesser.line() and "copies from its context" in copier.line()


def test_copy_score_on_our_tiny_model_and_bad_arguments(tok):
    from conftest import tiny_model_config

    from llmstack.model.llama import GPT

    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size)).train()
    score = copy_score(model, tok, n=4, span=10)
    assert model.training  # the mode it had is given back
    assert score.vocab == tok.n_ranks and not score.copies  # an untrained model copies nothing
    assert abs(score.first - score.second) < 0.5 and score.first > math.log(tok.n_ranks) - 1
    with pytest.raises(ValueError, match="at least 2 tokens"):
        copy_score(model, tok, span=1)
