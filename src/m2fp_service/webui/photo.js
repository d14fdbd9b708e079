// The Photo view: a photo in, its parsing explored (layout, opacity, classes, people), downloads,
// and the Compose panel (compose.js) fed from the same photo and selections.

import { errorText, parsePhoto } from "./api.js";
import { setUpCompose } from "./compose.js";
import { $, base64ToBlob, el, formatBytes, say, setDownload, stem, UrlSlot } from "./dom.js";
import { checkFile, setUpIntake } from "./intake.js";
import { decodeGrey, histogram, paint, union } from "./render.js";

const PARSE_OUTPUTS = ["label", "areas"]; // person masks only when the People list is asked for

const state = {
  info: null,
  file: null,
  shownFile: null, // the photo whose result is on screen
  labelSet: "cihp",
  result: null, // {data, labels, counts, classes, palette, cached, seconds, bytes}
  people: null, // [{id, score, box_xyxy, area, parts, mask: Uint8Array}] once asked for
  peopleCount: null,
  selectedClasses: new Set(),
  selectedPeople: new Set(),
  hover: { cls: null, person: null }, // under the mouse
  focus: { cls: null, person: null }, // under the keyboard focus
  parseAbort: null,
  peopleAbort: null,
  peoplePromise: null,
};

const urls = { photo: new UrlSlot(), color: new UrlSlot(), label: new UrlSlot(), json: new UrlSlot() };
let compose = null;

function percent(pixels, total) {
  const value = (100 * pixels) / total;
  return value >= 10 ? `${value.toFixed(0)}%` : value >= 0.1 ? `${value.toFixed(1)}%` : "<0.1%";
}

function labelSetOf(name) {
  const sets = state.info?.label_sets || {};
  return sets[name] || { classes: state.info?.classes || [], palette: state.info?.palette || [] };
}

// ---- receiving a photo and parsing it ------------------------------------------------------------------

async function receive(file) {
  const problem = checkFile(file, state.info?.limits?.max_upload_bytes);
  if (problem) {
    say($("status"), "");
    say($("error"), problem);
    return;
  }
  state.file = file;
  state.result = null; // the old result stays on screen until the new one replaces it
  state.people = null;
  state.peopleCount = null;
  state.selectedPeople.clear();
  state.selectedClasses.clear();
  state.peopleAbort?.abort();
  state.peoplePromise = null;
  $("drop-title").textContent = `${file.name || "Pasted image"} (${formatBytes(file.size)}) — choose another photo`;
  renderPeople();
  compose.reset();
  await parse();
}

/** Parses the current photo in the current label set; the latest call wins, older ones are aborted. */
async function parse() {
  const file = state.file;
  if (!file) return;
  state.parseAbort?.abort();
  const abort = new AbortController();
  state.parseAbort = abort;
  say($("error"), "");
  say($("status"), `Parsing ${file.name || "the pasted image"}…`, { busy: true });
  try {
    const reply = await parsePhoto(file, { outputs: PARSE_OUTPUTS, labels: state.labelSet, signal: abort.signal });
    const labels = await decodeGrey(base64ToBlob(reply.data.label_map, "image/png"));
    if (abort.signal.aborted) return;
    const set = labelSetOf(state.labelSet);
    state.result = { ...reply, labels, counts: histogram(labels.values), classes: set.classes, palette: set.palette };
    state.selectedClasses.clear();
    const newPhoto = state.shownFile !== file;
    if (newPhoto) {
      state.shownFile = file;
      $("photo-img").src = urls.photo.set(file);
      $("photo-img").alt = `The uploaded photo, ${file.name || "pasted image"}`;
    }
    showResult();
    say($("status"), `Parsed ${file.name || "the pasted image"}.`);
    if (newPhoto) compose.refresh({ now: true }); // a first preview: everyone, transparent background
    else compose.refresh({ because: "classes" }); // new label set: the class selection was cleared
  } catch (err) {
    if (err.name === "AbortError" || abort.signal.aborted) return;
    say($("status"), "");
    say($("error"), errorText(file, err));
    if (state.shownFile !== file) { // what is on screen belongs to another photo
      $("results").hidden = true;
      $("compose").hidden = true;
    }
  } finally {
    if (state.parseAbort === abort) state.parseAbort = null;
  }
}

