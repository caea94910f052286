"""GRPO: advantages and losses against hand-computed values, masking of tool results, bad input, a CLI run."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import bigram_model, tiny_model_config

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.inference.engine import Engine, Request
from llmstack.inference.sample import SamplingConfig
from llmstack.model.llama import GPT
from llmstack.rl.grpo import (
    Completion,
    GRPOConfig,
    GRPOTask,
    Rollout,
    collate_rollout,
    group_advantages,
    kl_k3,
    pass_at_k,
    policy_loss,
)
from llmstack.rl.verifiers import Problem, final_answer, heldout_problems, make_splits, reward
from llmstack.tokenizer import special as S
from llmstack.tools.registry import default_toolbox, tool_use
from llmstack.training import checkpoint as ckpt_io
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import train

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0]])
    plain = group_advantages(r, scale=False)
    # group 0: mean 1/3 -> (2/3, -1/3, -1/3); group 1: all equal -> exactly 0; group 2: mean 2/3
    assert torch.allclose(plain[0], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    assert torch.equal(plain[1], torch.zeros(3))
    assert torch.allclose(plain[2], torch.tensor([1 / 3, -2 / 3, 1 / 3]))
    scaled = group_advantages(r, scale=True)
    std = math.sqrt(2 / 9)  # population std of (1, 0, 0)
    assert torch.allclose(scaled[0], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / std, atol=1e-5)
    assert torch.allclose(scaled[0], torch.tensor([math.sqrt(2), -math.sqrt(2) / 2, -math.sqrt(2) / 2]), atol=1e-5)
    assert torch.equal(scaled[1], torch.zeros(3))


def test_degenerate_groups_give_zero_advantage_and_no_nan():
    for rewards in ([[0.0] * 4], [[1.0] * 4], [[0.1] * 3], [[0.7]]):  # 0.1 * 3 / 3 != 0.1 in floats
        for scale in (True, False):
            adv = group_advantages(torch.tensor(rewards), scale)
            assert torch.equal(adv, torch.zeros_like(adv)), (rewards, scale)


# ----------------------------------------------------------------------------- losses
def _on_policy(logp):
    return logp, logp.detach()


def test_policy_loss_variants_by_hand():
    # two completions: the first samples 2 tokens (advantage 1.0), the second 1 token (advantage -0.5)
    logp = torch.tensor([[-1.0, -2.0, -0.3], [-0.5, -0.7, -0.9]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -0.5])
    # on-policy the ratio is 1: per token -A, i.e. -1, -1 and +0.5
    expected = {
        "grpo": (-1.0 + 0.5) / 2,  # per-sequence means (-1, 0.5), then their mean
        "dapo": (-2.0 + 0.5) / 3,  # all tokens together
        "dr_grpo": (-2.0 + 0.5) / (2 * 4),  # constant normaliser: 2 completions x a budget of 4
    }
    for loss_type, value in expected.items():
        cur, old = _on_policy(logp)
        loss, _ = policy_loss(cur, old, adv, mask, loss_type, clip_eps=0.2, max_tokens=4)  # type: ignore[arg-type]
        assert loss.item() == pytest.approx(value), loss_type
    # the gradient: -A / (number of tokens) on sampled tokens, 0 elsewhere (dapo)
    cur, old = _on_policy(logp)
    loss, _ = policy_loss(cur, old, adv, mask, "dapo")
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g, torch.tensor([[-1 / 3, -1 / 3, 0.0], [0.5 / 3, 0.0, 0.0]]))


def test_clipped_ratio_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5]])).requires_grad_(True)  # ratios 1.5, 0.5, 1.5
    mask = torch.ones(1, 3)
    for adv, per_token, grads in (
        # A > 0: ratio 1.5 is clipped to 1.2 (no gradient); ratio 0.5 is below 0.8, the unclipped term is smaller
        (1.0, [-1.2, -0.5, -1.2], [0.0, -0.5 / 3, 0.0]),
        # A < 0: ratio 0.5 is clipped to 0.8 (no gradient); ratio 1.5 keeps its pessimistic unclipped term
        (-1.0, [1.5, 0.8, 1.5], [1.5 / 3, 0.0, 1.5 / 3]),
    ):
        loss, stats = policy_loss(logp, old, torch.tensor([adv]), mask, "dapo", clip_eps=0.2)
        assert loss.item() == pytest.approx(sum(per_token) / 3)
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.allclose(g, torch.tensor([grads]), atol=1e-6)  # d(ratio)/d(logp) = ratio
        assert stats["clip_frac"] == pytest.approx(sum(x == 0 for x in grads) / 3)


def test_kl_penalty_k3_by_hand():
    logp = torch.zeros(1, 2)
    ref = torch.tensor([[math.log(2.0), 0.0]])
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([[2 - math.log(2) - 1, 0.0]]))
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logp, logp, torch.zeros(1), mask, "dapo", ref_logp_BT=ref, kl_coef=0.1)
    assert stats["kl"] == pytest.approx((1 - math.log(2)) / 2)
    assert float(loss) == pytest.approx(0.1 * (1 - math.log(2)) / 2)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(logp, logp, torch.zeros(1), mask, "dapo", kl_coef=0.1)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(5, 2, 1) == pytest.approx(0.4)


# ----------------------------------------------------------------------------- masking of tool results
def test_collate_masks_prompt_padding_and_forced_tokens():
    comp = Completion([10, 11, 12, 13], [False, True, True, False])
    short = Completion([20], [False])
    x, y, mask = collate_rollout(Rollout([[1, 2, 3]], [[comp, short]]), pad_id=0)
    assert x.tolist() == [[1, 2, 3, 10, 11, 12], [1, 2, 3, 0, 0, 0]]
    assert y.tolist() == [[2, 3, 10, 11, 12, 13], [2, 3, 20, -1, -1, -1]]
    assert mask.tolist() == [[0, 0, 1, 0, 0, 1], [0, 0, 1, 0, 0, 0]]


def test_engine_tool_results_are_forced_and_never_trained(tok):
    """A real rollout with a tool call: the result tokens come back forced and the mask leaves them out."""
    sid = tok.special_id
    (x,), (the,), (model_,) = (tok.encode_ordinary(w) for w in ("x", " the", " model"))
    # after "x" the scripted model calls "the" (a malformed call: an error result), then says " model"
    script = {x: sid(S.TOOL_CALL_START), sid(S.TOOL_CALL_START): the, the: sid(S.TOOL_CALL_END)}
    script |= {sid(S.TOOL_RESULT_END): model_, model_: sid(S.ASSISTANT_END)}
    model = bigram_model(tok, script)
    fmt = ChatFormat(tok)
    prompt = fmt.prompt(Conversation.of(("user", "hi"), ("assistant", "x")))
    engine = Engine(model, tool_use(tok, default_toolbox().call))
    stop = frozenset({tok.special_id(S.ASSISTANT_END)})
    comp = Completion([], [])
    for ev in engine.run([Request(prompt, SamplingConfig(110, 0.0, None), stop)]):
        comp.tokens.append(ev.token)
        comp.forced.append(ev.forced)
    start, end = tok.special_id(S.TOOL_RESULT_START), tok.special_id(S.TOOL_RESULT_END)
    assert start in comp.tokens, tok.decode(comp.tokens)
    i, j = comp.tokens.index(start), comp.tokens.index(end)
    assert all(comp.forced[i : j + 1]) and not any(comp.forced[:i]) and not any(comp.forced[j + 1 :])
    x, y, mask = collate_rollout(Rollout([prompt], [[comp]]), tok.special_id(S.PAD))
    trained = [t for t, m in zip(y[0].tolist(), mask[0].tolist(), strict=True) if m]
    assert trained == [t for t, f in zip(comp.tokens, comp.forced, strict=True) if not f]
    assert start not in trained and end not in trained and trained[-1] == tok.special_id(S.ASSISTANT_END)
    # changing the policy's log-probabilities on forced tokens does not change the loss
    logp = torch.randn(mask.shape)
    base, _ = policy_loss(logp, logp, torch.tensor([1.0]), mask, "grpo")
    moved = logp + (1 - mask) * 5.0
    assert float(policy_loss(moved, moved, torch.tensor([1.0]), mask, "grpo")[0]) == pytest.approx(float(base))


# ----------------------------------------------------------------------------- verifiers
def test_final_answer_ignores_tool_spans_and_reward_credits():
    text = (
        "<|tool_call_start|>calculator: 2*3<|tool_call_end|><|tool_result_start|>6<|tool_result_end|>The answer is 7."
    )
    assert final_answer(text) == "7" and final_answer("1,234.0 apples") == "1234" and final_answer("none") is None
    p = Problem("What is 2 times 3?", "6", "multiply", lambda a: float(a == "6"))
    assert reward(p, text) == (0.0, None)
    assert reward(p, text, tool_credit=0.5) == (0.5, None)  # the right call, a wrong copy
    assert reward(p, text.replace("is 7", "is 6"), tool_credit=0.5) == (1.0, None)


def test_splits_are_disjoint_and_reasoning_gym_scores():
    train_p, held = make_splits(["multiply", "chain_sum"], 40, 10)
    assert len(held) == 10 and {p.source for p in held} == {"multiply", "chain_sum"}
    assert not {p.question for p in train_p} & {p.question for p in held}
    gym = next(p for p in held if p.source == "chain_sum")
    assert reward(gym, f"The answer is {gym.answer}.")[0] == 1.0
    assert reward(gym, "The answer is 99999.")[0] < 1.0
    # evaluation draws the same held-out problems without training ones: with 400 held-out and one
    # training problem per set, the small chain_sum settings leave none (``rl --eval-only --heldout 400``)
    assert [p.question for p in heldout_problems(["multiply", "chain_sum"], 10)] == [p.question for p in held]
    with pytest.raises(ValueError, match="no training problems left"):
        make_splits(["chain_sum"], 1, 400)


def test_every_rl_heldout_question_is_left_out_of_the_sft_mixture(monkeypatch):
    import llmstack.chat.mixture as mixture

    monkeypatch.setattr(mixture, "_HELDOUT_EXCLUDED", 50)  # the first 50 of each set and setting
    held = heldout_problems(["basic_arithmetic_3d", "chain_sum", "basic_arithmetic"], 120)
    assert {p.source for p in held} == {"basic_arithmetic_3d", "chain_sum", "basic_arithmetic"}
    excluded = mixture._heldout_questions("basic_arithmetic") | mixture._heldout_questions("chain_sum")
    assert {p.question for p in held} <= excluded
    three_digit = next(p for p in held if p.source == "basic_arithmetic_3d")
    assert all(len(n) == 3 for n in re.findall(r"\d+", three_digit.question))


def test_raising_verifier_scores_zero_and_is_logged(caplog):
    def broken(answer):
        raise RuntimeError("verifier bug")

    p = Problem("q", "1", "broken", broken)
    with caplog.at_level("WARNING"):
        r, err = reward(p, "The answer is 1.")
    assert r == 0.0 and err is not None and "verifier bug" in err and "verifier bug" in caplog.text
    nan = Problem("q", "1", "nan", lambda a: float("nan"))
    assert reward(nan, "1")[0] == 0.0


# ----------------------------------------------------------------------------- the task in the shared loop
def _task(tok, problems, tmp_path, **kw):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=128))
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    cfg = GRPOConfig(**{"group_size": 4, "prompts_per_batch": 2, "max_new_tokens": 6, "n_heldout": 4, **kw})
    tcfg = TrainConfig(max_steps=3, batch_size=8, lr=1e-3, warmup_steps=0, eval_every=0, ckpt_every=1)
    from llmstack.training.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    return model, GRPOTask(model, ref, tok, problems, problems[:2], cfg, tcfg, CPU, None, log, False), tcfg


def test_degenerate_batch_and_raising_verifier_do_not_stop_a_step(tok, tmp_path):
    def broken(answer):
        raise ValueError("no")

    problems = [Problem(f"question {i}", "1", "broken", broken) for i in range(4)]
    model, task, _ = _task(tok, problems, tmp_path)
    batch = task.next_batch()
    assert batch.stats["verifier_errors"] == 8 and batch.stats["degenerate_groups"] == 1.0
    assert torch.equal(batch.adv, torch.zeros(8))
    loss, n = task.loss(model, batch)
    loss.backward()
    assert n > 0 and loss.item() == 0.0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["kind"] == "rl" and rec["step"] == 1 and rec["verifier_errors"] == 8
    assert {"reward", "kl", "entropy", "response_tokens", "rollout_tok_per_s"} <= set(rec)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tok, tmp_path):
    problems = [Problem(f"question {i}", "1", "ones", lambda a: float(a == "1")) for i in range(8)]
    model, task, tcfg = _task(tok, problems, tmp_path)
    original = task.next_batch
    calls = {"n": 0}

    def poisoned():
        batch = original()
        calls["n"] += 1
        if calls["n"] == 2:  # after step 1's checkpoint, the weights go bad
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))
        return batch

    task.next_batch = poisoned  # type: ignore[method-assign]
    with pytest.raises(FloatingPointError, match="checkpoint is intact"):
        train(model, task, tcfg, tmp_path, CPU, meta={"tokenizer_fingerprint": tok.fingerprint}, progress=False)
    ckpt = ckpt_io.load_meta(tmp_path)
    assert ckpt.step == 1
    good, _ = ckpt_io.load_gpt(tmp_path)
    assert all(torch.isfinite(p).all() for p in good.parameters())


# ----------------------------------------------------------------------------- the command
@pytest.fixture()
def sft_run(tok, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=128))
    run = tmp_path / "sft"
    meta = {"model_config": model.config.to_dict(), "tokenizer_fingerprint": tok.fingerprint, "stage": "sft"}
    ckpt_io.save_checkpoint(run, 1, model, None, meta)
    tok.save(run / "tokenizer")
    return run


def test_rl_command_runs_logs_plots_and_resumes(sft_run, tmp_path, capsys):
    from llmstack.cli import main

    out = tmp_path / "rl"
    args = ["rl", "--model", str(sft_run), "--out", str(out), "--max-steps", "2", "--group-size", "2"]
    args += ["--prompts-per-step", "2", "--max-new-tokens", "6", "--tasks", "multiply,chain_sum", "--eval-every", "0"]
    args += ["--train-problems", "20", "--heldout", "6", "--tool-credit", "0.5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "tok/s" in printed and "2 steps" in printed
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in recs if r["kind"] == "rl"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in rl] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    assert {"pass@1", "pass@8", "pass@1/multiply", "pass@1/chain_sum"} <= set(evals[-1])
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["entropy"]) for r in rl)
    summary = json.loads((out / "rl_summary.json").read_text())
    assert summary["steps"] == 2 and "pass@1" in summary["sft"] and summary["rollout_tok_per_s"] > 0
    assert (out / "rl.png").stat().st_size > 0 and (out / "tokenizer" / "tokenizer.json").exists()
    assert ckpt_io.load_meta(out).meta["stage"] == "rl"
    assert main(args) == 0  # finished: resumes at step 2, nothing to do
    assert ckpt_io.load_meta(out).step == 2
    assert main(["rl", "--model", str(out), "--eval-only", "--tasks", "multiply", "--heldout", "4"]) == 0
    assert "pass@1" in capsys.readouterr().out


def test_rl_config_rejects_bad_values():
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=0)
    assert GRPOConfig(loss_type="dr_grpo").scale is False and GRPOConfig().scale is True
