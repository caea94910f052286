"""Byte-level BPE tokenizer: trained with HF ``tokenizers``, run with ``tiktoken``.

Why two libraries: HF ``tokenizers`` has a fast, well-tested BPE *trainer*, while ``tiktoken``
*encodes* several times faster (on this machine ~13-15 MB/s per thread against ~3 MB/s for HF),
and encoding the pretraining corpus is the part that runs over gigabytes. A trained HF byte-level
BPE converts losslessly to tiktoken's format: map each HF vocabulary string back to bytes through
the GPT-2 ``bytes_to_unicode`` table, and use the HF id as the tiktoken rank (HF numbers merged
tokens in merge order, which is what a tiktoken rank means). ``tests/test_tokenizer.py`` checks
token-for-token parity between the two.

Id layout of a trained tokenizer: ids ``0 .. n_ranks-1`` are the mergeable ranks (the 256 single
bytes first, then merges in the order they were learnt); ids ``n_ranks .. n_ranks+15`` are the
special tokens of :mod:`llmstack.tokenizer.special`, in that order. ``vocab_size`` is the total,
``n_ranks + 16``: the number of rows the model's embedding needs.

Pre-tokenization uses the GPT-4 (cl100k) split pattern with one change: every digit is its own
piece (``\\p{N}``, as Llama 2, Qwen 2 and SmolLM split numbers), so a number is always the same
digit tokens wherever it appears. With cl100k's 1-3 digit groups a small vocabulary learns a few
dozen digit merges and splits numbers unevenly ("686" -> "6" "86", "607110" -> "60" "7" "1" "10"),
and a small model copying a number into a calculator call, or a result into its answer, has to
copy rare tokens; digit by digit it copies ten well-trained ones (measured in docs/assistant.md).
``CL100K_PATTERN`` keeps GPT-4's own split, written so that Oniguruma (HF) and fancy-regex
(tiktoken) read it the same way: cl100k's ``\\p{N}{1,3}+`` becomes ``\\p{N}{1,3}`` because
Oniguruma's Ruby syntax reads ``{1,3}+`` as "one or more groups of 1-3 digits", not as a possessive
quantifier. The two forms are equivalent in tiktoken, as nothing follows the quantifier.

On-disk format (``save``/``load``), one directory holding two files:

``tokenizer.tiktoken``
    tiktoken's ranks format, readable by ``tiktoken.load.load_tiktoken_bpe``: one line per
    mergeable token, ``<base64 of the token's bytes> <rank>``, sorted by rank, ranks 0..n-1.
``tokenizer.json``
    metadata: ``{"format_version": 1, "pattern": <split regex>, "special_tokens": {name: id},
    "vocab_size": <total ids>, "fingerprint": <sha256 hex>}``.

Both files are written to temporary siblings, fsynced, and renamed into place only after both
were written completely, so a failing save leaves a previously saved tokenizer intact. The
fingerprint (sha256 over ranks, pattern and specials) is re-computed on load and must match:
a truncated ranks file, or a ranks file from another tokenizer, is refused with an error naming
the file. Checkpoints store the fingerprint to refuse a model trained with another tokenizer.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal

import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmstack.io import atomic_write, read_json
from llmstack.tokenizer.special import BOS, SPECIAL_TOKENS, special_token_ids

FORMAT_VERSION = 1
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"

CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
"""GPT-4 (cl100k) pre-tokenization regex, in a form HF's Oniguruma and tiktoken agree on."""

SPLIT_PATTERN = CL100K_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
"""Ours: cl100k with single digits (llama.cpp's "qwen2" pre-tokenizer splits text the same way)."""

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
"""GPT-2 (r50k) pre-tokenization regex, as tiktoken ships it (for the real GPT-2 ranks)."""

EOT = "<|endoftext|>"

AllowedSpecial = Literal["all", "none"] | AbstractSet[str]


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, used by HF byte-level vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, so
    every byte has a visible, non-whitespace stand-in in a JSON vocabulary.
    """
    printable = (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100))  # "!".."~", "¡".."¬", "®".."ÿ"
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of ``bytes_to_unicode``, built once."""
    return {c: b for b, c in bytes_to_unicode().items()}