// ---- the result ----------------------------------------------------------------------------------------

function showResult() {
  const { labels, classes, palette } = state.result;
  const total = labels.width * labels.height;
  const legend = $("legend");
  legend.replaceChildren();
  state.result.counts.forEach((pixels, id) => {
    if (!pixels) return;
    const swatch = el("span", { className: "sw", "aria-hidden": "true" });
    swatch.style.background = `rgb(${(palette[id] || [0, 0, 0]).join(",")})`; // CSSOM: allowed by the CSP
    const button = el("button", { type: "button", "aria-pressed": "false", dataset: { cls: String(id) } },
      swatch, el("span", { className: "name" }, classes[id] ?? `class ${id}`),
      el("span", { className: "num" }, percent(pixels, total)));
    button.title = `${pixels.toLocaleString()} pixels`;
    legend.append(el("li", {}, button));
  });
  $("results").hidden = false;
  $("compose").hidden = false;
  summarise();
  downloads();
  repaint();
}

function summarise() {
  const { data, labels, cached, seconds } = state.result;
  const people = state.peopleCount === null ? "" : ` · ${state.peopleCount} ${state.peopleCount === 1 ? "person" : "people"}`;
  const untrained = state.info?.trained === false ? " · UNTRAINED DEMO MODEL" : "";
  $("summary").textContent = `${labels.width} × ${labels.height} px · ${data.classes.length} classes${people} · ` +
    `inference ${data.inference_time.toFixed(2)} s${cached ? " (cached)" : ""} · round trip ${seconds.toFixed(2)} s` +
    untrained;
}

function summaryJson() {
  const { data, labels } = state.result;
  const total = labels.width * labels.height;
  const areas = data.areas || {};
  return {
    file: state.file.name || null,
    width: labels.width,
    height: labels.height,
    label_set: state.labelSet,
    classes: data.classes,
    areas,
    area_percent: Object.fromEntries(Object.entries(areas).map(([k, v]) => [k, +(100 * v / total).toFixed(3)])),
    people: state.people ? state.people.map(({ mask, ...person }) => person) : undefined,
    inference_time: data.inference_time,
    model: state.info?.model?.file ?? null,
    trained: state.info?.trained ?? null,
  };
}

function downloads() {
  const { data } = state.result;
  const name = `${stem(state.file.name)}.${state.labelSet}`;
  setDownload($("dl-color"), urls.color, base64ToBlob(data.result_image, "image/png"), `${name}.color.png`);
  setDownload($("dl-label"), urls.label, base64ToBlob(data.label_map, "image/png"), `${name}.label.png`);
  const json = new Blob([JSON.stringify(summaryJson(), null, 2)], { type: "application/json" });
  setDownload($("dl-json"), urls.json, json, `${name}.json`);
}

function repaint() {
  if (!state.result) return;
  const { labels, palette } = state.result;
  const personId = state.hover.person ?? state.focus.person;
  const person = personId !== null && state.people ? state.people.find((p) => p.id === personId) : null;
  const chosen = state.people ? state.people.filter((p) => state.selectedPeople.has(p.id)) : [];
  paint($("parsing"), labels, palette, {
    classes: state.selectedClasses,
    region: union(chosen.map((p) => p.mask)),
    hoverClass: state.hover.cls ?? state.focus.cls,
    hoverRegion: person ? person.mask : null,
    hoverBox: person ? person.box_xyxy : null,
  });
  for (const button of $("legend").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(state.selectedClasses.has(Number(button.dataset.cls))));
  }
  for (const button of $("people").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(state.selectedPeople.has(Number(button.dataset.person))));
  }
  const shown = [...state.selectedClasses].map((c) => state.result.classes[c]).join(", ");
  $("parsing").setAttribute("aria-label", shown ? `Parsing showing only: ${shown}` : "Parsing: every class in its colour");
}

