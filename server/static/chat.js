// The chat page: talks to /v1 like any OpenAI client, streams with fetch + ReadableStream (SSE).
// Model output is only ever put in the page as text (textContent), never as HTML.
// Storage: the API key and the conversation live in sessionStorage: they survive a reload of
// this tab, stay out of other tabs, and are gone when the tab closes (nothing left behind on a
// shared laptop). The settings (system prompt, temperature, max tokens) hold no secret: localStorage.
"use strict";

const KEY = "llamabox.key", CHAT = "llamabox.chat", SETTINGS = "llamabox.settings";
const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), log: $("log"), status: $("status"), ask: $("ask"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), newChat: $("new-chat"), settingsToggle: $("settings-toggle"),
  settings: $("settings"), system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"),
  keyForm: $("key-form"), key: $("key"), keyMessage: $("key-message"),
};

// --- state ----------------------------------------------------------------------------------

function loadJSON(store, name, fallback) {
  try { return JSON.parse(store.getItem(name)) || fallback; } catch { return fallback; }
}
// chat: {model, messages: [{role: "user"|"assistant", content, meta?, error?}]}
let chat = loadJSON(sessionStorage, CHAT, { model: "", messages: [] });
if (!Array.isArray(chat.messages)) chat = { model: "", messages: [] };
const saveChat = () => sessionStorage.setItem(CHAT, JSON.stringify(chat));
let controller = null;  // the AbortController of the answer being streamed

const saved = loadJSON(localStorage, SETTINGS, {});
if (typeof saved.system === "string") ui.system.value = saved.system;
if (saved.temperature !== undefined) ui.temperature.value = saved.temperature;
if (saved.maxTokens !== undefined) ui.maxTokens.value = saved.maxTokens;
for (const el of [ui.system, ui.temperature, ui.maxTokens]) {
  el.addEventListener("change", () => localStorage.setItem(SETTINGS, JSON.stringify(
    { system: ui.system.value, temperature: ui.temperature.value, maxTokens: ui.maxTokens.value })));
}

// --- rendering (text only) ------------------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function copyText(text, button) {
  const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1200); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text) && done());
  } else if (fallbackCopy(text)) done();
}
function fallbackCopy(text) {
  const t = el("textarea");
  t.value = text;
  document.body.append(t);
  t.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch { /* not allowed */ }
  t.remove();
  return ok;
}

// One message's element: {node, text, meta}; the copy button copies what the text shows now.
function messageView(m) {
  const node = el("div", "msg " + m.role);
  const text = el("div", "text", m.content);
  const meta = el("div", "meta" + (m.error ? " error" : ""), m.meta || "");
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.title = "Copy this message";
  copy.addEventListener("click", () => copyText(text.textContent, copy));
  const foot = el("div", "foot");
  foot.append(meta, copy);
  node.append(text, foot);
  ui.log.append(node);
  return { node, text, meta };
}

function render() {
  ui.log.replaceChildren();
  if (!chat.messages.length) ui.log.append(el("p", "empty", "Start a conversation below."));
  for (const m of chat.messages) messageView(m);
  ui.log.scrollTop = ui.log.scrollHeight;
}

function showStatus(text) {
  ui.status.textContent = text || "";
  ui.status.hidden = !text;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.prompt.disabled = false;
}

// --- the API --------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

class HttpError extends Error {
  constructor(status, message, retryAfter) { super(message); this.status = status; this.retryAfter = retryAfter; }
}

async function httpError(r) {
  let message = r.statusText || "error";
  try { message = (await r.json()).error.message || message; } catch { /* not our JSON */ }
  return new HttpError(r.status, message, r.headers.get("Retry-After"));
}

// A readable line for anything that went wrong.
function describe(e) {
  if (e instanceof HttpError) {
    const retry = e.retryAfter ? ` Try again in ${e.retryAfter} s.` : "";
    if (e.status === 503) return `The server is busy or the model is still loading (503): ${e.message}.${retry}`;
    if (e.status === 504) return `Timed out (504): ${e.message}.`;
    if (e.status === 401) return "The API key was not accepted (401).";
    return `Error ${e.status}: ${e.message}`;
  }
  if (e && e.streamError) return `The answer was cut off by the server: ${e.message}`;
  return "Lost the connection to the server. Is it still running? Try again.";
}

function askForKey(rejected) {
  sessionStorage.removeItem(KEY);
  ui.keyMessage.textContent = rejected
    ? "That API key was not accepted (401 Unauthorized). Enter the key again."
    : "This server needs an API key.";
  ui.keyMessage.classList.toggle("bad", !!rejected);
  ui.keyForm.hidden = false;
  ui.key.value = "";
  ui.key.focus();
}

