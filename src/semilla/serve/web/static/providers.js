// The dashboard's providers panel: each provider's calls, answers, failures, fallbacks, skips and
// mean latency (GET /admin/stats, summed over every replica that shares a Redis) beside its
// cooldown state (GET /admin/models). Its own module: admin.js draws the rest of the dashboard.
import { api, el, formatNumber } from "./common.js";

const REFRESH_MS = 10_000;
const ui = {};

function start() {
  for (const id of ["dashboard", "providers-panel", "providers", "providers-scope"]) ui[id] = document.getElementById(id);
  refresh();
}

async function refresh() {
  if (!ui.dashboard.hidden) { // admin.js shows the dashboard to admins only
    try {
      const [stats, models] = await Promise.all([api("/admin/stats"), api("/admin/models")]);
      render(stats, models.providers || []);
    } catch {
      ui["providers-panel"].hidden = true; // signed out or not an admin: admin.js says so
    }
  }
  setTimeout(refresh, REFRESH_MS);
}

function render(stats, states) {
  const counters = (stats.totals && stats.totals.providers) || {};
  const cooling = new Map(states.map((p) => [p.name, p]));
  const names = [...new Set([...Object.keys(counters), ...cooling.keys()])].sort();
  ui["providers-scope"].textContent = stats.replicas > 1
    ? `Summed over ${stats.replicas} replicas; cooldowns are shared by all of them.`
    : "This server's counters since it started.";
  const count = (v) => formatNumber(v ?? 0, 1);
  const rows = names.map((name) => {
    const c = counters[name] || {};
    const s = cooling.get(name);
    const state = !s ? "local model" : s.cooling_down_s > 0
      ? `cooling down ${Math.ceil(s.cooling_down_s)} s` : `ok${s.recent_failures ? ` (${s.recent_failures} recent failures)` : ""}`;
    return el("tr", { "data-provider": name },
      el("td", {}, name), el("td", {}, count(c.calls)), el("td", {}, count(c.successes)), el("td", {}, count(c.failures)),
      el("td", {}, count(c.fallbacks)), el("td", {}, count(c.skips)),
      el("td", {}, c.mean_latency_s == null ? "–" : `${(c.mean_latency_s * 1000).toFixed(0)} ms`), el("td", {}, state));
  });
  ui.providers.replaceChildren(...rows);
  ui["providers-panel"].hidden = rows.length === 0; // no providers file and no route used yet
}

start();
