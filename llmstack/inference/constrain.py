"""Constrained decoding: a per-row token mask that keeps a reply inside a grammar (JSON, a tool call).

The server makes one ``Constraint`` per row that asked for ``response_format`` or a forced tool call; before
each sampling step ``mask_`` puts -inf on every token the grammar does not allow next, and ``advance`` feeds
it the token the row took. The grammar engine is llguidance: it compiles JSON schemas and Lark grammars and
walks a token trie to find the allowed set, so nothing here knows JSON. What this module adds:

- the tokenizer bridge (``grammar_tokenizer``): our tiktoken-based ``Tokenizer`` and imported models' HF
  tokenizers both expose token bytes, so llguidance is built from those bytes rather than from a tokenizer
  file; specials are marked special, and ids past the tokenizer (a model's padded vocabulary) get no bytes,
  so they can never match;
- JSON in one fixed layout (``", "`` and ``": "``, as ``json.dumps`` writes it and as our training data and
  chat templates show it), with no free whitespace: a small model cannot loop on spaces or newlines;
- OpenAI's strict mode for objects that declare ``properties``: no other keys unless the schema says so;
- end tokens, per row: allowed exactly when the grammar accepts, so the text ends once it is complete.

Special tokens never match text: llguidance keeps them apart from the text grammar, so ``<|assistant_end|>``
cannot be taken inside a JSON string (the same characters spelt with ordinary tokens are plain text).

What is not covered: length bounds (a string or a number may run until ``max_tokens``), free text before a
tool call, several calls in one turn, and batching rows' masks in parallel (llguidance's ``LLExecutor``).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Collection
from typing import Any, Protocol

import llguidance
import torch

JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON options: one space after ``,`` and ``:`` and nowhere else (overrides a schema's own)."""

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""OpenAI's rule for function names; it also keeps ``:`` (our name/argument separator) out of names."""

_LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors without the parser state or the whole grammar


class TokenBytes(Protocol):
    """What the grammar engine needs of a tokenizer (ours and ``interop.tokenizer.HFTokenizer`` both fit)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_tokens(self) -> dict[str, int]: ...

    def decode_token_bytes(self, token_id: int) -> bytes: ...

    def encode_ordinary(self, text: str) -> list[int]: ...


# ----------------------------------------------------------------------------- the tokenizer bridge
class _TokenTable:
    """The object ``llguidance.TokenizerWrapper`` reads: bytes per id, special ids, an eos, an encoder.

    llguidance needs one eos id; the lowest special stands in for it, and ``Constraint`` clears it from
    every mask (a row's end tokens are its own). The encoder is held weakly so that the cache below,
    keyed weakly by the tokenizer, does not keep the tokenizer alive.
    """

    def __init__(self, tok: TokenBytes, vocab_size: int) -> None:
        n = tok.vocab_size
        if vocab_size < n:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {n} tokens")
        self.special_token_ids = sorted(set(tok.special_tokens.values()))
        if not self.special_token_ids:
            raise ValueError("constrained decoding needs a tokenizer with special tokens (one ends the text)")
        self.tokens = [_token_bytes(tok, i) for i in range(n)] + [b""] * (vocab_size - n)
        self.eos_token_id = self.special_token_ids[0]
        self.bos_token_id = None
        self._encode = weakref.WeakMethod(tok.encode_ordinary)

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes; a TypeError makes it send str
            raise TypeError("text must be a str")
        encode = self._encode()
        if encode is None:
            raise RuntimeError("the tokenizer behind this grammar tokenizer was garbage-collected")
        return encode(text)


def _token_bytes(tok: TokenBytes, i: int) -> bytes:
    """A token's bytes; an id the tokenizer skips (a hole in an imported vocabulary) gets none."""
    try:
        return tok.decode_token_bytes(i)
    except KeyError:
        return b""


_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[int, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()


def grammar_tokenizer(tok: TokenBytes, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of ``tok`` over a model vocabulary of ``vocab_size`` ids, cached per (tok, size).

    Built from token bytes (our tiktoken ranks have no HF ``tokenizer.json`` to hand to llguidance): 0.1-0.3 s
    for 50k tokens of ours, ~1 s for an ``HFTokenizer`` (whose ``decode_token_bytes`` is slower), hence the
    cache. Ids from ``tok.vocab_size`` up are padding: they get no bytes and are never allowed.
    """
    per_size = _TOKENIZERS.setdefault(tok, {})
    if vocab_size not in per_size:
        table = _TokenTable(tok, vocab_size)
        per_size[vocab_size] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(table), n_vocab=vocab_size)
    return per_size[vocab_size]


# ----------------------------------------------------------------------------- grammars
def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of a JSON reply: any object for ``None`` (OpenAI's ``json_object``), else ``schema``.

    Objects that list ``properties`` take no other keys unless the schema allows them (OpenAI's strict
    mode), so a small model cannot wander into keys nobody asked for. Raises ValueError naming the problem.
    """
    if schema is not None and not isinstance(schema, dict):
        raise ValueError(f"the JSON schema must be an object, not {type(schema).__name__}")
    return _compile_json({"type": "object"} if schema is None else strict_objects(schema), "invalid JSON schema")


def _tool_schemas(tools: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any] | None, dict[str, Any]]]:
    """(name, parameters as given, strict object schema) per tool, checked; ValueError naming the tool."""
    if not tools:
        raise ValueError("a tool call needs at least one tool")
    names = [t.get("name") for t in tools]
    out = []
    for i, tool in enumerate(tools):
        name, params = tool.get("name"), tool.get("parameters")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ValueError(f"tools[{i}]: the name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if name in names[:i]:
            raise ValueError(f"tools[{i}]: the name {name!r} is declared twice")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}] ({name}): parameters must be a JSON schema object or null")
        schema = _object_schema(strict_objects(params or {}), f"tools[{i}] ({name})")
        _compile_json(schema, f"tools[{i}] ({name}): invalid parameters schema")  # errors that name the tool
        out.append((name, params, schema))
    return out


