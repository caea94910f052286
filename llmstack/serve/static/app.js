// The llmstack chat UI: a model picker, a streamed chat and a token view over the OpenAI-compatible API,
// a battle mode (two anonymous models, a vote) over the server's arena endpoints, and an Inside view of
// what a model computes for a text (POST /api/inspect).
//
// Everything the model or the server writes is put into the page as text (textContent / text nodes),
// never parsed as HTML. The stream is read with fetch + a ReadableStream reader (EventSource cannot
// POST). Not covered: markdown rendering, several choices (n > 1), client-side tools (tool_calls are
// shown, never answered), saving conversations. Answers arrive through the server's output filter
// (on unless `llmstack serve --no-output-filter`): images and links to hosts off its allow-list are removed.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "llmstack.apiKey";
const MODEL_STORE = "llmstack.model";
const N_COLOURS = 7; // the token view's pastel backgrounds: .c0 .. .c6 in style.css

const state = {
  messages: [], // {role, content, el, body, meta, calls, tokens}
  streaming: null, // {controller, msg} while an answer streams
  models: new Map(), // id -> the /v1/models card
  image: null, // the attached image (a PNG data: URL) the next user message carries
};

// ----------------------------------------------------------------------------- small helpers
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// An OpenAI-style error body ({"error": {"message"}}) -> its message; anything else -> the status line.
async function errorMessage(res) {
  const text = await res.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not JSON: fall through
  }
  return `${res.status} ${res.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

async function api(path, body) {
  const init = body === undefined ? { headers: apiHeaders() } : { method: "POST", headers: apiHeaders(), body: JSON.stringify(body) };
  const res = await fetch(path, init);
  if (!res.ok) throw new Error(await errorMessage(res));
  return res.json();
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// ----------------------------------------------------------------------------- models
async function loadModels() {
  const select = $("model");
  let cards;
  try {
    cards = (await api("/v1/models")).data || [];
  } catch (e) {
    showError(`Could not list models: ${e.message}`);
    return;
  }
  const previous = select.value || localStorage.getItem(MODEL_STORE);
  state.models = new Map(cards.map((c) => [c.id, c]));
  const groups = { model: el("optgroup"), assistant: el("optgroup") };
  groups.model.label = "Models";
  groups.assistant.label = "Assistants";
  for (const card of cards) {
    const info = card.llmstack || {};
    const isAssistant = info.kind === "assistant";
    const option = el("option", null, isAssistant ? `${card.id} (assistant)` : card.id);
    option.value = card.id;
    option.dataset.kind = isAssistant ? "assistant" : "model";
    if (info.description) option.title = info.description;
    groups[isAssistant ? "assistant" : "model"].append(option);
  }
  select.replaceChildren(...[groups.model, groups.assistant].filter((g) => g.children.length));
  if (previous && state.models.has(previous)) select.value = previous;
  showModelInfo();
}

function showModelInfo() {
  const card = state.models.get($("model").value);
  const info = (card && card.llmstack) || {};
  const parts = [];
  if (card) parts.push(info.kind === "assistant" ? "assistant" : "model");
  if (info.context) parts.push(`context ${info.context} tokens`);
  if (info.tools && info.tools.length) parts.push(`server tools: ${info.tools.join(", ")}`);
  if (info.description) parts.push(info.description);
  $("model-info").textContent = parts.join(" · ");
  $("model").title = info.description || "";
}

// ----------------------------------------------------------------------------- messages
function addMessage(role, content) {
  $("empty").hidden = true;
  const msg = { role, content: "", calls: [], tokens: null };
  msg.el = el("div", `msg ${role}`);
  msg.el.dataset.testid = `msg-${role}`;
  msg.body = el("div", "body");
  msg.meta = el("div", "meta");
  msg.el.append(el("div", "role", role), msg.body, msg.meta);
  $("messages").append(msg.el);
  state.messages.push(msg);
  if (content) appendText(msg, content);
  scrollDown(true);
  return msg;
}

function removeMessage(msg) {
  msg.el.remove();
  state.messages = state.messages.filter((m) => m !== msg);
  $("empty").hidden = state.messages.length > 0;
}

// Each delta becomes its own text node, so the page grows as the answer streams.
function appendText(msg, text) {
  let span = msg.body.lastElementChild;
  if (!span || !span.classList.contains("text")) {
    span = el("span", "text");
    msg.body.append(span);
  }
  span.append(document.createTextNode(text));
  msg.content += text;
  scrollDown();
}

// A tool the server ran itself: its call and its result as blocks of their own inside the answer.
function addServerTool(msg, tool) {
  if (tool.type === "call") {
    const block = el("div", "tool-call");
    block.append(el("span", "tool-icon", "⚙"), el("code", null, tool.text));
    msg.body.append(block);
  } else {
    const block = el("div", "tool-result");
    if (/^\s*error\b/i.test(tool.text)) block.classList.add("tool-error");
    block.append(el("span", "tool-icon", "→"), el("code", null, tool.text));
    msg.body.append(block);
  }
  scrollDown();
}

// Client tool calls (OpenAI tool_calls) stream as pieces keyed by index: name, then arguments.
function addToolCallDelta(msg, delta) {
  const i = delta.index || 0;
  let call = msg.calls[i];
  if (!call) {
    call = { name: "", arguments: "", code: el("code") };
    const block = el("div", "tool-call client");
    block.title = "a tool call for the client to run";
    block.append(el("span", "tool-icon", "⚙"), call.code);
    msg.body.append(block);
    msg.calls[i] = call;
  }
  const fn = delta.function || {};
  call.name += fn.name || "";
  call.arguments += fn.arguments || "";
  call.code.textContent = `${call.name}(${call.arguments})`;
}

function applyDelta(msg, delta) {
  if (typeof delta.content === "string" && delta.content) appendText(msg, delta.content);
  if (delta.llmstack_tool) addServerTool(msg, delta.llmstack_tool);
  for (const call of delta.tool_calls || []) addToolCallDelta(msg, call);
}

function finishMessage(msg, { finish, stopped, error, seconds }) {
  msg.el.classList.remove("streaming");
  const notes = [];
  if (stopped) {
    msg.el.classList.add("stopped");
    notes.push("stopped");
  } else if (error) {
    msg.el.classList.add("failed");
    notes.push("error");
  } else if (finish) {
    msg.el.dataset.finish = finish;
    notes.push(finish === "length" ? "cut at max tokens" : `finish: ${finish}`);
  }
  if (seconds !== undefined) notes.push(`${seconds.toFixed(1)} s`);
  msg.meta.replaceChildren(el("span", "note", notes.join(" · ")));
  addTokenToggle(msg);
  scrollDown();
}

function addTokenToggle(msg) {
  const button = el("button", "toggle-tokens small ghost", "Tokens");
  button.type = "button";
  button.dataset.testid = "toggle-tokens";
  button.title = "show this message as the model's tokens";
  button.addEventListener("click", () => toggleMessageTokens(msg, button));
  msg.meta.append(button);
}

async function toggleMessageTokens(msg, button) {
  if (msg.tokens) {
    msg.tokens.remove();
    msg.tokens = null;
    msg.body.hidden = false;
    button.textContent = "Tokens";
    return;
  }
  try {
    const result = await api("/api/tokenize", { model: $("model").value, text: msg.content });
    msg.tokens = el("div", "token-view");
    msg.tokens.classList.toggle("with-ids", $("tokens-ids").checked);
    renderTokens(msg.tokens, result.tokens);
    msg.body.hidden = true;
    msg.body.after(msg.tokens);
    button.textContent = `Text (${result.count} tokens)`;
  } catch (e) {
    showError(`Tokenize: ${e.message}`);
  }
}

function scrollDown(force) {
  const box = $("messages");
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  if (force || near) box.scrollTop = box.scrollHeight;
}

// ----------------------------------------------------------------------------- streaming
// Server-Sent Events from a fetch response: yields each event's data (the "data:" lines joined).
// Partial lines are buffered across reads; a stop (the signal) cancels the reader.
async function* sseData(res, signal) {
  const reader = res.body.getReader();
  const cancel = () => reader.cancel().catch(() => {});
  signal.addEventListener("abort", cancel);
  const decoder = new TextDecoder();
  const eol = /\r\n|\r|\n/;
  let buf = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buf += decoder.decode(value, { stream: true });
      if (done) buf += decoder.decode();
      let m;
      // a "\r" at the very end may be half of "\r\n": wait for the next read
      while ((m = eol.exec(buf)) && (done || m[0] !== "\r" || m.index < buf.length - 1)) {
        const line = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } // other fields (event:, id:, retry:) and ":" comments are not used by this API
      }
      if (done) {
        if (buf.startsWith("data:")) data.push(buf.slice(buf.startsWith("data: ") ? 6 : 5));
        if (data.length) yield data.join("\n");
        return;
      }
    }
  } finally {
    signal.removeEventListener("abort", cancel);
    cancel();
  }
}

function requestBody() {
  const model = $("model").value;
  const messages = state.messages.map((m) =>
    m.image
      ? { role: m.role, content: [{ type: "image_url", image_url: { url: m.image } }, { type: "text", text: m.content }] }
      : { role: m.role, content: m.content },
  );
  const system = $("system").value.trim();
  if (system) messages.unshift({ role: "system", content: system });
  const body = { model, messages, stream: true };
  const temperature = $("temperature").value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  const maxTokens = $("max-tokens").value.trim();
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

// POST a JSON body and hand each server-sent event (parsed JSON) to onEvent until [DONE]. An error
// event ({"error": ...}) does not end the stream: the last one's message is returned. A failed
// request or a malformed event throws.
async function postStream(path, body, signal, onEvent) {
  const res = await fetch(path, { method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal });
  if (!res.ok) throw new Error(await errorMessage(res));
  let error = null;
  for await (const data of sseData(res, signal)) {
    if (data === "[DONE]") break;
    let event;
    try {
      event = JSON.parse(data);
    } catch (_) {
      throw new Error(`the server sent a malformed event: ${data.slice(0, 200)}`);
    }
    if (event.error) error = event.error.message || JSON.stringify(event.error);
    else onEvent(event);
  }
  return error;
}

async function generate() {
  if (state.streaming) return;
  if (!$("model").value) {
    showError("No model to talk to: the server lists none (or the API key is missing).");
    return;
  }
  hideError();
  const body = requestBody();
  const prefill = $("prefill").value;
  if (prefill) body.messages.push({ role: "assistant", content: prefill });
  const msg = addMessage("assistant", prefill);
  msg.el.classList.add("streaming");
  const controller = new AbortController();
  state.streaming = { controller, msg };
  setBusy(true);
  const started = performance.now();
  let finish = null;
  let error = null;
  try {
    error = await postStream("/v1/chat/completions", body, controller.signal, (chunk) => {
      for (const choice of chunk.choices || []) {
        if ((choice.index || 0) !== 0) continue; // this page asks for one choice
        applyDelta(msg, choice.delta || {});
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
  } catch (e) {
    if (!controller.signal.aborted) error = e.message || String(e);
  } finally {
    state.streaming = null;
    const stopped = controller.signal.aborted;
    if (error) showError(error);
    const empty = !msg.content && !msg.body.children.length;
    if (empty && (error || stopped)) removeMessage(msg); // the user's turn stays: Regenerate retries it
    else finishMessage(msg, { finish, stopped, error, seconds: (performance.now() - started) / 1000 });
    setBusy(false);
  }
}

function send() {
  const text = $("input").value;
  if ((!text.trim() && !state.image) || state.streaming) return;
  const msg = addMessage("user", "");
  if (state.image) {
    msg.image = state.image; // sent as an image_url content part (a data: URL) before the text
    const img = el("img", "attached");
    img.src = state.image;
    img.alt = "attached image";
    img.dataset.testid = "msg-image";
    msg.body.append(img);
    clearImage();
  }
  if (text) appendText(msg, text);
  $("input").value = "";
  generate();
}

// ----------------------------------------------------------------------------- image attachments
// The picked file is drawn on a canvas at most IMAGE_SIDE pixels a side and sent as a PNG data: URL
// (the server fetches no URLs, and a small image keeps the request under its body limit).
const IMAGE_SIDE = 256;

function attachImage(file) {
  if (!file) return;
  if (!["image/png", "image/jpeg"].includes(file.type)) {
    showError(`${file.name}: not a PNG or JPEG image`);
    $("image-input").value = "";
    return;
  }
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    URL.revokeObjectURL(url);
    const scale = Math.min(1, IMAGE_SIDE / Math.max(img.width, img.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(img.width * scale));
    canvas.height = Math.max(1, Math.round(img.height * scale));
    canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
    state.image = canvas.toDataURL("image/png");
    $("attachment-img").src = state.image;
    $("attachment").hidden = false;
    hideError();
  };
  img.onerror = () => {
    URL.revokeObjectURL(url);
    showError(`${file.name}: the browser cannot read it as an image`);
  };
  img.src = url;
  $("image-input").value = "";
}

function clearImage() {
  state.image = null;
  $("attachment").hidden = true;
  $("attachment-img").removeAttribute("src");
}

function regenerate() {
  if (state.streaming) return;
  const last = state.messages[state.messages.length - 1];
  if (last && last.role === "assistant") removeMessage(last);
  if (!state.messages.some((m) => m.role === "user")) return;
  generate();
}

function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

function newChat() {
  stop();
  for (const msg of [...state.messages]) removeMessage(msg);
  clearImage();
  hideError();
  setBusy(false);
  $("input").focus();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || state.messages.length === 0;
  document.body.classList.toggle("busy", busy);
}

// ----------------------------------------------------------------------------- the token view
function renderTokens(container, tokens) {
  container.replaceChildren(
    ...tokens.map((t, i) => {
      const span = el("span", `token c${i % N_COLOURS}`, t.text);
      if (t.text.includes("\n")) span.classList.add("nl");
      span.dataset.id = t.id;
      span.title = `token ${i} · id ${t.id} · ${JSON.stringify(t.text)}`;
      return span;
    }),
  );
}

let tokenizeSeq = 0;
let tokenizeTimer = null;
let tokensEdited = false; // until the user types there, the view follows the last message

async function tokenizeView() {
  const seq = ++tokenizeSeq;
  const text = $("tokens-input").value;
  const count = $("tokens-count");
  if (!$("model").value) return;
  try {
    const result = await api("/api/tokenize", { model: $("model").value, text });
    if (seq !== tokenizeSeq) return; // a newer request is on its way
    renderTokens($("tokens-output"), result.tokens);
    count.dataset.count = result.count;
    count.textContent = `${result.count} token${result.count === 1 ? "" : "s"} · ${[...text].length} characters`;
  } catch (e) {
    if (seq === tokenizeSeq) showError(`Tokenize: ${e.message}`);
  }
}

function scheduleTokenize() {
  clearTimeout(tokenizeTimer);
  tokenizeTimer = setTimeout(tokenizeView, 150);
}

function useLastMessage() {
  const last = state.messages[state.messages.length - 1];
  $("tokens-input").value = last ? last.content : $("input").value;
  tokensEdited = false;
  scheduleTokenize();
}

function showTab(name) {
  const tokens = name === "tokens";
  for (const tab of ["chat", "tokens", "battle", "inside"]) {
    $(`${tab}-view`).hidden = tab !== name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
  }
  document.body.dataset.tab = name;
  if (tokens) {
    if (!tokensEdited) useLastMessage();
    $("tokens-input").focus();
  }
  if (name === "battle") {
    loadBoard();
    $("battle-input").focus();
  }
  if (name === "inside") {
    if (!$("inside-input").value) $("inside-input").value = $("tokens-input").value || $("input").value;
    $("inside-input").focus();
  }
}

// ----------------------------------------------------------------------------- battle mode (the arena)
// Two anonymous models answer one prompt side by side: POST /api/arena/battles streams both answers
// as one SSE stream ({"battle": id} first, then {"side": "a" | "b", "delta", "finish_reason"}). The
// vote (POST /api/arena/battles/{id}/vote) reveals the names and goes into the server's battle log;
// there is one vote per battle, and only once both answers are complete.
const battle = { id: null, controller: null, sides: null, voted: false };
const VOTE_WORDS = { a: "A is better", b: "B is better", tie: "a tie", both_bad: "both are bad" };

function battleSide(side) {
  const box = $(`battle-${side}`);
  const body = box.querySelector(".body");
  body.replaceChildren();
  box.classList.remove("winner", "streaming");
  delete box.dataset.finish;
  $(`battle-name-${side}`).textContent = "";
  return { content: "", body, calls: [], el: box }; // the shape applyDelta writes into
}

function setBattleBusy(busy) {
  $("battle-send").disabled = busy;
  $("battle-stop").disabled = !busy;
}

async function startBattle() {
  const prompt = $("battle-input").value;
  if (!prompt.trim() || battle.controller) return;
  hideError();
  battle.id = null;
  battle.voted = false;
  battle.sides = { a: battleSide("a"), b: battleSide("b") };
  $("battle-answers").hidden = false;
  $("battle-votes").hidden = true;
  $("battle-result").textContent = "";
  const { model: _model, messages, stream: _stream, ...settings } = requestBody(); // temperature, max_tokens
  const body = { prompt, ...settings };
  if (messages[0] && messages[0].role === "system") body.system = messages[0].content;
  const controller = new AbortController();
  battle.controller = controller;
  setBattleBusy(true);
  for (const side of Object.values(battle.sides)) side.el.classList.add("streaming");
  const finished = { a: false, b: false };
  let error = null;
  try {
    error = await postStream("/api/arena/battles", body, controller.signal, (event) => {
      if (event.battle) battle.id = event.battle;
      const side = battle.sides[event.side];
      if (!side) return;
      applyDelta(side, event.delta || {});
      if (event.finish_reason) {
        finished[event.side] = true;
        side.el.dataset.finish = event.finish_reason;
        side.el.classList.remove("streaming");
      }
    });
  } catch (e) {
    if (!controller.signal.aborted) error = e.message || String(e);
  } finally {
    battle.controller = null;
    setBattleBusy(false);
    for (const side of Object.values(battle.sides)) side.el.classList.remove("streaming");
    if (error) showError(error);
    const complete = battle.id && finished.a && finished.b && !error;
    $("battle-votes").hidden = !complete;
    if (!complete) $("battle-result").textContent = "No vote for an unfinished battle: start a new one.";
  }
}

function stopBattle() {
  if (battle.controller) battle.controller.abort();
}

async function vote(winner) {
  if (!battle.id || battle.voted) return;
  battle.voted = true; // one vote, even on a double click
  try {
    const result = await api(`/api/arena/battles/${encodeURIComponent(battle.id)}/vote`, { winner });
    $("battle-votes").hidden = true;
    $("battle-name-a").textContent = result.model_a;
    $("battle-name-b").textContent = result.model_b;
    if (winner === "a" || winner === "b") $(`battle-${winner}`).classList.add("winner");
    $("battle-result").textContent =
      `You voted ${VOTE_WORDS[winner]}. A was ${result.model_a}, B was ${result.model_b}.`;
    loadBoard();
  } catch (e) {
    battle.voted = false;
    showError(`Vote: ${e.message}`);
  }
}

// The leaderboard with one tied game added per pair (prior=1), so a handful of votes already rate.
async function loadBoard() {
  let board;
  try {
    board = await api("/api/arena/leaderboard?prior=1");
  } catch (e) {
    $("battle-board-note").textContent = `Leaderboard: ${e.message}`;
    return;
  }
  const head = el("tr");
  for (const h of ["#", "Model", "Rating", "95% CI", "Battles", "W / T / L"]) head.append(el("th", null, h));
  const rows = (board.rows || []).map((r) => {
    const tr = el("tr");
    tr.dataset.model = r.model;
    const ci = `${Math.round(r.lo)} – ${Math.round(r.hi)}`;
    const cells = [r.rank, r.model, Math.round(r.rating), ci, r.battles, `${r.wins} / ${r.ties} / ${r.losses}`];
    for (const c of cells) tr.append(el("td", null, String(c)));
    return tr;
  });
  $("battle-board").replaceChildren(...(rows.length ? [head, ...rows] : []));
  $("battle-board-note").textContent = rows.length
    ? `Bradley-Terry, ${board.anchor} at ${board.base}, one tied game added per pair; judges: ${board.judges.join(", ")}.`
    : board.message || "";
}

// ----------------------------------------------------------------------------- the Inside tab
// POST /api/inspect (shapes: llmstack/inference/inspect.py): per token the next-token distribution (its
// surprise colours the text), attention maps, the logit lens, and, for a model served from a run
// directory, the actual next tokens' probabilities at each checkpoint. The first request asks for the
// attention of the layer shown only (all layers are layers x heads x tokens² numbers); a second one, in
// the background, brings every layer's maps where they are few enough and the run's checkpoints where
// the first answer says there are any. Larger maps come one layer at a time, as the layer is picked.
const inside = { result: null, layer: 0, head: 0, seq: 0 };
const ALL_LAYERS_MAX = 1500000; // attention weights fetched at once (about 10 MB of JSON)
const SURPRISE_MAX = 12; // bits (p = 1/4096) at which a token is fully red
const ACCENT = [47, 111, 222]; // --accent, for shades drawn on a canvas or set per cell

function shade(p) {
  return `rgba(${ACCENT.join(", ")}, ${Math.max(0, Math.min(1, p)).toFixed(3)})`;
}

function surpriseColour(bits) {
  const x = Math.min(1, bits / SURPRISE_MAX);
  return `hsl(${Math.round(130 * (1 - x))}, 70%, ${Math.round(88 - 16 * x)}%)`;
}

function fmtP(p) {
  if (p === 0) return "0"; // below what the server rounds to (4 significant digits of a float32)
  return p >= 0.01 ? p.toFixed(2) : p.toExponential(0);
}

// A token as one short line: whitespace made visible, long ones cut (canvas and table labels).
function shortToken(text, max = 10) {
  const shown = text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "·");
  return shown.length > max ? `${shown.slice(0, max - 1)}…` : shown;
}

function tokenOf(result, id) {
  const text = result.texts[String(id)];
  return text === undefined ? `#${id}` : text;
}

