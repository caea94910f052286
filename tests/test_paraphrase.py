"""Teacher-written wordings: which rewrites become frames, the frames file, and the eval asking in them."""

from __future__ import annotations

import json
import re

import pytest
from conftest import chatml_model

from llmstack.chat import paraphrase as pp
from llmstack.chat.mixture import ModelCard
from llmstack.eval import assistant as ev


@pytest.mark.parametrize(
    "skill, reply, values, frame",
    [
        ("*", "Could you work out 412 multiplied by 87?", ("412", "87"), "Could you work out {a} multiplied by {b}?"),
        ("*", '"What do I get from 87 times 412?"\nSure!', ("412", "87"), "What do I get from {b} times {a}?"),
        ("*", "412 x 87, what is it?", ("412", "87"), "{a} x {b}, what is it?"),
        ("+", "How much do 300 and 45 add up to?", ("300", "45"), "How much do {a} and {b} add up to?"),
        ("letters", "How often does the letter r show up in morning?", ("morning", "r"),
         "How often does the letter {l} show up in {w}?"),
        ("letters", "Count the r's in the word morning.", ("morning", "r"), "Count the {l}'s in the word {w}."),
        ("name", "By what name should I address you?", (), "By what name should I address you?"),
        ("maker", "Which group built you?", (), "Which group built you?"),
    ],
)  # fmt: skip
def test_a_faithful_rewrite_becomes_a_frame(skill, reply, values, frame):
    assert pp.to_frame(skill, reply, values) == (frame, "")
    pp.check_frame(skill, frame)


@pytest.mark.parametrize(
    "skill, reply, values, why",
    [
        ("*", "To solve this, multiply 412 by 87.", ("412", "87"), "answers"),
        ("*", "412 * 87 = 35844", ("412", "87"), "answers"),
        ("*", "What is 412 times 88?", ("412", "87"), "values_changed"),  # a number copied wrong
        ("*", "What is 412 times 87 times 2?", ("412", "87"), "values_changed"),  # a number added
        ("*", "What is 4120 times 87?", ("412", "87"), "values_changed"),
        ("*", "What is 1,412 times 87?", ("412", "87"), "values_changed"),
        ("*", "What is 412 plus 87?", ("412", "87"), "other_question"),  # another operation
        ("*", "What is the sum of 412 and 87 times over?", ("412", "87"), "other_question"),
        ("+", "Multiply 412 by 87.", ("412", "87"), "other_question"),
        ("letters", "How many letters are in morning?", ("morning", "r"), "values_changed"),  # the letter lost
        ("letters", "How many r's are in evening?", ("morning", "r"), "values_changed"),
        ("maker", "Who did you train?", (), "other_question"),  # about the model's pupils, not its maker
        ("name", "What is your name and who made you?", (), "other_question"),
        ("name", "Your name is llmstack-tiny?", (), "other_question"),
        ("*", "", ("412", "87"), "empty"),
        ("*", "This is a riddle. What does 412 * 87 mean?", ("412", "87"), "not_one_question"),
        ("*", "A simple way to convert 412 × 87!", ("412", "87"), "not_a_question"),
        ("letters", "The letter r appears only in morning.", ("morning", "r"), "not_a_question"),
        ("letters", "How many r's are in morning, like a's in banana?", ("morning", "r"), "values_changed"),
        ("letters", "Count for me that there are five r's in morning.", ("morning", "r"), "other_question"),
        ("letters", "Count how many times morning starts with r.", ("morning", "r"), "other_question"),
        ("name", "Your name is Simon?", (), "other_question"),
        ("name", "What do you name your child?", (), "other_question"),  # asks for a name, not its own
        ("maker", "Somebody made you.", (), "not_a_question"),
        ("*", "Please " + "really " * 30 + "multiply 412 by 87", ("412", "87"), "too_long"),
    ],
)  # fmt: skip
def test_an_unfaithful_rewrite_is_dropped_with_its_reason(skill, reply, values, why):
    assert pp.to_frame(skill, reply, values) == (None, why)


