// The chat's documents: pick a collection to answer from, create one, upload text files into
// it with progress, and show the sources a grounded answer came with. Everything the server
// sends back (names, document ids, snippets, errors) is set as text, never as HTML.
import { ApiError, api, describe, el } from "./common.js";

const RAG_KEY = "semilla.chat.rag";

const ui = {};
let onError = () => {};

/** Wire the documents bar; `handleError(err, retry)` is the page's (401 signs in again). */
export async function startDocuments(handleError) {
  onError = handleError;
  for (const id of ["collection", "rag-k", "add-files", "rag-files", "new-collection", "collection-form",
    "collection-name", "cancel-collection", "rag-status"]) {
    ui[id] = document.getElementById(id);
  }
  const saved = readSaved();
  if (Number.isInteger(saved.k)) ui["rag-k"].value = String(saved.k);
  ui.collection.addEventListener("change", () => {
    save();
    refreshButtons();
  });
  ui["rag-k"].addEventListener("change", save);
  ui["add-files"].addEventListener("click", () => ui["rag-files"].click());
  ui["rag-files"].addEventListener("change", () => {
    const files = [...ui["rag-files"].files];
    ui["rag-files"].value = ""; // the same file can be chosen again
    uploadAll(files);
  });
  ui["new-collection"].addEventListener("click", () => {
    ui["collection-form"].hidden = false;
    ui["new-collection"].hidden = true;
    ui["collection-name"].focus();
  });
  ui["cancel-collection"].addEventListener("click", closeForm);
  ui["collection-form"].addEventListener("submit", (event) => {
    event.preventDefault();
    createCollection();
  });
  await loadCollections(saved.collection);
}

/** The request's `rag` field: {collection, k} when a collection is picked, else undefined. */
export function ragRequest() {
  if (!ui.collection || !ui.collection.value) return undefined;
  const k = Math.round(Number(ui["rag-k"].value));
  return { collection: ui.collection.value, k: k >= 1 && k <= 20 ? k : 4 };
}

/** The sources under an answer: [n] document · chunk · score, then the snippet, all as text. */
export function sourcesView(sources, collection) {
  if (!sources.length) {
    return el("p", { class: "sources small muted" }, `No passage of ${collection} was found for this question.`);
  }
  return el("details", { class: "sources", open: true },
    el("summary", { class: "small muted" }, `Sources from ${collection} (${sources.length})`),
    el("ul", { class: "source-list" }, sources.map((s) => el("li", { class: "source", "data-document": s.document_id },
      el("div", { class: "source-head small" }, `[${s.id}] `, el("b", {}, s.document_id),
        ` · chunk ${s.chunk} · score ${Number(s.score).toFixed(3)}`),
      el("div", { class: "source-snippet small muted" }, s.snippet)))));
}

// --- collections ---------------------------------------------------------------------------

function readSaved() {
  try {
    const saved = JSON.parse(localStorage.getItem(RAG_KEY) || "{}");
    return saved && typeof saved === "object" ? saved : {};
  } catch {
    return {};
  }
}

function save() {
  localStorage.setItem(RAG_KEY, JSON.stringify({ collection: ui.collection.value, k: Number(ui["rag-k"].value) }));
}

async function loadCollections(wanted = ui.collection.value) {
  try {
    const list = (await api("/v1/collections")).data;
    ui.collection.replaceChildren(el("option", { value: "" }, "no documents"),
      ...list.map((c) => el("option", { value: c.name, selected: c.name === wanted },
        `${c.name} · ${c.documents} document${c.documents === 1 ? "" : "s"}`)));
  } catch (err) {
    // a server without the retrieval extra answers 501: the chat still works without documents
    if (err instanceof ApiError && err.status === 501) ui.collection.disabled = true;
    else onError(err, () => loadCollections(wanted));
  }
  refreshButtons();
}

function refreshButtons() {
  const picked = Boolean(ui.collection.value);
  ui["add-files"].disabled = !picked;
  ui["add-files"].title = picked ? `Add text or Markdown files to ${ui.collection.value}` : "Pick or create a collection first";
  ui["rag-k"].disabled = !picked;
}

function closeForm() {
  ui["collection-form"].hidden = true;
  ui["new-collection"].hidden = false;
  ui["collection-name"].value = "";
}

async function createCollection() {
  const name = ui["collection-name"].value.trim();
  if (!name) return;
  try {
    await api("/v1/collections", { method: "POST", json: { name } });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return onError(err);
    ui["rag-status"].replaceChildren();
    report(describe(err), "error");
    return;
  }
  closeForm();
  await loadCollections(name);
  save();
  ui["rag-status"].replaceChildren();
  report(`Collection ${name} created: add files to it.`, "done");
}

// --- uploads -------------------------------------------------------------------------------

/** One status line; `kind` is progress, done or error (a class, for colour). */
function report(text, kind, line = null) {
  const item = line || el("li");
  item.className = `rag-line ${kind}`;
  item.textContent = text;
  if (!line) ui["rag-status"].append(item);
  return item;
}

async function uploadAll(files) {
  const collection = ui.collection.value;
  if (!collection || !files.length) return;
  ui["rag-status"].replaceChildren();
  ui["add-files"].disabled = true;
  for (const file of files) {
    const line = report(`${file.name}: uploading…`, "progress");
    try {
      const result = await upload(collection, file, (sent) => {
        report(sent < 1 ? `${file.name}: uploading ${Math.round(sent * 100)}%` : `${file.name}: indexing…`, "progress", line);
      });
      report(result.added.length
        ? `${file.name}: added to ${collection} (${result.chunks} chunk${result.chunks === 1 ? "" : "s"})`
        : `${file.name}: already in ${collection}, nothing added`, "done", line);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return onError(err);
      const text = describe(err);
      report(text.startsWith(file.name) ? text : `${file.name}: ${text}`, "error", line);
    }
  }
  await loadCollections(collection);
}

/** POST one file as multipart; `progress(fraction sent)` while the body goes out (XHR: fetch
 * reports no upload progress). Resolves to {added, duplicates, chunks}; rejects with ApiError. */
function upload(collection, file, progress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/collections/${encodeURIComponent(collection)}/files`);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => e.lengthComputable && progress(e.loaded / e.total));
    xhr.upload.addEventListener("load", () => progress(1));
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) return resolve(xhr.response);
      const error = xhr.response && xhr.response.error;
      reject(new ApiError(xhr.status, error && error.message ? error.message : `${file.name}: ${xhr.status} ${xhr.statusText}`,
        { code: error ? error.code : null, retryAfter: Number(xhr.getResponseHeader("Retry-After")) || null }));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network error")));
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}
