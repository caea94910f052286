"""Tokenizers across formats: our tiktoken ranks <-> HF ``tokenizers`` BPE <-> GGUF vocab + merges.

Why a second backend (``HFTokenizer``) instead of converting every imported vocabulary to tiktoken
ranks: checked on SmolLM2's GGUF, its ids do not fit our ``Tokenizer``'s layout. Its 17 special tokens
take ids 0..16 *before* the byte tokens, 21 of the 256 single bytes have no token at all (bytes that
never occur in UTF-8, and some controls), and its pre-tokenizer splits every digit before the GPT-2
regex. Forcing it into tiktoken ranks would renumber ids (and permute the model's embedding rows) and
re-express a two-stage pre-tokenizer as one regex; HF ``tokenizers`` built from the file's own vocab
and merges *is* the reference encoder, with ids unchanged. So imported models keep an ``HFTokenizer``;
``as_tiktoken`` converts one back to our ``Tokenizer`` only where the ids already fit and a probe
text encodes identically, so that ``llmstack sample`` can read it.

Export goes the other way: ``hf_from_ranks`` builds an HF byte-level BPE equivalent to our ranks
(vocab = ranks spelled with GPT-2's byte->unicode table, merges recovered from the ranks, split =
our pattern, specials as added tokens); tests check the ids equal ours on a Unicode-heavy corpus.
A GGUF file also names its split for llama.cpp (``gguf_pre_name``): an imported tokenizer keeps the
name it came with (``HFTokenizer.gguf_pre``), ours is "qwen2", llama.cpp's GPT-4-style split with single digits
("llama-bpe" for a tokenizer trained with GPT-4's own split).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RawHF

from llmstack.io import atomic_write
from llmstack.tokenizer.bpe import (
    CL100K_PATTERN,
    GPT2_PATTERN,
    SPLIT_PATTERN,
    Tokenizer,
    _as_int_list,
    bytes_to_unicode,
    unicode_to_bytes,
)
from llmstack.tokenizer.special import ASSISTANT_END, BOS, PAD
from llmstack.training.checkpoint import ModelFileError, read_json_object

HF_TOKENIZER_FILE = "hf_tokenizer.json"
HF_META_FILE = "hf_tokenizer_meta.json"

PROBE_TEXT = (
    "Hello world! It's 2024-01-02, we'll pay $1,234.56 (or 7890 yen).\n\n"
    "  indented\tcode(x) => x ** 2;\r\nnaïve café 日本語 🙂👍🏽 Ελληνικά русский  \n"
)
"""Text used to check that two encoders agree before one is substituted for the other."""


def byte_level(token: bytes) -> str:
    """A token's bytes spelled in GPT-2's printable byte->unicode alphabet (HF and GGUF vocab strings)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[str, str]]:
    """Recover BPE merges from tiktoken ranks (as HF's tiktoken converter does).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a merge list ordered
    by the rank of the merged token reproduces that. Every split of a token into two known tokens is
    listed, since tiktoken would reach the token through any of them.
    """
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(byte_level(left), byte_level(right)) for _, _, _, left, right in merges]


