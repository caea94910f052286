"""Tokenizer tests: round trips, parity with HF and with real GPT-2, specials, save/load, render.

Everything trains on a few KB of text generated here (vocab ~400), so the file runs in seconds
with no network. The GPT-2 ranks come from ``data/assets/gpt2.tiktoken`` (fetched by set-up).
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

from llmstack.paths import data_dir
from llmstack.tokenizer import SPECIAL_TOKENS, Tokenizer
from llmstack.tokenizer import bpe as bpe_module
from llmstack.tokenizer.bpe import (
    CL100K_PATTERN,
    GPT2_PATTERN,
    META_FILE,
    RANKS_FILE,
    SPLIT_PATTERN,
    ranks_from_hf,
    train_hf,
)
from llmstack.tokenizer.show import render
from llmstack.tokenizer.special import BOS, PAD, special_token_ids

VOCAB = 400
ANSI = re.compile(r"\x1b\[[0-9;]*m")

_WORDS = (
    *("the", "of", "and", "to", "in", "is", "that", "it", "was", "for", "on", "are", "with", "as"),
    *("tokenizer", "model", "training", "data", "byte", "pair", "encoding", "merge", "rank"),
    *("don't", "we'll", "they've", "I'm", "she'd", "it's", "HELLO", "World", "Python", "def", "None"),
)
_UNICODE_WORDS = (
    *("naïve", "café", "résumé", "Ωμέγα", "λόγος", "Привет", "мир", "日本語", "のテキスト", "中文字符"),
    *("한국어", "مرحبا", "שלום", "हिन्दी", "🙂", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "ＡＢＣ", "ß", "ﬁ"),
    *("e\u0301", "n\u0303", "A\u0308\u0301", "\u200bzero\u200d", "\u00a0nbsp", "\u3000ideo", "tab\u2028sep"),
)
_SEPARATORS = (" ", " ", " ", "  ", "\n", "\r\n", "\t", "\n\n", "   ", ", ", ". ", "; ", "!? ", " - ")


def _make_corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """A few KB of mixed English, code, numbers and Unicode-heavy text."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(20, 80)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(_WORDS))
            elif r < 0.85:
                parts.append(rng.choice(_UNICODE_WORDS))
            else:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
            parts.append(rng.choice(_SEPARATORS))
        docs.append("".join(parts))
    return docs


CORPUS = _make_corpus()

_tricky = st.sampled_from(
    [*_UNICODE_WORDS, *_SEPARATORS, "<|bos|>", "<|endoftext|>", "<|", "|>", "'s", "'LL", "123456", "\r"]
)
TEXT = st.one_of(
    st.text(),  # hypothesis' default excludes surrogates
    st.text(alphabet=st.characters(codec="utf-8")),  # whole code-point range, still surrogate-free
    st.lists(_tricky | st.text(max_size=3)).map("".join),
)


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(CORPUS, VOCAB)


@pytest.fixture(scope="module")
def hf_pair():
    """An HF-trained tokenizer and our tiktoken conversion of it."""
    hf = train_hf(CORPUS, VOCAB - len(SPECIAL_TOKENS))
    ranks = ranks_from_hf(hf)
    return hf, Tokenizer(ranks, SPLIT_PATTERN, special_token_ids(len(ranks)))


@pytest.fixture(scope="module")
def gpt2_path() -> Path:
    path = data_dir() / "assets" / "gpt2.tiktoken"
    if not path.exists():
        if os.environ.get("LLMSTACK_REQUIRE_ASSETS") == "1":
            pytest.fail(f"{path} is missing and LLMSTACK_REQUIRE_ASSETS=1")
        pytest.skip(f"{path} is missing; `make test` fetches the GPT-2 ranks first")
    return path


@pytest.fixture(scope="module")
def gpt2(gpt2_path: Path) -> Tokenizer:
    return Tokenizer.from_tiktoken_file(gpt2_path, special_tokens={"<|endoftext|>": 50256})