// ---- people: fetched on request (their masks are most of the payload) -----------------------------------

/** Fetches the people with their masks once per photo; the server answers from its cache. */
export function ensurePeople() {
  if (state.people || !state.file) return Promise.resolve(state.people);
  if (state.peoplePromise) return state.peoplePromise;
  const file = state.file;
  const abort = new AbortController();
  state.peopleAbort = abort;
  $("people-load").setAttribute("aria-busy", "true"); // not disabled: that would drop a keyboard user's focus
  say($("status"), "Finding people…", { busy: true });
  state.peoplePromise = (async () => {
    try {
      const reply = await parsePhoto(file, { outputs: ["people"], labels: state.labelSet, signal: abort.signal });
      const people = await Promise.all(reply.data.people.map(async (person) => {
        const { values } = await decodeGrey(base64ToBlob(person.mask, "image/png"));
        for (let i = 0; i < values.length; i += 1) values[i] = values[i] > 127 ? 1 : 0;
        return { ...person, mask: values };
      }));
      if (abort.signal.aborted || file !== state.file) return null;
      state.people = people;
      state.peopleCount = people.length;
      say($("status"), `Found ${people.length} ${people.length === 1 ? "person" : "people"}.`);
      const keyboardWasThere = document.activeElement === $("people-load");
      renderPeople(); // hides the button: keep a keyboard user's focus in the list
      if (keyboardWasThere) $("people").querySelector("button")?.focus();
      if (state.result) {
        repaint();
        summarise();
        downloads();
      }
      return people;
    } catch (err) {
      if (err.name !== "AbortError" && !abort.signal.aborted) {
        say($("status"), "");
        say($("error"), errorText(file, err));
      }
      return null;
    } finally {
      if (file === state.file) {
        state.peoplePromise = null;
        $("people-load").removeAttribute("aria-busy");
      }
    }
  })();
  return state.peoplePromise;
}

function renderPeople() {
  const list = $("people");
  list.replaceChildren();
  $("people-load").hidden = state.people !== null;
  $("people-clear").hidden = !state.people?.length;
  if (!state.people) return;
  if (!state.people.length) list.append(el("li", { className: "hint" }, "No people found."));
  for (const person of state.people) {
    const total = person.mask.length;
    const button = el("button", { type: "button", "aria-pressed": "false", dataset: { person: String(person.id) } },
      el("span", { className: "name" }, `Person ${person.id + 1}`),
      el("span", { className: "num" }, `score ${person.score.toFixed(2)} · ${percent(person.area, total)}`));
    button.title = `id ${person.id} (keep=people:${person.id}), box ${person.box_xyxy.join(", ")}`;
    list.append(el("li", {}, button));
  }
}

export function peopleCountKnown(count) {
  if (state.peopleCount === null && count !== null && state.result) {
    state.peopleCount = count;
    summarise();
  }
}

// ---- wiring ---------------------------------------------------------------------------------------------

/** Highlight on mouse hover, and on keyboard focus (not on the focus a click leaves behind). */
function highlightOn(list, key, attribute) {
  const idOf = (node) => {
    const button = node instanceof Element ? node.closest("button") : null;
    return button && list.contains(button) ? Number(button.dataset[attribute]) : null;
  };
  const set = (kind, id) => {
    if (state[kind][key] === id) return;
    state[kind][key] = id;
    repaint();
  };
  list.addEventListener("mouseover", (e) => set("hover", idOf(e.target)));
  list.addEventListener("mouseout", (e) => { if (idOf(e.relatedTarget) === null) set("hover", null); });
  list.addEventListener("focusin", (e) => set("focus", e.target.matches(":focus-visible") ? idOf(e.target) : null));
  list.addEventListener("focusout", () => set("focus", null));
}

