"""Images with captions and questions, all made offline: shapes, counts and bar charts drawn with PIL, and
scikit-learn's handwritten digits (bundled with the package: 1,797 8x8 scans, no download).

Held out (``split="test"``): images never drawn for training (another seed; every fifth digit scan), and
colour/shape combinations never seen in training (``HELD_OUT_PAIRS``: the model saw red things and
triangles, never a red triangle). The kinds and their answers:

    shape   "what colour is the shape?" -> "red";  "what shape is it?" -> "triangle"
    count   "how many shapes are there?" -> "3"              (1-4 shapes of one kind and colour)
    chart   "which bar is tallest?" -> "left" / "middle" / "right"   (three bars)
    digit   "what digit is this?" -> "7"
    caption "describe the image." -> "a red triangle", "3 blue squares", "bars, tallest left", "the digit 7"

What is not covered: natural photographs, text in images, open-ended answers.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from llmstack.vision.images import to_tensor

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 170),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})  # each shape and colour once
CAPTION = "describe the image."
QUESTIONS = {
    "colour": "what colour is the shape?",
    "shape": "what shape is it?",
    "count": "how many shapes are there?",
    "chart": "which bar is tallest?",
    "digit": "what digit is this?",
}
KINDS = (*QUESTIONS, "caption")
BAR_NAMES = ("left", "middle", "right")
CANVAS = 64  # drawn at this size, then resized to the encoder's (anti-aliased edges)

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Example:
    image: torch.Tensor  # (3, S, S) in [-1, 1]
    question: str
    answer: str
    kind: str  # one of KINDS


def _pairs(split: Split) -> list[tuple[str, str]]:
    every = [(c, s) for c in COLOURS for s in SHAPES]
    return [p for p in every if (p in HELD_OUT_PAIRS) == (split == "test")]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_shape(colour: str, shape: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (CANVAS, CANVAS), "white")
    size = rng.uniform(24, 44)
    x, y = rng.uniform(4, CANVAS - 4 - size), rng.uniform(4, CANVAS - 4 - size)
    _draw_shape(ImageDraw.Draw(img), shape, (x, y, x + size, y + size), COLOURS[colour])
    return img


def draw_count(colour: str, shape: str, n: int, rng: random.Random) -> Image.Image:
    """``n`` (1-4) shapes, one per cell of a 2x2 grid, each jittered inside its cell."""
    img = Image.new("RGB", (CANVAS, CANVAS), "white")
    draw = ImageDraw.Draw(img)
    half = CANVAS // 2
    for cell in rng.sample(range(4), n):
        size = rng.uniform(14, 22)
        x = (cell % 2) * half + rng.uniform(2, half - 2 - size)
        y = (cell // 2) * half + rng.uniform(2, half - 2 - size)
        _draw_shape(draw, shape, (x, y, x + size, y + size), COLOURS[colour])
    return img


def draw_chart(rng: random.Random) -> tuple[Image.Image, int]:
    """Three bars of distinct heights (the tallest at least 8 pixels above the others); its index."""
    tallest = rng.randrange(3)
    top = rng.uniform(36, 56)
    heights = [top if i == tallest else rng.uniform(8, top - 8) for i in range(3)]
    img = Image.new("RGB", (CANVAS, CANVAS), "white")
    draw = ImageDraw.Draw(img)
    colour = COLOURS[rng.choice(list(COLOURS))]
    for i, h in enumerate(heights):
        x = 6 + i * 19
        draw.rectangle((x, CANVAS - 4 - h, x + 14, CANVAS - 4), fill=colour)
    draw.line((2, CANVAS - 4, CANVAS - 2, CANVAS - 4), fill=(0, 0, 0))
    return img, tallest


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # heavy import (scipy), and only the digit kind needs it

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digit_image(scan_8x8: np.ndarray) -> Image.Image:
    """A 0-16 grey scan -> dark ink on white, as large as the other images."""
    pixels = (255 - scan_8x8 * (255 / 16)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "L").resize((CANVAS, CANVAS), Image.Resampling.BILINEAR).convert("RGB")


def digit_indices(split: Split) -> list[int]:
    """Every fifth scan is held out."""
    n = len(_digits()[1])
    return [i for i in range(n) if (i % 5 == 0) == (split == "test")]


def make_examples(split: Split, n_per_kind: int, seed: int, size: int = 32) -> list[Example]:
    """``n_per_kind`` examples of each kind in ``KINDS`` (captions spread over the four image kinds), shuffled."""
    rng = random.Random(f"{split}:{seed}")
    pairs = _pairs(split)
    scans, labels = _digits()
    digits = digit_indices(split)
    out: list[Example] = []

    def add(img: Image.Image, kind: str, question: str, answer: str) -> None:
        out.append(Example(to_tensor(img, size), question, answer, kind))

    def image_of(kind: str) -> tuple[Image.Image, dict[str, str]]:
        colour, shape = rng.choice(pairs)
        if kind == "shape":
            return draw_shape(colour, shape, rng), {
                "colour": colour,
                "shape": shape,
                "caption": f"a {colour} {shape}",
            }
        if kind == "count":
            n = rng.randint(1, 4)
            plural = shape + ("s" if n > 1 else "")
            return draw_count(colour, shape, n, rng), {"count": str(n), "caption": f"{n} {colour} {plural}"}
        if kind == "chart":
            img, tallest = draw_chart(rng)
            return img, {"chart": BAR_NAMES[tallest], "caption": f"bars, tallest {BAR_NAMES[tallest]}"}
        i = rng.choice(digits)
        return digit_image(scans[i]), {"digit": str(labels[i]), "caption": f"the digit {labels[i]}"}

    for kind in QUESTIONS:
        source = "shape" if kind in ("colour", "shape") else kind
        for _ in range(n_per_kind):
            img, answers = image_of(source)
            add(img, kind, QUESTIONS[kind], answers[kind])
    for j in range(n_per_kind):
        img, answers = image_of(("shape", "count", "chart", "digit")[j % 4])
        add(img, "caption", CAPTION, answers["caption"])
    rng.shuffle(out)
    return out
