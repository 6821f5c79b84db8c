// The chat page: sign in, pick a model, keep conversations, stream replies, rate them, answer
// from a collection of documents (rag.js).
import { $, ApiError, api, copyText, describe, el, errorFrom, formatNumber, renderNav, session, showError, signIn } from "./common.js";
import { renderMarkdown } from "./markdown.js";
import { ragRequest, sourcesView, startDocuments } from "./rag.js";
import { clearConversation, requestModel, showAdapters, showConversation, splitModels, startLora } from "./lora.js";

const SETTINGS_KEY = "semilla.chat.settings";
const MODEL_KEY = "semilla.chat.model";
const NUMERIC = ["temperature", "top_p", "top_k", "max_tokens", "seed"];

const state = {
  who: null,
  conversationId: null,
  messages: [], // {role, content, completionId, stopped, node}
  controller: null,
  stats: { messages: 0, tokens: 0, replySeconds: 0, replies: 0, lastRate: null },
};

const ui = {};

// --- start ---------------------------------------------------------------------------------

async function start() {
  for (const id of ["auth", "app", "banner", "messages", "empty", "input", "send", "stop", "composer", "model", "nav",
    "conversations", "new-chat", "settings", "toggle-settings", "toggle-sidebar", "sidebar", "system", "reset-settings"]) {
    ui[id] = document.getElementById(id);
  }
  wireEvents();
  loadSettings();
  try {
    state.who = await session();
    if (!state.who.user && (!state.who.open || new URLSearchParams(location.search).has("signin"))) {
      await signIn(ui.auth, state.who.open ? "This server is in open mode: you may also chat without an account." : "");
      state.who = await session();
    }
  } catch (err) {
    ui.app.hidden = false;
    showError(ui.banner, err, () => location.reload());
    return;
  }
  renderNav(ui.nav, state.who, "/");
  if (!state.who.user) ui.nav.append(el("a", { href: "/?signin", id: "signin-link" }, "Sign in"));
  ui.app.hidden = false;
  await Promise.all([loadModels(), loadConversations(), startDocuments(handleError),
    startLora(() => state.conversationId, loadModels, handleError)]);
  const wanted = new URLSearchParams(location.hash.slice(1)).get("c");
  if (wanted) await openConversation(wanted);
  ui.input.focus();
}

function wireEvents() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
  ui["new-chat"].addEventListener("click", () => newChat());
  ui.model.addEventListener("change", () => localStorage.setItem(MODEL_KEY, ui.model.value));
  ui["toggle-settings"].addEventListener("click", () => toggle(ui.settings, ui["toggle-settings"]));
  ui["toggle-sidebar"].addEventListener("click", () => toggle(ui.sidebar, ui["toggle-sidebar"], "open"));
  ui["reset-settings"].addEventListener("click", () => {
    localStorage.removeItem(SETTINGS_KEY);
    location.reload();
  });
  for (const id of ["system", ...NUMERIC]) document.getElementById(id).addEventListener("change", saveSettings);
}

function toggle(panel, button, className) {
  const open = className ? !panel.classList.contains(className) : panel.hidden;
  if (className) panel.classList.toggle(className, open);
  else panel.hidden = !open;
  button.setAttribute("aria-expanded", String(open));
}

// --- settings ------------------------------------------------------------------------------

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  } catch {
    saved = {};
  }
  for (const id of ["system", ...NUMERIC]) {
    if (typeof saved[id] === "string") document.getElementById(id).value = saved[id];
  }
}

function saveSettings() {
  const saved = {};
  for (const id of ["system", ...NUMERIC]) saved[id] = document.getElementById(id).value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(saved));
}

/** The sampling fields of a request; blank fields are left to the server's defaults. */
function sampling() {
  const out = {};
  for (const id of NUMERIC) {
    const raw = document.getElementById(id).value.trim();
    if (raw !== "" && !Number.isNaN(Number(raw))) out[id] = Number(raw);
  }
  return out;
}

// --- models and conversations --------------------------------------------------------------

async function loadModels() {
  try {
    const models = splitModels((await api("/v1/models")).data);
    const wanted = ui.model.value || localStorage.getItem(MODEL_KEY);
    ui.model.replaceChildren(...models.map((m) => el("option", { value: m.id, selected: m.id === wanted },
      `${m.id} · ${formatNumber(m.parameters)} params`)));
    showAdapters();
    if (!models.length) showError(ui.banner, new ApiError(503, "no model is loaded"));
  } catch (err) {
    handleError(err, loadModels);
  }
}