function toggleOn(list, selection, attribute, changed) {
  list.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    const id = Number(button.dataset[attribute]);
    if (selection.has(id)) selection.delete(id);
    else selection.add(id);
    repaint();
    changed();
  });
}

function pointerInfo(event) {
  if (!state.result) return;
  const canvas = $("parsing");
  const box = canvas.getBoundingClientRect();
  const { width, height, values } = state.result.labels;
  const x = Math.floor(((event.clientX - box.left) / box.width) * width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * height);
  if (x < 0 || y < 0 || x >= width || y >= height) return;
  const i = y * width + x;
  const people = (state.people || []).filter((p) => p.mask[i]).map((p) => `person ${p.id + 1}`);
  $("pointer-info").textContent = `(${x}, ${y}): ${state.result.classes[values[i]]}` +
    (people.length ? ` · ${people.join(", ")}` : "");
}

function setLayout() {
  const overlay = document.querySelector("input[name=layout]:checked").value === "overlay";
  $("stage").classList.toggle("overlay", overlay);
  $("stage").classList.toggle("side", !overlay);
  $("opacity-field").hidden = !overlay;
  const opacity = Number($("opacity").value);
  $("opacity-out").textContent = `${opacity}%`;
  $("parsing").style.opacity = overlay ? String(opacity / 100) : "1"; // CSSOM: allowed by the CSP
}

export function setUpPhotoView(info) {
  state.info = info;
  const select = $("labels");
  const sets = Object.entries(info.label_sets || { cihp: { description: "CIHP" } });
  select.replaceChildren(...sets.map(([name, set]) => el("option", { value: name, title: set.description }, name)));
  select.value = state.labelSet;
  if (info.limits?.max_upload_bytes) $("max-size").textContent = formatBytes(info.limits.max_upload_bytes);

  compose = setUpCompose({
    file: () => state.file,
    labelSet: () => state.labelSet,
    chosenPeople: () => [...state.selectedPeople].sort((a, b) => a - b),
    chosenClasses: () => (state.result ? [...state.selectedClasses].sort((a, b) => a - b)
      .map((c) => state.result.classes[c]) : []),
    ensurePeople,
    peopleCount: peopleCountKnown,
  });
  setUpIntake({ button: $("drop"), input: $("file"), onFile: receive });
  highlightOn($("legend"), "cls", "cls");
  highlightOn($("people"), "person", "person");
  toggleOn($("legend"), state.selectedClasses, "cls", () => compose.refresh({ because: "classes" }));
  toggleOn($("people"), state.selectedPeople, "person", () => compose.refresh({ because: "people" }));
  $("show-all").addEventListener("click", () => {
    state.selectedClasses.clear();
    repaint();
    compose.refresh({ because: "classes" });
  });
  $("people-clear").addEventListener("click", () => {
    state.selectedPeople.clear();
    repaint();
    compose.refresh({ because: "people" });
  });
  $("people-load").addEventListener("click", ensurePeople);
  // Enter in the API key field: try again the photo the server refused.
  $("key-row").addEventListener("submit", () => { if (state.file && !state.result) void parse(); });
  $("parsing").addEventListener("pointermove", pointerInfo);
  for (const radio of document.querySelectorAll("input[name=layout]")) radio.addEventListener("change", setLayout);
  $("opacity").addEventListener("input", setLayout);
  select.addEventListener("change", async () => {
    // Person masks and ids do not depend on the label set, their parts do: fetch them again if shown.
    const hadPeople = state.people !== null;
    state.labelSet = select.value;
    state.selectedClasses.clear();
    state.people = null;
    state.peopleAbort?.abort();
    state.peoplePromise = null;
    renderPeople();
    await parse();
    if (hadPeople && state.result) await ensurePeople();
  });
  setLayout();
}
