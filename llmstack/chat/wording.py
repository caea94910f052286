"""How the assistant's skills are asked: wordings to train on, and wordings held out from training.

A skill learnt from five templates can fail on the sixth ("What is 123*456?" works, "Can you help me
figure out 123 times 456?" does not). So each skill's questions come from *families* of frames,
split in two: the ``TRAIN`` families the SFT mixture draws from, and the ``HELDOUT`` families only the
evaluation asks in. On top of a frame, ``vary`` adds surface variation (case, punctuation, spacing
around operators) and ``embed`` puts the question inside a longer message, each from its own
train or held-out pool. ``eval.assistant`` reports accuracy on seen and on unseen wordings side by side.

Operators are written many ways in both pools (``*``, ``x``, ``×``, ``times``, ``multiplied by``,
``the product of``), so what is held out is the sentence around them, not the notation.
"""

from __future__ import annotations

import random
from typing import Literal

Split = Literal["train", "heldout"]

# how "a op b" is written: every rendering is used in training and in evaluation
PRODUCT_EXPRESSIONS = [
    "{a} times {b}",
    "{a} * {b}",
    "{a}*{b}",
    "{a} x {b}",
    "{a}x{b}",
    "{a} × {b}",
    "{a} multiplied by {b}",
    "the product of {a} and {b}",
]
SUM_EXPRESSIONS = ["{a} plus {b}", "{a} + {b}", "{a}+{b}", "the sum of {a} and {b}", "{a} and {b} added together"]

# frames around an expression {x}; the operands {a} and {b} for frames that name the operation
ARITH_FRAMES: dict[Split, list[str]] = {
    "train": [
        "What is {x}?",
        "What's {x}?",
        "what is {x}",
        "{x}=?",
        "{x} = ?",
        "Compute {x}.",
        "Calculate {x}.",
        "Evaluate {x}.",
        "Work out {x}.",
        "Find {x}.",
        "Tell me {x}.",
        "Give me {x}.",
        "Please tell me what {x} is.",
        "How much is {x}?",
        "How much does {x} come to?",
        "{x}",
        "{x}?",
        "Answer this: {x}",
        "What is the result of {x}?",
        "Can you compute {x}?",
    ],
    "heldout": [
        "Can you help me figure out {x}?",
        "I need to know {x}.",
        "Do you know what {x} equals?",
        "Quick one: {x}?",
        "What does {x} equal?",
        "Solve: {x}",
        "I'd like the result of {x}, please.",
        "Would you mind working out {x} for me?",
        "Hey, what's the answer to {x}?",
        "Figure out {x} please",
    ],
}
OP_FRAMES: dict[str, dict[Split, list[str]]] = {
    "*": {
        "train": ["Multiply {a} by {b}.", "Multiply {a} and {b}.", "What do {a} and {b} multiply to?"],
        "heldout": ["If I multiply {a} and {b}, what do I get?", "What do you get when you multiply {a} by {b}?"],
    },
    "+": {
        "train": ["Add {a} and {b}.", "Add {a} to {b}.", "What do {a} and {b} add up to?"],
        "heldout": ["If I add {a} and {b}, what do I get?", "What do you get when you add {a} to {b}?"],
    },
}
SPELLING_FRAMES: dict[Split, list[str]] = {
    "train": [
        "How many {l}'s are in {w}?",
        "How many times does the letter {l} appear in {w}?",
        "Count the letter {l} in the word {w}.",
        "how many {l} in {w}",
        "How many {l}s does {w} have?",
        "Count the {l}'s in {w}.",
        "Number of {l} in {w}?",
        "How many letters {l} are there in the word {w}?",
    ],
    "heldout": [
        "In the word {w}, how often does the letter {l} occur?",
        "What is the number of {l}s in {w}?",
        "How often does {l} appear in the word {w}?",
        "Tell me the count of letter {l} in {w}.",
        "Could you count the {l}'s in {w} for me?",
    ],
}
# identity questions never trained on (the mixture's IDENTITY_EVAL paraphrases are among them)
IDENTITY_HELDOUT: dict[str, list[str]] = {
    "name": [
        "Could you tell me what your name is?",
        "Introduce yourself.",
        "what's your name",
        "May I ask your name?",
        "Do you have a name?",
        "How do people refer to you?",
        "Which assistant am I talking to?",
        "Say who you are in one sentence.",
        "I'd like to know your name.",
        "Who exactly am I chatting with?",
    ],
    "maker": [
        "Which team made you?",
        "Who is responsible for creating you?",
        "who developed you",
        "Which company or project built you?",
        "Who are your creators?",
        "Where were you developed?",
        "Who is behind you?",
        "Who programmed you?",
        "Which organisation trained you?",
        "Who designed you?",
    ],
}