async function loadConversations(force = false) {
  // a refresh in the background (a reply ended) must not undo a rename or a delete being
  // confirmed, whether it began before or while the list was fetched
  const editing = () => !force && ui.conversations.querySelector(".conv-rename, .conv-confirm");
  if (editing()) return;
  try {
    const list = (await api("/v1/conversations")).data;
    if (editing()) return;
    ui.conversations.replaceChildren(...list.map(conversationItem));
  } catch (err) {
    handleError(err, loadConversations);
  }
}

function conversationItem(c) {
  const title = c.title || "Untitled";
  const open = el("button", { type: "button", class: "conv-title", title, onclick: () => { openConversation(c.id); ui.sidebar.classList.remove("open"); } }, title);
  const item = el("li", { class: c.id === state.conversationId ? "conv current" : "conv", "data-id": c.id }, open);
  const rename = el("button", { type: "button", class: "icon ghost small", "aria-label": `Rename ${title}`, title: "Rename" }, "✎");
  const remove = el("button", { type: "button", class: "icon ghost small", "aria-label": `Delete ${title}`, title: "Delete" }, "✕");
  rename.addEventListener("click", () => {
    const input = el("input", { class: "conv-rename", value: title, maxlength: 200, "aria-label": "New title" });
    const save = async () => {
      try {
        await api(`/v1/conversations/${encodeURIComponent(c.id)}`, { method: "PATCH", json: { title: input.value.trim() } });
      } catch (err) {
        handleError(err);
      }
      loadConversations(true);
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") save();
      if (event.key === "Escape") loadConversations(true);
    });
    input.addEventListener("blur", save);
    item.replaceChildren(input);
    input.focus();
    input.select();
  });
  remove.addEventListener("click", () => {
    item.replaceChildren(
      el("span", { class: "muted small conv-confirm" }, "Delete this chat?"),
      el("button", { type: "button", class: "small danger", onclick: async () => {
        try {
          await api(`/v1/conversations/${encodeURIComponent(c.id)}`, { method: "DELETE" });
          if (c.id === state.conversationId) newChat();
        } catch (err) {
          handleError(err);
        }
        loadConversations(true);
      } }, "Delete"),
      el("button", { type: "button", class: "small ghost", onclick: () => loadConversations(true) }, "Keep"));
  });
  item.append(el("span", { class: "conv-actions" }, rename, remove));
  return item;
}

function markCurrent() {
  for (const li of ui.conversations.querySelectorAll("li.conv")) li.classList.toggle("current", li.dataset.id === state.conversationId);
  history.replaceState(null, "", state.conversationId ? `#c=${encodeURIComponent(state.conversationId)}` : location.pathname + location.search);
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.conversationId = null;
  state.messages = [];
  ui.messages.replaceChildren(ui.empty);
  clearConversation();
  markCurrent();
  ui.input.focus();
}

async function openConversation(id) {
  if (state.controller) state.controller.abort();
  try {
    const conv = await api(`/v1/conversations/${encodeURIComponent(id)}`);
    state.conversationId = conv.id;
    state.messages = [];
    ui.messages.replaceChildren();
    for (const m of conv.messages) {
      if (m.role === "system") continue;
      addMessage({ role: m.role, content: m.content, completionId: m.completion_id });
    }
    if (!state.messages.length) ui.messages.append(ui.empty);
    showConversation(conv);
    markCurrent();
    refreshActions();
    scrollToEnd(true);
  } catch (err) {
    handleError(err);
  }
}

// --- messages ------------------------------------------------------------------------------

function addMessage(message) {
  ui.empty.remove();
  const body = el("div", { class: "body" });
  const sources = el("div", { class: "sources-box" });
  const meta = el("div", { class: "meta muted small" });
  const actions = el("div", { class: "actions" });
  const node = el("article", { class: `msg ${message.role}`, "aria-label": message.role === "user" ? "You" : "Model" },
    el("div", { class: "who small muted" }, message.role === "user" ? "You" : "Model"), body, sources, meta, actions);
  message.node = node;
  state.messages.push(message);
  ui.messages.append(node);
  paint(message);
  return message;
}

