"""Bad input against the server in-process: every mistake is a 4xx OpenAI-style error, never a 5xx."""

from __future__ import annotations

import json

import pytest
from conftest import SCRIPT_REPLY
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def app(scripted_run):
    from llmstack.serve import build_registry
    from llmstack.serve.app import ServeConfig, create_app

    config = ServeConfig(api_key=KEY, max_body_bytes=20_000, max_messages=8, max_tokens_cap=32, max_n=4)
    return create_app(build_registry([f"tiny={scripted_run}"]), config)


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, **kw}


def assert_error(r, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_api_key_is_required(app, http):
    with TestClient(app) as anon:
        assert_error(anon.get("/v1/models"), 401, "API key")
        assert_error(anon.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer no"}), 401, "key")
        assert anon.get("/health").status_code == 200  # health needs no key
    assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_malformed_bodies(http):
    post = http.post
    assert_error(post("/v1/chat/completions", content=b"{not json"), 400, "not valid JSON")
    assert_error(post("/v1/chat/completions", content=b'{"model": "tiny\xff"}'), 400, "not valid UTF-8")
    assert_error(post("/v1/chat/completions", content=b"[1, 2]"), 400, "JSON object")
    assert_error(post("/v1/chat/completions", json={"model": "tiny"}), 400, "messages")
    assert_error(post("/v1/chat/completions", json=chat(temperature="hot")), 400, "temperature")
    assert_error(post("/v1/chat/completions", json=chat(n=0)), 400, "n")
    bad_role = {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}
    assert_error(post("/v1/chat/completions", json=bad_role), 400, "role")
    late_system = chat(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    assert_error(post("/v1/chat/completions", json=late_system), 400, "system")
    orphan_tool = chat(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "1"}])
    assert_error(post("/v1/chat/completions", json=orphan_tool), 400, "tool")
    assert_error(post("/v1/completions", json={"model": "tiny", "prompt": [99999]}), 400, "token ids")
    assert_error(post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 0}), 400, "echo")


def test_limits(http):
    assert_error(http.post("/v1/chat/completions", content=b" " * 30_000), 413, "over 20000 bytes")
    many = chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 5)
    assert_error(http.post("/v1/chat/completions", json=many), 400, "limit is 8")
    assert_error(http.post("/v1/chat/completions", json=chat(max_tokens=33)), 400, "limit of 32")
    assert_error(http.post("/v1/chat/completions", json=chat(n=5)), 400, "limit of 4")
    long = chat(messages=[{"role": "user", "content": "the " * 300}])
    r = http.post("/v1/chat/completions", json=long)
    assert_error(r, 400, "context")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert_error(http.get("/v1/models/nope"), 404, "does not exist")
    assert_error(http.get("/no/such/path"), 404, "Not Found")


def test_chat_and_stream_in_process(http):
    assert http.post("/v1/chat/completions", json=chat()).json()["choices"][0]["message"]["content"] == SCRIPT_REPLY
    with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in lines[:-1])
    assert text == SCRIPT_REPLY


def test_tokenize(http):
    r = http.post("/api/tokenize", json={"model": "tiny", "text": "the model 🙂"}).json()
    assert r["count"] == len(r["tokens"]) and "".join(t["text"] for t in r["tokens"]) == "the model 🙂"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]), "content": JSON}
)
CHAT_BODY = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "other", ""]), "messages": st.lists(MESSAGE, max_size=4)},
    optional={
        "temperature": JSON | st.floats(0, 2, allow_infinity=False),
        "top_p": JSON,
        "max_tokens": st.integers(-5, 40) | JSON,
        "n": st.integers(-1, 5),
        "seed": st.integers(),
        "stop": JSON,
        "stream": st.booleans(),
        "logprobs": JSON,
        "top_logprobs": st.integers(-2, 25),
        "tools": JSON,
        "tool_choice": JSON,
    },
)
COMPLETION_BODY = st.fixed_dictionaries(
    {"model": st.just("tiny"), "prompt": JSON | st.lists(st.integers(-3, 500), max_size=5)},
    optional={"max_tokens": st.integers(-1, 40), "echo": st.booleans(), "logprobs": st.integers(-1, 7), "n": JSON},
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=CHAT_BODY | COMPLETION_BODY)
def test_fuzz_no_server_errors(http, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = http.post(path, json=body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"]
