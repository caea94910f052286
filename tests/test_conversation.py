"""The chat format: tokens, loss mask, truncation, and the Jinja template's agreement with it."""

from __future__ import annotations

import jinja2
import pytest

from llmstack.chat.conversation import ChatFormat, Conversation, Message, Part
from llmstack.tokenizer import special as S
from llmstack.tokenizer.special import CHAT_TEMPLATE

TOOL_CONV = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 12*34? ünïcödé 🙂"},
    {
        "role": "assistant",
        "content": "Let me compute.",
        "tool_calls": [{"function": {"name": "calculator", "arguments": "12*34"}}],
    },
    {"role": "tool", "content": "408"},
    {"role": "assistant", "content": "It is 408."},
    {"role": "user", "content": "Thanks <|assistant_end|>"},
]


def test_render_marks_only_assistant_writing(tok):
    fmt = ChatFormat(tok)
    r = fmt.render(Conversation.from_openai(TOOL_CONV))
    assert r.ids[0] == tok.bos_id and len(r.ids) == len(r.mask)
    trained = tok.decode([t for t, m in zip(r.ids, r.mask, strict=True) if m])
    assert trained == "Let me compute.<|tool_call_start|>calculator: 12*34<|tool_call_end|>It is 408.<|assistant_end|>"
    untrained = tok.decode([t for t, m in zip(r.ids, r.mask, strict=True) if not m])
    assert "408<|tool_result_end|>" in untrained and "You are helpful." in untrained
    # a user typing a special token's text gets ordinary tokens, never the control token
    assert r.ids.count(tok.special_id(S.ASSISTANT_END)) == 1


def test_jinja_template_gives_the_same_tokens(tok):
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    fmt = ChatFormat(tok)
    for messages in (TOOL_CONV[:-1], TOOL_CONV[1:3] + TOOL_CONV[3:5], [{"role": "user", "content": "hi"}]):
        text = template.render(messages=messages, add_generation_prompt=False)
        assert tok.encode(text, allowed_special="all") == fmt.render(Conversation.from_openai(messages)).ids
    gen = template.render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.encode(gen, allowed_special="all") == fmt.prompt(Conversation.of(("user", "hi")))


def test_prompt_continues_an_assistant_turn_after_a_tool_result(tok):
    fmt = ChatFormat(tok)
    conv = Conversation.from_openai(TOOL_CONV[:4])
    ids = fmt.prompt(conv)
    assert ids[-1] == tok.special_id(S.TOOL_RESULT_END)
    assert ids.count(tok.special_id(S.ASSISTANT_START)) == 1


def test_truncation_keeps_system_and_latest_exchange(tok):
    fmt = ChatFormat(tok)
    turns = [("system", "sys prompt")]
    for i in range(10):
        turns += [("user", f"question number {i} " * 5), ("assistant", f"answer {i} " * 5)]
    conv = Conversation.of(*turns)
    full = fmt.render(conv)
    short = fmt.render(conv, max_tokens=len(full.ids) // 3)
    assert len(short.ids) <= len(full.ids) // 3
    text = tok.decode(short.ids)
    assert text.startswith("<|bos|><|system_start|>sys prompt") and "answer 9" in text and "answer 0" not in text
    assert "<|user_start|>question number" in text.split("<|system_end|>")[1][:40]


def test_bad_conversations_are_named():
    with pytest.raises(ValueError, match="unknown role"):
        Conversation.from_openai([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="must follow an assistant tool call"):
        Conversation.from_openai([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="system message may only come first"):
        Conversation([Message("user", "a"), Message("system", "b")])
    with pytest.raises(ValueError, match="only assistant turns"):
        Conversation([Message("user", [Part("tool_call", "calculator: 1")])])