function paint(message) {
  const body = message.node.querySelector(".body");
  if (message.role === "user") {
    body.replaceChildren(el("p", { class: "plain" }, message.content));
  } else {
    body.replaceChildren(renderMarkdown(message.content, { onCopy: copyText }));
    if (message.streaming) body.append(el("span", { class: "cursor", "aria-hidden": "true" }));
  }
}

/** Copy on every message; regenerate on the last reply; ratings on replies the server kept. */
function refreshActions() {
  const last = state.messages.at(-1);
  for (const message of state.messages) {
    const actions = message.node.querySelector(".actions");
    actions.replaceChildren();
    if (message.streaming) continue;
    const copy = el("button", { type: "button", class: "small ghost", "aria-label": "Copy message" }, "Copy");
    copy.addEventListener("click", () => copyText(message.content, copy));
    actions.append(copy);
    if (message.role !== "assistant") continue;
    if (message === last) actions.append(el("button", { type: "button", class: "small ghost regenerate", onclick: regenerate }, "Regenerate"));
    if (message.completionId) actions.append(...ratingButtons(message));
  }
}

function ratingButtons(message) {
  const up = el("button", { type: "button", class: "small ghost rate-up", "aria-label": "Good reply", "aria-pressed": String(message.rating === 1) }, "▲ good");
  const down = el("button", { type: "button", class: "small ghost rate-down", "aria-label": "Bad reply", "aria-pressed": String(message.rating === -1) }, "▼ bad");
  const choose = (rating) => {
    message.rating = rating;
    up.setAttribute("aria-pressed", String(rating === 1));
    down.setAttribute("aria-pressed", String(rating === -1));
    openFeedbackForm(message, rating);
  };
  up.addEventListener("click", () => choose(1));
  down.addEventListener("click", () => choose(-1));
  return [up, down];
}

function openFeedbackForm(message, rating) {
  message.node.querySelector(".feedback")?.remove();
  const text = el("textarea", { rows: 2, maxlength: 5000, placeholder: "What was good or wrong? (optional)", "aria-label": "Feedback comment" });
  const status = el("span", { class: "muted small", role: "status" });
  const form = el("form", { class: "feedback" }, text,
    el("div", { class: "row" }, el("button", { type: "submit", class: "small" }, rating > 0 ? "Send ▲ good" : "Send ▼ bad"),
      el("button", { type: "button", class: "small ghost", onclick: () => form.remove() }, "Cancel"), status));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("/feedback", { method: "POST", json: { completion_id: message.completionId, conversation_id: state.conversationId, rating, text: text.value } });
      form.replaceChildren(el("span", { class: "muted small thanks", role: "status" }, "Thanks, feedback saved."));
      setTimeout(() => form.remove(), 4000);
    } catch (err) {
      status.textContent = describe(err);
    }
  });
  message.node.append(form);
  text.focus();
}

function scrollToEnd(force = false) {
  const box = ui.messages;
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
}

// --- sending and streaming -----------------------------------------------------------------

async function send() {
  const text = ui.input.value;
  if (!text.trim() || state.controller) return;
  showError(ui.banner, null);
  if (!state.conversationId) {
    try {
      const conv = await api("/v1/conversations", { method: "POST", json: { title: text.trim().slice(0, 60) } });
      state.conversationId = conv.id;
      await loadConversations();
      markCurrent();
    } catch (err) {
      handleError(err, send);
      return;
    }
  }
  ui.input.value = "";
  addMessage({ role: "user", content: text });
  state.stats.messages += 1;
  updateMetrics();
  await generate();
}

async function regenerate() {
  if (state.controller) return;
  const last = state.messages.at(-1);
  if (last && last.role === "assistant") {
    state.messages.pop();
    last.node.remove();
  }
  await generate();
}

/** The messages to send: the system prompt and as much recent history as the model takes. */
function turnsToSend(skip) {
  const turns = state.messages.filter((m) => !m.streaming && !m.failed && m.content).map((m) => ({ role: m.role, content: m.content }));
  const kept = turns.slice(Math.min(skip, Math.max(turns.length - 1, 0)));
  const system = ui.system.value.trim();
  return system ? [{ role: "system", content: system }, ...kept] : kept;
}

