// WebUI for m2fp-service: uploads a photo to api/parse and shows the colour map, overlay and cutout.
// Relative URLs only, so the page works behind a path prefix and without internet.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let chosen = null;
const KEY_STORE = "m2fp-api-key";  // this tab only (sessionStorage), never a cookie

function text(el, value) { el.textContent = value; return el; }

// The API key, when the server requires one (M2FP_API_KEY), goes in the Authorization header.
function apiHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function loadInfo() {
  let res;
  try {
    res = await fetch("api/info", { headers: apiHeaders() });
    if (res.status === 401) {
      $("key-row").classList.remove("hidden");
      const wrong = $("api-key").value.trim() !== "";
      text($("model-meta"), wrong ? "API key refused: check it" : "this server requires an API key: enter it");
      $("api-key").focus();
      return;
    }
    info = await res.json();
  } catch (err) {
    text($("model-meta"), "cannot reach the server");
    return;
  }
  text($("version"), `m2fp-service ${info.version}`);
  const model = info.model ? `${info.model.file} · ${info.classes.length} classes · ${info.model.license}` : "no model";
  text($("model-meta"), `${model} · status: ${info.status}`);
  $("banner-untrained").classList.toggle("show", info.trained === false);
  if (info.trained === false) {
    text($("banner-untrained-detail"), info.warnings.find((w) => w.startsWith("UNTRAINED")) || "");
  }
  const notReady = info.status !== "ready";
  $("banner-notready").classList.toggle("show", notReady);
  if (notReady) text($("banner-notready"), `Model ${info.status}: ${info.detail || ""}`);
  $("key-row").classList.toggle("hidden", !info.api_key_required);
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  if (info.status === "loading") setTimeout(loadInfo, 1500);
  updateButton();
}

function updateButton() { $("go").disabled = !chosen; }

function choose(file) {
  chosen = file || null;
  text($("drop"), chosen ? `${chosen.name} (${(chosen.size / 1024).toFixed(0)} KB) — click Parse` :
    "Drop a photo here or click to choose one");
  updateButton();
}

function figure(title, b64, checker) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = b64.startsWith("blob:") ? b64 : `data:image/png;base64,${b64}`;
  img.alt = title;
  if (checker) img.className = "checker";
  fig.append(img, text(document.createElement("figcaption"), title));
  return fig;
}

function legend(classes, areas) {
  const box = $("legend");
  box.replaceChildren();
  const palette = (info && info.palette) || [];
  for (const name of classes) {
    const idx = info ? info.classes.indexOf(name) : -1;
    const rgb = palette[idx] || [0, 0, 0];
    const item = document.createElement("span");
    const sw = document.createElement("span");
    sw.className = "sw";
    sw.style.background = `rgb(${rgb.join(",")})`;
    const pixels = areas && areas[name] ? ` ${areas[name].toLocaleString()} px` : "";
    item.append(sw, document.createTextNode(name + pixels));
    box.append(item);
  }
}

async function parse() {
  if (!chosen) return;
  const outputs = [...document.querySelectorAll("input[name=out]:checked")].map((el) => el.value);
  const form = new FormData();
  form.append("image", chosen);
  const headers = apiHeaders();
  $("go").disabled = true;
  $("status").className = "";
  text($("status"), "parsing…");
  const started = performance.now();
  try {
    const res = await fetch(`api/parse?outputs=${encodeURIComponent(outputs.join(","))}`,
      { method: "POST", body: form, headers });
    const result = await res.json();
    if (result.code !== 0) throw new Error(`${res.status}: ${result.message}`);
    show(result.data, (performance.now() - started) / 1000);
    text($("status"), "");
  } catch (err) {
    $("status").className = "error";
    text($("status"), String(err.message || err));
  } finally {
    updateButton();
  }
}

function show(data, seconds) {
  const grid = $("images");
  grid.replaceChildren(figure("photo", URL.createObjectURL(chosen)), figure("colour map", data.result_image));
  if (data.overlay) grid.append(figure("overlay", data.overlay));
  if (data.cutout) grid.append(figure("cutout (transparent background)", data.cutout, true));
  legend(data.classes, data.areas);
  const people = data.people ? ` · ${data.people.length} people` : "";
  text($("summary"), `${data.classes.length} classes${people} · server ${data.inference_time.toFixed(2)} s · ` +
    `round trip ${seconds.toFixed(2)} s` + (info && info.trained === false ? " · UNTRAINED DEMO MODEL" : ""));
  $("results").classList.remove("hidden");
}

$("drop").addEventListener("click", () => $("file").click());
$("drop").addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
$("file").addEventListener("change", (e) => choose(e.target.files[0]));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  choose(e.dataTransfer.files[0]);
});
$("go").addEventListener("click", parse);
$("api-key").addEventListener("change", loadInfo);
$("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
loadInfo();
