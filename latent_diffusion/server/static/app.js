// The web page: a thin client of the same /sdapi/v1 API that external tools use.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "/sdapi/v1";
let currentTab = "txt2img";
let initImage = null;  // HTMLImageElement of the img2img / inpaint / upscale input
let busy = false;
let switching = false;  // a model load requested from the page is in flight

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(API + path, options);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const detail = data && data.detail;
    const message = typeof detail === "string" ? detail
      : Array.isArray(detail) ? detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("\n")
      : response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return data;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function showWarnings(warnings) {
  $("warnings").textContent = (warnings || []).map((warning) => "warning: " + warning).join("\n");
  $("warnings").hidden = !(warnings && warnings.length);
}

// ------------------------------------------------------------------------------------------- tabs
function selectTab(name) {
  currentTab = name;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
  for (const element of document.querySelectorAll("[class*='for-']")) {
    element.hidden = !element.classList.contains("for-" + name);
  }
  $("generate").textContent = name === "upscale" ? "Upscale" : "Generate";
}

// ------------------------------------------------------------------------------------------- lists
async function loadLists() {
  const [samplers, schedulers, models, options, upscalers, latentModes] = await Promise.all([
    api("/samplers"), api("/schedulers"), api("/sd-models"), api("/options"), api("/upscalers"),
    api("/latent-upscale-modes")]);
  $("sampler_name").replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  $("sampler_name").value = "Euler a";
  $("scheduler").replaceChildren(...schedulers.map((s) => new Option(s.label, s.label)));
  $("scheduler").value = "Automatic";
  $("model").replaceChildren(...models.map((m) => new Option(m.model_name, m.title)));
  $("refiner_checkpoint").replaceChildren(new Option("None", ""), ...models.map((m) => new Option(m.model_name, m.title)));
  const current = models.find((m) => options.sd_model_checkpoint && options.sd_model_checkpoint.startsWith(m.filename));
  if (current) $("model").value = current.title;
  $("upscaler_1").replaceChildren(...upscalers.filter((u) => u.name !== "None").map((u) => new Option(u.name, u.name)));
  $("hr_upscaler").replaceChildren(...[...latentModes, ...upscalers].map((u) => new Option(u.name, u.name)));
  $("hr_upscaler").value = "Latent";
}

// ------------------------------------------------------------------------------------------- input image and mask
function setInitImage(src) {
  const image = new Image();
  image.onload = () => {
    initImage = image;
    for (const canvas of [$("init_canvas"), $("mask_canvas")]) {
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
    }
    $("init_canvas").getContext("2d").drawImage(image, 0, 0);
    // Sizes default to the image's own, rounded down to a multiple of 8.
    $("width").value = Math.max(8, image.naturalWidth - (image.naturalWidth % 8));
    $("height").value = Math.max(8, image.naturalHeight - (image.naturalHeight % 8));
  };
  image.src = src;
}

function canvasBase64(canvas) {
  return canvas.toDataURL("image/png").split(",")[1];
}

function maskBase64() {
  // White strokes on black: the mask the API expects (white = repaint).
  const strokes = $("mask_canvas");
  const mask = document.createElement("canvas");
  mask.width = strokes.width;
  mask.height = strokes.height;
  const context = mask.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, mask.width, mask.height);
  context.drawImage(strokes, 0, 0);
  return canvasBase64(mask);
}

function setupMaskDrawing() {
  const canvas = $("mask_canvas");
  const context = canvas.getContext("2d");
  let drawing = false;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  const paint = (event) => {
    if (!drawing) return;
    const [x, y] = point(event);
    const radius = Number($("brush").value) * canvas.width / 256;
    context.fillStyle = "#fff";
    context.beginPath();
    context.arc(x, y, Math.max(radius, 0.5), 0, 2 * Math.PI);
    context.fill();
  };
  canvas.addEventListener("pointerdown", (event) => { drawing = true; canvas.setPointerCapture(event.pointerId); paint(event); });
  canvas.addEventListener("pointermove", paint);
  canvas.addEventListener("pointerup", () => { drawing = false; });
  $("clear_mask").addEventListener("click", () => context.clearRect(0, 0, canvas.width, canvas.height));
}