async function loadModels() {
  let r;
  try {
    r = await fetch("/v1/models", { headers: headers() });
  } catch {
    showStatus("Cannot reach the server. Is it running? Reload the page to try again.");
    return;
  }
  if (r.status === 401) { askForKey(!!sessionStorage.getItem(KEY)); return; }
  if (!r.ok) { showStatus("Could not list the models: " + describe(await httpError(r))); return; }
  ui.keyForm.hidden = true;
  showStatus("");
  const models = (await r.json()).data;
  ui.model.replaceChildren(...models.map((m) => {
    const o = el("option", "", m.state && m.state !== "loaded" ? `${m.id} (${m.state})` : m.id);
    o.value = m.id;
    return o;
  }));
  if (models.some((m) => m.id === chat.model)) ui.model.value = chat.model;
  chat.model = ui.model.value;
}

// The messages to send: the system prompt, then each finished exchange, then the new question.
// A question that got no answer (an error, a stop before the first word) is left out, so the
// roles still alternate user/assistant as chat templates want.
function conversation() {
  const out = ui.system.value.trim() ? [{ role: "system", content: ui.system.value.trim() }] : [];
  const ms = chat.messages;
  for (let i = 0; i < ms.length; i++) {
    const m = ms[i];
    if (m.role !== "user") continue;
    const next = ms[i + 1];
    if (i === ms.length - 1) out.push({ role: "user", content: m.content });
    else if (next && next.role === "assistant" && next.content) {
      out.push({ role: "user", content: m.content }, { role: "assistant", content: next.content });
    }
  }
  return out;
}

// Parse SSE events from the response body; calls onEvent(event, data) for each.
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length && onEvent(event, data.join("\n")) === false) return;
    }
  }
}

async function send(question) {
  chat.model = ui.model.value;
  chat.messages.push({ role: "user", content: question });
  const messages = conversation();
  const answer = { role: "assistant", content: "" };
  chat.messages.push(answer);
  saveChat();
  render();
  const last = ui.log.lastChild;  // the answer's element, empty for now
  const view = { node: last, text: last.querySelector(".text"), meta: last.querySelector(".meta") };
  view.node.classList.add("streaming");
  showStatus("");
  setBusy(true);
  controller = new AbortController();
  const body = {
    model: chat.model, messages, stream: true,
    stream_options: { include_usage: true },
  };
  const t = parseFloat(ui.temperature.value), n = parseInt(ui.maxTokens.value, 10);
  if (Number.isFinite(t)) body.temperature = t;
  if (Number.isFinite(n) && n > 0) body.max_tokens = n;
  const started = performance.now();
  let usage = null, ended = null, failure = null, stopped = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) throw await httpError(r);
    await readEvents(r.body, (event, data) => {
      if (event === "error") {
        let message = data;
        try { message = JSON.parse(data).error.message; } catch { /* raw text */ }
        throw Object.assign(new Error(message), { streamError: true });
      }
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.index === 0 && c.delta && c.delta.content) {
          answer.content += c.delta.content;
          view.text.textContent = answer.content;  // text, never HTML
          ui.log.scrollTop = ui.log.scrollHeight;
        }
      }
      ended = performance.now();
      return true;
    });
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else failure = e;
  }
  controller = null;
  view.node.classList.remove("streaming");
  if (failure instanceof HttpError && failure.status === 401) {
    // Put the question back, ask for the key again.
    chat.messages.splice(-2, 2);
    saveChat();
    render();
    ui.prompt.value = question;
    askForKey(true);
  } else {
    if (failure) {
      answer.error = true;
      answer.meta = describe(failure);
    } else if (stopped) {
      answer.meta = "Stopped.";
    } else if (usage) {
      const seconds = Math.max((ended || performance.now()) - started, 1) / 1000;
      answer.meta = `${usage.completion_tokens} tokens · ${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`;
    }
    view.meta.textContent = answer.meta || "";
    view.meta.classList.toggle("error", !!answer.error);
    saveChat();
  }
  setBusy(false);
  ui.prompt.focus();
}

// --- wiring ---------------------------------------------------------------------------------

ui.ask.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = ui.prompt.value.trim();
  if (!q || controller) return;
  if (!ui.keyForm.hidden) { ui.key.focus(); return; }
  ui.prompt.value = "";
  send(q);
});
ui.prompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); ui.ask.requestSubmit(); }
});
ui.stop.addEventListener("click", () => { if (controller) controller.abort(); });
ui.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  chat = { model: ui.model.value, messages: [] };
  saveChat();
  showStatus("");
  render();
  ui.prompt.focus();
});
ui.model.addEventListener("change", () => { chat.model = ui.model.value; saveChat(); });
ui.settingsToggle.addEventListener("click", () => {
  ui.settings.hidden = !ui.settings.hidden;
  ui.settingsToggle.setAttribute("aria-expanded", String(!ui.settings.hidden));
});
ui.keyForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = ui.key.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  ui.keyMessage.textContent = "Checking the key…";
  ui.keyMessage.classList.remove("bad");
  loadModels();
});

render();
loadModels();
