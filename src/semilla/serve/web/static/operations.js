// The dashboard's operations panels: the alerts the server evaluates itself (GET /admin/alerts).
// Kept apart from admin.js: it polls on its own and stays hidden for anyone but an admin.
import { ApiError, api, el } from "./common.js";

const REFRESH_MS = 10_000;
const since = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

async function refreshAlerts() {
  const body = document.getElementById("alerts");
  const health = document.getElementById("alerts-health");
  try {
    const alerts = await api("/admin/alerts");
    const rows = [...alerts.firing, ...alerts.pending, ...alerts.resolved.slice(0, 10)];
    body.replaceChildren(...rows.map((a) => el("tr", { "data-alert": a.name, "data-status": a.status },
      el("td", {}, a.name), el("td", {}, el("span", { class: `badge ${a.status}` }, a.status)),
      el("td", {}, a.annotations.summary || ""), el("td", {}, since(a.resolved_at || a.started_at)))));
    if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 4, class: "muted" }, `No alerts (${alerts.rules.length} rules, every ${alerts.interval_s} s).`)));
    const hook = alerts.webhook ? ` · webhook ${alerts.webhook.target}: ${alerts.webhook.delivered} delivered, ${alerts.webhook.failed} failed` : "";
    health.textContent = (alerts.health.ok ? "health check: ok" : `health check failing: ${alerts.health.problems.join("; ")}`) + hook;
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) return; // not an admin: admin.js says so
    if (err instanceof ApiError && err.status === 401) return setTimeout(refreshAlerts, 1000); // signing in
    health.textContent = `alerts unavailable: ${err.message}`;
  }
  setTimeout(refreshAlerts, REFRESH_MS);
}

refreshAlerts();