// ------------------------------------------------------------------------------------------- requests
function numberField(id) {
  return Number($(id).value);
}

function generationRequest() {
  return {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value,
    steps: numberField("steps"), cfg_scale: numberField("cfg_scale"), seed: Math.trunc(numberField("seed")),
    width: numberField("width"), height: numberField("height"),
    batch_size: numberField("batch_size"), n_iter: numberField("n_iter"),
  };
}

// A1111's refiner: another listed model takes over at "switch at" (a fraction of the noise schedule).
function refinerRequest() {
  if (!$("refiner_checkpoint").value) return {};
  return { refiner_checkpoint: $("refiner_checkpoint").value, refiner_switch_at: numberField("refiner_switch_at") };
}

function hiresRequest() {
  if (!$("enable_hr").checked) return {};
  return {
    enable_hr: true, hr_upscaler: $("hr_upscaler").value, hr_scale: numberField("hr_scale"),
    hr_second_pass_steps: numberField("hr_second_pass_steps"), denoising_strength: numberField("hr_denoising_strength"),
    hr_resize_x: numberField("hr_resize_x"), hr_resize_y: numberField("hr_resize_y"),
  };
}

async function run() {
  if (currentTab !== "txt2img" && !initImage) throw new Error("choose an input image first");
  if (currentTab === "txt2img") {
    return api("/txt2img", { ...generationRequest(), ...hiresRequest(), ...refinerRequest(), ...controlnetRequest(false) });
  }
  const init = canvasBase64($("init_canvas"));
  if (currentTab === "upscale") {
    const result = await api("/extra-single-image", {
      image: init, upscaler_1: $("upscaler_1").value, upscaling_resize: numberField("upscaling_resize")});
    return { images: [result.image], info: JSON.stringify({ infotexts: [result.html_info] }) };
  }
  const body = { ...generationRequest(), ...controlnetRequest(true), init_images: [init],
                 denoising_strength: numberField("denoising_strength") };
  if (currentTab === "inpaint") Object.assign(body, { mask: maskBase64(), mask_blur: numberField("mask_blur") });
  else Object.assign(body, refinerRequest());
  return api("/img2img", body);
}