async function generate(skip = 0) {
  const reply = addMessage({ role: "assistant", content: "", streaming: true });
  reply.node.classList.add("pending");
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let firstTokenAt = null;
  let tokens = 0;
  let usage = null;
  let failure = null;
  const rag = ragRequest();
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      signal: state.controller.signal,
      body: JSON.stringify({
        model: requestModel(),
        messages: turnsToSend(skip),
        stream: true,
        stream_options: { include_usage: true },
        conversation_id: state.conversationId,
        rag,
        ...sampling(),
      }),
    });
    if (!res.ok) throw await errorFrom(res);
    let painted = false;
    for await (const event of serverEvents(res.body)) {
      if (event.error) throw new ApiError(event.error.code === "rate_limit_exceeded" ? 429 : 500, event.error.message);
      if (event.id) reply.completionId = event.id;
      if (event.usage) usage = event.usage;
      if (event.sources && rag) reply.node.querySelector(".sources-box").replaceChildren(sourcesView(event.sources, rag.collection));
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        if (firstTokenAt === null) {
          firstTokenAt = performance.now();
          reply.node.classList.remove("pending");
        }
        tokens += 1;
        reply.content += delta.content;
        if (!painted) {
          painted = true;
          requestAnimationFrame(() => {
            painted = false;
            paint(reply);
            scrollToEnd();
          });
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") reply.stopped = true;
    else if (err instanceof TypeError) failure = new ApiError(0, "network error"); // fetch or the stream failed: no server
    else failure = err;
  } finally {
    state.controller = null;
    setBusy(false);
  }
  reply.streaming = false;
  reply.node.classList.remove("pending");
  if (failure && failure instanceof ApiError && failure.code === "context_length_exceeded"
      && turnsToSend(skip + 1).length < turnsToSend(skip).length) {
    reply.node.remove();
    state.messages.pop();
    return generate(skip + 1); // the history does not fit: drop the oldest turn and try again
  }
  if (failure) {
    reply.node.remove();
    state.messages.pop();
    handleError(failure, () => generate(skip));
    return;
  }
  const seconds = (performance.now() - started) / 1000;
  const count = usage ? usage.completion_tokens : tokens;
  if (reply.stopped) {
    reply.completionId = null; // the server keeps no record of a reply cut short
    reply.node.classList.add("stopped");
  }
  paint(reply);
  reply.node.querySelector(".meta").textContent = [
    `${count} tokens`, `${seconds.toFixed(1)} s`,
    firstTokenAt ? `${rate(count, (performance.now() - firstTokenAt) / 1000)} tok/s` : null,
    reply.stopped ? "stopped, not kept in the history" : null,
  ].filter(Boolean).join(" · ");
  Object.assign(state.stats, {
    messages: state.stats.messages + 1,
    tokens: state.stats.tokens + count,
    replySeconds: state.stats.replySeconds + seconds,
    replies: state.stats.replies + 1,
    lastRate: firstTokenAt ? rate(count, (performance.now() - firstTokenAt) / 1000) : null,
  });
  updateMetrics();
  refreshActions();
  scrollToEnd();
  if (!reply.stopped) loadConversations();
}

function rate(count, seconds) {
  return seconds > 0 ? (count / seconds).toFixed(1) : "–";
}

/** Parse a server-sent event stream into JSON objects, ending at [DONE]. */
async function* serverEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.messages.setAttribute("aria-busy", String(busy));
  if (busy) ui.stop.focus();
  else ui.input.focus();
  refreshActions();
}

function updateMetrics() {
  const s = state.stats;
  $("#m-messages").textContent = String(s.messages);
  $("#m-tokens").textContent = String(s.tokens);
  $("#m-avg").textContent = s.replies ? `${(s.replySeconds / s.replies).toFixed(2)} s` : "–";
  $("#m-rate").textContent = s.lastRate ? `${s.lastRate} tok/s` : "–";
}

/** 401: sign in again; everything else: a banner saying what happened, with Retry when it helps. */
function handleError(err, retry) {
  if (err instanceof ApiError && err.status === 401) {
    ui.app.hidden = true;
    signIn(ui.auth, "Your session has ended: please sign in again.").then(() => location.reload());
    return;
  }
  const retryable = err instanceof ApiError && [0, 429, 500, 502, 503, 504].includes(err.status);
  showError(ui.banner, err, retryable ? retry : null);
}

start();