async function inspectText() {
  const text = $("inside-input").value;
  const model = $("model").value;
  if (!text.trim() || !model) return;
  hideError();
  const seq = ++inside.seq;
  const sameModel = inside.result && inside.result.model === model;
  const layer = sameModel ? inside.layer : 0;
  const topK = Math.max(1, Math.min(20, Number($("inside-topk").value) || 5));
  $("inside-send").disabled = true;
  try {
    const result = await api("/api/inspect", { model, text, top_k: topK, layers: [layer] });
    if (seq !== inside.seq) return; // a newer request is on its way
    inside.result = result;
    inside.layer = layer;
    inside.head = sameModel ? Math.min(inside.head, result.heads - 1) : 0;
    renderInside();
    const n = result.tokens.length;
    const allLayers = result.layers > 1 && (result.layers * result.heads * n * (n + 1)) / 2 <= ALL_LAYERS_MAX;
    if (allLayers || result.run_checkpoints > 0) followUp(seq, model, text, allLayers, result.run_checkpoints > 0);
  } catch (e) {
    if (seq === inside.seq) showError(`Inspect: ${e.message}`);
  } finally {
    if (seq === inside.seq) $("inside-send").disabled = false;
  }
}

// Every layer's attention maps and/or the run's checkpoints, after the first answer is shown.
async function followUp(seq, model, text, allLayers, checkpoints) {
  if (checkpoints) $("inside-ckpt-note").textContent = "loading the run's checkpoints…";
  try {
    const more = await api("/api/inspect", { model, text, top_k: 1, layers: allLayers ? null : [], checkpoints });
    if (seq !== inside.seq) return;
    if (allLayers) {
      inside.result.attention = more.attention;
      drawHeatmap();
    }
    if (checkpoints) renderCheckpoints(more.checkpoints);
  } catch (e) {
    if (seq === inside.seq) $("inside-ckpt-note").textContent = `Checkpoints: ${e.message}`;
  }
}