def hf_from_ranks(tok: Tokenizer) -> RawHF:
    """An HF ``tokenizers`` byte-level BPE that encodes exactly like ``tok`` (same ids, specials included)."""
    ranks = tok.mergeable_ranks
    vocab = {byte_level(token): rank for token, rank in ranks.items()}
    hf = RawHF(models.BPE(vocab=vocab, merges=merges_from_ranks(ranks), ignore_merges=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, token_id in specials:
        if hf.token_to_id(name) != token_id:
            raise ValueError(f"special token {name} got id {hf.token_to_id(name)} in HF, expected {token_id}")
    return hf


def hf_from_vocab_merges(
    tokens: Sequence[str], merges: Sequence[str], special_ids: Iterable[int], pre: str | None
) -> RawHF:
    """An HF byte-level BPE from a GGUF-style vocabulary (id -> byte-level string) and "a b" merges."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the tokenizer vocabulary lists the same token twice")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = RawHF(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))  # type: ignore[arg-type]
    hf.pre_tokenizer = gguf_pre_tokenizer(pre)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)])
    return hf


def gguf_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre`` name (only the names we can vouch for)."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt-2", "gpt2"):
        return gpt2
    if pre in ("smollm", "starcoder", "refact"):  # digits one by one, then GPT-2's regex (their tokenizer.json)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    patterns = {"llama-bpe": CL100K_PATTERN, "llama3": CL100K_PATTERN, "qwen2": SPLIT_PATTERN}
    if pre in patterns:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(patterns[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(
        f"unsupported tokenizer.ggml.pre {pre!r} (known: default, gpt-2, smollm, starcoder, llama-bpe, qwen2)"
    )


class HFTokenizer:
    """An HF ``tokenizers`` BPE behind the interface of our ``Tokenizer`` (encode, decode, specials, bos).

    Like ``Tokenizer``, special-token text in ``encode_ordinary`` input stays ordinary text, so user
    input cannot inject control tokens; ``encode_with_special`` is for trusted templates. ``add_bos``: whether
    the model's files say a text starts with the bos token (GGUF ``tokenizer.ggml.add_bos_token``, HF
    ``add_bos_token`` or the tokenizer.json post-processor); it lives here, beside bos and eos, because
    every model built on this tokenizer (a LoRA adapter's too) follows it.
    """

    def __init__(
        self,
        hf: RawHF,
        bos_token: str | None = None,
        eos_token: str | None = None,
        gguf_pre: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self._hf = hf
        self.gguf_pre = gguf_pre  # llama.cpp's name for the split, when read from a GGUF file (re-exported as is)
        self.add_bos = add_bos
        self._specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self._id_to_special = {i: name for name, i in self._specials.items()}
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template: str | None = None  # its model's, set by the Bundle (as transformers' tokenizers carry it)
        for name in (bos_token, eos_token):
            if name is not None and name not in self._specials and hf.token_to_id(name) is None:
                raise ValueError(f"token {name!r} is not in the tokenizer's vocabulary")

    # ----- encoding / decoding ------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        self._hf.encode_special_tokens = True  # special-token text is split like prose
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        finally:
            self._hf.encode_special_tokens = False

    def encode(self, text: str, allowed_special: Any = "none") -> list[int]:
        return self.encode_ordinary(text) if allowed_special == "none" else self.encode_with_special(text)

    def encode_with_special(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | Any) -> str:
        return b"".join(self.decode_token_bytes(i) for i in _as_int_list(ids)).decode("utf-8", errors="replace")

    def decode_token_bytes(self, token_id: int) -> bytes:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode()
        token = self._hf.id_to_token(token_id)
        if token is None:
            raise KeyError(f"token id {token_id} is not in this tokenizer's vocabulary (size {self.vocab_size})")
        u2b = unicode_to_bytes()  # once per process: this runs for every token a server streams
        try:
            return bytes(u2b[c] for c in token)
        except KeyError:  # an added non-special token stored as plain text
            return token.encode()

    def special_id(self, name: str) -> int:
        try:
            return self._specials[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not a special token of this tokenizer (known: {list(self._specials)})"
            ) from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._id_to_special

    # ----- properties ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def bos_id(self) -> int | None:
        return self._token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._token_id(self.eos_token)

    def _token_id(self, name: str | None) -> int | None:
        return None if name is None else self._hf.token_to_id(name)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._hf.to_str().encode()).hexdigest()

    @property
    def raw(self) -> RawHF:
        return self._hf

    # ----- files --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """``hf_tokenizer.json`` (HF's own format) + ``hf_tokenizer_meta.json`` (bos/eos names, add_bos, GGUF pre
        name)."""
        directory = Path(directory)
        with atomic_write(directory / HF_TOKENIZER_FILE) as f:
            f.write(self._hf.to_str(pretty=False))
        meta = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "gguf_pre": self.gguf_pre,
            "add_bos": self.add_bos,
        }
        with atomic_write(directory / HF_META_FILE) as f:
            json.dump(meta, f)

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        directory = Path(directory)
        path = directory / HF_TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        meta = read_json_object(directory / HF_META_FILE)
        try:
            raw = RawHF.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a plain Exception for a damaged file
            raise ModelFileError(path, f"unreadable tokenizer ({e})") from None
        try:
            add_bos = meta.get("add_bos") is True  # absent (saved before it was recorded): no, as HF's default
            return cls(raw, meta.get("bos_token"), meta.get("eos_token"), meta.get("gguf_pre"), add_bos)
        except ValueError as e:
            raise ModelFileError(directory / HF_META_FILE, str(e)) from None

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, n_special={len(self._specials)})"


AnyTokenizer = Tokenizer | HFTokenizer


def adds_bos(raw: RawHF, bos_token: str | None) -> bool:
    """Whether ``raw``'s post-processor puts ``bos_token`` before a text (what ``add_special_tokens=True`` does:
    a Llama tokenizer.json's ``TemplateProcessing``)."""
    bos_id = raw.token_to_id(bos_token) if bos_token else None
    return bos_id is not None and raw.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


def with_bos(raw: RawHF, bos_token: str | None, add: bool) -> RawHF:
    """``raw``, or a copy whose post-processor adds ``bos_token`` before a text exactly when ``add`` says so (an
    exported tokenizer.json: transformers' ``tokenizer(text)`` then starts as the model was trained)."""
    bos_id = raw.token_to_id(bos_token) if bos_token else None
    add = add and bos_id is not None
    if adds_bos(raw, bos_token) == add:
        return raw
    out = RawHF.from_str(raw.to_str())
    out.post_processor = (
        processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token}:1 $B:1", special_tokens=[(bos_token, bos_id)]
        )
        if add
        else None
    )
    return out