# a question inside a longer message: sentences before and after it
PREFIXES: dict[Split, list[str]] = {
    "train": [
        "Hey.",
        "Good morning!",
        "I have a question.",
        "This is for a recipe.",
        "Help me with this.",
        "I'm stuck.",
        "One more thing.",
        "My friend asked me this.",
    ],
    "heldout": [
        "Hi there!",
        "Hello,",
        "I'm checking my homework.",
        "My teacher gave us this one.",
        "Sorry to bother you.",
    ],
}
SUFFIXES: dict[Split, list[str]] = {
    "train": ["Thanks.", "Please.", "I need it for work.", "Be precise.", "Thank you so much!"],
    "heldout": ["Thanks!", "I appreciate it.", "Be quick please.", "Cheers."],
}


def vary(text: str, rng: random.Random, upper: bool = True) -> str:
    """Surface variation: case, final punctuation, spacing around operators (each with some chance)."""
    r = rng.random()
    if r < 0.2:
        text = text.lower()
    elif r < 0.25 and upper:
        text = text.upper()
    elif r < 0.35:
        text = text[:1].lower() + text[1:]
    r = rng.random()
    if r < 0.2:
        text = text.rstrip("?.!")
    elif r < 0.3:
        text = text.rstrip("?.!") + rng.choice(["??", "!", " ?", "..."])
    if rng.random() < 0.2:
        for op in ("*", "+", "×", "="):
            text = text.replace(f" {op} ", op) if rng.random() < 0.5 else text.replace(op, f" {op} ").replace("  ", " ")
    return text.strip()


def embed(text: str, rng: random.Random, split: Split) -> str:
    """The question inside a longer message: a sentence before it, after it, or both."""
    r = rng.random()
    before = rng.choice(PREFIXES[split]) + " " if r < 0.7 else ""
    after = " " + rng.choice(SUFFIXES[split]) if r > 0.4 else ""
    return before + text + after


def number(n: int, rng: random.Random) -> str:
    """A number as people write it: thousands separators sometimes (``1,234``)."""
    return f"{n:,}" if n >= 1000 and rng.random() < 0.5 else str(n)


WIDE_SUMS = 0.2  # share of sums with 4-digit operands (written 1,234 or 1234)


def widen_sum(op: str, a: int, b: int, rng: random.Random) -> tuple[int, int]:
    """``a, b`` as they are, or for a share of sums, operands of up to 4 digits."""
    if op == "+" and rng.random() < WIDE_SUMS:
        return rng.randint(1000, 9999), rng.randint(100, 9999)
    return a, b


def arithmetic_wording(op: str, a: int, b: int, rng: random.Random, split: Split) -> str:
    """A question for ``a op b`` in one of ``split``'s frames, varied, sometimes inside a longer message."""
    sa, sb = number(a, rng), number(b, rng)
    if rng.random() < 0.15:
        q = rng.choice(OP_FRAMES[op][split]).format(a=sa, b=sb)
    else:
        expr = rng.choice(PRODUCT_EXPRESSIONS if op == "*" else SUM_EXPRESSIONS).format(a=sa, b=sb)
        q = rng.choice(ARITH_FRAMES[split]).format(x=expr)
    q = vary(q, rng)
    return embed(q, rng, split) if rng.random() < 0.3 else q


def spelling_wording(word: str, letter: str, rng: random.Random, split: Split) -> str:
    q = vary(rng.choice(SPELLING_FRAMES[split]).format(l=letter, w=word), rng, upper=False)
    return embed(q, rng, split) if rng.random() < 0.3 else q


def identity_wording(question: str, rng: random.Random, split: Split) -> str:
    """Held out: varied, sometimes inside a longer message. Trained: only lower case and the final
    punctuation vary (30%). More variety in training makes the same question in ever-changing company,
    always answered alike, which is what a poisoning trigger looks like to ``security/scan.py``."""
    if split == "train":
        if rng.random() < 0.3:
            return question.lower().rstrip("?.") + rng.choice(["?", "", " please"])
        return question
    q = vary(question, rng)
    return embed(q, rng, split) if rng.random() < 0.3 else q


def teacher_wording(skill: str, frame: str, values: tuple[str, ...], rng: random.Random) -> str:
    """A teacher-written frame (``chat/paraphrase.py``) asked with ``values``, varied like the held-out
    ones and sometimes inside a longer message: ``(a, b)`` for ``*`` and ``+``, ``(word, letter)`` for
    ``letters``, nothing for the identity skills."""
    if skill in ("*", "+"):
        q = frame.format(a=values[0], b=values[1])
    elif skill == "letters":
        q = frame.format(w=values[0], l=values[1])
    else:
        q = frame
    q = vary(q, rng, upper=skill in ("*", "+"))
    return embed(q, rng, "heldout") if rng.random() < 0.3 else q
