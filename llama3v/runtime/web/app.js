// The llama3v chat page: plain JavaScript over the server's OpenAI API (no build step, no dependencies).
// Model output and file names are inserted as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "llama3v-api-key";
const state = {
  messages: [],        // the conversation as OpenAI messages (media as data URIs), resent each turn
  attachments: [],     // media waiting for the next message: {kind, name, url, element, ok}
  controller: null,    // AbortController of the answer being streamed
  key: sessionStorage.getItem(KEY_STORE) || "",
  model: "llama3v",
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function fmt(value, digits = 0) {
  return Number(value).toLocaleString("en-US", {maximumFractionDigits: digits, minimumFractionDigits: digits});
}

// ---- the API: key handling and errors as the server reports them ----

function askKey(why) {
  const dialog = $("key-dialog");
  if (!dialog.open) {  // requests refused together share one question
    $("key-why").textContent = why;
    $("key").value = "";
    dialog.showModal();
  }
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      state.key = $("key").value.trim();
      sessionStorage.setItem(KEY_STORE, state.key);
      resolve(state.key);
    }, {once: true});
  });
}

async function api(path, body, signal) {
  for (let attempt = 0; ; attempt++) {
    const headers = {"Content-Type": "application/json"};
    if (state.key) headers.Authorization = "Bearer " + state.key;
    const response = await fetch(path, body === undefined ? {headers, signal} :
      {method: "POST", headers, body: JSON.stringify(body), signal});
    if (response.status !== 401 || attempt >= 3) return response;
    await askKey(state.key ? "That key was refused; enter the right one." :
      "This server needs an API key. It is kept for this tab only.");
    if (!state.key) return response;
  }
}

async function errorText(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) { /* not JSON: keep the status text */ }
  return `Error ${response.status}: ${message}`;
}

// ---- attachments: preview what the runtime will make of each file ----

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    const kind = file.type.startsWith("video/") ? "video" : file.type.startsWith("image/") ? "image" : null;
    const item = {kind, name: file.name, url: null, ok: false};
    const caption = el("figcaption", {text: file.name});
    const remove = el("button", {type: "button", class: "remove", "aria-label": `Remove ${file.name}`, text: "×"});
    item.element = el("figure", {class: "attachment", "data-kind": kind || "other"}, remove, caption);
    remove.addEventListener("click", () => {
      state.attachments = state.attachments.filter((a) => a !== item);
      item.element.remove();
      $("prompt").focus();
    });
    state.attachments.push(item);
    $("tray").append(item.element);
    if (!kind) {
      problem(item, `${file.name} is neither an image nor a video`);
      continue;
    }
    try {
      item.url = await readAsDataURL(file);
      const response = await api("/v1/llama3v/media", {type: kind, url: item.url});
      if (!response.ok) {
        problem(item, await errorText(response));
        continue;
      }
      const plan = await response.json();
      item.element.insertBefore(kind === "image" ? imagePreview(file, plan) : videoPreview(plan), caption);
      caption.textContent = `${file.name} · ` + (kind === "image" ? imageSummary(plan) : videoSummary(plan));
      item.ok = true;
    } catch (err) {
      problem(item, `could not read ${file.name}: ${err.message || err}`);
    }
  }
}

function problem(item, message) {
  item.element.append(el("p", {class: "problem", role: "alert", text: message}));
}

function imagePreview(file, plan) {
  const box = el("div", {class: "frame-box"}, el("img", {src: URL.createObjectURL(file), alt: file.name}));
  const place = (node, [x, y, w, h]) => {
    node.style.left = `${100 * x / plan.width}%`;
    node.style.top = `${100 * y / plan.height}%`;
    node.style.width = `${100 * w / plan.width}%`;
    node.style.height = `${100 * h / plan.height}%`;
    box.append(node);
  };
  // The base (or only) view, then the high-resolution tiles in the order they are encoded.
  place(el("span", {class: "tile base", title: "base view", text: plan.tiles.length ? "base" : ""}), plan.base);
  plan.tiles.forEach((tile, i) => place(el("span", {class: "tile", title: `tile ${i + 1}`, text: `${i + 1}`}), tile));
  return box;
}

function imageSummary(plan) {
  const grid = plan.tiles.length ? `${plan.grid[0]}×${plan.grid[1]} tiles + base view` : "one tile";
  return `${plan.width}×${plan.height}, ${grid}, ${fmt(plan.rows)} prompt positions`;
}

function videoPreview(plan) {
  const strip = el("div", {class: "frames"});
  for (const frame of plan.frames) {
    strip.append(el("figure", {class: "frame"},
      el("img", {src: frame.image, alt: `frame ${frame.index} at ${fmt(frame.time, 1)} s`}),
      el("figcaption", {text: `${fmt(frame.time, 1)} s`})));
  }
  return strip;
}

function videoSummary(plan) {
  return `${plan.frames.length} frames sampled over ${fmt(plan.duration, 1)} s, ` +
    `up to ${fmt(plan.rows_per_frame)} positions each`;
}

// ---- the conversation ----