// Another layer's maps: drawn from those at hand, else asked for on their own (the rest of the result stays).
async function loadLayer(layer) {
  const r = inside.result;
  if (!r) return;
  inside.layer = layer;
  if (r.attention.layers.includes(layer)) {
    drawHeatmap();
    return;
  }
  const seq = inside.seq;
  try {
    const text = $("inside-input").value;
    const fresh = await api("/api/inspect", { model: r.model, text, top_k: 1, layers: [layer] });
    if (seq !== inside.seq || inside.layer !== layer) return;
    r.attention = fresh.attention;
    drawHeatmap();
  } catch (e) {
    showError(`Inspect: ${e.message}`);
  }
}

function renderInside() {
  const r = inside.result;
  $("inside-out").hidden = false;
  $("inside-ckpt-box").hidden = r.run_checkpoints === 0;
  $("inside-ckpts").replaceChildren();
  renderSurprise(r);
  showDistribution(r.tokens.length - 1);
  const layers = [...Array(r.layers).keys()].map((l) => new Option(l === r.layers - 1 ? `${l} (last)` : String(l), l));
  $("inside-layer").replaceChildren(...layers);
  $("inside-layer").value = String(inside.layer);
  const kv = r.attention.kv_head;
  const grouped = kv.some((k, h) => k !== h); // GQA: name the key/value head each query head reads
  const heads = kv.map((k, h) => new Option(grouped ? `${h} (kv ${k})` : String(h), h));
  $("inside-head").replaceChildren(...heads);
  $("inside-head").value = String(inside.head);
  drawHeatmap();
  renderLens(r);
}

