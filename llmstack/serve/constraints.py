"""A request's grammars: ``response_format`` and the client's tool declarations, compiled once per
request (a bad schema is a 400 naming the field) into factories of per-row ``Constraint``s
(``inference/constrain.py``, over llguidance).

* ``response_format`` ``json_object`` / ``json_schema``: the whole reply is JSON (valid against the
  schema), then the model's end-of-turn token; nothing else can be sampled.
* Declared tools, our models: each call's text (between our call tokens) is ``name: {arguments}``, the name one
  of the declared functions (the one ``tool_choice`` names, if it names one) and the arguments valid
  against its ``parameters``; no special token can appear inside them. The model still decides
  whether to call (``tool_choice: auto``).
* Declared tools, models without tool tokens (SmolLM2): calls are Hermes ``<tool_call>`` JSON in the
  text; with ``tool_choice`` required or named the whole reply is one such call (``hermes_calls``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmstack.inference.constrain import (
    Constraint,
    grammar_tokenizer,
    hermes_call_grammar,
    json_grammar,
    tool_call_grammar,
)
from llmstack.serve.models import RequestError, ServedModel
from llmstack.tokenizer import special as S


def _lltok(sm: ServedModel) -> Any:
    return grammar_tokenizer(sm.bundle.tokenizer, sm.bundle.model.config.vocab_size)


def response_format(sm: ServedModel, fmt: Any) -> Callable[[], Constraint] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise RequestError("response_format: type json_schema needs json_schema", "response_format.json_schema")
        schema = fmt.json_schema.schema_ or {"type": "object"}
    else:
        schema = None
    try:
        grammar = json_grammar(schema)
    except ValueError as e:
        raise RequestError(f"response_format: {e}", "response_format") from None
    return _factory(grammar, sm, frozenset(sm.stop_ids), "response_format")


def tool_calls(sm: ServedModel, tools: list[dict[str, Any]]) -> Callable[[], Constraint] | None:
    if not tools:
        return None
    try:
        grammar = tool_call_grammar([{"name": t["name"], "parameters": t.get("parameters")} for t in tools])
    except ValueError as e:
        raise RequestError(f"tools: {e}", "tools") from None
    return _factory(grammar, sm, frozenset({sm.bundle.tokenizer.special_id(S.TOOL_CALL_END)}), "tools")


def hermes_calls(sm: ServedModel, tools: list[dict[str, Any]]) -> Callable[[], Constraint]:
    """A model without tool tokens forced to call (``tool_choice`` required or named): the whole reply is
    one ``<tool_call>`` block for a declared tool, then its end of turn."""
    try:
        grammar = hermes_call_grammar([{"name": t["name"], "parameters": t.get("parameters")} for t in tools])
    except ValueError as e:
        raise RequestError(f"tools: {e}", "tools") from None
    return _factory(grammar, sm, frozenset(sm.stop_ids), "tools")


def _factory(grammar: str, sm: ServedModel, end_ids: frozenset[int], param: str) -> Callable[[], Constraint]:
    lltok = _lltok(sm)
    try:  # compiled now: a grammar llguidance refuses is the request's error
        Constraint(grammar, lltok, end_ids)
    except ValueError as e:
        raise RequestError(f"{param}: {e}", param) from None

    def make() -> Constraint:
        return Constraint(grammar, lltok, end_ids)

    return make
