"""Preferences, the reward model, DPO and RLHF: losses pinned by hand, the gold judge, the commands end to end."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_model_config

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.rl.dpo import dpo_loss, rpo_loss
from llmstack.rl.judges import ArithmeticProblem, gold_pairs, gold_score, llm_pairs
from llmstack.rl.mistakes import perturb, perturbed_pairs
from llmstack.rl.pairs import Pair, encode_reply, parse_reply, read_pairs, write_pairs
from llmstack.rl.preferences import hhh_pairs
from llmstack.rl.reward_model import RewardModel, bradley_terry_loss
from llmstack.rl.rlhf import overoptimisation_point, policy_gradient_loss

CALL, END = "<|tool_call_start|>calculator: {}<|tool_call_end|>", "<|assistant_end|>"
RESULT = "<|tool_result_start|>{}<|tool_result_end|>"
P = ArithmeticProblem("What is 686 times 849?", 686, 849, "*")  # 582414


def reply(call: str | None, result: str | None, text: str, finished: bool = True) -> str:
    return (
        (CALL.format(call) if call else "")
        + (RESULT.format(result) if result else "")
        + text
        + (END if finished else "")
    )


# ----------------------------------------------------------------------------- losses, pinned
def test_bradley_terry_loss_matches_hand_computed_values():
    # -log sigmoid(1 - 0) = log(1 + e^-1) = 0.3132617; -log sigmoid(0 - 2) = log(1 + e^2) = 2.1269280
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx((0.3132617 + 2.1269280) / 2, abs=1e-6)
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([3.0])).item() == pytest.approx(math.log(2))


def test_dpo_loss_matches_hand_computed_values():
    # beta 0.1: row 1 margin 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2 -> log(1 + e^-0.2) = 0.5981389
    #           row 2 margin 0.1 * ((-5 + 4) - (-5 + 6)) = -0.2 -> log(1 + e^0.2) = 0.7981389
    policy_c, policy_r = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0])
    ref_c, ref_r = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -6.0])
    loss, margin = dpo_loss(policy_c, policy_r, ref_c, ref_r, 0.1)
    assert margin.tolist() == pytest.approx([0.2, -0.2])
    assert loss.item() == pytest.approx((0.5981389 + 0.7981389) / 2, abs=1e-6)
    same = torch.tensor([-7.0])
    assert dpo_loss(same, same - 1, same, same - 1, 0.5)[0].item() == pytest.approx(math.log(2))  # policy = reference


def test_rpo_adds_the_chosen_nll_per_token():
    # the DPO loss of the rows above, plus 0.5 x (10 + 5) / (4 + 6) chosen tokens = 0.75
    policy_c, policy_r = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0])
    ref_c, ref_r = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -6.0])
    tokens = torch.tensor([4, 6])
    loss, margin = rpo_loss(policy_c, policy_r, ref_c, ref_r, 0.1, tokens, 0.5)
    assert loss.item() == pytest.approx((0.5981389 + 0.7981389) / 2 + 0.75, abs=1e-6)
    assert margin.tolist() == pytest.approx([0.2, -0.2])
    assert (
        rpo_loss(policy_c, policy_r, ref_c, ref_r, 0.1, tokens, 0.0)[0]
        == dpo_loss(policy_c, policy_r, ref_c, ref_r, 0.1)[0]
    )


def test_rlhf_policy_gradient_is_minus_advantage_times_token_logprob():
    """By hand on a one-layer-free model: logits fixed per position, so log p of each target is known."""

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]])))

        def forward(self, x, cache=None):  # (B, T) -> (B, T, V)
            return self.w.unsqueeze(0).expand(x.size(0), -1, -1)

    x = torch.zeros(2, 2, dtype=torch.long)
    y = torch.tensor([[0, 1], [2, -1]])  # targets; -1 is not trained
    adv = torch.tensor([1.0, -2.0])
    model = Fixed()
    loss = policy_gradient_loss(model, x, y, adv)
    assert abs(loss.detach().item() - -(1.0 + 1.0 - 2.0) / 3) < 1e-6  # ratio 1 on fresh rollouts: -mean advantage
    (grad,) = torch.autograd.grad(loss, model.w)
    # the gradient of -(1 * log p0(0) + 1 * log p1(1) - 2 * log p0(2)) / 3, written out
    w = model.w.detach().clone().requires_grad_(True)
    logp = w.log_softmax(-1)
    by_hand = -(1.0 * logp[0, 0] + 1.0 * logp[1, 1] - 2.0 * logp[0, 2]) / 3
    (expected,) = torch.autograd.grad(by_hand, w)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_reward_model_is_gpt_with_a_scalar_head(tok):
    from llmstack.model.llama import GPT

    torch.manual_seed(0)
    policy = GPT(tiny_model_config(tok.vocab_size))
    rm = RewardModel.from_policy(policy)
    keys = set(rm.state_dict())
    assert "score.weight" in keys and not any(k.startswith("lm_head") for k in keys)
    assert torch.equal(rm.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    x = torch.randint(0, tok.n_ranks, (3, 10))
    r = rm(x)
    assert r.shape == (3, 10) and torch.all(r == 0)  # a zero head: neutral before training


def test_reward_model_likelihood_term_is_the_log_ratio_to_a_frozen_sft_copy(tok):
    from llmstack.model.llama import GPT

    torch.manual_seed(0)
    policy = GPT(tiny_model_config(tok.vocab_size)).eval()
    rm = RewardModel.from_policy(policy).eval()
    assert not any("reference" in name for name, _ in rm.named_parameters())  # frozen, not trained, not saved
    x = torch.randint(0, tok.n_ranks, (2, 9))
    with torch.no_grad():
        assert torch.all(rm(x) == 0)  # the same weights on both sides: neutral
        rm.model.embed_tokens.weight.add_(0.05 * torch.randn_like(rm.model.embed_tokens.weight))
        r = rm(x)
        moved = GPT(policy.config).eval()  # the RM's backbone with its tied head, as a language model
        moved.load_state_dict({k: v for k, v in rm.state_dict().items() if k.startswith("model.")}, strict=False)

        def logp(m):
            return m(x[:, :-1]).log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)

        expected = logp(moved) - logp(policy)
    assert torch.equal(rm.reference.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert torch.all(r[:, 0] == 0) and torch.allclose(r[:, 1:], expected, atol=1e-5) and expected.abs().max() > 1e-3


def test_reward_pooling_reads_the_mean_of_the_reply_tokens_or_the_last_one():
    from llmstack.rl.reward_model import pad_rows, rewards_of

    class PerToken(torch.nn.Module):  # reward after each prefix = the token id
        def __init__(self, pool: str) -> None:
            super().__init__()
            self.pool = pool

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float()

    rows = [([5, 1, 2, 7], [0, 0, 1, 1]), ([3, 4, 9], [0, 1, 0])]  # (ids, reply mask); row 2 right-padded
    x, last, m = pad_rows(rows, pad_id=0)
    assert x.tolist() == [[5, 1, 2, 7], [3, 4, 9, 0]] and last.tolist() == [3, 2]
    assert rewards_of(PerToken("mean"), x, last, m).tolist() == [4.5, 4.0]  # (2 + 7) / 2; 4 (9 is a tool result)
    assert rewards_of(PerToken("last"), x, last, m).tolist() == [7.0, 9.0]
    with pytest.raises(ValueError, match="no tokens the model wrote"):
        rewards_of(PerToken("mean"), x, last, torch.zeros_like(m))
    with pytest.raises(ValueError, match="unknown reward pooling 'max'"):
        RewardModel(tiny_model_config(64), pool="max")


# ----------------------------------------------------------------------------- the gold judge
def test_gold_judge_follows_the_rubric():
    perfect = reply("686*849", "582414", "The answer is 582414.")
    assert gold_score(P, perfect).score == pytest.approx(1.5)
    assert gold_score(P, reply("849 * 686", "582414", "The answer is 582414.")).score == pytest.approx(1.5)
    mistyped = reply("686*849", "582414", "The answer is 582144.")  # right call, answer copied wrong
    assert gold_score(P, mistyped).score == pytest.approx(0.25)
    faithful_wrong = reply("686*894", "613284", "The answer is 613284.")  # one operand mistyped, result reported
    assert gold_score(P, faithful_wrong).score == pytest.approx(0.125 + 0.25)
    assert gold_score(P, reply(None, None, "The answer is 582,414.")).score == pytest.approx(1.0)  # right, no tool
    cut = reply("686*849", "582414", "The answer", finished=False)
    assert gold_score(P, cut).score == pytest.approx(0.25 - 0.5)
    error = reply("686*", "error: cannot parse '686*'", "The answer is 5.")
    assert "broken" in gold_score(P, error).notes
    chatty = reply(None, None, "Sure! Multiplying them, the answer is 582414.")  # 45 visible characters
    assert gold_score(P, chatty).score == pytest.approx(1.0 - 0.01 * (45 - 24))
    wrong_op = reply("686+849", "1535", "The answer is 1535.")
    assert gold_score(P, wrong_op).score == pytest.approx(0.25)  # faithful, but not the question's operation


def test_gold_judge_on_subtraction_keeps_the_operands_in_order():
    sub = ArithmeticProblem("Calculate 505 - 663.", 505, 663, "-")
    assert sub.answer == -158
    assert gold_score(sub, reply("505-663", "-158", "The answer is -158.")).score == pytest.approx(1.5)
    assert gold_score(sub, reply("505 - 663", "-158", "The answer is -159.")).score == pytest.approx(0.25)
    swapped = gold_score(sub, reply("663-505", "158", "The answer is 158."))  # right numbers, wrong order
    assert swapped.score == pytest.approx(0.25) and "correct" not in swapped.notes
    half = gold_score(sub, reply("505-633", "-128", "The answer is -128."))
    assert half.notes[:1] == ["tool operand 505"] and half.score == pytest.approx(0.125 + 0.25)


def test_reasoning_gym_questions_for_the_gold_judge():
    import reasoning_gym

    from llmstack.chat.mixture import REASONING_GYM_3D, spread_seed
    from llmstack.rl.judges import HELDOUT_SEED, PREF_SEED, arithmetic_problems

    probs = arithmetic_problems(30, PREF_SEED, "basic_arithmetic_3d")
    ds = reasoning_gym.create_dataset(
        "basic_arithmetic", size=30, seed=spread_seed(PREF_SEED), **REASONING_GYM_3D["basic_arithmetic"]
    )
    assert [p.prompt for p in probs] == [e["question"] for e in ds]
    assert [str(p.answer) for p in probs] == [e["answer"] for e in ds]  # the dataset's own answers
    assert {p.op for p in probs} == {"+", "-", "*"}
    held = {p.prompt for p in arithmetic_problems(30, HELDOUT_SEED, "basic_arithmetic_3d")}
    assert not held & {p.prompt for p in probs}
    assert arithmetic_problems(5, PREF_SEED) != probs[:5]  # the default stays the SFT mixture's questions
    with pytest.raises(ValueError, match="unknown question set 'gsm8k'"):
        arithmetic_problems(5, PREF_SEED, "gsm8k")


def test_built_mistakes_each_lose_to_the_right_reply_and_probe_a_reward():
    from llmstack.rl.mistakes import MISTAKES, built_mistakes, mistake_probe, tool_reply

    minus = ArithmeticProblem("Calculate 505 - 663.", 505, 663, "-")
    small = ArithmeticProblem("Calculate 86 * 7.", 86, 7, "*")
    assert gold_score(minus, tool_reply(505, "-", 663)).score == pytest.approx(1.5)
    assert list(built_mistakes(minus)) == list(MISTAKES)  # every kind, the sign too: -158
    assert set(built_mistakes(P)) == set(MISTAKES) - {"sign dropped"}  # 582414 has no sign to drop
    assert "operand digit left out" not in built_mistakes(small)  # 7 has no digit to spare
    assert built_mistakes(minus)["sign dropped"].endswith("The answer is 158.<|assistant_end|>")
    for problem in (minus, small, P):
        for kind, bad in built_mistakes(problem).items():
            assert gold_score(problem, bad).score < 1.5, kind

    problems = {p.prompt: p for p in (minus, small, P)}

    def gold(prompts, replies):
        return [gold_score(problems[q], r).score for q, r in zip(prompts, replies, strict=True)]

    assert set(mistake_probe(gold, list(problems.values())).values()) == {0.0}  # the labeler: never fooled
    anti = mistake_probe(lambda q, r: [-x for x in gold(q, r)], list(problems.values()))
    assert set(anti) == set(MISTAKES) and set(anti.values()) == {1.0}
    assert mistake_probe(gold, []) == {}


def test_reply_parts_and_loss_mask(tok):
    fmt = ChatFormat(tok)
    text = reply("12*3", "36", "It is 36.")
    r = parse_reply(text)
    assert r.finished and [p.kind for p in r.parts] == ["tool_call", "tool_result", "text"]
    ids, mask = encode_reply(fmt, "What is 12*3?", text)
    n_prompt = len(fmt.prompt(Conversation.of(("user", "What is 12*3?"))))
    assert mask[:n_prompt] == [0] * n_prompt
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == "<|tool_call_start|>calculator: 12*3<|tool_call_end|>It is 36.<|assistant_end|>"
    assert "36<|tool_result_end|>" in tok.decode(ids)  # the tool's result is in the input, not trained


def test_gold_pairs_keep_the_widest_margin_first():
    group = [
        reply("686*849", "582414", "The answer is 582414."),  # 1.5
        reply("686*849", "582414", "The answer is 582144."),  # 0.25
        reply("686*849", "582414", "The answer is 582143."),  # 0.25
    ]
    pairs = gold_pairs([P], [group], min_margin=0.25, per_prompt=2)
    assert len(pairs) == 2 and all(p.chosen == group[0] for p in pairs)
    assert pairs[0].scores is not None and pairs[0].scores[0] - pairs[0].scores[1] == pytest.approx(1.25)
    assert gold_pairs([P], [group[1:]], min_margin=0.25) == []  # equally good: a tie, no pair


def test_perturbed_pairs_put_one_wrong_digit_into_a_right_reply():
    """A copying error on the way in (an operand: the tool result and the answer follow it) or on the way
    out (the answer): one digit differs, and the gold judge ranks the original higher."""
    import random

    good = reply("686*849", "582414", "The answer is 582414.")
    kinds = set()
    for seed in range(40):
        bad = perturb(P, good, random.Random(seed))
        assert bad is not None and bad != good and gold_score(P, bad).score < gold_score(P, good).score
        call = bad.split("calculator: ")[1].split("<")[0]
        result = bad.split("<|tool_result_start|>")[1].split("<")[0]
        answer = bad.split("The answer is ")[1].split(".")[0]
        if call == "686*849":  # the answer was mistyped: exactly one digit off the tool's result
            assert result == "582414" and sum(x != y for x, y in zip(answer, result, strict=True)) == 1
            kinds.add("out")
        else:  # an operand was mistyped or a digit left out: the calculator's result for it, reported faithfully
            a, b = call.split("*")
            assert result == str(int(a) * int(b)) == answer and not a.startswith("0") and not b.startswith("0")
            if len(a + b) == 6:
                assert sum(x != y for x, y in zip(a + b, "686849", strict=True)) == 1
                kinds.add("in")
            else:
                assert len(a + b) == 5 and any(x[:i] + x[i + 1 :] in (a, b) for x in ("686", "849") for i in range(3))
                kinds.add("dropped")
    assert kinds == {"in", "dropped", "out"}
    minus = ArithmeticProblem("Calculate 505 - 663.", 505, 663, "-")
    good_minus = reply("505-663", "-158", "The answer is -158.")
    for seed in range(20):  # the sign survives: a miscopied answer stays negative, a new result replaces it
        bad = perturb(minus, good_minus, random.Random(seed))
        assert bad is not None and "--" not in bad and gold_score(minus, bad).score < 1.5
    wrong = reply("686*849", "582414", "The answer is 582144.")
    pairs = perturbed_pairs([P], [[good, wrong, good]], n=5, seed=1)
    assert len(pairs) == 5 and all(p.chosen == good and p.rejected != good for p in pairs)  # only right replies
    assert perturbed_pairs([P], [[wrong]], n=5) == []  # no right reply: nothing to perturb
    assert perturb(P, reply(None, None, "The answer is 582414."), random.Random(0)) is None


def test_llm_judged_pairs_drop_ties():
    def judge(problem, a, b):  # prefers the shorter answer, ties on equal length
        return ("a" if len(a) < len(b) else "b" if len(b) < len(a) else "tie"), ""

    pairs = llm_pairs(["Why?", "How?"], [["short.", "a longer one.", "x", "y"], ["ab", "cd"]], judge)
    assert [(p.chosen, p.rejected, p.source) for p in pairs] == [("short.", "a longer one.", "llm")]


def test_hhh_alignment_becomes_pairs(tmp_path):
    task = tmp_path / "hhh_alignment" / "harmless" / "task.json"
    task.parent.mkdir(parents=True)
    ex = {"input": "Can you help me?", "target_scores": {"Sure, how?": 1, "No.": 0}}
    task.write_text(json.dumps({"examples": [ex]}))
    assert hhh_pairs(tmp_path) == [Pair("Can you help me?", "Sure, how?", "No.", "hhh_alignment")]
    with pytest.raises(FileNotFoundError, match="llmstack data fetch"):
        hhh_pairs(tmp_path / "nothing")


def test_malformed_preference_rows_name_the_line(tmp_path):
    f = tmp_path / "train.jsonl"
    write_pairs(f, [Pair("q", "good", "bad", "gold", (1.0, 0.0))])
    assert read_pairs(f) == [Pair("q", "good", "bad", "gold", (1.0, 0.0))]
    good = f.read_text()
    for bad, why in [
        ("{not json", "not valid JSON"),
        ('{"prompt": "q", "chosen": "a"}', '"rejected" must be a non-empty string'),
        ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "the same reply"),
        ('["q", "a", "b"]', "expected an object"),
    ]:
        f.write_text(good + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"train.jsonl:3: .*{why}"):
            read_pairs(f)


def test_overoptimisation_point():
    assert overoptimisation_point([0, 10, 20, 30], [0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 0.2, 0.1]) == 10
    assert overoptimisation_point([0, 10, 20, 30], [0.0, 1.0, 2.0, 3.0], [0.0, 0.1, 0.2, 0.3]) is None
    assert overoptimisation_point([0, 10, 20], [0.0, 1.0, 0.5], [0.0, 0.5, 0.0]) is None  # both fall: not hacking


# ----------------------------------------------------------------------------- the commands, end to end
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tok):
    """A run directory shaped like the main job's: <run>/sft holds a (random, tiny) chat model."""
    from llmstack.model.llama import GPT
    from llmstack.training.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("rl") / "run"
    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=128))
    meta = {"stage": "sft", "tokenizer_fingerprint": tok.fingerprint, "model_config": model.config.to_dict()}
    save_checkpoint(run / "sft", 1, model, None, meta)
    tok.save(run / "sft" / "tokenizer")
    return run