def tool_call_grammar(tools: list[dict[str, Any]]) -> str:
    """The grammar of one call in our format, ``NAME: ARGS``: NAME one of ``tools``' names, ARGS a JSON object
    valid against that tool's ``parameters`` (``None``: any object). Raises ValueError naming the tool."""
    alternatives = []
    for name, params, schema in _tool_schemas(tools):
        alternatives.append(f"{json.dumps(name + ': ')} %json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT})}")
        if bare_key(params) is not None:  # our models' own form, `calculator: 6*7`: the one string, unquoted
            alternatives.append(f"{json.dumps(name + ': ')} BARE")
    bare = "\nBARE: /[^{\\s][^\\x00]*/" if any(a.endswith(" BARE") for a in alternatives) else ""
    grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(alternatives) + bare)
    _check(grammar, "tool call grammar")
    return grammar


def hermes_call_grammar(tools: list[dict[str, Any]]) -> str:
    """The grammar of a whole reply that is one call in the Hermes format models without tool tokens use
    (SmolLM2, Qwen): ``<tool_call>``, a line ``{"name": NAME, "arguments": ARGS}``, ``</tool_call>``; NAME
    declared and ARGS valid against its parameters."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, _, schema in _tool_schemas(tools)
    ]
    body = {"anyOf": calls} if len(calls) > 1 else calls[0]
    lark = f'start: "<tool_call>\\n" %json {json.dumps({**body, "x-guidance": JSON_LAYOUT})} "\\n</tool_call>"'
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    _check(grammar, "tool call grammar")
    return grammar


def bare_key(params: dict[str, Any] | None) -> str | None:
    """The property of a tool whose parameters are one string (``{"input": string}``): our models write
    such a call's argument as bare text (``calculator: 6*7``), which means ``{"input": "6*7"}``."""
    props = (params or {}).get("properties")
    if not isinstance(props, dict) or len(props) != 1:
        return None
    (key, spec), required = next(iter(props.items())), (params or {}).get("required", [])
    ok = isinstance(spec, dict) and spec.get("type") == "string" and set(required) <= {key}
    limits = {"enum", "pattern", "format", "const", "maxLength", "minLength"}  # bare text would escape them
    return key if ok and not (limits & set(spec)) else None


def _object_schema(schema: dict[str, Any], where: str) -> dict[str, Any]:
    """``schema`` restricted to objects: a schema without a ``type`` would also accept a number or a string."""
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise ValueError(f"{where}: parameters must describe a JSON object, not type {kind!r}")
    return {**schema, "type": "object"}