function addMessage(role, ...children) {
  const node = el("article", {class: `message ${role}`, "aria-label": role === "user" ? "You" : "Answer"},
    ...children);
  $("hint")?.remove();
  $("log").append(node);
  node.scrollIntoView({block: "end"});
  return node;
}

function statsList(usage, ext) {
  const t = ext.timings;
  const fresh = usage.prompt_tokens - ext.n_reused_tokens;
  const rows = [
    ["encode", `${fmt(t.encode_ms)} ms`, "encode-ms"],
    ["prompt", `${fmt(fresh)} tokens in ${fmt(t.prompt_ms)} ms` +
      (t.prompt_ms > 0 ? ` (${fmt(1000 * fresh / t.prompt_ms, 1)} tokens/s)` : ""), "prompt-ms"],
    ["decode", `${fmt(usage.completion_tokens)} tokens at ${fmt(t.decode_tokens_per_s, 1)} tokens/s`, "decode"],
    ["prompt tokens", fmt(usage.prompt_tokens), "prompt-tokens"],
    ["reused", fmt(ext.n_reused_tokens), "reused"],
    ["tiles encoded", fmt(ext.n_encodes), "encodes"],
  ];
  return el("dl", {class: "stats"}, ...rows.map(([name, value, key]) =>
    el("div", {}, el("dt", {text: name}), el("dd", {"data-stat": key, text: value}))));
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("attach").disabled = busy;
}

async function send() {
  const text = $("prompt").value.trim();
  const media = state.attachments.filter((a) => a.ok);
  if (state.controller || (!text && !media.length)) return;
  const parts = media.map((a) => ({type: `${a.kind}_url`, [`${a.kind}_url`]: {url: a.url}}));
  if (text) parts.push({type: "text", text});
  const system = $("system").value.trim();
  if (!state.messages.length && system) state.messages.push({role: "system", content: system});
  state.messages.push({role: "user", content: parts});
  const userNode = addMessage("user", ...media.map((a) => a.element), text ? el("div", {class: "text", text}) : null);
  const kept = state.attachments;
  state.attachments = [];
  $("tray").replaceChildren();
  $("prompt").value = "";

  const answer = el("div", {class: "text"});
  const node = addMessage("assistant", answer);
  node.setAttribute("aria-busy", "true");
  const controller = state.controller = new AbortController();
  setBusy(true);
  const body = {model: state.model, messages: state.messages, stream: true, stream_options: {include_usage: true},
                temperature: Number($("temperature").value || 0.7)};
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  let failure = null;
  try {
    const response = await api("/v1/chat/completions", body, controller.signal);
    if (!response.ok) failure = await errorText(response);
    else failure = await readStream(response, answer, node);
  } catch (err) {
    if (err.name !== "AbortError") failure = `Error: ${err.message || err}`;
  }
  const stopped = controller.signal.aborted;
  if (failure) {
    // Not part of the conversation: the message comes back to the composer to edit and resend.
    state.messages.pop();
    node.classList.add("error");
    node.setAttribute("role", "alert");
    answer.textContent = failure;
    userNode.classList.add("failed");
    $("prompt").value = text;
    state.attachments = kept;
    for (const a of kept) $("tray").append(a.element);
  } else if (answer.textContent || !stopped) {
    state.messages.push({role: "assistant", content: answer.textContent});
    if (stopped) node.append(el("p", {class: "note", text: "stopped"}));
  } else {  // stopped before a word came: the question stays unanswered and out of the conversation
    state.messages.pop();
    userNode.classList.add("failed");
    node.append(el("p", {class: "note", text: "stopped"}));
  }
  node.removeAttribute("aria-busy");
  state.controller = null;
  setBusy(false);
  $("prompt").focus();
}

// Reads server-sent events into `answer`; returns an error message, or null.
async function readStream(response, answer, node) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) return null;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return null;
        const chunk = JSON.parse(data);
        if (chunk.error) return `Error ${chunk.error.code}: ${chunk.error.message}`;
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          answer.textContent += choice.delta.content;
          node.scrollIntoView({block: "end"});
        }
        if (chunk.llama3v && chunk.usage) {
          node.append(statsList(chunk.usage, chunk.llama3v));
          if (choice && choice.finish_reason === "length") {
            node.append(el("p", {class: "note", text: "stopped at the token limit"}));
          }
        }
      }
    }
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.messages = [];
  $("log").replaceChildren();
  $("prompt").focus();
}

// ---- wiring ----

async function start() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) stop(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", (e) => { attach([...e.target.files]); e.target.value = ""; });
  $("prompt").addEventListener("paste", (e) => {
    const files = [...e.clipboardData.files];
    if (files.length) { e.preventDefault(); attach(files); }
  });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    attach([...e.dataTransfer.files]);
  });
  $("prompt").focus();
  const response = await api("/v1/models");
  if (response.ok) {
    const models = await response.json();
    state.model = models.data[0].id;
    $("model").textContent = state.model;
  } else {
    $("model").textContent = await errorText(response);
  }
  document.body.dataset.ready = "true";
}

start();