def crafted_pairs(folder, n_train: int = 24, n_val: int = 8) -> None:
    """Finished replies beat ones cut off mid-way (a preference even a tiny model learns in seconds)."""
    import random

    rng = random.Random(0)

    def pair(i: int) -> Pair:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        q = f"What is {a} times {b}?"
        good = reply(f"{a}*{b}", str(a * b), f"The answer is {a * b}.")
        return Pair(q, good, reply(f"{a}*{b}", str(a * b), "The", finished=False), "gold", (1.5, -0.25))

    write_pairs(folder / "train.jsonl", [pair(i) for i in range(n_train)])
    write_pairs(folder / "heldout.jsonl", [pair(i) for i in range(n_val)])


def test_preferences_command_writes_pairs(sft_run, capsys):
    from llmstack.cli import main

    out = sft_run / "prefs-cli"
    args = ["preferences", "--run-dir", str(sft_run), "--out", str(out), "--judge", "none", "--prompts", "6"]
    assert main(args + ["--heldout-prompts", "4", "--samples", "3", "--min-margin", "0", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_pairs_gold"] >= 1 and summary["train_pairs_llm"] == 0
    assert len(read_pairs(out / "train.jsonl")) == summary["train_pairs_gold"] + summary["train_pairs_perturbed"]
    assert all(p.source == "gold" for p in read_pairs(out / "train.jsonl"))


def test_question_set_travels_from_the_pairs_to_the_reward_model_and_rlhf(sft_run, capsys):
    from llmstack.cli import main
    from llmstack.rl.preferences import pairs_questions
    from llmstack.rl.reward_model import load_reward_model

    pairs = sft_run / "prefs-3d"
    args = ["preferences", "--run-dir", str(sft_run), "--out", str(pairs), "--judge", "none", "--prompts", "6"]
    args += ["--heldout-prompts", "4", "--samples", "2", "--min-margin", "0", "--questions", "basic_arithmetic_3d"]
    assert main(args) == 0 and pairs_questions(pairs) == "basic_arithmetic_3d"
    assert read_pairs(pairs / "train.jsonl")[0].prompt.startswith("Calculate ")
    assert pairs_questions(sft_run / "nowhere") == "mixture"
    crafted_pairs(pairs)  # learnable pairs; the summary (and so the question set) stays
    common = ["--run-dir", str(sft_run), "--device", "cpu", "--dtype", "float32", "--eval-every", "0"]
    rm_args = ["reward-model", *common, "--pairs", str(pairs), "--out", str(sft_run / "rm-3d"), "--max-steps", "2"]
    assert main(rm_args + ["--batch-size", "4"]) == 0
    assert load_reward_model(str(sft_run / "rm-3d"))[1].meta["questions"] == "basic_arithmetic_3d"
    rl = ["--max-steps", "1", "--group", "2", "--prompts-per-step", "2", "--heldout", "2"]
    assert main(["rlhf", *common, *rl, "--reward-model", str(sft_run / "rm-3d"), "--out", str(sft_run / "h3d")]) == 0
    summary = json.loads((sft_run / "h3d" / "summary.json").read_text())
    assert summary["questions"] == "basic_arithmetic_3d"
    assert "on basic_arithmetic_3d questions" in capsys.readouterr().out
    bad = ["rlhf", *common, *rl, "--reward-model", str(sft_run / "rm-3d"), "--questions", "gsm8k"]
    assert main(bad + ["--out", str(sft_run / "hbad")]) == 2
    assert "unknown question set 'gsm8k'" in capsys.readouterr().err


def test_reward_model_dpo_and_rlhf_commands(sft_run, capsys):
    from llmstack.cli import main
    from llmstack.rl.reward_model import load_reward_model

    pairs = sft_run / "prefs"
    crafted_pairs(pairs)
    common = ["--run-dir", str(sft_run), "--device", "cpu", "--dtype", "float32"]
    rm_args = ["reward-model", *common, "--max-steps", "40", "--batch-size", "8", "--lr", "3e-3", "--eval-every", "0"]
    assert main(rm_args) == 0
    summary = json.loads((sft_run / "rm" / "summary.json").read_text())
    assert summary["heldout_accuracy"] >= 0.9 and summary["train_pairs"] == 24
    probe = summary["mistake_probe"]
    assert set(probe) == {"operand digit left out", "operand digit changed", "wrong operation", "result miscopied"}
    assert all(0.0 <= v <= 1.0 for v in probe.values())  # the mixture's products and sums: no sign to drop
    rm, _ = load_reward_model(str(sft_run / "rm"))
    assert isinstance(rm, RewardModel)

    assert main(["dpo", *common, "--max-steps", "6", "--batch-size", "8", "--lr", "1e-3", "--heldout", "4"]) == 0
    summary = json.loads((sft_run / "dpo" / "summary.json").read_text())
    assert {"gold_before", "gold_after", "sampled_gold_before", "sampled_correct_after"} <= set(summary)
    assert summary["evals"][-1]["val_accuracy"] >= 0.5  # the implicit reward moved towards the labels

    rl = ["--max-steps", "3", "--group", "2", "--prompts-per-step", "2", "--heldout", "4", "--eval-every", "1"]
    assert main(["rlhf", *common, *rl]) == 0
    out = sft_run / "rlhf"
    assert (out / "overoptimisation.png").stat().st_size > 0
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == 3
    assert "rlhf: held-out RM score" in capsys.readouterr().out
    shutil.rmtree(sft_run / "rm" / "reference")
    with pytest.raises(FileNotFoundError, match="frozen SFT copy is missing"):
        load_reward_model(str(sft_run / "rm"))


def test_malformed_pairs_file_is_a_clear_cli_error(sft_run, tmp_path, capsys):
    from llmstack.cli import main

    crafted_pairs(tmp_path)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write('{"prompt": "q", "chosen": 3, "rejected": "b"}\n')
    args = ["reward-model", "--run-dir", str(sft_run), "--pairs", str(tmp_path), "--out", str(tmp_path / "rm")]
    assert main(args + ["--max-steps", "1", "--batch-size", "4"]) == 2
    assert 'train.jsonl:25: "chosen" must be a non-empty string' in capsys.readouterr().err


def test_rm_refresh_labels_the_rollouts_and_trains_on_them(sft_run, tok, capsys):
    """Iterated RLHF's step: the gold judge's pairs from rollouts join the RM's pairs; a resumed refresh
    reuses the pairs it wrote instead of relabelling."""
    import random
    from dataclasses import replace

    from llmstack.cli import main
    from llmstack.rl.reward_model import load_reward_model
    from llmstack.rl.reward_model import preset as rm_preset
    from llmstack.rl.rlhf import refresh_reward_model
    from llmstack.training.distributed import init_distributed

    pairs, rm_dir = sft_run / "prefs-refresh", sft_run / "rm-refresh-base"
    crafted_pairs(pairs)
    common = ["--run-dir", str(sft_run), "--device", "cpu", "--dtype", "float32", "--eval-every", "0"]
    assert main(["reward-model", *common, "--pairs", str(pairs), "--out", str(rm_dir), "--max-steps", "1"]) == 0
    assert load_reward_model(str(rm_dir))[1].meta["pairs"] == str(pairs.resolve())
    rng = random.Random(1)
    rollouts = []
    for _ in range(6):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        right = reply(f"{a}*{b}", str(a * b), f"The answer is {a * b}.")
        rollouts.append((ArithmeticProblem(f"What is {a} times {b}?", a, b, "*"), [right, right[:30]]))
    cfg = replace(rm_preset("tiny"), max_steps=40, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, dtype="float32")
    out = sft_run / "h-refresh" / "rm-refresh"
    r = refresh_reward_model(rm_dir, 5, rollouts, pairs, out, cfg, tok, init_distributed("cpu"))
    assert r is not None and r.new_pairs == 6 and r.pool == 6 + 3 * 6 and r.path == str(out / "step_000005")
    assert r.accuracy_after >= 0.9 and r.accuracy_after >= r.accuracy_before
    assert [p.rejected for p in read_pairs(out / "step_000005" / "pairs.jsonl")] == [g[1] for _, g in rollouts]
    rm, ckpt = load_reward_model(r.path)
    assert ckpt.meta["refreshed_at_rlhf_step"] == 5 and ckpt.meta["pairs"] == str(pairs.resolve())
    again = refresh_reward_model(rm_dir, 5, [], pairs, out, cfg, tok, init_distributed("cpu"))
    assert again is not None and again.new_pairs == 6 and again.accuracy_after == r.accuracy_after  # reloaded
    assert refresh_reward_model(r.path, 9, [], pairs, out, cfg, tok, init_distributed("cpu")) is None
    by_checkpoint = refresh_reward_model(ckpt.path, 7, rollouts, pairs, out, cfg, tok, init_distributed("cpu"))
    assert by_checkpoint is not None and (out / "step_000007" / "reference" / "model.safetensors").exists()
    assert "no rollouts since the last refresh" in capsys.readouterr().out


def test_rlhf_in_rounds_refreshes_and_resumes(sft_run, capsys, monkeypatch):
    from llmstack.cli import main
    from llmstack.rl import judges

    # a random model's replies all grade alike; a labeler that prefers shorter replies makes pairs of them
    monkeypatch.setattr(judges, "gold_score", lambda problem, r: judges.Grade(-len(r) / 8))

    pairs, rm_dir = sft_run / "prefs-rounds", sft_run / "rm-rounds"
    crafted_pairs(pairs)
    common = ["--run-dir", str(sft_run), "--device", "cpu", "--dtype", "float32"]
    assert main(["reward-model", *common, "--pairs", str(pairs), "--out", str(rm_dir), "--max-steps", "1"]) == 0
    out = sft_run / "h-rounds"
    rl = ["--group", "2", "--prompts-per-step", "2", "--heldout", "2", "--eval-every", "2", "--eval-samples", "2"]
    args = ["rlhf", *common, *rl, "--reward-model", str(rm_dir), "--out", str(out), "--refresh-every", "2"]
    assert main([*args, "--max-steps", "4", "--refresh-steps", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [e["step"] for e in summary["evals"]] == [0, 2, 4]
    [r] = summary["refreshes"]  # 2 prompts x 2 steps, 2 replies each: at most a pair per prompt
    assert r["step"] == 2 and 1 <= r["new_pairs"] <= 4 and summary["refresh_labels"] == r["new_pairs"]
    assert len(read_pairs(out / "rm-refresh" / "step_000002" / "pairs.jsonl")) == r["new_pairs"]
    assert "RM refresh at step 2" in capsys.readouterr().out
    assert main([*args, "--max-steps", "6", "--refresh-steps", "2"]) == 0  # resumed: rounds at 2 and 4 reused
    summary = json.loads((out / "summary.json").read_text())
    assert [e["step"] for e in summary["evals"]] == [0, 2, 4, 6]
    # 2 reloaded; 4 labelled from the rollouts of steps 3-4 (no more), which the step-4 checkpoint kept
    assert [r["step"] for r in summary["refreshes"]] == [2, 4] and summary["refreshes"][1]["new_pairs"] <= 4
    history = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]  # the first run's steps kept
    assert "resumed from" in capsys.readouterr().out
    assert main([*args, "--max-steps", "6", "--no-resume"]) == 2
    assert "holds an RLHF run already" in capsys.readouterr().err
    assert main([*args, "--max-steps", "9", "--refresh-every", "3"]) == 2  # other rounds: refused
    assert "was run with refresh_every 2, not 3" in capsys.readouterr().err
    missing = ["--pairs", str(sft_run / "nowhere"), "--out", str(sft_run / "h-nowhere")]
    assert main([*args, "--max-steps", "6", *missing]) == 2
    assert "needs the pairs it was trained on" in capsys.readouterr().err
    assert main([*args, "--max-steps", "6", "--refresh-every", "-1"]) == 2
    assert "refresh_every and refresh_replay must be >= 0" in capsys.readouterr().err


def test_score_policy_grades_every_sampled_reply(sft_run):
    from llmstack.interop.load import load_trainable
    from llmstack.rl.judges import score_policy

    model, tok, _ = load_trainable(sft_run / "sft")
    model.eval()
    probs = [P, ArithmeticProblem("Calculate 505 - 663.", 505, 663, "-")]
    one = score_policy(model, tok, probs, 1.0, seed=3, max_new_tokens=8)
    three = score_policy(model, tok, probs, 1.0, seed=3, max_new_tokens=8, samples=3)
    assert one.examples[0].startswith(repr(P.prompt)) and three.examples[1].startswith(repr(P.prompt))
    assert -1.0 <= three.gold <= 1.5 and 0.0 <= three.correct <= 1.0
    with pytest.raises(ValueError, match="samples must be 1"):
        score_policy(model, tok, probs, 0.0, samples=2)  # greedy replies would all be the same
    with pytest.raises(ValueError, match="samples must be 1"):
        score_policy(model, tok, probs, 1.0, samples=0)
