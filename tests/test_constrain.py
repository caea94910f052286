"""Constrained decoding (llmstack/inference/constrain.py): a seeded random-logit "model" samples only from
the allowed tokens, over our tokenizer and over an imported-style HF tokenizer (specials first, as SmolLM2),
each with a padded model vocabulary; every text must parse, validate (jsonschema_rs as the reference) and
end with an end token, and no special or padding id may ever be allowed inside the text."""

from __future__ import annotations

import json
import re

import jsonschema_rs
import pytest
import torch
from tokenizers import Tokenizer as RawHF
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmstack.inference.constrain import (
    Constraint,
    grammar_tokenizer,
    json_grammar,
    strict_objects,
    tool_call_grammar,
)
from llmstack.interop.tokenizer import HFTokenizer
from llmstack.tokenizer import special as S

SEEDS = range(25)

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "hourly": {"type": "boolean"},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}, "tags": {"$ref": "#/$defs/tags"}},
            "required": ["lat"],
        },
    },
    "required": ["city", "unit"],
    "$defs": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
}
TOOLS = [
    {"name": "calculator", "parameters": None},
    {"name": "get_weather", "parameters": SCHEMA},
    {"name": "calc", "parameters": {"properties": {"x": {"type": "integer", "maximum": 999}}, "required": ["x"]}},
]


class Kind:
    """One tokenizer kind under test: the tokenizer, the padded model vocabulary, its end ids."""

    def __init__(self, tok, vocab_size: int, end_ids: list[int]) -> None:
        self.tok, self.V, self.end_ids = tok, vocab_size, end_ids
        self.lltok = grammar_tokenizer(tok, vocab_size)
        self.specials = set(tok.special_tokens.values())
        quotes = [i for i in range(tok.vocab_size) if b'"' in tok.decode_token_bytes(i)]
        self.bias_V = torch.zeros(vocab_size)
        self.bias_V[quotes] = 4.0  # so that a random string closes within a few dozen tokens

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(grammar, self.lltok, self.end_ids)


