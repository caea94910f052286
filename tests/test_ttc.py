"""Test-time compute: majority vote, best-of-n, accuracy-vs-n curves by hand, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model_config

from llmstack.model.llama import GPT
from llmstack.rl.ttc import MeanLogprobScorer, best_of_n, curves, majority_vote, oracle_scorer
from llmstack.rl.verifiers import Problem
from llmstack.training import checkpoint as ckpt_io


def _problem(q: str, answer: str) -> Problem:
    return Problem(q, answer, "test", lambda a: float(a == answer))


def test_majority_vote_and_best_of_n():
    assert majority_vote(["3", None, "4", "4", "3", None, None]) == "3"  # tie 2-2: the first seen wins
    assert majority_vote(["5", "7", "7"]) == "7" and majority_vote([None, None]) is None and majority_vote([]) is None
    assert best_of_n([0.1, 0.9, 0.9, -1.0]) == 1


def test_curves_by_hand():
    p = [_problem("a", "1"), _problem("b", "2")]
    samples = [
        ["It is 1.", "It is 3.", "It is 3.", "It is 1."],  # majority over 4: tie 1-3 -> "1" (first seen): right
        ["It is 5.", "It is 2.", "It is 5.", "It is 5."],  # majority over 4: "5": wrong
    ]
    scores = {"s": [[0.0, 1.0, 0.0, 2.0], [0.0, 1.0, 0.0, 2.0]]}  # prefers samples 3, then 1
    ns, acc = curves(p, samples, scores)
    assert ns == [1, 2, 4]
    # n=1: problem a right in 2 of 4 blocks, b in 1 of 4 -> 3/8
    # n=2: blocks (0,1), (2,3): a -> "1" (first seen), "3": 1 of 2; b -> "5", "5": 0 -> 1/4
    # n=4: a right, b wrong -> 1/2
    assert acc["majority vote"] == pytest.approx([3 / 8, 1 / 4, 1 / 2])
    # best-of-n with s: n=1 as before; n=2 picks samples 1 and 3: a: "3" wrong, "1" right; b: "2" right,
    # "5" wrong -> 2/4; n=4 picks sample 3: a right, b wrong -> 1/2
    assert acc["best-of-n (s)"] == pytest.approx([3 / 8, 2 / 4, 1 / 2])
    oracle = oracle_scorer(p)
    ora = {"oracle": [[oracle(q.question, t) for t in s] for q, s in zip(p, samples, strict=True)]}
    _, acc = curves(p, samples, ora)
    assert acc["best-of-n (oracle)"] == pytest.approx([3 / 8, 3 / 4, 1.0])  # pass@n


def test_mean_logprob_scorer_prefers_what_the_model_says(tok):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=128))
    scorer = MeanLogprobScorer(model, tok)
    a = scorer("hi", "the model reads")
    assert isinstance(a, float) and a < 0
    # a tool result is left out: adding one does not change the score of the same sampled tokens
    with_result = "the model reads<|tool_result_start|>x y z<|tool_result_end|>"
    b = scorer("hi", with_result)
    assert b != float("-inf")


def test_ttc_command_writes_curves_and_plot(tok, tmp_path, capsys):
    from llmstack.cli import main

    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=128))
    run = tmp_path / "sft"
    meta = {"model_config": model.config.to_dict(), "tokenizer_fingerprint": tok.fingerprint}
    ckpt_io.save_checkpoint(run, 1, model, None, meta)
    tok.save(run / "tokenizer")
    out = tmp_path / "ttc"
    assert main(["ttc", "--model", str(run), "--out", str(out), "--n", "4", "--problems", "3"]) == 0
    printed = capsys.readouterr().out
    assert "majority vote" in printed and "best-of-n (logprob)" in printed and "n=4" in printed
    res = json.loads((out / "ttc.json").read_text())
    assert res["ns"] == [1, 2, 4] and set(res["curves"]) == {
        "majority vote",
        "best-of-n (oracle)",
        "best-of-n (logprob)",
    }
    assert (out / "ttc.png").stat().st_size > 0
