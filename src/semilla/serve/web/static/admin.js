// The admin dashboard: server time series, training runs (live), models, feedback, users, keys.
// Every panel reads the same HTTP API as any client; the data endpoints answer 403 to non-admins.
import { ApiError, api, el, formatNumber, formatTime, renderNav, session, showError, signIn } from "./common.js";
import { barChart, lineChart } from "./charts.js";

const REFRESH_MS = 30_000;
const LIVE_MS = 5_000;
const LIVE_WINDOW_S = 120; // a run that wrote metrics this recently is running
const ui = {};
const state = { paused: false, timer: null, liveTimer: null, run: null, users: new Map() };

const ms = (v) => `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms`;
const num = (v) => formatNumber(v, 1);
const pct = (v) => `${(v * 100).toFixed(0)}%`;
const date = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

async function start() {
  for (const id of ["auth", "app", "nav", "banner", "forbidden", "forbidden-text", "dashboard", "totals", "charts", "runs", "run-detail",
    "models", "feedback", "users", "all-keys", "updated", "refresh", "pause"]) ui[id] = document.getElementById(id);
  let who;
  try {
    who = await session();
    if (!who.user) {
      await signIn(ui.auth, "The dashboard is for admins: sign in with an admin account.");
      who = await session();
    }
  } catch (err) {
    ui.app.hidden = false;
    showError(ui.banner, err, () => location.reload());
    return;
  }
  renderNav(ui.nav, who, "/admin");
  ui.app.hidden = false;
  ui.refresh.addEventListener("click", refresh);
  ui.pause.addEventListener("click", () => {
    state.paused = !state.paused;
    ui.pause.setAttribute("aria-pressed", String(state.paused));
    ui.pause.textContent = state.paused ? "Resume auto-refresh" : "Pause auto-refresh";
    schedule();
  });
  await refresh();
}

function schedule() {
  clearTimeout(state.timer);
  clearTimeout(state.liveTimer);
  if (state.paused) return;
  state.timer = setTimeout(refresh, REFRESH_MS);
  if (state.run && state.run.live) state.liveTimer = setTimeout(() => showRun(state.run.id), LIVE_MS);
}

async function refresh() {
  clearTimeout(state.timer);
  showError(ui.banner, null);
  try {
    const stats = await api("/admin/stats"); // first: a 403 here means this is not an admin
    ui.forbidden.hidden = true;
    ui.dashboard.hidden = false;
    const [models, runs, feedback, users, keys] = await Promise.all([
      api("/v1/models"), api("/training/runs"), api("/admin/feedback?limit=1000"), api("/admin/users"), api("/admin/keys")]);
    renderServer(stats, feedback.data);
    renderModels(models.data);
    renderLora();
    renderFeedback(feedback.data);
    renderUsers(users.data);
    renderKeys(keys.data);
    renderRuns(runs.data);
    ui.updated.textContent = `updated ${new Date().toLocaleTimeString()}${state.paused ? " · paused" : " · every 30 s"}`;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      ui.app.hidden = true;
      signIn(ui.auth, "Your session has ended: please sign in again.").then(() => location.reload());
      return;
    }
    if (err instanceof ApiError && err.status === 403) {
      ui.dashboard.hidden = true;
      ui.forbidden.hidden = false;
      ui["forbidden-text"].textContent = `${err.message}. Ask an admin to give your account the admin role.`;
      return;
    }
    showError(ui.banner, err, refresh);
  }
  schedule();
}

// --- server ----------------------------------------------------------------------------------

function renderServer(stats, feedback) {
  const points = stats.points;
  const t = (p) => p.time;
  const series = (name, cls, f) => ({ name, cls, points: points.map((p) => [t(p), f(p)]) });
  const totals = stats.totals || {};
  const last = points.at(-1) || {};
  ui.totals.replaceChildren(
    tile("requests", num(totals.requests ?? 0)), tile("tokens generated", num(totals.tokens ?? 0)),
    tile("requests / min", num(last.requests_per_min ?? 0)), tile("tokens / s", num(last.tokens_per_s ?? 0)),
    tile("cache hit rate", totals.cache_hit_rate == null ? "–" : pct(totals.cache_hit_rate)),
    tile("feedback", `${feedback.filter((f) => f.positive).length} good / ${feedback.filter((f) => !f.positive).length} bad`));
  const statusNames = [...new Set(points.flatMap((p) => Object.keys(p.status)))].sort();
  const fmtX = (x) => formatTime(x);
  ui.charts.replaceChildren(
    lineChart("Requests per minute", [series("requests/min", "c1", (p) => p.requests_per_min)], { xFormat: fmtX, yFormat: num }),
    lineChart("Latency", [series("P50", "c1", (p) => p.latency_s.p50), series("P95", "c2", (p) => p.latency_s.p95),
      series("P99", "c3", (p) => p.latency_s.p99)], { xFormat: fmtX, yFormat: ms }),
    lineChart("Status codes per interval", statusNames.map((s, i) => series(s, `s${s[0]} c${i + 1}`, (p) => p.status[s] || 0)), { xFormat: fmtX, yFormat: num }),
    lineChart("Generated tokens per second", [series("tokens/s", "c1", (p) => p.tokens_per_s)], { xFormat: fmtX, yFormat: num }),
    lineChart("Queue depth and active slots", [series("waiting", "c3", (p) => p.queue_depth), series("active", "c1", (p) => p.active_slots)],
      { xFormat: fmtX, yFormat: num }),
    lineChart("Cache hit rate", [series("hit rate", "c2", (p) => p.cache_hit_rate)], { xFormat: fmtX, yFormat: pct }),
    feedbackChart(feedback),
  );
}

