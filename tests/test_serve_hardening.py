"""What an attack run against ``llmstack serve`` found, each pinned: hostile bodies, paths and
connections get a 4xx (or are closed) and never a 5xx, the server keeps answering, and a
schema-driven fuzz over ``/openapi.json`` finds no 5xx."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
import urllib.request
from urllib.parse import urlparse

import pytest
from conftest import SCRIPT_REPLY, serve_process
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from llmstack.serve import build_registry
from llmstack.serve.app import ServeConfig, create_app
from llmstack.serve.connections import RateLimitFilter
from llmstack.serve.protocol import json_depth

KEY = "sk-hardening"
POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/api/tokenize", "/api/inspect"]
POST_ROUTES += ["/api/arena/battles", "/api/arena/battles/x/vote"]


@pytest.fixture(scope="module")
def app(scripted_run, tmp_path_factory):
    app = create_app(build_registry([f"tiny={scripted_run}"]), ServeConfig(api_key=KEY, max_n=8, max_rows=6))
    app.state.arena_log = tmp_path_factory.mktemp("arena") / "battles.jsonl"
    return app


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, **kw}


def assert_error(r, status: int, needle: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert param is None or err["param"] == param, err
    return err


# ----------------------------------------------------------------------------- bodies


def test_deep_json_is_refused_before_it_is_parsed(http):
    for route in POST_ROUTES:  # was a RecursionError (500) on every JSON route
        err = assert_error(http.post(route, content=b"[" * 100_000), 400, "100000 levels deep")
        assert err["code"] == "json_too_deep"
    assert_error(http.post("/v1/chat/completions", content=b'{"a":' * 50_000), 400, "levels deep")
    nested = {"model": "tiny", "text": "x", "extra": json.loads("[" * 63 + "]" * 63)}  # 64 levels with the body
    assert http.post("/api/tokenize", json=nested).status_code == 200
    nested["extra"] = [nested["extra"]]
    assert_error(http.post("/api/tokenize", json=nested), 400, "65 levels deep; the limit is 64")
    brackets_in_text = {"model": "tiny", "text": '[{"[' * 500}  # inside a string: no depth at all
    assert http.post("/api/tokenize", json=brackets_in_text).json()["count"] > 0


TRICKY = st.text(alphabet='[]{}"\\ab', max_size=8)  # brackets, quotes and backslashes inside strings
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY, inner, max_size=3),
    max_leaves=20,
)


def depth(v) -> int:
    if isinstance(v, list):
        return 1 + max(map(depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(depth, v.values()), default=0)
    return 0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(doc=JSON)
def test_json_depth_matches_the_parsed_document(doc):
    assert json_depth(json.dumps(doc).encode()) == depth(doc)


def test_rows_over_the_batch_limit_are_a_400_naming_the_field(http):
    # max_rows 6, max_n 8: both were handed to the engine and failed there (500)
    body = {"model": "tiny", "prompt": ["the"] * 5, "n": 8, "max_tokens": 2}
    assert_error(http.post("/v1/completions", json=body), 400, "40 rows", "n")
    assert_error(http.post("/v1/completions", json={**body, "max_tokens": 0, "echo": True}), 400, "40 rows", "n")
    assert_error(http.post("/v1/completions", json={**body, "prompt": ["a"] * 7, "n": 1}), 400, "7 rows", "prompt")
    assert_error(http.post("/v1/chat/completions", json=chat(n=7)), 400, "7 rows", "n")
    assert_error(http.post("/v1/chat/completions", json=chat(n=9)), 400, "over the limit of 8", "n")
    assert len(http.post("/v1/completions", json={**body, "prompt": ["a"] * 3, "n": 2}).json()["choices"]) == 6


def test_lone_surrogates_are_a_400_naming_the_field(http):
    def raw(route: str, text: str):
        return http.post(route, content=text.encode(), headers={"Content-Type": "application/json"})

    base = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]'
    assert_error(raw("/v1/chat/completions", base + ', "stop": "\\ud800"}'), 400, "surrogate", "stop")  # was a 500
    assert_error(raw("/v1/chat/completions", base + ', "stop": ["a", "x\\uDFFF"]}'), 400, "surrogate", "stop.1")
    bad_content = '{"model": "tiny", "messages": [{"role": "user", "content": "\\udc00"}]}'
    assert_error(raw("/v1/chat/completions", bad_content), 400, "surrogate", "messages.0.content")
    assert_error(raw("/api/tokenize", '{"model": "tiny", "text": "a\\ud83d"}'), 400, "surrogate", "text")
    assert_error(raw("/v1/completions", '{"model": "tiny", "prompt": "x", "\\ud800": 1}'), 400, "surrogate")
    pair = raw("/api/tokenize", '{"model": "tiny", "text": "\\ud83d\\ude42 \\\\ud800"}')  # a pair; an escaped backslash
    assert pair.status_code == 200 and "".join(t["text"] for t in pair.json()["tokens"]) == "🙂 \\ud800"


def test_a_vanishing_temperature_is_greedy_not_an_overflow(http):
    r = http.post("/v1/chat/completions", json=chat(temperature=1e-320))  # logits / 1e-320 overflowed: a 500
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == SCRIPT_REPLY


# ----------------------------------------------------------------------------- paths, health, schema, the catch-all


def test_odd_static_paths_are_404(http):
    for path in ["/static/app.js%00.html", "/static/..%2fapp.py", "/static/%2e%2e", "/static/", "/static/x%00"]:
        assert http.get(path).status_code == 404, path  # the first was a 500 (embedded null byte)
    assert http.get("/static/app.js").status_code == 200 and http.get("/").status_code == 200


def test_health_names_models_only_to_key_holders(app, http, scripted_run):
    with TestClient(app) as anon:
        assert anon.get("/health").json() == {"status": "ok"}
        assert anon.get("/health", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ok"}
    assert http.get("/health").json()["models"] == ["tiny"]
    with TestClient(create_app(build_registry([f"tiny={scripted_run}"]))) as open_server:  # no key: nothing to hide
        assert open_server.get("/health").json()["models"] == ["tiny"]


def test_openapi_describes_every_request_body(http):
    doc = http.get("/openapi.json").json()
    components = doc["components"]["schemas"]
    posts = {path: ops["post"] for path, ops in doc["paths"].items() if "post" in ops}
    assert len(posts) == len(POST_ROUTES)
    for path, op in posts.items():
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.startswith("#/components/schemas/") and components[ref.split("/")[-1]]["properties"], path
    chat_schema = components["ChatRequest"]
    assert {"model", "messages"} <= set(chat_schema["required"])
    assert chat_schema["properties"]["temperature"]["maximum"] == 2
    leaderboard = doc["paths"]["/api/arena/leaderboard"]["get"]["parameters"]
    assert {p["name"] for p in leaderboard} == {"prior", "judge"}


def test_an_unexpected_error_is_a_logged_500_without_a_traceback(app, http, monkeypatch, caplog):
    tok = app.state.registry.models["tiny"].bundle.tokenizer

    def broken(text: str):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(tok, "encode_ordinary", broken)
    with caplog.at_level(logging.ERROR, logger="llmstack.serve"):
        r = http.post("/api/tokenize", json={"model": "tiny", "text": "hi"})
    err = assert_error(r, 500, "failed")
    assert err["type"] == "server_error" and "secret" not in r.text and "Traceback" not in r.text
    assert "POST /api/tokenize failed: RuntimeError" in caplog.text and "secret internal detail" in caplog.text
    monkeypatch.undo()
    assert http.post("/api/tokenize", json={"model": "tiny", "text": "hi"}).status_code == 200


def test_rate_limited_log_counts_what_it_left_out():
    now = [0.0]
    quiet = RateLimitFilter(10, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("llmstack.serve", logging.WARNING, __file__, 1, msg, None, None)

    assert quiet.filter(record("at the limit (%d)"))
    assert not any(quiet.filter(record("at the limit (%d)")) for _ in range(99))
    assert quiet.filter(record("another message"))  # each message has its own budget
    now[0] = 11.0
    again = record("at the limit (%d)")
    assert quiet.filter(again) and "[and 99 more like it in 11 s, not logged]" in again.msg


# ----------------------------------------------------------------------------- slow connections (a real server)


def test_slow_connections_are_capped_and_timed_out(scripted_run, tmp_path):
    log = tmp_path / "server.log"
    args = ["--model", f"tiny={scripted_run}", "--no-assistants", "--max-connections", "50"]
    with serve_process([*args, "--header-timeout", "2", "--body-timeout", "1"], log) as url:
        u = urlparse(url)

        def connect(first: bytes) -> socket.socket:
            s = socket.create_connection((u.hostname, u.port), timeout=5)
            s.sendall(first)
            return s

        assert get(url + "/v1/chat/completions", chat())["choices"]  # warm: the first answer's one-off costs
        # headers that never end: plain uvicorn kept every such connection, a file descriptor each, for good
        socks = [connect(b"GET /health HTTP/1.1\r\nHost: x\r\n") for _ in range(200)]
        t0 = time.monotonic()
        assert get(url + "/health")["status"] == "ok"
        assert get(url + "/v1/chat/completions", chat())["choices"][0]["message"]["content"] == SCRIPT_REPLY
        assert time.monotonic() - t0 < 2
        while closed(socks) < 150 and time.monotonic() - t0 < 2:  # at most 50 open: the longest-waiting...
            time.sleep(0.05)
        assert closed(socks) >= 150  # ...were closed for the newcomers, a moment after they came
        while closed(socks) < 200 and time.monotonic() - t0 < 6:  # the rest: the header timeout (2 s)
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"X")  # a trickled byte does not reset the deadline
            time.sleep(0.25)
        assert closed(socks) == 200
        # 50 requests whose bodies never come: every connection busy, so a newcomer gets a 503
        head = b"POST /api/tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n"
        busy, answers = [connect(head) for _ in range(50)], []
        while b"503" not in b"".join(answers) and time.monotonic() - t0 < 8:  # once the server has read them all
            with connect(b"") as late:
                answers.append(late.recv(200)[:12])
        assert answers[-1] == b"HTTP/1.1 503"
        time.sleep(1.5)  # the body timeout (1 s) closes them
        assert closed(busy) == 50 and get(url + "/health")["status"] == "ok"
    for s in socks + busy:
        s.close()
    text = log.read_text()
    assert text.count("connection limit") <= 3 and text.count("did not arrive") <= 2, text  # rate-limited


def get(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def closed(socks: list[socket.socket]) -> int:
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            n += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


# ----------------------------------------------------------------------------- schema-driven fuzz


def test_schema_fuzz_finds_no_server_errors(scripted_run, tmp_path):
    """schemathesis generates requests from /openapi.json, valid and invalid, for every operation;
    half of the bodies name a served model, so they reach the engine. Deterministic, offline."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error

    app = create_app(build_registry([f"tiny={scripted_run}", f"tiny2={scripted_run}"]), ServeConfig(max_tokens_cap=8))
    app.state.arena_log = tmp_path / "battles.jsonl"
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases = 0

    def aim(pair):
        case, real = pair
        if real and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"
        return case

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(
                max_examples=30,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=st.tuples(op.as_strategy(generation_mode=mode), st.booleans()).map(aim))
            def run(case):
                nonlocal cases
                cases += 1
                case.validate_response(case.call(), checks=[not_a_server_error])  # raises on a 5xx

            try:
                run()
            except Unsatisfiable:  # an operation with no inputs has no invalid ones
                assert mode == schemathesis.GenerationMode.NEGATIVE
    assert cases >= 300
