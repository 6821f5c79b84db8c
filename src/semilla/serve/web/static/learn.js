// The dashboard's self-learning panel: the server's learning loop (GET /admin/learn), its totals
// and rounds, and a form to start or stop it (POST /admin/learn/start, /admin/learn/stop).
// Self-contained: it fills #learn once the dashboard is shown, and stays quiet for non-admins.
import { ApiError, api, el, formatNumber, showError } from "./common.js";

const REFRESH_MS = 5_000;
const ui = {};

function tile(label, value) {
  return el("div", { class: "tile" }, el("b", {}, String(value)), el("span", { class: "muted small" }, label));
}

function render(status) {
  const job = status.job;
  const stats = status.stats || {};
  ui.state.textContent = job ? `${job.state} · run ${job.run}${job.error ? ` · ${job.error}` : ""}` : "no learning loop has run yet";
  ui.stop.disabled = !job || !["running", "stopping"].includes(job.state);
  ui.tiles.replaceChildren(
    tile("questions asked", formatNumber(stats.questions_asked ?? 0, 1)), tile("gaps detected", formatNumber(stats.gaps_detected ?? 0, 1)),
    tile("datasets generated", stats.datasets_generated ?? 0), tile("examples generated", formatNumber(stats.examples_generated ?? 0, 1)),
    tile("rounds promoted", stats.promotions ?? 0), tile("rounds rolled back", stats.rollbacks ?? 0));
  const rounds = stats.per_round || [];
  ui.rounds.replaceChildren(...rounds.slice(-20).reverse().map((r) => el("tr", {},
    el("td", {}, String(r.round)), el("td", {}, r.status), el("td", {}, String(r.questions)), el("td", {}, String(r.gaps)),
    el("td", {}, String(r.examples)), el("td", {}, r.recall == null ? "–" : r.recall.toFixed(2)),
    el("td", {}, r.val_ppl == null ? "–" : r.val_ppl.toFixed(3)))));
  if (!rounds.length) ui.rounds.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No rounds yet.")));
}

async function refresh() {
  clearTimeout(ui.timer);
  try {
    render(await api("/admin/learn"));
    ui.panel.hidden = false;
  } catch (err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) ui.panel.hidden = true; // the dashboard says why
    else showError(ui.banner, err, refresh);
  }
  ui.timer = setTimeout(refresh, REFRESH_MS);
}

async function act(path, json) {
  showError(ui.banner, null);
  try {
    render(await api(path, { method: "POST", json }));
  } catch (err) {
    showError(ui.banner, err);
  }
}

function start() {
  ui.panel = document.getElementById("learn");
  if (!ui.panel) return;
  ui.banner = el("div", { class: "banner", role: "alert", hidden: true });
  ui.state = el("p", { class: "muted small", role: "status" });
  ui.tiles = el("div", { class: "tiles" });
  ui.rounds = el("tbody");
  const run = el("input", { name: "run", placeholder: "run name", required: true, "aria-label": "Run" });
  const teacher = el("input", { name: "teacher", placeholder: "ollama/llama3", "aria-label": "Teacher (PROVIDER/MODEL)" });
  const rounds = el("input", { name: "rounds", type: "number", min: "1", value: "1", "aria-label": "Rounds" });
  ui.stop = el("button", { type: "button", class: "small secondary", onclick: () => act("/admin/learn/stop") }, "Stop");
  const form = el("form", { class: "row" }, run, teacher, rounds, el("button", { type: "submit", class: "small" }, "Start learning"), ui.stop);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act("/admin/learn/start", { run: run.value, teacher: teacher.value || null, rounds: Number(rounds.value) || 1 });
  });
  const table = el("table", { class: "table", "aria-label": "Learning rounds" },
    el("thead", {}, el("tr", {}, ...["Round", "Status", "Questions", "Gaps", "Examples", "Recall", "Val ppl"].map((h) => el("th", {}, h)))), ui.rounds);
  ui.panel.append(ui.banner, ui.state, ui.tiles, form, table);
  refresh();
}

start();