def strict_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` wherever an object lists ``properties`` and says
    nothing about other keys. Left alone: ``allOf`` branches (each would forbid the others' keys), and
    objects without ``properties`` (a free-form object stays free)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("items", "additionalProperties", "contains", "propertyNames", "not", "if", "then", "else"):
        if key in out:
            out[key] = strict_objects(out[key])
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {k: strict_objects(v) for k, v in out[key].items()}
    for key in ("anyOf", "oneOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [strict_objects(s) for s in out[key]]
    if isinstance(out.get("items"), list):  # draft-04 tuple form
        out["items"] = [strict_objects(s) for s in out["items"]]
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _compile_json(schema: dict[str, Any], what: str) -> str:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)  # type: ignore[arg-type]
    except ValueError as e:  # only for a schema that is not a JSON object (e.g. NaN inside)
        raise ValueError(f"{what}: {e}") from None
    _check(grammar, what)
    return grammar


def _check(grammar: str, what: str) -> None:
    """Compile now (no tokenizer needed), so a bad schema is a 400 before any row starts."""
    error = llguidance.LLMatcher.validate_grammar(grammar, limits=_LIMITS)
    if error:
        raise ValueError(f"{what}: {error.strip()}")


# ----------------------------------------------------------------------------- one row
_BYTE_BIAS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_bias(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row b holds 0 or -inf for the 8 tokens of a mask byte b (bit i = token 8j + i).

    Indexing it with the packed mask and adding is ~2x faster on CPU than unpacking the bits for a
    ``masked_fill_`` (~30 against ~70 us at 50k tokens), and sends a GPU 8x fewer bytes than a bool mask.
    """
    key = (device, dtype)
    if key not in _BYTE_BIAS:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        _BYTE_BIAS[key] = torch.zeros(256, 8).masked_fill_(bits == 0, float("-inf")).to(device, dtype)
    return _BYTE_BIAS[key]


class Constraint:
    """The grammar state of one row: which tokens may come next, and which came.

    ``end_ids`` are the row's end tokens (``<|assistant_end|>``, ``<|tool_call_end|>``, SmolLM2's
    ``<|im_end|>``): allowed exactly when the grammar accepts (for a JSON object, right after its closing
    brace, where nothing else is allowed), never before. Every other special token is never allowed.
    """

    def __init__(self, grammar: str, lltok: llguidance.LLTokenizer, end_ids: Collection[int]) -> None:
        if not end_ids:
            raise ValueError("a constraint needs at least one end token")
        bad = [i for i in end_ids if not 0 <= i < lltok.vocab_size]
        if bad:
            raise ValueError(f"end ids {bad} are outside the vocabulary of {lltok.vocab_size}")
        self.lltok = lltok
        self.end_ids = sorted(set(end_ids))
        self._matcher = llguidance.LLMatcher(lltok, grammar, log_level=0, limits=_LIMITS)
        if self._matcher.is_error():
            raise ValueError(f"grammar: {self._matcher.get_error().strip()}")
        self._never = sorted(set(lltok.eos_tokens) - set(self.end_ids))  # llguidance's stand-in eos
        self._taken: list[int] = []
        self._finished = False

    @property
    def finished(self) -> bool:
        """An end token was taken: the text is complete."""
        return self._finished

    def allowed_bytes(self) -> bytearray:
        """The next-token mask, one bit per id (bit ``i % 8`` of byte ``i // 8``), end tokens resolved."""
        if self._finished:
            raise ValueError("the constrained text has ended: nothing may follow its end token")
        mask = bytearray(self._matcher.compute_bitmask())
        accepting = self._matcher.is_accepting()
        for i in self._never:
            mask[i >> 3] &= ~(1 << (i & 7))
        for i in self.end_ids:
            if accepting:
                mask[i >> 3] |= 1 << (i & 7)
            else:
                mask[i >> 3] &= ~(1 << (i & 7))
        return mask

    def mask_(self, logits_V: torch.Tensor) -> torch.Tensor:
        """In place: adds -inf to every token not allowed now. Returns ``logits_V`` (V = the model's vocab)."""
        vocab = logits_V.shape[-1]
        if vocab != self.lltok.vocab_size:
            raise ValueError(f"logits have {vocab} entries; the grammar tokenizer has {self.lltok.vocab_size}")
        packed = torch.frombuffer(self.allowed_bytes(), dtype=torch.uint8).to(logits_V.device).int()
        bias_V = _byte_bias(logits_V.device, logits_V.dtype).index_select(0, packed).view(-1)[:vocab]
        return logits_V.add_(bias_V)

    def advance(self, token: int) -> None:
        """The row took ``token``; raises ValueError naming it when the grammar did not allow it (the
        state is then unchanged, so the row can still be ended or sampled again)."""
        if self._finished:
            raise ValueError(f"token {self._describe(token)} after the end of the constrained text")
        if token in self.end_ids:
            if not self._matcher.is_accepting():
                raise ValueError(f"end token {self._describe(token)} before the text is complete{self._after()}")
            self._finished = True
            return
        if not 0 <= token < self.lltok.vocab_size:  # llguidance would fall into its error state for good
            raise ValueError(f"token {self._describe(token)}{self._after()}")
        if token in self._never or self._matcher.validate_tokens([token]) != 1:
            raise ValueError(f"token {self._describe(token)} is not allowed here{self._after()}")
        if not self._matcher.consume_token(token):
            raise ValueError(f"token {self._describe(token)}: {self._matcher.get_error().strip()}")
        self._taken.append(token)

    def text(self) -> str:
        """The text taken so far (end tokens excluded)."""
        return self.lltok.decode_str(self._taken)

    def _describe(self, token: int) -> str:
        if not 0 <= token < self.lltok.vocab_size:
            return f"{token} (outside the vocabulary)"
        return f"{token} ({self.lltok.decode_bytes([token])!r})"

    def _after(self) -> str:
        text = self.text()
        return f" after {text[-40:]!r}" if text else " at the start"
