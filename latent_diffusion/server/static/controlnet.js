// The ControlNet panel: one unit, sent as A1111's ControlNet extension takes it (alwayson_scripts).
"use strict";

let controlImage = null;  // base64 PNG of the chosen control image

async function controlnetApi(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(`${response.status}: ${data.detail || response.statusText}`);
  return data;
}

async function loadControlnetLists() {
  const [models, modules] = await Promise.all([controlnetApi("/controlnet/model_list"),
                                               controlnetApi("/controlnet/module_list")]);
  const select = document.getElementById("cn_model");
  select.replaceChildren(new Option("None", ""), ...models.model_list.map((m) => new Option(m, m)));
  document.getElementById("cn_module").replaceChildren(...modules.module_list.map((m) => new Option(m, m)));
  document.getElementById("controlnet").dataset.models = String(models.model_list.length);
}

// The unit of the panel, or {} when no ControlNet is chosen; img2img and inpaint may leave the image
// out (their input image controls then).
function controlnetRequest(hasInitImage) {
  const model = document.getElementById("cn_model").value;
  if (!model) return {};
  if (!controlImage && !hasInitImage) throw new Error("choose a control image for the ControlNet");
  const number = (id) => Number(document.getElementById(id).value);
  const unit = {
    enabled: true, model, module: document.getElementById("cn_module").value, image: controlImage,
    weight: number("cn_weight"), guidance_start: number("cn_start"), guidance_end: number("cn_end"),
    control_mode: document.getElementById("cn_mode").value, resize_mode: document.getElementById("cn_resize").value,
    pixel_perfect: true,
  };
  return { alwayson_scripts: { controlnet: { args: [unit] } } };
}

async function previewControlMap() {
  if (!controlImage) throw new Error("choose a control image first");
  const result = await controlnetApi("/controlnet/detect", {
    controlnet_module: document.getElementById("cn_module").value, controlnet_input_images: [controlImage]});
  const preview = document.getElementById("cn_preview");
  preview.src = "data:image/png;base64," + result.images[0];
  preview.hidden = false;
}

function setupControlnet(showError) {
  document.getElementById("cn_file").addEventListener("change", () => {
    const file = document.getElementById("cn_file").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => { controlImage = reader.result.split(",")[1]; };
    reader.readAsDataURL(file);
  });
  document.getElementById("cn_preview_button").addEventListener(
    "click", () => previewControlMap().catch((error) => showError(error.message)));
  loadControlnetLists().catch((error) => showError("could not list ControlNets: " + error.message));
}
