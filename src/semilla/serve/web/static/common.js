// Shared by every page: the API client, DOM building, errors people can act on, sign-in.
// Text from the server is only ever set with textContent / createTextNode, never innerHTML.

export class ApiError extends Error {
  constructor(status, message, { code = null, retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/** The error a failed response carries (OpenAI's shape), with Retry-After when sent. */
export async function errorFrom(res) {
  let message = `${res.status} ${res.statusText}`;
  let code = null;
  try {
    const body = await res.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: keep the status line
  }
  const retryAfter = Number(res.headers.get("Retry-After")) || null;
  return new ApiError(res.status, message, { code, retryAfter });
}

/** fetch() with the session cookie; JSON in and out; an ApiError on failure (status 0: no server). */
export async function api(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, signal, credentials: "same-origin", headers: {} };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = new URLSearchParams(form);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "cannot reach the server: is `semilla serve` still running?");
  }
  if (!res.ok) throw await errorFrom(res);
  if (res.status === 204) return null;
  return res.json();
}

/** A human sentence for an error, saying what to do about it. */
export function describe(err) {
  if (!(err instanceof ApiError)) return `unexpected error: ${err && err.message ? err.message : err}`;
  switch (err.status) {
    case 0:
      return "The server cannot be reached. Is `semilla serve` still running? Retrying helps once it is back.";
    case 401:
      return "Your session has ended: please sign in again.";
    case 403:
      return `Not allowed: ${err.message}`;
    case 429:
      return `Too many requests: wait ${err.retryAfter || "a few"} s and try again.`;
    case 503:
      return `The server is busy or still loading (${err.message}). Try again in a moment.`;
    default:
      return err.message;
  }
}

/** Build an element: el("a", {href: "/", class: "x", onclick: fn}, "text", child, ...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

/**
 * Show an error (or clear it with null) in a banner; 429 counts down Retry-After, and a
 * retry callback gets a button.
 */
export function showError(banner, err, retry) {
  clearInterval(banner._timer);
  banner.replaceChildren();
  banner.hidden = !err;
  if (!err) return;
  banner.dataset.status = err instanceof ApiError ? String(err.status) : "error";
  const text = el("span", { class: "banner-text" }, describe(err));
  banner.append(text);
  if (retry) {
    const button = el("button", { type: "button", class: "small", onclick: () => { showError(banner, null); retry(); } }, "Retry");
    banner.append(button);
    if (err instanceof ApiError && err.status === 429 && err.retryAfter) {
      let left = err.retryAfter;
      button.disabled = true;
      button.textContent = `Retry in ${left} s`;
      banner._timer = setInterval(() => {
        left -= 1;
        if (left > 0) {
          button.textContent = `Retry in ${left} s`;
        } else {
          clearInterval(banner._timer);
          button.disabled = false;
          button.textContent = "Retry";
        }
      }, 1000);
    }
  }
  banner.append(el("button", { type: "button", class: "small ghost", "aria-label": "Dismiss", onclick: () => showError(banner, null) }, "×"));
}

/**
 * Who is here: {user} when signed in, {open: true} when the server lets anonymous callers use
 * the models (loopback, no accounts yet), {} when a sign-in is needed. Throws when unreachable.
 */
export async function session() {
  try {
    return { user: await api("/auth/me") };
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 401) throw err;
  }
  try {
    await api("/v1/models");
    return { open: true };
  } catch (err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return {};
    throw err;
  }
}

export async function logout() {
  try {
    await api("/auth/logout", { method: "POST" });
  } catch {
    // the session is gone either way
  }
  location.reload();
}

/**
 * The sign-in panel: log in, or register (the first account becomes admin) and log in.
 * Resolves once signed in.
 */
export function signIn(container, note = "") {
  return new Promise((resolve) => {
    const banner = el("div", { class: "banner", role: "alert", hidden: true });
    const user = el("input", { id: "auth-username", name: "username", autocomplete: "username", required: true, maxlength: 64 });
    const pass = el("input", { id: "auth-password", name: "password", type: "password", autocomplete: "current-password", required: true, maxlength: 256 });
    const form = el("form", { class: "auth-form", "aria-labelledby": "auth-title" },
      el("h1", { id: "auth-title" }, "Sign in to semilla"),
      note ? el("p", { class: "muted" }, note) : null,
      banner,
      el("label", { for: "auth-username" }, "Username"), user,
      el("label", { for: "auth-password" }, "Password"), pass,
      el("div", { class: "row" },
        el("button", { type: "submit", id: "auth-login" }, "Log in"),
        el("button", { type: "button", id: "auth-register", class: "secondary" }, "Register")),
      el("p", { class: "muted small" }, "The first account registered on a server becomes its admin."));
    const done = async (register) => {
      showError(banner, null);
      if (!form.reportValidity()) return;
      try {
        if (register) await api("/auth/register", { method: "POST", json: { username: user.value, password: pass.value } });
        await api("/auth/login", { method: "POST", form: { username: user.value, password: pass.value } });
        container.hidden = true;
        container.replaceChildren();
        resolve();
      } catch (err) {
        showError(banner, err);
      }
    };
    form.addEventListener("submit", (event) => { event.preventDefault(); done(false); });
    form.querySelector("#auth-register").addEventListener("click", () => done(true));
    container.replaceChildren(form);
    container.hidden = false;
    user.focus();
  });
}

/** The top bar's right side: the pages, who is signed in, log out / sign in. */
export function renderNav(nav, who, current) {
  const links = [["/", "Chat"], ["/keys", "API keys"]];
  if (!who.user || who.user.role === "admin") links.push(["/admin", "Dashboard"]);
  nav.replaceChildren(
    ...links.map(([href, label]) => el("a", { href, "aria-current": href === current ? "page" : null }, label)),
    who.user
      ? el("span", { class: "who" }, el("span", { class: "muted" }, who.user.role === "admin" ? "admin " : ""), who.user.username,
        " ", el("button", { type: "button", class: "small ghost", id: "logout", onclick: logout }, "Log out"))
      : el("span", { class: "who muted" }, who.open ? "open mode" : "signed out"),
  );
}

export function formatNumber(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs >= 1e9) return `${(value / 1e9).toFixed(digits)}G`;
  if (abs >= 1e6) return `${(value / 1e6).toFixed(digits)}M`;
  if (abs >= 1e3) return `${(value / 1e3).toFixed(digits)}k`;
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

export function formatTime(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function copyText(text, button) {
  const done = () => {
    const before = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = before; }, 1200);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  } else {
    fallbackCopy(text, done);
  }
}

function fallbackCopy(text, done) {
  const area = el("textarea", { class: "offscreen", readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  try {
    document.execCommand("copy");
    done();
  } finally {
    area.remove();
  }
}
