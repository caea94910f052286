"""SFT: the data mixture, batching with the loss mask, training through the shared loop, scoring."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_model_config

from llmstack.chat.conversation import ChatFormat, Conversation
from llmstack.chat.finetune import mixture_parts
from llmstack.chat.mixture import (
    ARITH_TEMPLATES,
    HELDOUT_SEED,
    REASONING_GYM,
    REASONING_GYM_SMALL,
    SPELLING_TEMPLATES,
    MixtureConfig,
    ModelCard,
    arithmetic,
    build_mixture,
    identity,
    reasoning,
    reasoning_gym_entries,
    spelling,
    spread_seed,
    with_calculator_calls,
    words_from,
)
from llmstack.eval.assistant import EvalResult, _final_number
from llmstack.model.llama import GPT
from llmstack.tokenizer import special as S
from llmstack.tools.calculator import calculator
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import DistInfo
from llmstack.training.loop import train
from llmstack.training.sft import IGNORE, SFTTask, collate

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def test_worked_solutions_become_calculator_calls():
    parts = with_calculator_calls("He has 35 × 3 = 105 kiwi, so 105 + 35 = 140 in all.")
    calls = [p.text for p in parts if p.kind == "tool_call"]
    results = [p.text for p in parts if p.kind == "tool_result"]
    assert calls == ["calculator: 35 * 3", "calculator: 105 + 35"] and results == ["105", "140"]
    assert parts[0].text == "He has " and parts[-1].text == " in all."


def test_mixture_sources_are_correct_and_deterministic():
    convs = arithmetic(50, seed=3)
    assert [c.messages[1].parts for c in convs] == [c.messages[1].parts for c in arithmetic(50, seed=3)]
    for c in convs:
        call, result, text = c.messages[1].parts
        a, op, b = call.text.removeprefix("calculator: ").partition("*" if "*" in call.text else "+")
        assert int(result.text) == (int(a) * int(b) if op == "*" else int(a) + int(b))
        assert text.text == f"The answer is {result.text}."
    for c in spelling(30, 1, ["strawberry", "banana"]):
        word = c.messages[1].parts[0].text.split("'")[1]
        letter = c.messages[1].parts[0].text.split("'")[3]
        assert c.messages[1].parts[1].text == str(word.count(letter))
    card = ModelCard(name="testbot", maker="the test team")
    answers = [c.messages[1].text for c in identity(40, 0, card)]
    assert all("testbot" in a and "test team" in a.lower() for a in answers)  # who it is and who made it, always
    assert words_from(["the tokenizer tokenizer splits words", "splits"])[:2] == ["splits", "tokenizer"]


def test_five_digit_products_have_twice_their_natural_share():
    """Uniform 3x3 products are 5 digits long 17% of the time; the mixture makes it about a third, and the
    questions stay 3-digit x 3-digit."""
    products = [c for c in arithmetic(3000, seed=5) if "*" in c.messages[1].parts[0].text]
    operands = [c.messages[1].parts[0].text.removeprefix("calculator: ").split("*") for c in products]
    assert all(100 <= int(x) <= 999 for pair in operands for x in pair)
    share = sum(len(c.messages[1].parts[1].text) == 5 for c in products) / len(products)
    assert 0.28 < share < 0.40


def test_reasoning_gym_arithmetic_goes_through_the_calculator_and_never_uses_held_out_questions(monkeypatch):
    """Each conversation's calculator call is the question's expression and evaluates to the answer;
    a question of the held-out seed is left out even when a training seed draws it."""
    import llmstack.chat.mixture as mixture

    monkeypatch.setattr(mixture, "_HELDOUT_EXCLUDED", 300)
    convs = reasoning(60, seed=4)
    assert len(convs) == 60 and convs[0].messages[0].content != convs[-1].messages[0].content
    kinds = {"Calculate": 0, "State the final answer": 0}
    for c in convs:
        call, result, text = c.messages[1].parts
        q = c.messages[0].content
        kinds["Calculate" if q.startswith("Calculate") else "State the final answer"] += 1
        expr = call.text.removeprefix("calculator: ")
        assert " " not in expr and expr[:2] in q.replace(" ", "")
        assert calculator(expr) == result.text and text.text == f"The answer is {result.text}."
    assert kinds == {"Calculate": 30, "State the final answer": 30}
    held = {
        x["question"]
        for config in (REASONING_GYM["chain_sum"], REASONING_GYM_SMALL["chain_sum"])  # the mixture's and RL's
        for x in reasoning_gym_entries("chain_sum", 300, HELDOUT_SEED, **config)
    }
    settings = REASONING_GYM["chain_sum"]
    drawn = {x["question"] for x in reasoning_gym_entries("chain_sum", 410, spread_seed(9), **settings)}
    assert held & drawn  # small settings repeat questions across seeds...
    assert not held & {c.messages[0].content for c in reasoning(400, seed=9)}  # ...and the mixture drops them


def test_reasoning_gym_seeds_are_spread_apart():
    """reasoning-gym draws item i from seed + i: the mixture's seeds (train 105, validation 205) must not
    land within a few thousand items of each other, of the suite's seed 0 or of HELDOUT_SEED."""
    starts = [spread_seed(s) for s in (105, 205, 103, 203)] + [0, HELDOUT_SEED]
    assert all(abs(a - b) > 10_000 for i, a in enumerate(starts) for b in starts[i + 1 :])


