"""Wordings: the held-out families never reach training, and the eval tells seen from unseen wording."""

from __future__ import annotations

import random
import re

import pytest

from llmstack.chat import mixture, wording
from llmstack.chat.mixture import ARITH_TEMPLATES, IDENTITY_QUESTIONS, arithmetic, identity, spelling
from llmstack.eval import assistant as ev


def _fixed_words(frame: str) -> str:
    """A frame's own words, slots and punctuation removed (what would show it was trained on)."""
    return re.sub(r"\s+", " ", re.sub(r"\{\w\}|[^\w' ]", " ", frame)).strip().lower()


def _pattern(template: str) -> str:
    return re.escape(template).replace(r"\{a\}", r"\d+").replace(r"\{b\}", r"\d+")


def test_train_and_heldout_pools_are_disjoint():
    for pools in (wording.ARITH_FRAMES, wording.SPELLING_FRAMES, wording.PREFIXES, wording.SUFFIXES):
        assert not set(pools["train"]) & set(pools["heldout"])
    for op in wording.OP_FRAMES.values():
        assert not set(op["train"]) & set(op["heldout"])
    trained = {q.lower() for qs in IDENTITY_QUESTIONS.values() for q in qs}
    assert not trained & {q.lower() for qs in wording.IDENTITY_HELDOUT.values() for q in qs}


def test_no_heldout_frame_appears_in_the_training_mixture():
    text = "\n".join(
        m.text.lower() if isinstance(m.text, str) else ""
        for conv in arithmetic(3000, 1) + identity(600, 2) + spelling(600, 3, ["banana", "strawberry", "letter"])
        for m in conv.messages
        if m.role == "user"
    )
    heldout = [*wording.ARITH_FRAMES["heldout"], *wording.SPELLING_FRAMES["heldout"]]
    heldout += [f for op in wording.OP_FRAMES.values() for f in op["heldout"]]
    heldout += wording.PREFIXES["heldout"] + wording.SUFFIXES["heldout"]
    for frame in heldout:
        words = _fixed_words(frame)
        if len(words) >= 8:  # long enough to be the frame's own, not a common phrase
            assert words not in re.sub(r"[^\w' ]", " ", text), frame
    for q in (q for qs in wording.IDENTITY_HELDOUT.values() for q in qs):
        assert q.lower().rstrip("?.") not in text, q


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("op", ["*", "+"])
def test_every_wording_keeps_the_operands(split, op):
    """Whatever the frame, variation and separators, the question holds exactly its two numbers."""
    rng = random.Random(0)
    frames = set()
    for _ in range(500):
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        q = wording.arithmetic_wording(op, a, b, rng, split)
        assert [int(x) for x in re.findall(r"\d[\d,]*", q.replace(",", ""))] == [a, b], q
        frames.add(q)
    assert len(frames) > 300  # many distinct wordings, not a handful


def test_the_mixture_calls_the_calculator_with_the_question_numbers():
    for conv in arithmetic(400, 7):
        q = conv.messages[0].text
        call = next(p.text for p in conv.messages[1].parts if p.kind == "tool_call")
        a, b = (int(x) for x in re.findall(r"\d+", q.replace(",", "")))
        assert re.fullmatch(rf"calculator: {a}[*+]{b}", call), (q, call)
    templates = [
        re.escape(t).replace(r"\{a\}", r"\d+").replace(r"\{b\}", r"\d+") for ts in ARITH_TEMPLATES.values() for t in ts
    ]
    questions = [conv.messages[0].text for conv in arithmetic(1000, 8)]
    worded = [q for q in questions if not any(re.fullmatch(t, q) for t in templates)]
    assert abs(len(worded) / len(questions) - mixture.WORDING_SHARE) < 0.1  # that share in the many wordings


WORDS = ["strawberry", "banana", "letters", "python", "bookkeeper"]


class _Oracle:
    """Answers like a trained assistant: a calculator call on the two numbers, the name on identity
    questions, the right letter count. ``trained_only`` understands only the trained templates."""

    def __init__(self, trained_only: bool):
        self.trained_only = trained_only
        card = mixture.ModelCard()
        self.patterns = [_pattern(t) for t in ARITH_TEMPLATES["*"]]
        self.identity = {q for qs in IDENTITY_QUESTIONS.values() for q in qs}
        self.reply = f"I am {card.name}, made by {card.maker}."

    def answer_questions(self, qs: list[str], max_tokens: int) -> list[str]:
        out = []
        for q in qs:
            nums = [int(x) for x in re.findall(r"\d+", q.replace(",", ""))]
            known = any(re.fullmatch(p, q) for p in self.patterns) or q in self.identity
            if self.trained_only and not known and not q.startswith("How many "):
                out.append("I do not understand.")
            elif len(nums) == 2:
                value = nums[0] * nums[1] if re.search(r"times|\*|x|×|multipl|product", q, re.I) else sum(nums)
                out.append(f"<|tool_call_start|>calculator: x<|tool_call_end|>The answer is {value}.")
            elif word := next((w for w in WORDS if w in q.lower()), None):
                letter = re.findall(r"\b([a-z])(?:'s|s)?\b", q.lower().replace(word, " "))[-1]
                out.append(f"There are {word.count(letter)}.")
            else:
                out.append(self.reply)
        return out


def test_the_eval_separates_seen_from_unseen_wording(monkeypatch):
    words = WORDS * 4
    for trained_only in (False, True):
        monkeypatch.setattr(ev, "our_chat", lambda model, tok, tools=None, t=trained_only: _Oracle(t))
        results = {r.name: r for r in ev.evaluate_assistant(None, None, None, n=60)}
        products, unseen = results["multiply 3x3 (calculator)"], results["multiply 3x3 (calculator), unseen wording"]
        assert products.accuracy == 1.0 and unseen.total == 60
        assert unseen.accuracy == (1.0 if not trained_only else 0.0)
        assert results["identity"].accuracy == 1.0
        assert results["identity, unseen wording"].accuracy == (1.0 if not trained_only else 0.0)
        spelled = ev.eval_spelling(None, None, words, n=10, wording="unseen")
        assert spelled.total == 10 and spelled.accuracy == (1.0 if not trained_only else 0.0)
    table = ev.wording_table(list(results.values()))
    row = next(line for line in table if line.startswith("multiply 3x3 (calculator) "))
    assert "100.0%" in row and "0.0%" in row and "of 60" in row