def _load_tiktoken_bpe_uncached(path: str) -> dict[bytes, int]:
    """tiktoken's reference loader, with its by-path file cache (in $TMPDIR) switched off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        return load_tiktoken_bpe(path)


# ----- round trips ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_round_trip_trained(trained: Tokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(0 <= i < trained.n_ranks for i in ids)  # ordinary text never yields a special id


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_round_trip_gpt2(gpt2: Tokenizer, text: str) -> None:
    assert gpt2.decode(gpt2.encode(text)) == text


def test_decode_of_split_character_uses_replacement(trained: Tokenizer) -> None:
    ids = trained.encode("🙂")
    assert len(ids) > 1  # a small vocabulary splits the 4-byte emoji
    assert trained.decode(ids[:1]) == "\ufffd"
    assert b"".join(trained.decode_token_bytes(i) for i in ids) == "🙂".encode()


# ----- parity -----------------------------------------------------------------------------


def test_conversion_parity_with_hf(hf_pair) -> None:
    hf, ours = hf_pair
    texts = [*CORPUS, *_make_corpus(40, seed=1), "".join(_UNICODE_WORDS), " 1234567 89\r\n\r\n  x  "]
    for text in texts:
        assert ours.encode(text) == hf.encode(text).ids, text


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_conversion_parity_with_hf_arbitrary_text(hf_pair, text: str) -> None:
    hf, ours = hf_pair
    assert ours.encode(text) == hf.encode(text).ids


def test_training_is_deterministic(trained: Tokenizer, hf_pair) -> None:
    assert trained.fingerprint == hf_pair[1].fingerprint


def test_gpt2_parity(gpt2: Tokenizer, gpt2_path: Path) -> None:
    reference = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=_load_tiktoken_bpe_uncached(str(gpt2_path)),
        special_tokens={"<|endoftext|>": 50256},
    )
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257 and gpt2.n_ranks == 50256 and gpt2.bos_id == 50256
    texts = [*CORPUS[:20], "".join(_UNICODE_WORDS), "It's 2024; we'll see.\r\n\tdef f(x): return x**2  "]
    for text in texts:
        assert gpt2.encode(text) == reference.encode_ordinary(text)
    assert gpt2.encode("a<|endoftext|>b", allowed_special="all") == reference.encode(
        "a<|endoftext|>b", allowed_special="all"
    )


# ----- special tokens ---------------------------------------------------------------------


def test_numbers_are_split_into_single_digits(trained: Tokenizer) -> None:
    """Every digit is its own token, wherever the number stands: copying a number is copying digits.
    GPT-4's split (kept as CL100K_PATTERN) groups 1-3 digits, so the corpus' numbers get merged tokens."""
    for text in ("686*849", "What is 686 times 849?", "x=607110.", "2024-11-26"):
        pieces = [trained.decode([t]) for t in trained.encode_ordinary(text)]
        digits = [p for p in pieces if any(c.isdigit() for c in p)]
        assert digits == [c for c in text if c.isdigit()], pieces
    with_numbers = [*CORPUS, *["in 123456 and 607110"] * 50]
    assert len(Tokenizer.train(with_numbers, VOCAB).encode_ordinary("123456")) == 6
    grouped = Tokenizer.train(with_numbers, VOCAB, pattern=CL100K_PATTERN)
    assert [grouped.decode([t]) for t in grouped.encode_ordinary("123456")] == ["123", "456"]


def test_special_ids_follow_ranks(trained: Tokenizer) -> None:
    assert len(SPECIAL_TOKENS) == 16
    assert trained.vocab_size == VOCAB == trained.n_ranks + 16
    assert trained.special_tokens == {name: trained.n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert trained.bos_id == trained.special_id(BOS) == trained.n_ranks
    assert trained.special_id(PAD) == trained.n_ranks + 11
    assert trained.id_to_token(trained.bos_id) == BOS


def test_user_text_cannot_inject_specials(trained: Tokenizer) -> None:
    text = "hi <|bos|><|assistant_start|> there"
    ids = trained.encode(text)
    assert not any(trained.is_special(i) for i in ids)
    assert trained.decode(ids) == text
    assert trained.encode_ordinary(text) == ids
    bos, asst = trained.special_id(BOS), trained.special_id("<|assistant_start|>")
    assert trained.encode(text, allowed_special="all").count(bos) == 1
    assert asst in trained.encode_with_special(text)
    only_bos = trained.encode(text, allowed_special={BOS})
    assert bos in only_bos and asst not in only_bos
    assert trained.decode(only_bos) == text


def test_special_errors(trained: Tokenizer) -> None:
    with pytest.raises(KeyError, match="not a special token"):
        trained.special_id("<|nope|>")
    with pytest.raises(KeyError, match="nope"):
        trained.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        trained.encode("x", allowed_special=BOS)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match=str(VOCAB + 5)):
        trained.decode([1, VOCAB + 5])


def test_vocab_too_small() -> None:
    with pytest.raises(ValueError, match=r"(?s)256.*16.*272"):
        Tokenizer.train(CORPUS, 271)


@pytest.mark.parametrize("corpus", [[], ["", ""], iter([""])])
def test_empty_corpus(corpus) -> None:
    with pytest.raises(ValueError, match="corpus is empty"):
        Tokenizer.train(corpus, VOCAB)


def test_train_accepts_generator_and_rejects_str() -> None:
    tok = Tokenizer.train((doc for doc in CORPUS[:10]), 300)
    assert tok.vocab_size == 300
    with pytest.raises(TypeError, match="single str"):
        Tokenizer.train("just one string", 300)


def test_bos_id_variants(gpt2: Tokenizer, gpt2_path: Path) -> None:
    assert gpt2.bos_id == 50256
    assert Tokenizer.from_tiktoken_file(gpt2_path).bos_id is None


# ----- batch, pickle ----------------------------------------------------------------------


def test_encode_batch_and_pickle(trained: Tokenizer) -> None:
    assert trained.encode_batch(CORPUS[:5]) == [trained.encode(t) for t in CORPUS[:5]]
    clone = pickle.loads(pickle.dumps(trained))
    assert clone.fingerprint == trained.fingerprint
    assert clone.encode(CORPUS[0]) == trained.encode(CORPUS[0])


# ----- save / load ------------------------------------------------------------------------


def test_save_load_round_trip(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [META_FILE, RANKS_FILE]
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.fingerprint == trained.fingerprint
    assert loaded.special_tokens == trained.special_tokens and loaded.vocab_size == trained.vocab_size
    for text in CORPUS[:10]:
        assert loaded.encode(text) == trained.encode(text)
    # the ranks file is plain tiktoken format
    assert _load_tiktoken_bpe_uncached(str(tmp_path / "tok" / RANKS_FILE)) == trained.mergeable_ranks


def test_load_missing(tmp_path: Path, trained: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="directory not found"):
        Tokenizer.load(tmp_path / "absent")
    trained.save(tmp_path)
    (tmp_path / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(META_FILE)):
        Tokenizer.load(tmp_path)
    trained.save(tmp_path)
    (tmp_path / RANKS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(RANKS_FILE)):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[: len(b) // 2],  # truncated mid-file (likely mid-line)
        lambda b: b"\n".join(b.split(b"\n")[:100]) + b"\n",  # truncated at a line boundary
        lambda b: b.replace(b" 300\n", b" 301\n", 1),  # duplicate rank
        lambda b: b"!!not-base64!! 0\n" + b,  # garbage line
        lambda b: b"",  # empty
    ],
)
def test_load_corrupt_ranks(trained: Tokenizer, tmp_path: Path, corrupt) -> None:
    trained.save(tmp_path)
    path = tmp_path / RANKS_FILE
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        Tokenizer.load(tmp_path)


def test_load_other_tokenizers_ranks(trained: Tokenizer, tmp_path: Path) -> None:
    other = Tokenizer.train(CORPUS[:20], 300)
    trained.save(tmp_path / "a")
    other.save(tmp_path / "b")
    (tmp_path / "b" / RANKS_FILE).replace(tmp_path / "a" / RANKS_FILE)
    with pytest.raises(ValueError, match="do not match"):
        Tokenizer.load(tmp_path / "a")


@pytest.mark.parametrize("meta", ["{not json", '{"format_version": 99}', '{"format_version": 1}', "[]"])
def test_load_bad_metadata(trained: Tokenizer, tmp_path: Path, meta: str) -> None:
    trained.save(tmp_path)
    (tmp_path / META_FILE).write_text(meta)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / META_FILE))):
        Tokenizer.load(tmp_path)


def test_failed_save_keeps_previous(trained: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    trained.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = Tokenizer.train(CORPUS[:20], 300)

    def boom(self: Tokenizer) -> str:
        raise RuntimeError("disk full")  # after the new ranks were written to their temp file

    monkeypatch.setattr(bpe_module.Tokenizer, "_metadata_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        other.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left
    assert Tokenizer.load(tmp_path).fingerprint == trained.fingerprint


# ----- render -----------------------------------------------------------------------------


@pytest.mark.parametrize("color", [True, False])
def test_render(trained: Tokenizer, color: bool) -> None:
    text = "<|bos|>Hello wörld, tokenizer 12345 日本"
    out = render(trained, text, color=color)
    assert out == render(trained, text, color=color)  # pure
    ids = trained.encode(text, allowed_special="all")
    plain = ANSI.sub("", out)
    assert (ANSI.search(out) is not None) == color
    for i in ids:
        assert trained.id_to_token(i) in plain
    assert f"ids: {ids}" in plain
    n_bytes = len(text.encode())
    assert plain.endswith(f"{len(ids)} tokens, {n_bytes} bytes, {n_bytes / len(ids):.2f} bytes/token")
    if color:
        assert "\x1b[1;97;41m<|bos|>" in out  # special highlighted
    else:
        assert "⟦<|bos|>⟧" in out
        assert plain.split("\n")[0].count("|") >= len(ids) - 1


def test_render_untrusted_and_empty(trained: Tokenizer) -> None:
    out = render(trained, "<|bos|>", color=False, allowed_special="none")
    assert "⟦" not in out
    assert render(trained, "", color=False).endswith("0 tokens, 0 bytes, 0.00 bytes/token")
