// m2fp-service WebUI entry: model information and banners, the API key, and the views.
// Each view is a <section class="view" data-view="NAME"> with a link to #NAME in the "Views" nav and
// a set-up function below; a new view (e.g. Live) adds those three things and nothing else changes.

import { ApiError, getInfo, setApiKey } from "./api.js";
import { $, say } from "./dom.js";
import { setUpPhotoView } from "./photo.js";

const VIEWS = {
  photo: setUpPhotoView,
};
const ready = new Set();
let info = null;

function showView() {
  const wanted = location.hash.slice(1);
  const name = wanted in VIEWS ? wanted : "photo";
  for (const section of document.querySelectorAll("section.view")) section.hidden = section.dataset.view !== name;
  for (const link of $("views-nav").querySelectorAll("a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (info && !ready.has(name)) {
    ready.add(name);
    VIEWS[name](info);
  }
}

function showInfo() {
  $("version").textContent = `m2fp-service ${info.version}`;
  const model = info.model ? `${info.model.file} · ${info.classes.length} classes · ${info.model.license}` : "no model";
  $("model-meta").textContent = `${model} · status: ${info.status}`;
  $("banner-untrained").hidden = info.trained !== false;
  if (info.trained === false) {
    $("banner-untrained-detail").textContent = info.warnings.find((w) => w.startsWith("UNTRAINED")) || "";
  }
  $("banner-notready").hidden = info.status === "ready";
  if (info.status !== "ready") $("banner-notready").textContent = `Model ${info.status}: ${info.detail || ""}`;
  if (info.api_key_required) $("key-row").hidden = false;
}

async function loadInfo() {
  try {
    info = await getInfo();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      // Every /api/* route needs the key on this server, /api/info too: ask for it, then load again.
      info = null;
      $("model-meta").textContent = "this server requires an API key: enter it above";
      $("key-row").hidden = false;
      $("api-key").focus();
      return;
    }
    $("model-meta").textContent = "cannot reach the server";
    say($("error"), `Cannot load the model information: ${err.message}. Reload the page to try again.`);
    return;
  }
  showInfo();
  showView();
  if (info.status === "loading") setTimeout(refreshInfo, 1500);
}

async function refreshInfo() {
  try { info = await getInfo(); } catch { return; }
  showInfo();
  if (info.status === "loading") setTimeout(refreshInfo, 1500);
}

$("api-key").addEventListener("input", (e) => setApiKey(e.target.value));
$("key-row").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!info) void loadInfo(); // the key was needed for the model information itself
});
window.addEventListener("m2fp:unauthorized", () => {
  $("key-row").hidden = false;
  if (document.activeElement !== $("api-key")) $("api-key").focus({ preventScroll: false });
});
window.addEventListener("hashchange", showView);
void loadInfo();
