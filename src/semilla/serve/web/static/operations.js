// The dashboard's operations panels: the alerts the server evaluates itself (GET /admin/alerts),
// the A/B routes side by side (GET /admin/ab, promote a winner) and usage and cost by model
// (GET /admin/usage). Kept apart from admin.js: it polls on its own, for admins only.
import { ApiError, api, el, formatNumber } from "./common.js";

const REFRESH_MS = 10_000;
const since = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

const share = (v) => (v == null ? "–" : `${(v * 100).toFixed(1)}%`);
const secs = (v) => (v == null ? "–" : `${(v * 1000).toFixed(0)} ms`);

async function refreshAB() {
  const box = document.getElementById("ab");
  const routes = (await api("/admin/ab")).data;
  box.replaceChildren(...routes.map((r) => el("table", { class: "table", "aria-label": `A/B route ${r.route}`, "data-route": r.route },
    el("thead", {}, el("tr", {}, ...["Variant", "Share", "Up", "Requests", "Errors", "Mean latency", "Tokens", "Feedback", "vs control", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...r.variants.map((v) => el("tr", { "data-variant": v.variant },
      el("td", {}, v.variant, v.variant === r.control ? el("span", { class: "muted small" }, " (control)") : null),
      el("td", {}, share(v.weight)), el("td", {}, v.up ? "yes" : "no"), el("td", {}, formatNumber(v.requests, 0)),
      el("td", {}, share(v.error_rate)), el("td", {}, secs(v.mean_latency_s)), el("td", {}, formatNumber(v.completion_tokens, 0)),
      el("td", {}, `${v.feedback.good} good / ${v.feedback.bad} bad${v.feedback.score == null ? "" : ` (${share(v.feedback.score)})`}`),
      el("td", {}, v.vs_control ? `p = ${v.vs_control.p_value.toPrecision(2)}${v.vs_control.significant ? " · significant" : ""}` : "–"),
      el("td", {}, r.variants.length > 1 ? el("button", { type: "button", class: "small secondary", onclick: () => promote(r.route, v.variant) }, "Promote") : "winner")))))));
  if (!routes.length) box.append(el("p", { class: "muted" }, "No A/B routes: add one to the providers file (routes: NAME: {split: {A: 70, B: 30}})."));
}

async function promote(route, variant) {
  await api(`/admin/ab/${encodeURIComponent(route)}/promote`, { method: "POST", json: { variant } });
  refreshAB();
}

async function refreshUsage() {
  const by = document.getElementById("usage-by").value;
  const usage = await api(`/admin/usage?by=${by}&period=day&days=7`);
  document.getElementById("usage-who").textContent = by === "user" ? "User" : "Model";
  const money = (v) => `${v.toFixed(4)} ${usage.currency}`;
  const body = document.getElementById("usage");
  body.replaceChildren(...usage.data.map((r) => el("tr", {},
    el("td", {}, r.period), el("td", {}, r[by]), el("td", {}, formatNumber(r.requests, 0)), el("td", {}, formatNumber(r.prompt_tokens, 0)),
    el("td", {}, formatNumber(r.completion_tokens, 0)), el("td", {}, r.seconds.toFixed(1)), el("td", {}, money(r.cost)), el("td", {}, money(r.cost_per_generation)))));
  if (!usage.data.length) body.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No requests in the last 7 days.")));
}

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
    await Promise.all([refreshAB(), refreshUsage()]);
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) return; // not an admin: admin.js says so
    if (err instanceof ApiError && err.status === 401) return setTimeout(refreshAlerts, 1000); // signing in
    health.textContent = `operations panels unavailable: ${err.message}`;
  }
  setTimeout(refreshAlerts, REFRESH_MS);
}

document.getElementById("usage-by").addEventListener("change", () => refreshUsage().catch(() => {}));
refreshAlerts();