function renderSurprise(r) {
  const spans = r.tokens.map((t, i) => {
    const span = el("span", "token", t.text);
    if (t.text.includes("\n")) span.classList.add("nl");
    span.dataset.index = i;
    const bits = i > 0 ? r.next.surprise[i - 1] : null;
    if (bits === null) {
      span.classList.add("unscored");
      span.title = `token ${i} · id ${t.id} · the first token: nothing predicted it`;
    } else {
      span.dataset.surprise = bits;
      span.style.backgroundColor = surpriseColour(bits);
      span.title = `token ${i} · id ${t.id} · surprise ${bits.toFixed(2)} bits (p ${fmtP(2 ** -bits)})`;
    }
    return span;
  });
  $("inside-tokens").replaceChildren(...spans);
}

// What the model expected after token i: its top-k, the entropy, and how the actual next token fared.
function showDistribution(i) {
  const r = inside.result;
  for (const s of $("inside-tokens").querySelectorAll(".token.selected")) s.classList.remove("selected");
  const span = $("inside-tokens").children[i];
  if (span) span.classList.add("selected");
  const head = el("p", "detail-head");
  head.append(
    "After ",
    el("code", null, JSON.stringify(r.tokens[i].text)),
    ` (token ${i}): entropy ${r.next.entropy[i].toFixed(2)} bits`,
  );
  const bits = r.next.surprise[i];
  if (bits !== null) {
    head.append("; the actual next token ", el("code", null, JSON.stringify(r.tokens[i + 1].text)));
    head.append(` had p ${fmtP(2 ** -bits)} (${bits.toFixed(2)} bits)`);
  }
  const table = el("table", "topk");
  const nextId = i + 1 < r.tokens.length ? r.tokens[i + 1].id : null;
  for (const [id, p] of r.next.top[i]) {
    const tr = el("tr");
    if (id === nextId) tr.classList.add("actual");
    const bar = el("span", "bar");
    bar.style.width = `${Math.round(p * 100)}%`;
    const barCell = el("td", "bar-cell");
    barCell.append(bar);
    tr.append(el("td", "tok", JSON.stringify(tokenOf(r, id))), el("td", "num", fmtP(p)), barCell);
    table.append(tr);
  }
  $("inside-detail").replaceChildren(head, table);
}

