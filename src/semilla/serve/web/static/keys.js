// The API keys page: a signed-in user creates, names and revokes their own keys.
import { ApiError, api, copyText, el, renderNav, session, showError, signIn } from "./common.js";

const ui = {};

function date(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

async function start() {
  for (const id of ["auth", "app", "nav", "banner", "new-key", "key-name", "key-days", "new-secret", "keys", "base-url"]) ui[id] = document.getElementById(id);
  ui["base-url"].textContent = `${location.origin}/v1`;
  let who;
  try {
    who = await session();
    if (!who.user) {
      await signIn(ui.auth, "Keys belong to an account: sign in or register to manage them.");
      who = await session();
    }
  } catch (err) {
    ui.app.hidden = false;
    showError(ui.banner, err, () => location.reload());
    return;
  }
  renderNav(ui.nav, who, "/keys");
  ui.app.hidden = false;
  ui["new-key"].addEventListener("submit", create);
  await load();
}

async function load() {
  try {
    const keys = (await api("/v1/keys")).data;
    ui.keys.replaceChildren(...keys.map(row));
    if (!keys.length) ui.keys.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No keys yet.")));
  } catch (err) {
    failed(err, load);
  }
}

function row(key) {
  const actions = el("td");
  if (key.revoked) {
    actions.append(el("span", { class: "muted" }, "revoked"));
  } else {
    const revoke = el("button", { type: "button", class: "small danger", "aria-label": `Revoke ${key.name}` }, "Revoke");
    revoke.addEventListener("click", () => {
      actions.replaceChildren(
        el("button", { type: "button", class: "small danger confirm-revoke", onclick: async () => {
          try {
            await api(`/v1/keys/${key.id}`, { method: "DELETE" });
          } catch (err) {
            failed(err);
          }
          load();
        } }, "Yes, revoke"),
        el("button", { type: "button", class: "small ghost", onclick: load }, "Keep"));
    });
    actions.append(revoke);
  }
  return el("tr", { class: key.revoked ? "revoked" : null, "data-id": key.id },
    el("td", {}, key.name), el("td", {}, el("code", {}, `${key.prefix}…`)), el("td", {}, key.scopes.join(" ")),
    el("td", {}, date(key.created_at)), el("td", {}, date(key.expires_at)), el("td", {}, date(key.last_used_at)), actions);
}

async function create(event) {
  event.preventDefault();
  showError(ui.banner, null);
  const days = ui["key-days"].value.trim();
  try {
    const created = await api("/v1/keys", { method: "POST", json: { name: ui["key-name"].value.trim() || "default", expires_in_days: days ? Number(days) : null } });
    const copy = el("button", { type: "button", class: "small" }, "Copy");
    copy.addEventListener("click", () => copyText(created.key, copy));
    ui["new-secret"].replaceChildren(
      el("p", {}, el("strong", {}, `Key “${created.name}” created.`), " Copy it now: it is shown only this once."),
      el("div", { class: "row" }, el("code", { id: "secret-value", class: "secret-value" }, created.key), copy));
    ui["new-secret"].hidden = false;
    ui["key-name"].value = "";
    ui["key-days"].value = "";
    await load();
  } catch (err) {
    failed(err, () => create(event));
  }
}

function failed(err, retry) {
  if (err instanceof ApiError && err.status === 401) {
    ui.app.hidden = true;
    signIn(ui.auth, "Your session has ended: please sign in again.").then(() => location.reload());
    return;
  }
  showError(ui.banner, err, retry);
}

start();
