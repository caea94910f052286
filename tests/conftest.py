"""Hermetic fixtures: a tokenizer trained in-process, token shards and a tiny model; no network."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = [
    "the",
    "model",
    "reads",
    "tokens",
    "and",
    "predicts",
    "the",
    "next",
    "one",
    ";",
    "a",
    "list",
    "holds",
    "items",
    ",",
    "a",
    "dict",
    "maps",
    "keys",
    "to",
    "values",
    ".",
    "python",
    "code",
    ":",
    "def",
    "f",
    "(",
    "x",
    ")",
    ":",
    "return",
    "x",
    "+",
    "1",
    ".",
    "numbers",
    "1",
    "2",
    "3",
    "42",
    "100",
    ".",
    "café",
    "naïve",
    "日本語",
    "emoji",
    "🙂",
    ".",
]


def make_texts(n_docs: int, seed: int = 0, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 4, words))) for _ in range(n_docs)]


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return make_texts(200)


@pytest.fixture(scope="session")
def tok(texts):
    from llmstack.tokenizer import Tokenizer

    return Tokenizer.train(texts, 384)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, tok, texts):
    from llmstack.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(((f"doc{i}", t) for i, t in enumerate(texts)), tok, out, val_fraction=0.1, progress=False)
    return out


def tiny_model_config(vocab_size: int, **kw):
    from llmstack.model.config import ModelConfig

    base = dict(
        vocab_size=vocab_size,
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_kv_head=2,
        intermediate_size=64,
        max_seq_len=64,
    )
    base.update(kw)
    return ModelConfig(**base)