async function pollProgress() {
  while (busy) {
    try {
      const progress = await api("/progress");
      $("progress").value = progress.progress;
      $("progress-text").textContent = progress.textinfo || (progress.state.queue_length ? "waiting in queue" : "");
      if (progress.current_image) {
        $("preview").src = "data:image/png;base64," + progress.current_image;
        $("preview").hidden = false;
      }
    } catch (error) { /* the next poll retries */ }
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

async function generate(event) {
  event.preventDefault();
  if (busy) return;
  showError("");
  showWarnings([]);
  busy = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress-box").hidden = false;
  $("preview").hidden = true;
  $("progress").value = 0;
  const polling = pollProgress();
  try {
    const result = await run();
    const info = JSON.parse(result.info || "{}");
    if (info.interrupted) showError("interrupted");
    showWarnings(info.warnings);
    addResults(result.images, info.infotexts || []);
  } catch (error) {
    showError(error.message);
  } finally {
    busy = false;
    await polling;
    $("generate").disabled = switching;  // a model switch started meanwhile keeps it off until loaded
    $("interrupt").disabled = true;
    $("progress-box").hidden = true;
  }
}

// ------------------------------------------------------------------------------------------- gallery
function addResults(images, infotexts) {
  const template = $("result-template");
  const figures = images.map((b64, index) => {
    const figure = template.content.firstElementChild.cloneNode(true);
    const src = "data:image/png;base64," + b64;
    figure.querySelector("img").src = src;
    const text = infotexts[index] || "";
    figure.querySelector(".parameters").textContent = text;
    for (const button of figure.querySelectorAll("button[data-send]")) {
      button.addEventListener("click", () => {
        if (button.dataset.send === "parameters") return applyParameters(b64).catch((e) => showError(e.message));
        setInitImage(src);
        selectTab(button.dataset.send);
      });
    }
    return figure;
  });
  // Newest request first, its images in seed order.
  $("gallery").prepend(...figures);
}

// ------------------------------------------------------------------------------------------- PNG parameters
function applyParsed(parameters) {
  const fields = { "Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "CFG scale": "cfg_scale",
                   "Seed": "seed", "Size-1": "width", "Size-2": "height", "Denoising strength": "denoising_strength" };
  for (const [key, id] of Object.entries(fields)) {
    if (parameters[key] !== undefined && parameters[key] !== "") $(id).value = parameters[key];
  }
  applyHires(parameters);
  if (!parameters.Sampler) return;
  // No "Schedule type" means Automatic, as A1111 reads it.
  const [sampler, scheduler] = splitSampler(parameters.Sampler, parameters["Schedule type"] || "Automatic");
  if (hasOption("sampler_name", sampler)) $("sampler_name").value = sampler;
  if (hasOption("scheduler", scheduler)) $("scheduler").value = scheduler;
}

function applyHires(parameters) {
  const hires = parameters["Hires upscale"] !== undefined || parameters["Hires resize-1"] !== undefined;
  $("enable_hr").checked = hires;
  if (!hires) return;
  const fields = { "Hires upscale": "hr_scale", "Hires steps": "hr_second_pass_steps",
                   "Denoising strength": "hr_denoising_strength", "Hires resize-1": "hr_resize_x",
                   "Hires resize-2": "hr_resize_y" };
  const defaults = { hr_second_pass_steps: "0", hr_resize_x: "0", hr_resize_y: "0" };
  for (const [key, id] of Object.entries(fields)) {
    const value = parameters[key] !== undefined ? parameters[key] : defaults[id];
    if (value !== undefined) $(id).value = value;
  }
  const upscaler = parameters["Hires upscaler"] || "Latent";
  if (hasOption("hr_upscaler", upscaler)) $("hr_upscaler").value = upscaler;
}

function hasOption(id, value) {
  return [...$(id).options].some((o) => o.value === value);
}

// "DPM++ 2M Karras" (written before schedulers were chosen apart) is the sampler "DPM++ 2M" with "Karras".
function splitSampler(sampler, scheduler) {
  if (hasOption("sampler_name", sampler)) return [sampler, scheduler];
  for (const option of $("scheduler").options) {
    const suffix = " " + option.value;
    if (sampler.endsWith(suffix)) return [sampler.slice(0, -suffix.length), option.value];
  }
  return [sampler, scheduler];
}

async function applyParameters(b64) {
  // The result PNG carries its parameters; the server parses them, so page and API agree on the format.
  const info = await api("/png-info", { image: b64 });
  applyParsed(info.parameters);
}

function readDroppedFile(file) {
  const reader = new FileReader();
  reader.onload = async () => {
    const dataUrl = reader.result;
    try {
      const info = await api("/png-info", { image: dataUrl.split(",")[1] });
      $("pnginfo").hidden = false;
      $("pnginfo").open = true;
      $("pnginfo-text").textContent = info.info || "(this image holds no generation parameters)";
      if (info.info) applyParsed(info.parameters);
      if (currentTab !== "txt2img") setInitImage(dataUrl);
    } catch (error) {
      showError(error.message);
    }
  };
  reader.readAsDataURL(file);
}

// ------------------------------------------------------------------------------------------- wiring
function main() {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => selectTab(button.dataset.tab));
  }
  $("settings").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", () => api("/interrupt", {}).catch((e) => showError(e.message)));
  $("model").addEventListener("change", async () => {
    switching = true;
    $("generate").disabled = true;
    try { await api("/options", { sd_model_checkpoint: $("model").value }); } catch (e) { showError(e.message); }
    switching = false;
    $("generate").disabled = busy;
  });
  $("init_file").addEventListener("change", () => {
    const file = $("init_file").files[0];
    if (file) setInitImage(URL.createObjectURL(file));
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) readDroppedFile(file);
  });
  setupMaskDrawing();
  setupControlnet(showError);
  selectTab("txt2img");
  loadLists().catch((error) => showError("could not reach the server: " + error.message));
}

main();
