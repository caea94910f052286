"""The web chat UI (llmstack/serve/static) in headless Chromium against a real ``llmstack serve``.

Needs playwright (``pip install playwright``) and Debian's chromium (``apt-get install chromium``);
Playwright's own browser download is not used. Without them the tests skip, unless
``LLMSTACK_REQUIRE_ASSETS=1``. The screenshot goes to ``$LLMSTACK_TEST_ARTIFACTS`` (default
``runs/test-artifacts``).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from conftest import SCRIPT_REPLY

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Records each text node added to an assistant bubble: a streamed answer arrives as several.
RECORD_TEXT = """() => {
  window.__pieces = [];
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes)
      if (n.nodeType === Node.TEXT_NODE && n.parentElement && n.parentElement.closest('.msg.assistant .body'))
        window.__pieces.push(n.data);
  }).observe(document.querySelector('#messages'), {childList: true, subtree: true});
}"""

# A slow network: the chat stream is handed to the page one SSE event every 700 ms (while __slow).
SLOW_STREAM = """() => {
  window.__slow = true;
  const realFetch = window.fetch.bind(window);
  window.fetch = async (url, init) => {
    const res = await realFetch(url, init);
    if (!window.__slow || !String(url).endsWith('/v1/chat/completions') || !res.ok) return res;
    const reader = res.body.getReader(), dec = new TextDecoder(), enc = new TextEncoder();
    const queue = [];
    let buf = '';
    const body = new ReadableStream({
      async pull(ctl) {
        while (!queue.length) {
          const {value, done} = await reader.read();
          if (done) { if (buf) queue.push(buf); buf = ''; if (!queue.length) { ctl.close(); return; } break; }
          buf += dec.decode(value, {stream: true});
          const events = buf.split('\\n\\n');
          buf = events.pop();
          for (const e of events) queue.push(e + '\\n\\n');
        }
        await new Promise((ok) => setTimeout(ok, 700));
        try { ctl.enqueue(enc.encode(queue.shift())); } catch (_) { /* cancelled meanwhile */ }
      },
      cancel(reason) { return reader.cancel(reason); },
    });
    return new Response(body, {status: res.status, headers: res.headers});
  };
}"""

IDLE = "!document.querySelector('#send').disabled && document.querySelector('#stop').disabled"
FINISHED = f"document.querySelectorAll('.msg.assistant:not(.streaming)').length === 1 && {IDLE}"


def _unavailable(reason: str) -> None:
    if os.environ.get("LLMSTACK_REQUIRE_ASSETS") == "1":
        pytest.fail(f"{reason} (LLMSTACK_REQUIRE_ASSETS=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is missing: pip install playwright")
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """The UI loaded in a fresh context (own localStorage); fails on any script error or dialog."""
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    page = context.new_page()
    page.set_default_timeout(10_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(server + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    yield page
    context.close()
    assert not problems, problems


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def answers(page) -> list[str]:
    return page.eval_on_selector_all(".msg.assistant .body", "bs => bs.map(b => b.textContent)")


def test_chat_streams_the_reply(page):
    options = page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.dataset.kind])")
    assert ["tiny", "model"] in options
    page.select_option("#model", "tiny")
    page.fill("#temperature", "0")
    page.evaluate(RECORD_TEXT)
    send(page, "hi")
    page.wait_for_function(FINISHED)
    assert page.locator(".msg.user .body").text_content() == "hi"
    assert answers(page) == [SCRIPT_REPLY]
    assert page.locator(".msg.assistant").get_attribute("data-finish") == "stop"
    pieces = page.evaluate("window.__pieces")
    seen = ["".join(pieces[: i + 1]) for i in range(len(pieces))]
    assert seen[-1] == SCRIPT_REPLY
    assert any(0 < len(s) < len(SCRIPT_REPLY) for s in seen), f"no partial answer was shown: {pieces}"

    out = Path(os.environ.get("LLMSTACK_TEST_ARTIFACTS", "runs/test-artifacts")) / "webui-chat.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    png = out.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # the finished answer as tokens, and back
    page.click(".msg.assistant .toggle-tokens")
    page.wait_for_selector(".msg.assistant .token")
    pieces = page.eval_on_selector_all(".msg.assistant .token", "ts => ts.map(t => t.textContent)")
    assert "".join(pieces) == SCRIPT_REPLY and len(pieces) == 3
    assert page.locator(".msg.assistant .body").is_hidden()
    page.click(".msg.assistant .toggle-tokens")
    assert page.locator(".msg.assistant .token").count() == 0
    # the token tab starts from the last message
    page.click("#tab-tokens")
    assert page.input_value("#tokens-input") == SCRIPT_REPLY
    page.wait_for_function("document.querySelectorAll('#tokens-output .token').length === 3")


def test_token_view_matches_the_api(page, server):
    text = "the model reads tokens, and predicts 42 café.\ndef f(x): return x + 1"
    expected = post(server + "/api/tokenize", {"model": "tiny", "text": text})
    page.click("#tab-tokens")
    page.fill("#tokens-input", text)
    page.wait_for_function(
        "n => document.querySelectorAll('#tokens-output .token').length === n", arg=expected["count"]
    )
    tokens = page.eval_on_selector_all(
        "#tokens-output .token", "ts => ts.map(t => [t.textContent, Number(t.dataset.id)])"
    )
    assert "".join(t for t, _ in tokens) == text
    assert [i for _, i in tokens] == [t["id"] for t in expected["tokens"]]
    assert page.get_attribute("#tokens-count", "data-count") == str(expected["count"])
    colours = page.eval_on_selector_all(
        "#tokens-output .token", "ts => ts.map(t => getComputedStyle(t).backgroundColor)"
    )
    assert all(a != b for a, b in zip(colours, colours[1:], strict=False)), "neighbouring tokens share a colour"
    after = "getComputedStyle(document.querySelector('#tokens-output .token'), '::after').content"
    assert page.evaluate(after) in ("none", "normal", "")
    page.check("#tokens-ids")
    assert page.evaluate(after) == f'"{expected["tokens"][0]["id"]}"'


def test_api_error_is_shown_then_regenerate_recovers(page):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "100000")
    send(page, "hi")
    page.wait_for_selector("#error", state="visible")
    assert "max_tokens" in page.text_content("#error")
    page.wait_for_function(IDLE)
    assert page.locator(".msg.assistant").count() == 0 and page.locator(".msg.user").count() == 1
    page.fill("#max-tokens", "16")
    page.click("#regenerate")
    page.wait_for_function(FINISHED)
    assert page.locator("#error").is_hidden()
    assert answers(page) == [SCRIPT_REPLY]


def test_stop_then_regenerate(page):
    page.fill("#temperature", "0")
    page.evaluate(SLOW_STREAM)
    send(page, "hi")
    page.wait_for_function("(document.querySelector('.msg.assistant .body') || {}).textContent")
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    page.wait_for_function(IDLE)
    (partial,) = answers(page)
    assert 0 < len(partial) < len(SCRIPT_REPLY) and SCRIPT_REPLY.startswith(partial)
    assert "stopped" in page.get_attribute(".msg.assistant", "class")
    assert page.locator("#error").is_hidden()
    page.evaluate("window.__slow = false")
    page.click("#regenerate")
    page.wait_for_function(FINISHED)
    assert answers(page) == [SCRIPT_REPLY]
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.is_disabled("#regenerate")


def test_server_tools_show_as_blocks_in_a_narrow_window(page):
    page.set_viewport_size({"width": 380, "height": 720})
    page.fill("#temperature", "0")
    page.click("#advanced summary")
    page.fill("#prefill", "x")  # the scripted model then opens a malformed call: the tool answers an error
    send(page, "hi")
    page.wait_for_function(FINISHED)
    blocks = page.eval_on_selector_all(".msg.assistant .body > *", "bs => bs.map(b => [b.className, b.textContent])")
    kinds = [k for k, _ in blocks]
    assert kinds == ["text", "tool-call", "tool-result tool-error", "text"]
    assert blocks[0][1] == "x" and blocks[3][1] == SCRIPT_REPLY
    assert blocks[1][1].endswith("42") and "error" in blocks[2][1]
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_api_key_is_kept_and_sent(page, server):
    page.click("#advanced summary")
    with page.expect_request("**/v1/models") as models:
        page.fill("#api-key", "sk-test")
        page.press("#api-key", "Tab")
    assert models.value.headers["authorization"] == "Bearer sk-test"
    page.reload()
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert page.input_value("#api-key") == "sk-test"
    with page.expect_request("**/v1/chat/completions") as chat:
        send(page, "hi")
    assert chat.value.headers["authorization"] == "Bearer sk-test"
    page.wait_for_function(FINISHED)


def test_stream_parser_buffers_split_events(page):
    """A stubbed stream in 5-byte pieces (split lines and UTF-8 characters, CRLF) ending in an error chunk."""
    deltas = [
        {"role": "assistant", "content": ""},
        {"content": "café "},
        {"content": "🙂"},
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": "x"}'}}]},
        {"llmstack_tool": {"type": "call", "text": "calculator: 12*34"}},
        {"llmstack_tool": {"type": "result", "text": "408"}},
        {"content": " done <b>not bold</b>"},
    ]
    events = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({"error": {"message": "boom: the engine failed", "type": "server_error"}})
    body = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n"
    page.evaluate(
        """(body) => {
          const realFetch = window.fetch.bind(window);
          window.fetch = async (url, init) => {
            if (!String(url).endsWith('/v1/chat/completions')) return realFetch(url, init);
            const bytes = new TextEncoder().encode(body);
            let i = 0;
            const stream = new ReadableStream({pull(ctl) {
              if (i >= bytes.length) return ctl.close();
              ctl.enqueue(bytes.slice(i, i + 5));
              i += 5;
            }});
            return new Response(stream, {headers: {'Content-Type': 'text/event-stream'}});
          };
        }""",
        body,
    )
    send(page, "hi")
    page.wait_for_function(FINISHED)
    blocks = page.eval_on_selector_all(".msg.assistant .body > *", "bs => bs.map(b => [b.className, b.textContent])")
    assert [k for k, _ in blocks] == ["text", "tool-call client", "tool-call", "tool-result", "text"]
    assert blocks[0][1] == "café 🙂" and blocks[4][1] == " done <b>not bold</b>"
    assert blocks[1][1].endswith('lookup({"q": "x"})') and blocks[2][1].endswith("calculator: 12*34")
    assert blocks[3][1].endswith("408")
    assert page.locator(".msg.assistant b").count() == 0  # model text is never parsed as HTML
    assert "boom: the engine failed" in page.text_content("#error")
    assert "failed" in page.get_attribute(".msg.assistant", "class")


def test_assistants_are_listed_as_such(page):
    cards = [
        {"id": "tiny", "llmstack": {"kind": "model", "context": 128, "tools": []}},
        {"id": "tutor", "llmstack": {"kind": "assistant", "context": 128, "description": "Explains Python."}},
    ]
    page.route("**/v1/models", lambda route: route.fulfill(json={"object": "list", "data": cards}))
    page.reload()
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    option = page.locator("#model optgroup[label=Assistants] option")
    assert option.get_attribute("value") == "tutor" and option.get_attribute("title") == "Explains Python."
    assert "assistant" in option.text_content()
    page.select_option("#model", "tutor")
    assert "Explains Python." in page.text_content("#model-info")


@pytest.fixture(scope="module")
def arena_server(scripted_run, tmp_path_factory):
    """An in-process server (a uvicorn thread) offering the scripted model under two names, so that a
    battle has two models; its battle log lies in a temporary folder. Yields (URL, log path)."""
    import threading
    import time

    import uvicorn
    from conftest import free_port

    from llmstack.serve import build_registry
    from llmstack.serve.app import create_app

    app = create_app(build_registry([f"tiny={scripted_run}", f"tiny2={scripted_run}"]))
    app.state.arena_log = tmp_path_factory.mktemp("arena") / "battles.jsonl"
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the arena server did not start"
    yield f"http://127.0.0.1:{port}", app.state.arena_log
    server.should_exit = True
    thread.join(timeout=10)


def test_battle_mode_votes_then_reveals_the_names(page, arena_server):
    from llmstack.eval.arena import read_battles

    url, log = arena_server
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    page.fill("#temperature", "0")  # the chat's settings apply to battles too
    page.click("#tab-battle")
    assert page.is_hidden("#chat-view") and page.get_attribute("#tab-battle", "aria-selected") == "true"
    assert page.is_hidden("#battle-votes") and page.text_content("#battle-board-note") == "no battles yet"
    page.fill("#battle-input", "hi")
    page.press("#battle-input", "Enter")
    page.wait_for_selector("#battle-votes", state="visible")
    sides = page.eval_on_selector_all(".battle-side .body", "bs => bs.map(b => b.textContent)")
    assert sides == [SCRIPT_REPLY, SCRIPT_REPLY]
    assert page.text_content("#battle-answers").count("tiny") == 0  # anonymous until the vote
    assert page.get_attribute("#battle-a", "data-finish") == "stop"

    page.click("[data-testid=vote-b]")
    page.wait_for_function("document.querySelector('#battle-name-a').textContent !== ''")
    names = [page.text_content("#battle-name-a"), page.text_content("#battle-name-b")]
    assert sorted(names) == ["tiny", "tiny2"] and page.is_hidden("#battle-votes")
    assert "winner" in page.get_attribute("#battle-b", "class")
    assert page.text_content("#battle-result") == f"You voted B is better. A was {names[0]}, B was {names[1]}."
    (logged,) = read_battles(log).battles
    assert [logged.model_a, logged.model_b, logged.winner, logged.judge] == [*names, "b", "human"]
    page.click("#battle-board-box summary")
    page.wait_for_function("document.querySelectorAll('#battle-board tr[data-model]').length === 2")
    assert page.eval_on_selector_all("#battle-board tr[data-model]", "rs => rs[0].dataset.model") == names[1]

    out = Path(os.environ.get("LLMSTACK_TEST_ARTIFACTS", "runs/test-artifacts")) / "webui-battle.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    page.click("#tab-chat")
    assert page.is_visible("#chat-view") and page.is_hidden("#battle-view")


@pytest.fixture(scope="module")
def inside_server(scripted_run, tmp_path_factory):
    """The scripted model served from a run of three checkpoints, as if trained: step 0 a random init, step 50
    halfway in weight space, step 100 the scripted model (the one served: LATEST). Yields the URL."""
    import shutil

    import torch
    from conftest import running

    from llmstack.model.llama import GPT
    from llmstack.serve import build_registry
    from llmstack.serve.app import create_app
    from llmstack.training.checkpoint import load_gpt, save_checkpoint

    run = tmp_path_factory.mktemp("inside") / "run"
    shutil.copytree(scripted_run, run)
    trained, ckpt = load_gpt(run / "checkpoints" / "step_000000")
    torch.manual_seed(0)
    early = GPT(trained.config)
    halfway = GPT(trained.config)
    with torch.no_grad():
        for h, a, b in zip(halfway.parameters(), early.parameters(), trained.parameters(), strict=True):
            h.copy_((a + b) / 2)
    for step, model in [(0, early), (50, halfway), (100, trained)]:
        save_checkpoint(run, step, model, None, ckpt.meta, keep=0)
    with running(create_app(build_registry([f"tiny={run}"]))) as url:
        yield url


INSIDE_TEXT = " the model reads tokens, and the model predicts 42"
# the colour of a canvas pixel (x, y in CSS pixels) as [r, g, b]
PIXEL = """([x, y]) => {
  const c = document.querySelector('#inside-heatmap'), d = window.devicePixelRatio || 1;
  return Array.from(c.getContext('2d').getImageData(x * d, y * d, 1, 1).data.slice(0, 3));
}"""


def test_inside_tab_shows_surprise_attention_lens_and_checkpoints(page, inside_server):
    expected = post(inside_server + "/api/inspect", {"model": "tiny", "text": INSIDE_TEXT, "layers": [1]})
    n = len(expected["tokens"])
    page.goto(inside_server + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 1")
    page.click("#tab-inside")
    assert page.is_visible("#inside-view") and page.is_hidden("#chat-view")
    page.fill("#inside-input", INSIDE_TEXT)
    page.press("#inside-input", "Enter")
    page.wait_for_function("k => document.querySelectorAll('#inside-tokens .token').length === k", arg=n)

    # tokens coloured by surprise: the first has none; the scripted bigrams (" model" after " the") are green
    tokens = page.eval_on_selector_all(
        "#inside-tokens .token",
        "ts => ts.map(t => [t.textContent, t.dataset.surprise, getComputedStyle(t).backgroundColor])",
    )
    assert [t for t, _, _ in tokens] == [t["text"] for t in expected["tokens"]]
    assert tokens[0][1] is None and [float(s) for _, s, _ in tokens[1:]] == expected["next"]["surprise"][:-1]
    rgb = [[int(v) for v in c[4:-1].split(", ")] for _, _, c in tokens[1:]]  # "rgb(r, g, b)": no transparency
    texts = [t for t, _, _ in tokens]
    model_at = texts.index(" model")
    green, red = rgb[model_at - 1], rgb[texts.index(" reads")]  # the scripted model ends its turn after " reads"
    assert green[1] > green[0] and red[0] > red[1], (tokens, green, red)
    page.click(f"#inside-tokens .token >> nth={model_at - 1}")  # after " the": " model" is expected
    assert page.locator("#inside-detail .topk tr").count() == 5
    assert page.locator("#inside-detail .topk tr.actual").count() == 1
    assert "entropy" in page.text_content("#inside-detail .detail-head")

    # the heatmap of a chosen layer and head: the last query's own cell is shaded, the future is grey
    page.select_option("#inside-head", "2")
    page.wait_for_function("document.querySelector('#inside-heatmap').dataset.head === '2'")
    page.wait_for_function("document.querySelector('#inside-heatmap').dataset.held === '2'")  # both layers' maps
    asked = []
    page.on("request", lambda r: asked.append(r.url) if r.url.endswith("/api/inspect") else None)
    page.select_option("#inside-layer", "1")  # the first answer held layer 0's maps only
    page.wait_for_function("document.querySelector('#inside-heatmap').dataset.layer === '1'")
    assert not asked, "the maps at hand were asked for again"
    size = page.evaluate(
        "(({cell, margin}) => [Number(cell), Number(margin)])(document.querySelector('#inside-heatmap').dataset)"
    )
    cell, margin = size
    last = margin + (n - 1) * cell + cell // 2
    first = margin + cell // 2
    assert page.evaluate(PIXEL, [last, last]) != [255, 255, 255]
    assert page.evaluate(PIXEL, [first, first]) == [47, 111, 222]  # the first query attends only to itself
    assert page.evaluate(PIXEL, [last, first]) == [0xEE, 0xF0, 0xF4]  # row 0, the last key: the future
    page.mouse.move(*(page.locator("#inside-heatmap").bounding_box()[k] + first for k in ("x", "y")))
    assert page.text_content("#inside-cell").endswith(": 1.0000")

    # the logit lens: one row per layer, one cell per position
    rows = page.eval_on_selector_all("#inside-lens tbody tr", "rs => rs.map(r => r.querySelectorAll('td').length)")
    assert rows == [n] * expected["layers"]

    # across the run's checkpoints: the scripted tokens become likely over training
    page.wait_for_function("document.querySelectorAll('#inside-ckpts tbody tr').length === 3")
    steps = page.eval_on_selector_all("#inside-ckpts tbody tr", "rs => rs.map(r => r.dataset.step)")
    assert steps == ["0", "50", "100"]
    cells = page.eval_on_selector_all(
        "#inside-ckpts tbody tr", "rs => rs.map(r => [...r.querySelectorAll('td')].slice(1).map(c => c.textContent))"
    )
    assert float(cells[0][model_at - 1]) < 0.01 < 0.9 < float(cells[2][model_at - 1])

    page.set_viewport_size({"width": 1000, "height": 1400})
    out = Path(os.environ.get("LLMSTACK_TEST_ARTIFACTS", "runs/test-artifacts")) / "webui-inside.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    if os.environ.get("LLMSTACK_SCREENSHOTS") == "1":  # the picture in docs/inside.md, rewritten on request only
        doc = Path(__file__).resolve().parents[1] / "docs" / "img" / "inside.png"
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_bytes(out.read_bytes())
