// The playground: wires the form, the two modes, the status strip and the gallery to the HTTP API.
// Server text only ever reaches the page through textContent, attributes and data: URLs (never innerHTML).

import { ApiError, apiKey, getJSON, setApiKey, streamImages } from "./api.js";
import * as gallery from "./gallery.js";
import { MaskPainter } from "./mask.js";
import { Viewer } from "./progress.js";

const $ = (id) => document.getElementById(id);
const STATUS_EVERY_MS = 3000;
const FIELD_OF_PARAM = { prompt: "prompt", size: "size", seed: "seed", guidance_scale: "guidance", steps: "steps",
                         image: "edit-file", mask: "edit-mask", Authorization: "api-key" };

const ui = {
  mode: "generate",
  sizes: [], // allowed "WxH" sizes, native first (from /v1/models)
  model: null,
  busy: null, // AbortController of the request in flight
  retryTimer: null,
  retry: null, // the action the error panel's "Try again" repeats
  errorParam: null, // the field the shown error is about
  loadFailed: false, // GET /v1/models failed (shown in the error panel) and is to be retried
  needKey: false, // the server wants an API key: status polling waits for one
  defaultsApplied: false, // the model's default steps and guidance are in the inputs
  edit: null, // {blob, width, height, name}: the image being edited
  genViewer: new Viewer($("gen-viewer")),
  editViewer: new Viewer($("edit-viewer")),
  painter: new MaskPainter($("edit-image"), $("edit-mask")),
};

// --- status strip and model info -----------------------------------------------------------------------

function setText(id, text) {
  $(id).textContent = text;
}

async function refreshStatus() {
  if (document.hidden || ui.needKey) return; // a page without its key would add a 401 every few seconds
  const state = $("st-state");
  try {
    const s = await getJSON("/v1/status");
    setText("st-model", s.model || "loading…");
    setText("st-device", s.device ? `${s.device} (${s.dtype})` : "…");
    setText("st-queue", `${s.queue_size} waiting · ${s.rows_running} running`);
    setText("st-rate", Number(s.images_per_second).toFixed(2));
    state.textContent = s.status;
    state.dataset.state = s.status;
    if (s.defaults) applyDefaults(s);
  } catch (e) {
    ui.needKey = e.status === 401;
    state.textContent = ui.needKey ? "API key needed" : "unreachable";
    state.dataset.state = "failed";
  }
}

function applyDefaults(s) {
  if (ui.defaultsApplied) return;
  ui.defaultsApplied = true;
  // The model's defaults fill the inputs; limits become hints (the server still has the last word).
  if (!$("steps").value) $("steps").value = s.defaults.steps;
  if (!$("guidance").value) $("guidance").value = s.defaults.guidance_scale;
  $("steps").max = s.limits.max_steps;
  $("guidance").max = s.limits.max_guidance_scale;
  $("prompt").maxLength = s.limits.max_prompt_chars;
}

async function loadModel() {
  try {
    const models = await getJSON("/v1/models");
    if (ui.loadFailed) clearError(); // the error of an earlier attempt (a missing key, say) is resolved
    ui.loadFailed = false;
    const m = models.data[0];
    ui.model = m.id;
    ui.sizes = m.sizes;
    const select = $("size");
    select.replaceChildren(...m.sizes.map((size) => {
      const option = document.createElement("option");
      option.value = size;
      option.textContent = size;
      if (size === m.native_size) option.title = "the model's native size";
      return option;
    }));
  } catch (e) {
    if (e.status === 503 || e.status === 0) {
      setTimeout(loadModel, 1000); // still loading: ask again
      return;
    }
    ui.loadFailed = true;
    showError(e);
  }
}

// --- errors --------------------------------------------------------------------------------------------