def smollm_like_tokenizer(texts: list[str]) -> HFTokenizer:
    """An HF byte-level BPE laid out as SmolLM2's: specials take ids 0..2, digits split one by one."""
    hf = RawHF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=900, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(hf, bos_token="<|im_start|>", eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def ours(tok) -> Kind:
    return Kind(tok, tok.vocab_size + 13, [tok.special_id(S.ASSISTANT_END), tok.special_id(S.TOOL_CALL_END)])


@pytest.fixture(scope="module")
def imported(texts) -> Kind:
    hf = smollm_like_tokenizer(texts)
    assert hf.special_id("<|im_end|>") == 2
    return Kind(hf, (hf.vocab_size + 63) // 64 * 64, [hf.special_id("<|im_end|>")])


@pytest.fixture(params=["ours", "imported"])
def kind(request) -> Kind:
    return request.getfixturevalue(request.param)


def sample(kind: Kind, grammar: str, seed: int, max_tokens: int = 400) -> str:
    """Random logits, masked, sampled until an end token; checks every mask on the way."""
    c, gen = kind.constraint(grammar), torch.Generator().manual_seed(seed)
    taken: list[int] = []
    while not c.finished:
        logits_V = c.mask_(torch.randn(kind.V, generator=gen) + kind.bias_V)
        allowed = set(torch.isfinite(logits_V).nonzero().flatten().tolist())
        assert allowed, "the mask allows nothing"
        assert max(allowed) < kind.tok.vocab_size, "a padding id is allowed"
        specials = allowed & kind.specials
        assert not specials or (specials <= set(kind.end_ids) and allowed == specials), "specials mid-text"
        taken.append(int(torch.multinomial(logits_V.softmax(-1), 1, generator=gen)))
        c.advance(taken[-1])
        assert len(taken) < max_tokens, f"no end after {max_tokens} tokens: {kind.tok.decode(taken)!r}"
    assert taken[-1] in kind.end_ids
    text = kind.tok.decode(taken[:-1])
    assert text == c.text()
    return text


def assert_compact(text: str) -> None:
    """Outside strings, whitespace only as the fixed ", " and ": " separators."""
    skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert not re.search(r"\s", skeleton.replace(", ", ",").replace(": ", ":")), text


def test_any_object_samples_are_compact_json(kind):
    grammar = json_grammar(None)
    for seed in SEEDS:
        text = sample(kind, grammar, seed)
        assert isinstance(json.loads(text), dict), text
        assert_compact(text)


def test_schema_samples_validate_and_take_no_other_keys(kind):
    grammar = json_grammar(SCHEMA)
    for seed in SEEDS:
        text = sample(kind, grammar, seed)
        value = json.loads(text)
        jsonschema_rs.validate(SCHEMA, value)
        assert set(value) <= set(SCHEMA["properties"]) and set(value.get("where", {})) <= {"lat", "tags"}, text
        assert_compact(text)


def test_tool_call_samples_name_a_declared_tool_with_valid_arguments(kind):
    grammar, seen = tool_call_grammar(TOOLS), set()
    schemas = {t["name"]: t["parameters"] or {"type": "object"} for t in TOOLS}
    for seed in SEEDS:
        text = sample(kind, grammar, seed)
        name, sep, args = text.partition(": ")
        assert sep and name in schemas, text
        value = json.loads(args)
        assert isinstance(value, dict), text
        jsonschema_rs.validate(schemas[name], value)
        seen.add(name)
    assert len(seen) >= 2, f"only {seen} sampled"


def feed(c: Constraint, tok, text: str) -> None:
    for t in tok.encode_ordinary(text):
        c.advance(t)


def allowed_ids(c: Constraint, V: int) -> set[int]:
    return set(torch.isfinite(c.mask_(torch.zeros(V))).nonzero().flatten().tolist())


def test_no_special_token_inside_a_string(kind):
    c = kind.constraint(json_grammar({"type": "object", "properties": {"a": {"type": "string"}}}))
    feed(c, kind.tok, '{"a": "')
    allowed = allowed_ids(c, kind.V)
    assert len(allowed) > 50 and not allowed & kind.specials
    for special in kind.specials:
        with pytest.raises(ValueError, match=f"token {special} "):
            c.advance(special)
    name = next(iter(kind.tok.special_tokens))  # its text spelt with ordinary tokens is plain text
    feed(c, kind.tok, name + '"}')
    assert allowed_ids(c, kind.V) == set(kind.end_ids)
    c.advance(kind.end_ids[0])
    assert c.finished and json.loads(c.text()) == {"a": name}


def test_end_tokens_only_and_exactly_when_complete(ours):
    tok, end = ours.tok, ours.end_ids
    c = ours.constraint(tool_call_grammar(TOOLS))
    assert allowed_ids(c, ours.V).isdisjoint(end)
    with pytest.raises(ValueError, match=f"end token {end[0]} .* before the text is complete at the start"):
        c.advance(end[0])
    feed(c, tok, 'calc: {"x": 12')
    assert allowed_ids(c, ours.V).isdisjoint(end)
    feed(c, tok, "}")
    assert allowed_ids(c, ours.V) == set(end)
    c.advance(end[1])
    assert c.finished and c.text() == 'calc: {"x": 12}'
    with pytest.raises(ValueError, match="after the end"):
        c.advance(end[0])
    with pytest.raises(ValueError, match="has ended"):
        c.mask_(torch.zeros(ours.V))


def test_a_disallowed_token_raises_and_leaves_the_state_alone(ours):
    tok = ours.tok
    c = ours.constraint(tool_call_grammar(TOOLS))
    feed(c, tok, "calc")
    (bad,) = tok.encode_ordinary("x")
    with pytest.raises(ValueError, match=rf"token {bad} \(b'x'\) is not allowed here after 'calc'"):
        c.advance(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        c.advance(ours.V + 5)
    feed(c, tok, ': {"x": 7}')  # the row goes on from where it was
    c.advance(ours.end_ids[0])
    assert c.text() == 'calc: {"x": 7}'


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "strin"}, "invalid JSON schema: Invalid type: strin"),
        ({"type": "string", "format": "bogus"}, "Unknown format: bogus"),
        ({"$ref": "#/$defs/missing"}, "Pointer '/$defs/missing' does not exist"),
        ({"properties": {"a": {"not": {"type": "string"}}}}, 'Unimplemented keys: ["not"]'),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable schema"),
        ([{"type": "object"}], "must be an object, not list"),
    ],
)
def test_a_bad_schema_is_a_value_error_naming_the_problem(schema, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        json_grammar(schema)


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ([], "at least one tool"),
        (
            [{"name": "a"}, {"name": "b", "parameters": {"properties": {"q": {"type": "strin"}}}}],
            "tools[1] (b): invalid parameters schema: Invalid type: strin",
        ),
        ([{"name": "a"}, {"name": "a"}], "tools[1]: the name 'a' is declared twice"),
        ([{"name": "a: b"}], "tools[0]: the name 'a: b' must be"),
        ([{"name": "a", "parameters": {"type": "string"}}], "parameters must describe a JSON object"),
        ([{"name": "a", "parameters": "x"}], "parameters must be a JSON schema object"),
    ],
)
def test_bad_tools_are_value_errors_naming_the_tool(tools, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tool_call_grammar(tools)


def test_strict_objects_closes_declared_objects_only():
    schema = {
        "properties": {"properties": {"type": "object", "properties": {"x": {}}}, "free": {"type": "object"}},
        "anyOf": [{"properties": {"y": {}}}],
        "allOf": [{"properties": {"z": {}}}],
        "$defs": {"open": {"properties": {"w": {}}, "additionalProperties": True}},
    }
    out = strict_objects(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False  # a key named "properties"
    assert "additionalProperties" not in out["properties"]["free"]
    assert out["anyOf"][0]["additionalProperties"] is False
    assert out["allOf"] == schema["allOf"]
    assert out["$defs"]["open"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the input is not changed


def test_grammar_tokenizer_is_cached_and_sized_by_the_model(ours):
    assert grammar_tokenizer(ours.tok, ours.V) is ours.lltok
    assert grammar_tokenizer(ours.tok, ours.V + 1).vocab_size == ours.V + 1
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        grammar_tokenizer(ours.tok, ours.tok.vocab_size - 1)
    c = ours.constraint(json_grammar(None))
    with pytest.raises(ValueError, match="logits have"):
        c.mask_(torch.zeros(ours.tok.vocab_size))


def test_mask_is_the_same_in_half_precision(ours):
    c = ours.constraint(json_grammar(SCHEMA))
    feed(c, ours.tok, '{"city": "')
    logits_V = torch.randn(ours.V)
    half_V = logits_V.bfloat16()
    assert c.mask_(half_V) is half_V
    assert torch.equal(torch.isfinite(half_V), torch.isfinite(c.mask_(logits_V)))
    assert torch.equal(half_V[torch.isfinite(half_V)], logits_V.bfloat16()[torch.isfinite(logits_V)])


def test_a_constraint_refuses_a_broken_grammar_and_foreign_end_ids(ours):
    broken = json.dumps({"grammars": [{"json_schema": {"type": "strin"}}]})  # not checked by json_grammar
    with pytest.raises(ValueError, match="grammar: .*Invalid type: strin"):
        ours.constraint(broken)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Constraint(json_grammar(None), ours.lltok, [ours.V])