// The attention of one layer and head as a heatmap: rows are queries, columns keys (the future greyed).
function drawHeatmap() {
  const r = inside.result;
  const canvas = $("inside-heatmap");
  const at = r.attention.layers.indexOf(inside.layer);
  if (at < 0) return; // its maps are on their way (loadLayer)
  const rows = r.attention.maps[at][inside.head];
  const n = rows.length;
  const cell = Math.max(3, Math.min(26, Math.floor(520 / n)));
  const margin = cell >= 10 ? 80 : 0; // token labels only where they fit
  const size = margin + n * cell;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = size * dpr;
  canvas.height = size * dpr;
  canvas.style.width = `${size}px`;
  canvas.style.height = `${size}px`;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, size, size);
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      ctx.fillStyle = k > q ? "#eef0f4" : shade(Math.sqrt(rows[q][k]));
      ctx.fillRect(margin + k * cell, margin + q * cell, cell - (cell > 6 ? 1 : 0), cell - (cell > 6 ? 1 : 0));
    }
  }
  if (margin) {
    ctx.fillStyle = "#1d2330";
    ctx.font = `${Math.min(12, cell - 1)}px ui-monospace, monospace`;
    ctx.textBaseline = "middle";
    r.tokens.forEach((t, i) => {
      ctx.textAlign = "right";
      ctx.fillText(shortToken(t.text), margin - 4, margin + i * cell + cell / 2);
      ctx.save();
      ctx.translate(margin + i * cell + cell / 2, margin - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(shortToken(t.text), 0, 0);
      ctx.restore();
    });
  }
  Object.assign(canvas.dataset, { layer: inside.layer, head: inside.head, n, cell, margin });
  canvas.dataset.held = r.attention.layers.length; // layers whose maps are at hand
}