function clearError() {
  clearInterval(ui.retryTimer);
  ui.errorParam = null;
  $("error").hidden = true;
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showError(err, retry = null) {
  clearError();
  if (!(err instanceof ApiError)) err = new ApiError(0, "page_error", String(err && err.message ? err.message : err));
  setText("error-message", err.message); // the API's own words
  const detail = [err.status ? `HTTP ${err.status}` : null, err.code, err.param ? `field: ${err.param}` : null,
                  err.requestId ? `request ${err.requestId}` : null].filter(Boolean).join(" · ");
  setText("error-detail", detail);
  const field = err.param && $(FIELD_OF_PARAM[err.param] || "");
  if (field) {
    field.setAttribute("aria-invalid", "true");
    const details = field.closest("details");
    if (details) details.open = true; // e.g. the API key field
  }
  const retryButton = $("retry");
  const note = $("error-retry");
  retryButton.hidden = !(retry && err.retryable);
  note.hidden = err.retryAfter == null;
  if (err.retryAfter != null) {
    let left = err.retryAfter;
    const tick = () => {
      note.textContent = left > 0 ? `Retry-After: ${err.retryAfter} s. The server suggests waiting ${left} s more.`
                                  : `Retry-After: ${err.retryAfter} s. You can try again now.`;
      left -= 1;
      if (left < 0) clearInterval(ui.retryTimer);
    };
    tick();
    ui.retryTimer = setInterval(tick, 1000);
  }
  ui.retry = retry;
  ui.errorParam = err.param;
  $("error").hidden = false;
}

// --- reading the form ----------------------------------------------------------------------------------

function numberField(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = parse(raw);
  return Number.isFinite(value) ? value : raw; // a non-number goes to the server, which names the problem
}

function knobs() {
  const out = { prompt: $("prompt").value };
  const seed = numberField("seed", Number);
  // A whole number the page cannot send exactly; a fraction goes to the server, which names the problem.
  if (typeof seed === "number" && Number.isInteger(seed) && !Number.isSafeInteger(seed)) {
    throw new ApiError(0, "page_error", "this page handles seeds up to 2^53 - 1; use the API for larger ones",
                       "seed");
  }
  for (const [key, value] of [["seed", seed], ["guidance_scale", numberField("guidance", Number)],
                              ["steps", numberField("steps", Number)]]) {
    if (value !== undefined) out[key] = value;
  }
  return out;
}

// --- generate and edit ---------------------------------------------------------------------------------

function setBusy(controller) {
  ui.busy = controller;
  $("run").disabled = Boolean(controller);
  $("stop").hidden = !controller;
  document.body.dataset.busy = controller ? "true" : "false";
}

async function run(action) {
  if (ui.busy) return;
  clearError();
  const viewer = action === edit ? ui.editViewer : ui.genViewer;
  const controller = new AbortController();
  setBusy(controller);
  try {
    await action(controller.signal);
  } catch (e) {
    const stopped = e.code === "cancelled";
    if (!stopped) showError(e, () => run(action));
    viewer.failed(stopped);
  } finally {
    setBusy(null);
  }
}

function dataURL(body) {
  return `data:image/${body.output_format};base64,${body.images[0].b64_json}`;
}

function remember(kind, body, k) {
  const image = body.images[0];
  const items = gallery.add({
    id: body.id, kind, created: Date.now(), model: body.model, prompt: k.prompt, size: body.size,
    seed: image.seed, steps: k.steps ?? null, guidance_scale: k.guidance_scale ?? null, image: dataURL(body),
  });
  renderGallery(items);
}

async function generate(signal) {
  const k = knobs();
  const size = $("size").value || undefined; // none while the model loads: the server answers 503 itself
  const [width, height] = (size || "1x1").split("x").map(Number);
  ui.genViewer.start(width, height);
  const t0 = performance.now();
  const body = await streamImages("/v1/generate", { ...k, size, stream: true, preview: true },
                                  ui.genViewer.listener(), signal);
  ui.genViewer.done(body, (performance.now() - t0) / 1000, k.prompt);
  remember("generate", body, k);
}

async function edit(signal) {
  const k = knobs();
  if (!ui.edit) throw new ApiError(0, "page_error", "choose an image to edit first", "image");
  if (ui.painter.coverage() === 0) {
    throw new ApiError(0, "page_error", "paint over the part of the image to regenerate first", "mask");
  }
  const form = new FormData();
  form.append("image", ui.edit.blob, ui.edit.name);
  form.append("mask", await ui.painter.toBlob(), "mask.png");
  for (const [key, value] of Object.entries(k)) form.append(key, String(value));
  form.append("stream", "true");
  form.append("preview", "true");
  ui.editViewer.start(ui.edit.width, ui.edit.height);
  const t0 = performance.now();
  const body = await streamImages("/v1/edit", form, ui.editViewer.listener(), signal);
  ui.editViewer.done(body, (performance.now() - t0) / 1000, `edit: ${k.prompt}`);
  remember("edit", body, k);
}

// --- edit input ----------------------------------------------------------------------------------------

function fitTo(bitmap, width, height) {
  // Scale to cover width x height, centred, cropping the overflow.
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const scale = Math.max(width / bitmap.width, height / bitmap.height);
  const w = bitmap.width * scale;
  const h = bitmap.height * scale;
  canvas.getContext("2d").drawImage(bitmap, (width - w) / 2, (height - h) / 2, w, h);
  return canvas;
}

async function setEditInput(blob, name) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    showError(new ApiError(0, "page_error", `${name} could not be read as an image`, "image"));
    return;
  }
  const size = `${bitmap.width}x${bitmap.height}`;
  let source = bitmap;
  let note = `${name}, ${size}.`;
  if (ui.sizes.length && !ui.sizes.includes(size)) {
    // An edit keeps the input's size, which must be a served size: resize instead of failing.
    const [w, h] = ui.sizes[0].split("x").map(Number);
    source = fitTo(bitmap, w, h);
    blob = await new Promise((resolve) => source.toBlob(resolve, "image/png"));
    note = `${name} was ${size}; resized and cropped to ${ui.sizes[0]}, a size this server edits.`;
  }
  ui.edit = { blob, width: source.width, height: source.height, name: "input.png" };
  ui.painter.load(source);
  $("brush-size").max = String(Math.max(160, Math.round(Math.max(source.width, source.height) / 2)));
  $("paint").dataset.loaded = "true";
  $("paint").style.aspectRatio = `${source.width} / ${source.height}`;
  ui.editViewer.reset(source.width, source.height);
  setText("edit-note", note);
  if (ui.errorParam === "image") clearError(); // an earlier file's problem is solved by this one
}