function tile(label, value) {
  return el("div", { class: "tile" }, el("b", {}, value), el("span", { class: "muted small" }, label));
}

/** Ratings per hour over the last day: good (+1, 3-5 stars) and bad (-1, 1-2 stars). */
function feedbackChart(feedback) {
  const hour = 3600_000;
  const now = Math.ceil(Date.now() / hour) * hour;
  const buckets = Array.from({ length: 24 }, (_, i) => {
    const start = now - (24 - i) * hour;
    return { start, label: new Date(start).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }), values: { good: 0, bad: 0 } };
  });
  for (const f of feedback) {
    const at = Date.parse(f.created_at);
    const i = Math.floor((at - (now - 24 * hour)) / hour);
    if (i >= 0 && i < 24) buckets[i].values[f.positive ? "good" : "bad"] += 1;
  }
  return barChart("Feedback ratings per hour (last 24 h)", buckets, [{ name: "good", cls: "good" }, { name: "bad", cls: "bad" }]);
}

// --- training runs ---------------------------------------------------------------------------

function renderRuns(runs) {
  const now = Date.now() / 1000;
  ui.runs.replaceChildren(...runs.map((r) => {
    const live = r.updated_at && now - r.updated_at < LIVE_WINDOW_S;
    const val = r.last.val || r.last.eval || {};
    return el("tr", { "data-run": r.id, class: state.run && state.run.id === r.id ? "selected" : null },
      el("td", {}, r.id, live ? el("span", { class: "badge live" }, "live") : null), el("td", {}, String(r.step)),
      el("td", {}, r.last.train ? r.last.train.loss.toFixed(3) : "–"), el("td", {}, val.loss != null ? val.loss.toFixed(3) : "–"),
      el("td", {}, val.ppl != null ? num(val.ppl) : "–"), el("td", {}, r.updated_at ? new Date(r.updated_at * 1000).toLocaleString() : "–"),
      el("td", {}, el("button", { type: "button", class: "small secondary", onclick: () => { state.run = { id: r.id, live }; showRun(r.id); } }, "Curves")));
  }));
  if (!runs.length) ui.runs.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No training runs in the runs directory yet.")));
  if (!state.run && runs.length) {
    const r = runs[0];
    state.run = { id: r.id, live: r.updated_at && now - r.updated_at < LIVE_WINDOW_S };
  }
  if (state.run) showRun(state.run.id);
}

async function showRun(id) {
  clearTimeout(state.liveTimer);
  try {
    const rows = (await api(`/training/runs/${encodeURIComponent(id)}/metrics`)).data;
    const pick = (kind, key) => rows.filter((r) => r.kind === kind && r[key] != null).map((r) => [r.step, r[key]]);
    const evalKind = rows.some((r) => r.kind === "val") ? "val" : "eval";
    const lastTime = rows.length ? rows.at(-1).time : 0;
    state.run = { id, live: Date.now() / 1000 - lastTime < LIVE_WINDOW_S };
    for (const tr of ui.runs.querySelectorAll("tr[data-run]")) tr.classList.toggle("selected", tr.dataset.run === id);
    const title = `${id}${state.run.live ? " (live)" : ""}`;
    const spikes = rows.filter((r) => r.kind === "grad_spike").map((r) => r.step); // train_insight.py's flags
    ui["run-detail"].replaceChildren(
      lineChart(`Loss · ${title}`, [{ name: "train", cls: "c1", points: pick("train", "loss") }, { name: "validation", cls: "c2", points: pick(evalKind, "loss") }],
        { xFormat: (x) => `step ${x}`, yFormat: (v) => v.toFixed(2), zero: false }),
      lineChart(`Perplexity · ${title}`, [{ name: "train", cls: "c1", points: pick("train", "ppl") }, { name: "validation", cls: "c2", points: pick(evalKind, "ppl") }],
        { xFormat: (x) => `step ${x}`, yFormat: num, zero: false }),
      lineChart(`Learning rate · ${title}`, [{ name: "lr", cls: "c3", points: pick("train", "lr") }],
        { xFormat: (x) => `step ${x}`, yFormat: (v) => v.toExponential(1) }),
      lineChart(`Gradient norm · ${title}${spikes.length ? ` · spikes at step ${spikes.slice(-5).join(", ")}` : ""}`,
        [{ name: "grad norm", cls: "c1", points: pick("train", "grad_norm") }], { xFormat: (x) => `step ${x}`, yFormat: (v) => v.toPrecision(2) }),
    );
  } catch (err) {
    showError(ui.banner, err);
  }
  if (state.run && state.run.live && !state.paused) state.liveTimer = setTimeout(() => showRun(id), LIVE_MS);
}

