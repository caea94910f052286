"""The OpenAI-compatible server, driven by the official ``openai`` client against a real process.

The served model is a scripted bigram GPT (see ``conftest.bigram_model``): greedy decoding answers
" the model reads", so every assertion below is about the server, not about luck.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import pytest
import torch

openai = pytest.importorskip("openai")

from conftest import CALC, SCRIPT_REPLY  # noqa: E402


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    assert client.models.retrieve("tiny").model_extra["llmstack"]["kind"] == "model"


def test_chat_non_stream(client):
    r = client.chat.completions.create(model="tiny", messages=ask(), temperature=0)
    assert r.choices[0].message.content == SCRIPT_REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 4  # three words and the end-of-turn token
    assert r.usage.prompt_tokens > 3 and r.usage.total_tokens == r.usage.prompt_tokens + 4


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=ask(), temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPT_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_stop_sequences_cut_the_text_streamed_or_not(client):
    r = client.chat.completions.create(model="tiny", messages=ask(), temperature=0, stop=[" reads"])
    assert r.choices[0].message.content == " the model" and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model="tiny", messages=ask(), temperature=0, stop="del", stream=True)
    pieces = [c.choices[0].delta.content or "" for c in s if c.choices]
    assert "".join(pieces) == " the mo"  # "mo" + "del": the held-back prefix of a stop never leaks


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(model="tiny", messages=ask(), temperature=0, max_tokens=2)
    assert r.choices[0].message.content == " the model" and r.choices[0].finish_reason == "length"


def test_logprobs_match_the_model(client, scripted_run):
    from llmstack.interop.load import load_model

    r = client.chat.completions.create(model="tiny", messages=ask(), temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == SCRIPT_REPLY
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
        assert bytes(t.bytes).decode() == t.token
    # the first token's log-probability, recomputed from the weights
    b = load_model(scripted_run)
    from llmstack.chat.conversation import ChatFormat, Conversation

    ids = ChatFormat(b.tokenizer).prompt(Conversation.of(("user", "hi")))
    with torch.no_grad():
        ref = b.model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
    assert content[0].logprob == pytest.approx(float(ref[b.tokenizer.encode_ordinary(" the")[0]]), abs=1e-4)


def test_tool_call_round_trip(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=ask("what is 6*7?"),
        temperature=0,
        tools=[CALC],
        tool_choice={"type": "function", "function": {"name": "calculator"}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"input": "42"}
    assert call.id.startswith("call-")
    follow = client.chat.completions.create(
        model="tiny",
        temperature=0,
        tools=[CALC],
        messages=[
            *ask("what is 6*7?"),
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "42"},
        ],
    )
    assert follow.choices[0].message.content == SCRIPT_REPLY
    assert follow.choices[0].finish_reason == "stop"


def test_tool_call_streamed(client):
    s = client.chat.completions.create(
        model="tiny", messages=ask(), temperature=0, tools=[CALC], tool_choice="required", stream=True
    )
    chunks = [c for c in s if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "calculator"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_server_side_tool_runs_and_shows_a_malformed_call_as_an_error(client):
    # the prefill "x" makes the model open a call "42": not 'name: argument', so the tool answers an error
    r = client.chat.completions.create(
        model="tiny", messages=[*ask(), {"role": "assistant", "content": "x"}], temperature=0
    )
    msg = r.choices[0].message
    assert msg.content == SCRIPT_REPLY  # generation went on after the tool result
    tools = msg.model_extra["llmstack_tools"]
    assert tools[0] == {"type": "call", "text": "42"}
    assert tools[1]["type"] == "result" and tools[1]["text"].startswith("error:")


def test_n_and_seed_are_reproducible(client):
    def run():
        r = client.chat.completions.create(model="tiny", messages=ask(), n=3, seed=7, temperature=1.5, max_tokens=8)
        return [c.message.content for c in r.choices]

    a = run()
    assert len(a) == 3 and a == run()


def test_completions_echo_logprobs_equal_a_forward_pass(client, scripted_run):
    from llmstack.interop.load import load_model

    text = " the model reads tokens"
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    # every prompt token has an entry, BOS included (harnesses count tokens); the text is the prompt's
    assert r.choices[0].text == text and lp.tokens[0] == "<|bos|>" and "".join(lp.tokens[1:]) == text
    b = load_model(scripted_run)
    ids = [b.tokenizer.bos_id, *b.tokenizer.encode_ordinary(text)]
    assert len(lp.tokens) == len(ids) == r.usage.prompt_tokens
    with torch.no_grad():
        ref = b.model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)
    want = [float(ref[i, t]) for i, t in enumerate(ids[1:])]
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert lp.text_offset[:2] == [0, 0] and lp.text_offset[-1] == len(text) - len(lp.tokens[-1])
    gen = client.completions.create(model="tiny", prompt=[ids[1:]], max_tokens=3, temperature=0)
    assert gen.choices[0].finish_reason in ("length", "stop")


def test_client_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=ask())
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=ask(), max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=ask("the " * 200))
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=ask(), tool_choice="required")


def test_disconnect_mid_stream_leaves_the_server_serving(server, client):
    u = urlparse(server)
    body = json.dumps({"model": "tiny", "messages": ask(), "stream": True, "max_tokens": 60, "temperature": 1.0})
    for _ in range(3):
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            assert b"200 OK" in s.recv(200)  # headers arrived; hang up mid-stream
    r = client.chat.completions.create(model="tiny", messages=ask(), temperature=0)
    assert r.choices[0].message.content == SCRIPT_REPLY