function blobOfDataURL(url) {
  const [head, b64] = url.split(",", 2);
  const type = head.slice(5).split(";")[0];
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function updateCoverage() {
  const c = ui.painter.coverage();
  const percent = c < 0.01 ? "under 1" : String(Math.round(c * 100));
  setText("mask-coverage", c === 0 ? "Nothing painted yet." : `${percent}% of the image marked for regeneration.`);
  if (c > 0 && ui.errorParam === "mask") clearError(); // "paint ... first" has been done
}

// --- modes, gallery, wiring ----------------------------------------------------------------------------

function setMode(mode) {
  ui.mode = mode;
  for (const name of ["generate", "edit"]) {
    const tab = $(`tab-${name}`);
    tab.setAttribute("aria-selected", String(name === mode));
    tab.tabIndex = name === mode ? 0 : -1;
    $(`panel-${name}`).hidden = name !== mode;
  }
  $("run").textContent = mode === "edit" ? "Edit" : "Generate";
  $("size").disabled = mode === "edit"; // an edit keeps the input's size
  document.body.dataset.mode = mode;
}

function renderGallery(items = gallery.load()) {
  $("gallery-empty").hidden = items.length > 0;
  gallery.render($("gallery"), items, {
    useForEdit: (it) => {
      setMode("edit");
      setEditInput(blobOfDataURL(it.image), `gallery image (seed ${it.seed})`);
      $("paint").scrollIntoView({ behavior: "smooth", block: "center" });
    },
    reuse: (it) => {
      $("prompt").value = it.prompt;
      $("seed").value = it.seed;
      if (it.steps != null) $("steps").value = it.steps;
      if (it.guidance_scale != null) $("guidance").value = it.guidance_scale;
      if (ui.sizes.includes(it.size)) $("size").value = it.size;
      $("prompt").focus();
    },
    remove: (it) => renderGallery(gallery.remove(it.id)),
  });
}

function wire() {
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    run(ui.mode === "edit" ? edit : generate);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      $("form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => ui.busy && ui.busy.abort());
  $("retry").addEventListener("click", () => ui.retry && ui.retry());
  $("dice").addEventListener("click", () => {
    $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
  });
  $("tab-generate").addEventListener("click", () => setMode("generate"));
  $("tab-edit").addEventListener("click", () => setMode("edit"));
  document.querySelector("[role=tablist]").addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
      const next = ui.mode === "edit" ? "generate" : "edit";
      setMode(next);
      $(`tab-${next}`).focus();
    }
  });
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", () => {
    setApiKey($("api-key").value.trim());
    ui.needKey = false;
    refreshStatus();
    if (!ui.sizes.length) loadModel();
  });
  $("edit-file").addEventListener("change", () => {
    const file = $("edit-file").files[0];
    if (file) setEditInput(file, file.name);
  });
  for (const id of ["tool-brush", "tool-eraser"]) {
    $(id).addEventListener("change", () => { ui.painter.erase = $("tool-eraser").checked; });
  }
  $("brush-size").addEventListener("input", () => {
    ui.painter.brush = Number($("brush-size").value);
    setText("brush-size-value", $("brush-size").value);
  });
  $("mask-clear").addEventListener("click", () => ui.painter.clear());
  $("mask-invert").addEventListener("click", () => ui.painter.invert());
  ui.painter.onchange = updateCoverage;
  $("gallery-clear").addEventListener("click", () => renderGallery(gallery.clear()));
}

wire();
setMode("generate");
renderGallery();
loadModel();
refreshStatus();
setInterval(refreshStatus, STATUS_EVERY_MS);
document.addEventListener("visibilitychange", refreshStatus);