function heatmapCell(event) {
  const canvas = $("inside-heatmap");
  const r = inside.result;
  const { cell, margin, n } = canvas.dataset;
  if (!r || !cell) return;
  const box = canvas.getBoundingClientRect();
  const k = Math.floor((event.clientX - box.left - Number(margin)) / Number(cell));
  const q = Math.floor((event.clientY - box.top - Number(margin)) / Number(cell));
  const at = r.attention.layers.indexOf(inside.layer);
  if (at < 0 || q < 0 || k < 0 || q >= Number(n) || k >= Number(n)) {
    $("inside-cell").textContent = "";
    return;
  }
  const w = k <= q ? r.attention.maps[at][inside.head][q][k] : null;
  const names = `${JSON.stringify(r.tokens[q].text)} (${q}) → ${JSON.stringify(r.tokens[k].text)} (${k})`;
  $("inside-cell").textContent = w === null ? `${names}: the future, masked` : `${names}: ${w.toFixed(4)}`;
}

// Layers x positions: the top-1 token of each layer's read-out, shaded by its probability.
function renderLens(r) {
  const head = el("tr");
  head.append(el("th", null, "layer"));
  for (const t of r.tokens) head.append(el("th", "tok", shortToken(t.text, 8)));
  const rows = r.lens.top.map((layer, l) => {
    const tr = el("tr");
    tr.append(el("th", null, l === r.layers - 1 ? `${l} (out)` : String(l)));
    layer.forEach(([[id, p], ...rest], t) => {
      const td = shadedCell("tok", shortToken(tokenOf(r, id), 8), p);
      if (t + 1 < r.tokens.length && id === r.tokens[t + 1].id) td.classList.add("hit");
      const others = rest.map(([i, q]) => `${JSON.stringify(tokenOf(r, i))} ${fmtP(q)}`).join(", ");
      const actual = t < r.lens.p_next[l].length ? `; actual next token p ${fmtP(r.lens.p_next[l][t])}` : "";
      const top = `${JSON.stringify(tokenOf(r, id))} ${fmtP(p)}${others ? `, ${others}` : ""}`;
      td.title = `layer ${l}, after token ${t}: ${top}${actual}`;
      tr.append(td);
    });
    return tr;
  });
  fillTable("inside-lens", head, rows);
}