def test_collate_trains_only_assistant_tokens(tok):
    fmt = ChatFormat(tok)
    r = fmt.render(arithmetic(1, seed=0)[0])
    x, y = collate([(r.ids, r.mask)], pad_id=tok.special_id(S.PAD))
    assert x.shape == y.shape and x.shape[1] % 64 == 0
    trained = y[y != IGNORE].tolist()
    assert trained == [t for t, m in zip(r.ids[1:], r.mask[1:], strict=True) if m]
    assert tok.decode(trained).endswith("<|assistant_end|>") and "<|tool_result_start|>" not in tok.decode(trained)


def test_batches_are_grouped_by_length_and_an_epoch_sees_every_conversation_once(tok):
    short = [Conversation.of(("user", f"q{i}"), ("assistant", "a")) for i in range(48)]
    long = [Conversation.of(("user", f"q{i} " + "the model reads tokens " * 20), ("assistant", "b")) for i in range(16)]
    convs = short + long
    cfg = TrainConfig(max_steps=10, batch_size=8, seq_len=192, eval_batches=1, seed=3)
    task = SFTTask(convs, convs[:8], ChatFormat(tok), tok.special_id(S.PAD), cfg, CPU)
    seen, widths = [], []
    for _ in range(len(convs) // 8):  # one epoch
        first = task.cursor
        x, _ = task.next_batch()
        seen += [task._index(first + i) for i in range(8)]
        widths.append(x.shape[1])
    assert sorted(seen) == list(range(len(convs)))  # a permutation: nothing dropped or repeated
    # one window holds the whole epoch here: 6 batches of short rows (width 64) and 2 of long ones
    assert sorted(widths) == [64] * 6 + [192] * 2
    assert task._order(1).tolist() != task._order(0).tolist()  # a new shuffle each epoch
    again = SFTTask(convs, convs[:8], ChatFormat(tok), tok.special_id(S.PAD), cfg, CPU)
    again.load_state_dict(task.state_dict())  # resuming mid-stream continues with the same batches
    assert torch.equal(again.next_batch()[0], task.next_batch()[0])


def test_sft_through_the_shared_loop_learns_the_format(tok, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(tok.vocab_size, max_seq_len=128))
    convs = [Conversation.of(("user", "hi"), ("assistant", "the model reads tokens"))] * 32
    cfg = TrainConfig(max_steps=60, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=2, eval_every=0, eval_batches=2)
    task = SFTTask(convs, convs[:8], ChatFormat(tok), tok.special_id(S.PAD), cfg, CPU)
    result = train(model, task, cfg, tmp_path, CPU, meta={"tokenizer_fingerprint": tok.fingerprint}, progress=False)
    assert result.evals[0]["val_loss"] > 3.0 and result.evals[-1]["val_loss"] < 0.5
    prompt = ChatFormat(tok).prompt(Conversation.of(("user", "hi")))
    from llmstack.inference.engine import Engine
    from llmstack.inference.sample import SamplingConfig

    out = Engine(model).generate(
        [prompt], SamplingConfig(max_new_tokens=20, temperature=0.0), {tok.special_id(S.ASSISTANT_END)}
    )[0]
    assert tok.decode(out) == "the model reads tokens<|assistant_end|>"


def test_scoring_ignores_numbers_inside_tool_spans():
    text = "<|tool_call_start|>calculator: 12*34<|tool_call_end|><|tool_result_start|>408<|tool_result_end|>It is 407."
    assert _final_number(text) == 407
    assert _final_number("<|tool_call_start|>calculator: 12*34") is None
    r = EvalResult("x", 95, 100)
    lo, hi = r.interval()
    assert lo < 0.95 < hi and lo > 0.88 and hi < 0.99


def test_builtin_spec_picks_kinds_and_their_amounts():
    full = mixture_parts("builtin")
    assert full.arithmetic > 1000 and full.identity > 0  # the whole mixture
    some = mixture_parts("builtin:identity,spelling")
    assert (some.arithmetic, some.identity, some.spelling, some.gsm) == (0, full.identity, full.spelling, 0)
    balanced = mixture_parts("builtin:arithmetic=600, identity=250,spelling")
    assert (balanced.arithmetic, balanced.identity, balanced.spelling) == (600, 250, full.spelling)
    assert balanced.reasoning == balanced.chitchat == 0 and balanced.wording_share == full.wording_share
    worded = mixture_parts("builtin:arithmetic=40,wording=1")
    assert worded.wording_share == 1.0 and worded.arithmetic == 40 and worded.identity == 0
    classic = [c.messages[0].text for c in arithmetic(40, 3)]
    reworded = [c.messages[0].text for c in arithmetic(40, 3, worded.wording_share)]
    assert sum(a != b for a, b in zip(classic, reworded, strict=True)) > 30  # other sentences around them
    words = ["strawberry", "banana", "letters", "python", "bookkeeper"]
    for share, worded_at_most in ((0.0, 0), (1.0, 40)):  # the share reaches both kinds through build_mixture
        mix = MixtureConfig(arithmetic=20, identity=0, spelling=20, gsm=0, chitchat=0, reasoning=0, wording_share=share)
        asked = [c.messages[0].text for c in build_mixture(mix, seed=5, words=words)]
        classic_sums = {t for ts in ARITH_TEMPLATES.values() for t in ts} | set(SPELLING_TEMPLATES)
        patterns = [re.escape(t).replace(r"\{a\}", r"\d+").replace(r"\{b\}", r"\d+") for t in classic_sums]
        patterns = [p.replace(r"\{l\}", r"\w").replace(r"\{w\}", r"\w+") for p in patterns]
        unusual = [q for q in asked if not any(re.fullmatch(p, q) for p in patterns)]
        assert len(unusual) >= 30 if share else unusual == [], (share, unusual[:3])
        assert len(unusual) <= worded_at_most
    for bad, named in (
        ("builtin:arithmetic=0", "positive integer"),
        ("builtin:arithmetic=many", "positive integer"),
        ("builtin:arithmetics", "unknown mixture kind 'arithmetics'"),
        ("builtin:,", "no mixture kinds"),
        ("builtin:arithmetic,wording=1.5", "from 0 to 1"),
        ("builtin:arithmetic,wording=most", "from 0 to 1"),
        ("builtin:wording=0.5", "no mixture kinds"),
    ):
        with pytest.raises(ValueError, match=named):
            mixture_parts(bad)