def test_paraphrase_keeps_new_frames_once_and_counts_the_rest(monkeypatch):
    """Through ``paraphrase`` with a scripted teacher: each skill asked ``asks`` times; a rewrite that is a
    known frame, or one already kept, is dropped as ``known``."""
    asked = []

    def teacher(bundle, chats, cfg, on_done):
        replies = []
        for chat in chats:
            q = chat[-1]["content"].removeprefix("Rewrite: ")
            asked.append(q)
            nums = re.findall(r"\d+", q)
            if nums:
                op = "times" if re.search(r"times|\*|x|×|multipl|product", q) else "plus"
                replies.append((f"Would you figure out {nums[0]} {op} {nums[1]}?", "stop"))
            elif "letter" in q or "'s" in q or "Count" in q or "how many" in q.lower():
                replies.append(("The answer is 2.", "stop"))
            elif "name" in q or "call" in q or "Who are you" in q:
                replies.append(("What is your name?", "stop"))  # a trained question: not new
            else:
                replies.append(("Who exactly created you?", "length"))  # truncated
        return replies

    monkeypatch.setattr(pp, "generate_replies", teacher)
    frames = pp.paraphrase(None, asks=6, seed=3)  # type: ignore[arg-type]
    assert len(asked) == 6 * len(pp.SKILLS)
    assert frames.frames == {"*": ["Would you figure out {a} times {b}?"], "+": ["Would you figure out {a} plus {b}?"]}
    assert frames.dropped["*"] == {"known": 5} and frames.dropped["letters"] == {"answers": 6}
    assert frames.dropped["name"] == {"known": 6} and frames.dropped["maker"] == {"truncated": 6}
    assert "* 1 of 6" in frames.summary() and "letters 0 of 6" in frames.summary()


def test_the_frames_file_round_trips_and_a_bad_one_is_named(tmp_path):
    frames = pp.TeacherFrames({"*": ["Work {a} by {b} out?"], "name": ["Who is this?"]}, {"*": {"answers": 2}}, "t")
    path = frames.save(tmp_path / "f.json")
    back = pp.TeacherFrames.load(path)
    assert (back.frames, back.dropped, back.teacher) == (frames.frames, frames.dropped, "t")
    path.write_text(json.dumps({"frames": {"*": ["Work {a} out?"]}}))
    with pytest.raises(ValueError, match=r"f\.json.*must hold \{a\} and \{b\}"):
        pp.TeacherFrames.load(path)
    path.write_text(json.dumps({"frames": {"letters2": ["{w} {l}"]}}))
    with pytest.raises(ValueError, match="unknown skill 'letters2'"):
        pp.TeacherFrames.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"f\.json: not a teacher frames file.*llmstack paraphrase"):
        pp.TeacherFrames.load(path)


class _Reader:
    """Answers every question right, except those in the words ``blind``: there it does not understand."""

    def __init__(self, blind: str):
        self.blind, self.asked = blind, []
        card = ModelCard()
        self.reply = f"I am {card.name}, made by {card.maker}."

    def answer_questions(self, qs, max_tokens):
        self.asked += qs
        out = []
        for q in qs:
            nums = [int(x) for x in re.findall(r"\d+", q.replace(",", ""))]
            if self.blind in q.lower():
                out.append("I do not understand.")
            elif len(nums) == 2:
                product = re.search(r"times|\*|x|×|multipl|product", q, re.I)
                out.append(f"The answer is {nums[0] * nums[1] if product else sum(nums)}.")
            elif "banana" in q:
                out.append("There are 3.")
            else:
                out.append(self.reply)
        return out


def test_the_eval_asks_every_third_unseen_question_in_a_teacher_frame(monkeypatch):
    reader = _Reader(blind="gizmo")
    monkeypatch.setattr(ev, "our_chat", lambda model, tok, tools=None: reader)
    teacher = pp.TeacherFrames(
        {"*": ["Gizmo asks: work {a} times {b}?"], "letters": ["Gizmo wants the {l} count of {w}."],
         "name": ["Gizmo wonders who you are?"]}
    )  # fmt: skip
    products = ev.eval_arithmetic(None, None, 30, wording="unseen", teacher=teacher)
    assert sum("gizmo asks" in q.lower() for q in reader.asked) == 10
    assert products.parts == {"teacher": [0, 10], "held-out frames": [20, 20]} and products.correct == 20
    assert any("gizmo" in ex.lower() for ex in products.examples)  # each source's first transcript is kept
    letters = ev.eval_spelling(None, None, ["banana"] * 9, n=9, wording="unseen", teacher=teacher)
    assert letters.parts["teacher"] == [0, 3]
    ident = ev.eval_identity(None, None, teacher=teacher)
    assert ident.total == 122 and ident.parts["teacher"] == [0, 2]
    plain = ev.eval_arithmetic(None, None, 30, wording="unseen")
    assert plain.parts == {} and plain.correct == 30  # without teacher frames: the held-out families alone
    table = ev.wording_table([products, ident])
    assert table[-1].endswith("multiply 3x3 0/10, identity 0/2")


def test_a_teacher_that_keeps_nothing_is_an_error_and_writes_nothing(tmp_path):
    """A real (tiny, random) chat model through the engine: its rewrites keep no value, so no frame."""
    model = chatml_model(tmp_path / "teacher", context=1024)
    out = tmp_path / "frames.json"
    with pytest.raises(ValueError, match="kept no frame of 10 asked"):
        pp.write_teacher_frames(str(model), out, asks=2, progress=False)
    assert not out.exists()