// A table cell shaded by a probability (dark text on the darker shades).
function shadedCell(cls, text, p) {
  const td = el("td", cls, text);
  td.style.backgroundColor = shade(p);
  if (p > 0.55) td.classList.add("dark");
  return td;
}

function fillTable(id, head, rows) {
  const thead = el("thead");
  thead.append(head);
  const tbody = el("tbody");
  tbody.append(...rows);
  $(id).replaceChildren(thead, tbody);
}

// Checkpoints x the tokens being predicted: p of the actual token at each step.
function renderCheckpoints(c) {
  const r = inside.result;
  const head = el("tr");
  head.append(el("th", null, "step"), el("th", null, "bits/token"));
  for (const t of r.tokens.slice(1)) head.append(el("th", "tok", shortToken(t.text, 8)));
  const rows = c.steps.map((step, j) => {
    const tr = el("tr");
    tr.dataset.step = step;
    const bits = c.mean_surprise[j];
    tr.append(el("th", null, String(step)), el("td", "num", bits === null ? "–" : bits.toFixed(2)));
    c.p_next[j].forEach((p, t) => {
      const td = shadedCell("num", fmtP(p), p);
      td.title = `step ${step}: p(${JSON.stringify(r.tokens[t + 1].text)} | the text up to token ${t}) = ${p}`;
      tr.append(td);
    });
    return tr;
  });
  fillTable("inside-ckpts", head, rows);
  const shown = `${c.steps.length} checkpoint${c.steps.length === 1 ? "" : "s"}`;
  $("inside-ckpt-note").textContent = c.skipped.length ? `${shown}; skipped: ${c.skipped.join("; ")}` : shown;
}

