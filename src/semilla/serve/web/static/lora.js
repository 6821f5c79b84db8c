// The chat's LoRA adapters: an adapter picker next to the model picker (the adapters /v1/models
// lists with the chosen model as their parent), the conversation's domain, "Teach" (a
// /v1/lora/generate job from this conversation, its progress, the adapter to download), and the
// count of LoRA files generated. Everything the server sends back is set as text.
import { api, describe, el } from "./common.js";

const ADAPTER_KEY = "semilla.chat.adapter";
const POLL_MS = 1000;

const ui = {};
let adapters = []; // the /v1/models cards that have a parent
let conversationId = () => null;
let onError = () => {};
let onModels = async () => {};

/** Wire the adapter picker and the teach bar. `current()` is the open conversation's id,
 * `reloadModels()` the page's model list refresh, `handleError(err, retry)` its error banner. */
export async function startLora(current, reloadModels, handleError) {
  conversationId = current;
  onModels = reloadModels;
  onError = handleError;
  for (const id of ["model", "adapter", "domain", "domains", "teach", "teach-status", "m-lora"]) ui[id] = document.getElementById(id);
  ui.model.addEventListener("change", () => showAdapters());
  ui.adapter.addEventListener("change", () => localStorage.setItem(ADAPTER_KEY, ui.adapter.value));
  ui.teach.addEventListener("click", teach);
  await refreshStats();
}

/** Split /v1/models: the base models go to the model picker (returned), adapters to ours. */
export function splitModels(cards) {
  adapters = cards.filter((m) => m.parent);
  return cards.filter((m) => !m.parent);
}

/** Fill the adapter picker with the chosen model's adapters (keeping the choice when it fits). */
export function showAdapters(wanted = localStorage.getItem(ADAPTER_KEY)) {
  const own = adapters.filter((a) => a.parent === ui.model.value);
  ui.adapter.replaceChildren(el("option", { value: "" }, "no adapter"),
    ...own.map((a) => el("option", { value: a.id, selected: a.id === wanted }, `${a.id} · LoRA`)));
  ui.adapter.disabled = !own.length;
}

/** The `model` a chat request names: the adapter when one is picked, else the model. */
export function requestModel() {
  return ui.adapter.value || ui.model.value || undefined;
}

/** An opened conversation: its model (an adapter selects its parent too) and its domain. */
export function showConversation(conv) {
  const adapter = adapters.find((a) => a.id === conv.model);
  const model = adapter ? adapter.parent : conv.model;
  if (model && [...ui.model.options].some((o) => o.value === model)) ui.model.value = model;
  showAdapters(adapter ? adapter.id : "");
  ui.domain.value = conv.domain || "";
}

/** A new chat: no domain yet. */
export function clearConversation() {
  ui.domain.value = "";
  ui["teach-status"].textContent = "";
}

async function refreshStats() {
  try {
    const stats = await api("/v1/lora/stats");
    ui["m-lora"].textContent = String(stats.lora_files_generated);
    ui.domains.replaceChildren(...stats.domains.map((d) => el("option", { value: d })));
  } catch (err) {
    onError(err, refreshStats);
  }
}

function say(text) {
  ui["teach-status"].textContent = text;
}

async function teach() {
  const id = conversationId();
  const domain = ui.domain.value.trim();
  if (!id) return say("Send a message first: a saved conversation is what the adapter learns from.");
  if (!domain) return say("Choose a domain for this conversation (medicina, legal, ...).");
  ui.teach.disabled = true;
  try {
    await api(`/v1/conversations/${encodeURIComponent(id)}`, { method: "PATCH", json: { domain } });
    const job = await api("/v1/lora/generate", { method: "POST", json: { conversation_id: id, domain, model: ui.model.value } });
    await follow(job);
  } catch (err) {
    say(describe(err));
  } finally {
    ui.teach.disabled = false;
  }
}

async function follow(job) {
  while (job.status === "queued" || job.status === "running") {
    say(job.status === "queued" ? `Job ${job.id} is waiting for its turn…` : `Training ${job.adapter}: step ${job.step} of ${job.max_iters}`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    job = await api(`/v1/lora/jobs/${encodeURIComponent(job.id)}`);
  }
  if (job.status !== "succeeded") return say(`The job ${job.status}${job.error ? `: ${job.error}` : ""}.`);
  ui["teach-status"].replaceChildren(`Adapter ${job.adapter} is ready and in the adapter picker · `,
    el("a", { href: job.files.safetensors, download: `${job.adapter}.safetensors` }, "download .safetensors"), " · ",
    el("a", { href: job.files.zip, download: `${job.adapter}.zip` }, "PEFT zip"));
  await Promise.all([onModels(), refreshStats()]);
}