def train_hf(
    texts: Iterable[str], n_ranks: int, *, pattern: str = SPLIT_PATTERN, show_progress: bool = False
) -> HFTokenizer:
    """Train an HF byte-level BPE with ``n_ranks`` mergeable tokens and no special tokens.

    Exposed (rather than private) so the parity test and the benchmark can compare HF's own
    encoding with ours. Specials are left out on purpose: HF would give them the first ids and
    shift every rank; llmstack appends them after the ranks instead.
    """
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_ranks,
        min_frequency=0,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return hf


def ranks_from_hf(hf: HFTokenizer) -> dict[bytes, int]:
    """Convert an HF byte-level BPE vocabulary to tiktoken mergeable ranks (rank = HF id)."""
    u2b = unicode_to_bytes()
    ranks: dict[bytes, int] = {}
    for text, token_id in hf.get_vocab(with_added_tokens=False).items():
        try:
            ranks[bytes(u2b[c] for c in text)] = token_id
        except KeyError:
            raise ValueError(f"HF vocabulary entry {text!r} is not a byte-level token") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("HF vocabulary ids are not contiguous 0..n-1; cannot use them as ranks")
    return ranks


def format_ranks(ranks: Mapping[bytes, int]) -> bytes:
    """Serialize ranks in tiktoken's ``.tiktoken`` format, sorted by rank."""
    lines = [
        base64.b64encode(token) + b" " + str(rank).encode()
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    return b"\n".join(lines) + b"\n"


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` ranks file; every error names the file (and the line).

    Same format as ``tiktoken.load.load_tiktoken_bpe``, which is not used because it caches
    local files by *path* in ``$TMPDIR/data-gym-cache``: after a file is rewritten in place it
    keeps returning the old contents (a re-saved tokenizer would silently load stale ranks).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: tokenizer ranks file not found") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a directory, expected a .tiktoken ranks file") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank_text = line.split()
            token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
        except Exception as e:  # any parse failure means the same thing: a malformed line
            raise ValueError(f"{path}:{lineno}: malformed ranks line {line[:80]!r} ({e})") from None
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: ranks file is empty")
    return ranks


def _fingerprint(ranks: Mapping[bytes, int], pattern: str, special_tokens: Mapping[str, int]) -> str:
    h = hashlib.sha256(b"llmstack-tokenizer\n")
    h.update(format_ranks(ranks))
    rest = {"pattern": pattern, "special_tokens": dict(special_tokens)}
    h.update(json.dumps(rest, sort_keys=True).encode())
    return h.hexdigest()


def _validate(ranks: Mapping[bytes, int], special_tokens: Mapping[str, int]) -> None:
    """Refuse vocabularies tiktoken would mis-handle or crash on, with a reason."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"mergeable ranks must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        example = bytes(missing[:3])
        raise ValueError(f"mergeable ranks lack {len(missing)} single-byte tokens (e.g. {example!r})")
    ids = list(special_tokens.values())
    if len(set(ids)) != len(ids):
        raise ValueError(f"special tokens share ids: {dict(special_tokens)}")
    clash = {name: i for name, i in special_tokens.items() if i < len(ranks) or i < 0}
    if clash:
        raise ValueError(f"special token ids overlap the mergeable ranks 0..{len(ranks) - 1}: {clash}")


class Tokenizer:
    """A byte-level BPE tokenizer: mergeable ranks + split pattern + special tokens.

    Special-token *text* in ``encode`` input is ordinary text by default: user-supplied text
    must never be able to inject control tokens. Only templates (chat formatting, document
    packing) ask for specials, via ``allowed_special`` or ``encode_with_special``.
    """

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        pattern: str,
        special_tokens: Mapping[str, int] | None = None,
    ) -> None:
        self._ranks = dict(mergeable_ranks)
        self._pattern = pattern
        self._specials = dict(special_tokens or {})
        _validate(self._ranks, self._specials)
        self._id_to_special = {i: name for name, i in self._specials.items()}
        self._enc = tiktoken.Encoding(
            name="llmstack", pat_str=pattern, mergeable_ranks=self._ranks, special_tokens=self._specials
        )
        # an imported model's tokenizer in our format keeps its own chat template (set by the Bundle), so that
        # the tokenizer alone is enough to render its chats (``chat.template.format_of``)
        self.chat_template: str | None = None
        self.bos_token: str | None = None
        self.eos_token: str | None = None

    # ----- construction -------------------------------------------------------------------

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, *, pattern: str = SPLIT_PATTERN, show_progress: bool = False
    ) -> Tokenizer:
        """Train on ``texts`` (one document per item) split by ``pattern``; ``vocab_size`` counts the 16 specials.

        The result can be smaller than asked for when the corpus has fewer distinct merges than
        ``vocab_size - 16`` (a warning says so); always size the model by ``tok.vocab_size``.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of documents, not a single str")
        n_special = len(SPECIAL_TOKENS)
        minimum = 256 + n_special
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it includes the {n_special} special tokens, "
                f"so it must be at least 256 byte tokens + {n_special} specials = {minimum}"
            )
        documents = _require_nonempty(texts)
        hf = train_hf(documents, vocab_size - n_special, pattern=pattern, show_progress=show_progress)
        ranks = ranks_from_hf(hf)
        if len(ranks) < vocab_size - n_special:
            warnings.warn(
                f"corpus only supports {len(ranks)} mergeable tokens; vocab_size is "
                f"{len(ranks) + n_special}, not the {vocab_size} asked for",
                stacklevel=2,
            )
        return cls(ranks, pattern, special_token_ids(len(ranks)))

    @classmethod
    def from_tiktoken_file(
        cls,
        path: str | Path,
        pat_str: str = GPT2_PATTERN,
        special_tokens: dict[str, int] | None = None,
    ) -> Tokenizer:
        """Load bare ``.tiktoken`` ranks, e.g. GPT-2's with ``{"<|endoftext|>": 50256}``."""
        ranks = read_ranks(path)
        try:
            return cls(ranks, pat_str, special_tokens)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a tokenizer written by ``save``; verifies the fingerprint."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: tokenizer directory not found")
        meta_path, ranks_path = directory / META_FILE, directory / RANKS_FILE
        meta = _parse_meta(meta_path, read_json(meta_path))
        ranks = read_ranks(ranks_path)
        try:
            tok = cls(ranks, meta["pattern"], meta["special_tokens"])
        except ValueError as e:
            raise ValueError(f"{ranks_path}: {e}") from None
        if tok.fingerprint != meta["fingerprint"] or tok.vocab_size != meta["vocab_size"]:
            raise ValueError(
                f"{ranks_path}: contents do not match {meta_path} (fingerprint {tok.fingerprint[:16]}… "
                f"vs {str(meta['fingerprint'])[:16]}…, vocab_size {tok.vocab_size} vs {meta['vocab_size']}); "
                "the ranks file is truncated, corrupted or belongs to another tokenizer"
            )
        return tok

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.tiktoken`` + ``tokenizer.json`` into ``directory`` (see module doc).

        Both files are complete on disk before either replaces an existing one, so an error
        while saving leaves an earlier save loadable.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with (
            atomic_write(directory / META_FILE, "w") as meta_file,
            atomic_write(directory / RANKS_FILE, "wb") as ranks_file,
        ):
            ranks_file.write(format_ranks(self._ranks))
            meta_file.write(self._metadata_json())

    def _metadata_json(self) -> str:
        meta = {
            "format_version": FORMAT_VERSION,
            "pattern": self._pattern,
            "special_tokens": dict(sorted(self._specials.items(), key=lambda kv: kv[1])),
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
        }
        return json.dumps(meta, indent=2, ensure_ascii=False) + "\n"  # specials stay in id order

    # ----- encoding / decoding ------------------------------------------------------------

    def encode(self, text: str, allowed_special: AllowedSpecial = "none") -> list[int]:
        """Encode ``text``. Special-token text is ordinary text unless listed in ``allowed_special``
        ("all", "none" or a set of names); the default "none" is the safe one for user input."""
        if allowed_special == "none":
            return self._enc.encode_ordinary(text)
        if allowed_special == "all":
            return self._enc.encode(text, allowed_special="all", disallowed_special=())
        if isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all', 'none' or a set of names, not {allowed_special!r}")
        allowed = set(allowed_special)
        unknown = allowed - self._specials.keys()
        if unknown:
            raise KeyError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with no special tokens at all (any ``<|...|>`` text is split like prose)."""
        return self._enc.encode_ordinary(text)

    def encode_with_special(self, text: str) -> list[int]:
        """Encode a trusted template: every special-token name in ``text`` becomes its id."""
        return self.encode(text, allowed_special="all")

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = "none") -> list[list[int]]:
        """Encode many texts with a plain loop: on this 2-core machine tiktoken's thread-pool
        batch burnt ~2x the CPU for the same or lower wall throughput (bench/tokenizer_throughput.py).
        Parallelize across processes (the tokenizer pickles) when there are cores to spare."""
        return [self.encode(text, allowed_special) for text in texts]

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Decode ids to text; byte sequences that are not valid UTF-8 become U+FFFD."""
        ids = _as_int_list(ids)
        try:
            return self._enc.decode(ids, errors="replace")
        except (KeyError, OverflowError):
            raise self._bad_id_error(ids) from None

    def decode_token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (a special token's bytes are its name in UTF-8)."""
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode()
        if 0 <= token_id < len(self._ranks):
            return self._enc.decode_single_token_bytes(token_id)
        raise self._bad_id_error([token_id])

    def id_to_token(self, token_id: int) -> str:
        """A readable form of one token: its text, with bytes that are not UTF-8 shown as ``\\xNN``."""
        return self.decode_token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def special_id(self, name: str) -> int:
        """The id of special token ``name``; a KeyError lists the known ones."""
        try:
            return self._specials[name]
        except KeyError:
            known = list(self._specials)
            raise KeyError(f"{name!r} is not a special token of this tokenizer (known: {known})") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._id_to_special

    def _bad_id_error(self, ids: Iterable[int]) -> KeyError:
        valid = set(range(len(self._ranks))) | self._id_to_special.keys()
        bad = next((i for i in ids if i not in valid), None)
        return KeyError(f"token id {bad} is not in this tokenizer's vocabulary (size {self.vocab_size})")

    # ----- properties ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Total number of ids (ranks + specials): the model's embedding size."""
        return max([len(self._ranks) - 1, *self._specials.values()]) + 1

    @property
    def n_ranks(self) -> int:
        return len(self._ranks)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """A copy of the byte-token -> rank table (for exporting to other formats)."""
        return dict(self._ranks)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def bos_id(self) -> int | None:
        """``<|bos|>`` if present, else GPT-2's ``<|endoftext|>``, else None."""
        for name in (BOS, EOT):
            if name in self._specials:
                return self._specials[name]
        return None

    @property
    def pattern(self) -> str:
        return self._pattern

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 hex over ranks, pattern and specials; identical across save/load."""
        return _fingerprint(self._ranks, self._pattern, self._specials)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, n_ranks={self.n_ranks}, "
            f"n_special={len(self._specials)}, fingerprint={self.fingerprint[:12]})"
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the tables, not the tiktoken object (for data-loader worker processes)."""
        return {"ranks": self._ranks, "pattern": self._pattern, "specials": self._specials}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["ranks"], state["pattern"], state["specials"])  # type: ignore[misc]


def _require_nonempty(texts: Iterable[str]) -> Iterator[str]:
    """Pass ``texts`` through, but raise before training if none of them has any characters."""
    it = iter(texts)
    for text in it:
        if text:
            return itertools.chain([text], it)
    raise ValueError("cannot train a tokenizer: the corpus is empty (no non-empty text)")


def _as_int_list(ids: Sequence[int] | Any) -> list[int]:
    """Accept lists, tuples, numpy arrays and torch tensors of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _parse_meta(path: Path, meta: Any) -> dict[str, Any]:
    """Check ``tokenizer.json`` has the fields and version this code reads; errors name the file."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    expected = {"pattern": str, "special_tokens": dict, "vocab_size": int, "fingerprint": str}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in meta["special_tokens"].items()):
        raise ValueError(f"{path}: special_tokens must map names to integer ids")
    return meta