// ----------------------------------------------------------------------------- wiring
// A form that runs `action` when submitted or on Enter in its textarea (Shift+Enter: a new line).
function sendsOnEnter(form, input, action) {
  $(form).addEventListener("submit", (e) => {
    e.preventDefault();
    action();
  });
  $(input).addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      action();
    }
  });
}

function init() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    hideError();
    loadModels();
  });
  $("model").addEventListener("change", () => {
    localStorage.setItem(MODEL_STORE, $("model").value);
    showModelInfo();
    if (!$("tokens-view").hidden) scheduleTokenize();
    if (!$("inside-view").hidden && inside.result) inspectText();
  });
  sendsOnEnter("composer", "input", send);
  $("image-input").addEventListener("change", () => attachImage($("image-input").files[0]));
  $("attachment-remove").addEventListener("click", clearImage);
  $("stop").addEventListener("click", stop);
  $("regenerate").addEventListener("click", regenerate);
  $("new-chat").addEventListener("click", newChat);
  $("error-close").addEventListener("click", hideError);
  $("tab-chat").addEventListener("click", () => showTab("chat"));
  $("tab-tokens").addEventListener("click", () => showTab("tokens"));
  $("tokens-input").addEventListener("input", () => {
    tokensEdited = true;
    scheduleTokenize();
  });
  $("tokens-last").addEventListener("click", useLastMessage);
  $("tab-battle").addEventListener("click", () => showTab("battle"));
  sendsOnEnter("battle-form", "battle-input", startBattle);
  $("battle-stop").addEventListener("click", stopBattle);
  for (const button of document.querySelectorAll("#battle-votes button")) {
    button.addEventListener("click", () => vote(button.dataset.vote));
  }
  $("tab-inside").addEventListener("click", () => showTab("inside"));
  sendsOnEnter("inside-form", "inside-input", inspectText);
  $("inside-layer").addEventListener("change", () => loadLayer(Number($("inside-layer").value)));
  $("inside-head").addEventListener("change", () => {
    inside.head = Number($("inside-head").value);
    drawHeatmap();
  });
  $("inside-heatmap").addEventListener("mousemove", heatmapCell);
  for (const kind of ["mouseover", "click"]) {
    $("inside-tokens").addEventListener(kind, (e) => {
      const span = e.target.closest(".token");
      if (span) showDistribution(Number(span.dataset.index));
    });
  }
  $("tokens-ids").addEventListener("change", () => {
    for (const view of document.querySelectorAll(".token-view")) {
      view.classList.toggle("with-ids", $("tokens-ids").checked);
    }
  });
  setBusy(false);
  loadModels();
}

init();