// --- models, feedback, users, keys -----------------------------------------------------------

function renderModels(models) {
  ui.models.replaceChildren(...models.map((m) => m.parent ? adapterRow(m) : el("tr", {},
    el("td", {}, m.id), el("td", {}, num(m.parameters)), el("td", {}, m.context_length ? `${m.context_length} tokens` : "unbounded"),
    el("td", {}, `${m.meta.arch} ${m.meta.family || ""} · ${m.meta.n_layer} layers × ${m.meta.n_embd}`),
    el("td", {}, `${m.meta.tokenizer} · ${m.meta.vocab_size}`), el("td", { class: "path" }, m.meta.path))));
}

/** LoRA files generated, jobs by status and domains in use, under the models. */
async function renderLora() {
  const node = document.getElementById("lora-stats");
  try {
    const lora = await api("/v1/lora/stats");
    const jobs = Object.entries(lora.jobs).map(([status, n]) => `${n} ${status}`).join(", ") || "none yet";
    node.textContent = `LoRA files generated: ${lora.lora_files_generated} · jobs: ${jobs} · domains: ${lora.domains.length} of ${lora.max_domains}`;
  } catch (err) {
    node.textContent = `LoRA: ${err.message}`;
  }
}

/** A LoRA adapter (its card has a parent): what it adapts and where it was read from. */
function adapterRow(a) {
  return el("tr", { class: "adapter" }, el("td", {}, a.id), el("td", {}, "–"), el("td", {}, "–"),
    el("td", {}, `LoRA adapter on ${a.parent}`), el("td", {}, "–"), el("td", { class: "path" }, a.meta ? a.meta.path : ""));
}

function renderFeedback(feedback) {
  ui.feedback.replaceChildren(...feedback.slice(0, 10).map((f) => el("li", {},
    el("span", { class: "rating" }, f.scale === "stars" ? `${f.rating}/5` : f.rating === 1 ? "▲ good" : "▼ bad"), " ",
    el("span", { class: "feedback-text" }, f.text || "(no comment)"), " ",
    el("span", { class: "muted small" }, `${date(f.created_at)}${f.completion_id ? ` · ${f.completion_id}` : ""}`))));
  if (!feedback.length) ui.feedback.append(el("li", { class: "muted" }, "No feedback yet."));
}

function renderUsers(users) {
  state.users = new Map(users.map((u) => [u.id, u.username]));
  ui.users.replaceChildren(...users.map((u) => el("tr", { "data-user": u.username },
    el("td", {}, u.username), el("td", {}, u.role), el("td", {}, u.disabled ? "disabled" : "active"), el("td", {}, date(u.created_at)),
    el("td", {},
      el("button", { type: "button", class: "small secondary", onclick: () => changeUser(u.id, { role: u.role === "admin" ? "user" : "admin" }) },
        u.role === "admin" ? "Make user" : "Make admin"), " ",
      el("button", { type: "button", class: "small ghost", onclick: () => changeUser(u.id, { disabled: !u.disabled }) }, u.disabled ? "Enable" : "Disable")))));
}

async function changeUser(id, change) {
  try {
    await api(`/admin/users/${id}`, { method: "PATCH", json: change });
  } catch (err) {
    showError(ui.banner, err);
  }
  refresh();
}

function renderKeys(keys) {
  ui["all-keys"].replaceChildren(...keys.map((k) => el("tr", { class: k.revoked ? "revoked" : null },
    el("td", {}, k.name), el("td", {}, state.users.get(k.user_id) || `#${k.user_id}`), el("td", {}, el("code", {}, `${k.prefix}…`)),
    el("td", {}, k.scopes.join(" ")), el("td", {}, date(k.last_used_at)),
    el("td", {}, k.revoked ? el("span", { class: "muted" }, "revoked") : el("button", { type: "button", class: "small danger", onclick: async () => {
      try {
        await api(`/admin/keys/${k.id}`, { method: "DELETE" });
      } catch (err) {
        showError(ui.banner, err);
      }
      refresh();
    } }, "Revoke")))));
  if (!keys.length) ui["all-keys"].append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No keys.")));
}

start();