def as_tiktoken(tok: HFTokenizer, probe: str = PROBE_TEXT) -> Tokenizer | None:
    """Our ``Tokenizer`` with the same ids as ``tok``, or None when its layout or encoding differs.

    Fits when the non-special ids are 0..n-1 over all 256 bytes, specials come after them, and the
    pre-tokenizer is our split pattern or GPT-2's; then a probe text must encode identically.
    """
    data = json.loads(tok.raw.to_str())
    pattern = _single_regex(data.get("pre_tokenizer"))
    vocab: dict[str, int] = data.get("model", {}).get("vocab") or {}
    if pattern is None or not vocab or data.get("model", {}).get("type") != "BPE":
        return None
    u2b = unicode_to_bytes()
    ranks: dict[bytes, int] = {}
    for text, i in vocab.items():
        if i in tok._id_to_special:
            continue
        if any(c not in u2b for c in text):
            return None
        ranks[bytes(u2b[c] for c in text)] = i
    try:
        candidate = Tokenizer(ranks, pattern, tok.special_tokens)
    except ValueError:
        return None
    probe_with_specials = probe + "".join(tok.special_tokens)
    if candidate.encode_ordinary(probe_with_specials) != tok.encode_ordinary(probe_with_specials):
        return None
    return candidate


def _single_regex(pre: dict[str, Any] | None) -> str | None:
    """The one split regex of a pre-tokenizer we can express in tiktoken, else None."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PATTERN
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if parts and len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
        split, level = parts
        if split.get("behavior") == "Isolated" and not split.get("invert") and not level.get("use_regex", True):
            regex = (split.get("pattern") or {}).get("Regex")
            return regex if isinstance(regex, str) else None
    return None


GGUF_PRE_NAMES = {SPLIT_PATTERN: "qwen2", CL100K_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt-2"}
"""Split regex -> the ``tokenizer.ggml.pre`` under which llama.cpp splits text the same way. "llama-bpe"
selects llama.cpp's GPT-4-style (Llama 3) split with tiktoken's whole-word lookup (``ignore_merges``),
"qwen2" the same split with single digits (ours); the opt-in llama.cpp test checks that it tokenizes
like ours."""


def gguf_pre_name(tok: AnyTokenizer) -> str:
    """The ``tokenizer.ggml.pre`` for ``tok`` in a GGUF file: the name it was imported with, else the name
    of its split. A split llama.cpp has no name for is refused: any name would tokenize differently there
    (llama.cpp's "default" is not GPT-2's split)."""
    if isinstance(tok, HFTokenizer) and tok.gguf_pre:
        return tok.gguf_pre
    if isinstance(tok, Tokenizer):
        pattern: str | None = tok.pattern
    else:
        pre = json.loads(tok.raw.to_str()).get("pre_tokenizer")
        if _is_digits_then_gpt2(pre):
            return "smollm"  # digits one by one, GPT-2's regex, no clean-up of spaces on decoding (as ours)
        pattern = _single_regex(pre)
    if pattern not in GGUF_PRE_NAMES:
        raise ValueError(
            "GGUF export: llama.cpp has no pre-tokenizer name for this tokenizer's split "
            f"(known: our GPT-4-style pattern, GPT-2's, digits + GPT-2); got {pattern!r}"
        )
    return GGUF_PRE_NAMES[pattern]


def _is_digits_then_gpt2(pre: dict[str, Any] | None) -> bool:
    parts = pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else None
    if not parts or len(parts) != 2:
        return False
    digits, level = parts
    return (
        digits.get("type") == "Digits"
        and bool(digits.get("individual_digits"))
        and _single_regex(level) == GPT2_PATTERN
    )


def default_special_names(tok: AnyTokenizer) -> tuple[str | None, str | None, str | None]:
    """(bos, eos, pad) names for an llmstack tokenizer: eos ends an assistant turn."""
    names = tok.special_tokens
    pick = [name if name in names else None for name in (BOS, ASSISTANT_END, PAD)]
    return pick[0], pick[1], pick[2]
