// captioner demo page: upload an image, show the caption, its alternatives, the stage timings,
// and (for attention models) a heatmap per generated word. Vanilla JS, nothing fetched from
// outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { maxUpload: 0, request: 0, result: null, image: null, step: 0 };

const TIMING_LABELS = [
  ["decode", "decode image"], ["queue", "wait for model"], ["encoder", "encoder (CNN)"],
  ["search", "search (beam)"], ["total", "total (server)"],
];

async function init() {
  let preferred = 3;
  try {
    const info = await (await fetch("/healthz")).json();
    preferred = info.beam_size || 3;  // the model's dev-tuned beam size
    state.maxUpload = info.max_upload_bytes;
    $("model-info").textContent = `model ${info.model} on ${info.device}` +
      (info.attention ? " · attention: step through the words to see where it looked" : " · no attention");
    $("limit").textContent = `JPEG, PNG, GIF, WebP, BMP or TIFF, up to ${formatMB(state.maxUpload)}`;
  } catch (err) {
    showError(`cannot reach the demo server (${err.message})`);
  }
  for (let k = 1; k <= 5; k++) $("beam").add(new Option(String(k), String(k), k === preferred, k === preferred));
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    $("file").value = "";  // so choosing the same file again still counts as a change
    if (file) captionFile(file);
  });
  setUpDrop($("drop"));
  $("prev").addEventListener("click", () => setStep(state.step - 1));
  $("next").addEventListener("click", () => setStep(state.step + 1));
  document.addEventListener("keydown", (e) => {
    if (!state.result || !state.result.attention) return;
    if (e.key === "ArrowLeft") setStep(state.step - 1);
    if (e.key === "ArrowRight") setStep(state.step + 1);
  });
  $("app").dataset.ready = "true";
}

function setUpDrop(zone) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files[0]) captionFile(e.dataTransfer.files[0]);
  });
}

function formatMB(bytes) {
  return `${(bytes / 1048576).toFixed(bytes < 1048576 ? 2 : 1)} MB`;
}

// Size is checked here first so nobody waits for a doomed upload; the server checks again.
async function captionFile(file) {
  hideError();
  if (state.maxUpload && file.size > state.maxUpload) {
    showError(`${file.name}: upload too large: ${formatMB(file.size)}; the limit is ${formatMB(state.maxUpload)}`);
    return;
  }
  const request = ++state.request;  // a newer upload makes older answers stale
  $("status").textContent = `captioning ${file.name}…`;
  const beam = $("beam").value;
  const started = performance.now();
  try {
    const [response, image] = await Promise.all([
      fetch(`/api/caption?beam_size=${beam}&n_best=${beam}`, {
        method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
      }),
      loadPreview(file),
    ]);
    const data = await response.json().catch(() => ({ error: `server answered HTTP ${response.status}` }));
    if (request !== state.request) return;
    if (!response.ok) throw new Error(`${file.name}: ${data.error || `HTTP ${response.status}`}`);
    data.timings_ms.round_trip = Math.round(performance.now() - started);
    show(data, image);
    $("status").textContent = "";
  } catch (err) {
    if (request !== state.request) return;
    $("status").textContent = "";
    // fetch() itself rejects with a TypeError when the connection fails.
    showError(err instanceof TypeError ? `${file.name}: upload failed (${err.message})` : err.message);
  }
}

// The browser's own decode of the file, for display; null when it cannot show the format.
function loadPreview(file) {
  return new Promise((resolve) => {
    const image = new Image();
    const url = URL.createObjectURL(file);
    image.onload = () => { URL.revokeObjectURL(url); resolve(image); };
    image.onerror = () => { URL.revokeObjectURL(url); resolve(null); };
    image.src = url;
  });
}

function show(data, image) {
  Object.assign(state, { result: data, image, step: 0 });
  $("caption").textContent = data.caption || "(empty caption)";
  fillAlternatives(data.alternatives);
  fillTimings(data.timings_ms);
  const labels = stepLabels(data);
  $("words").replaceChildren(...labels.map((word, k) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = word;
    button.disabled = !data.attention;
    button.addEventListener("click", () => setStep(k));
    return button;
  }));
  $("stepper").hidden = !data.attention;
  $("result").hidden = false;
  setStep(0);
}

// One label per attention step: the words, then <end> when the search emitted it.
function stepLabels(data) {
  const labels = [...data.words];
  if (data.attention && data.attention.length > labels.length) labels.push("<end>");
  return labels;
}

function setStep(k) {
  const n = stepLabels(state.result).length;
  state.step = n ? (k + n) % n : 0;
  const pressed = (i) => String(Boolean(state.result.attention) && i === state.step);
  [...$("words").children].forEach((button, i) => button.setAttribute("aria-pressed", pressed(i)));
  $("step-info").textContent = state.result.attention
    ? `attention for word ${state.step + 1} of ${n}: “${stepLabels(state.result)[state.step]}”`
    : "this model has no attention";
  draw();
}

function draw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const { image, result } = state;
  if (!image) {
    canvas.width = 448; canvas.height = 120;
    ctx.fillStyle = "#555"; ctx.font = "16px system-ui";
    ctx.fillText("(this browser cannot display this image format)", 16, 64);
    return;
  }
  const scale = 448 / Math.max(image.naturalWidth, image.naturalHeight);
  canvas.width = Math.round(image.naturalWidth * scale);
  canvas.height = Math.round(image.naturalHeight * scale);
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  if (!result.attention) return;
  const [x0, y0, x1, y1] = result.view_box;
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(heatmap(result.attention[state.step], result.grid_shape),
    x0 * canvas.width, y0 * canvas.height, (x1 - x0) * canvas.width, (y1 - y0) * canvas.height);
}

// The attention weights as a tiny grid-sized shade: black, transparent where the weight is
// highest and dark where it is lowest, so the image shows through where the model looked
// (the "Show, Attend and Tell" style). Drawn enlarged with smoothing, it becomes a soft map.
function heatmap(weights, [h, w]) {
  const grid = document.createElement("canvas");
  grid.width = w; grid.height = h;
  const pixels = grid.getContext("2d").createImageData(w, h);
  const lo = Math.min(...weights), hi = Math.max(...weights);
  weights.forEach((value, i) => {
    const t = hi > lo ? (value - lo) / (hi - lo) : 0;
    pixels.data.set([0, 0, 0, Math.round(215 * (1 - t))], 4 * i);
  });
  grid.getContext("2d").putImageData(pixels, 0, 0);
  return grid;
}

function fillAlternatives(alternatives) {
  $("alternatives").tBodies[0].replaceChildren(...alternatives.map((alt, i) =>
    row([String(i + 1), alt.caption, alt.log_prob.toFixed(3), alt.score.toFixed(3)], [0, 2, 3])));
}

function fillTimings(timings) {
  const rows = TIMING_LABELS.map(([key, label]) => row([label, `${timings[key].toFixed(1)} ms`], [1]));
  rows.push(row(["round trip (browser)", `${timings.round_trip} ms`], [1]));
  $("timings").tBodies[0].replaceChildren(...rows);
}

function row(cells, numeric) {
  const tr = document.createElement("tr");
  cells.forEach((text, i) => {
    const td = tr.insertCell();
    td.textContent = text;
    if (numeric.includes(i)) td.className = "num";
  });
  return tr;
}

function showError(message) {
  $("result").hidden = true;  // an old caption next to a new error would mislead
  $("error").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

init();
