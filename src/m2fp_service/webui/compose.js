// The Compose panel: POST api/background with the photo and the controls, previewed live.
// Control changes are debounced; a new request aborts the one in flight, so only the latest shows.
// The server keeps the photo's parsing in its cache, so a recomposition skips inference.

import { ApiError, composePhoto, errorText } from "./api.js";
import { $, debounce, formatBytes, say, setDownload, stem, UrlSlot } from "./dom.js";
import { checkFile } from "./intake.js";

const DEBOUNCE_MS = 300;
const SUFFIX = { png: "png", webp: "webp", jpeg: "jpg" };

/**
 * @param {object} ctx what the Photo view knows
 * @param {() => File|null} ctx.file the photo
 * @param {() => string} ctx.labelSet the label set (class names of keep=classes:...)
 * @param {() => number[]} ctx.chosenPeople person ids selected in the People list
 * @param {() => string[]} ctx.chosenClasses class names selected in the legend
 * @param {() => Promise<unknown>} ctx.ensurePeople loads the People list
 * @param {(count: number|null) => void} ctx.peopleCount told the number of people (X-People)
 */
export function setUpCompose(ctx) {
  const form = $("compose-form");
  const preview = $("composed");
  const previewUrl = new UrlSlot();
  const downloadUrl = new UrlSlot();
  let inFlight = null;
  let retryTimer = null;

  const value = (name) => form.elements[name].value;
  const checked = (name) => form.elements[name].checked;

  /** The request's fields, or {problem} when the controls do not make a request yet. */
  function params() {
    const keepChoice = value("keep");
    let keep = keepChoice;
    if (keepChoice === "chosen-people") {
      const ids = ctx.chosenPeople();
      if (!ids.length) return { problem: "Select one or more people in the People list above." };
      keep = `people:${ids.join(",")}`;
    } else if (keepChoice === "chosen-classes") {
      const names = ctx.chosenClasses();
      if (!names.length) return { problem: "Select one or more classes in the Classes list above." };
      keep = `classes:${names.join(",")}`;
    }
    const mode = value("mode");
    const backdrop = $("bg-file").files[0] || null;
    if (mode === "image" && !backdrop) return { problem: "Choose a background picture." };
    if (mode === "image" && checkFile(backdrop, null)) return { problem: `Background: ${checkFile(backdrop, null)}` };
    const fields = { keep, mode, invert: String(checked("invert")), refine: String(checked("refine")),
                     feather: value("feather"), format: value("format"), labels: ctx.labelSet() };
    if (mode === "blur") fields.blur = value("blur");
    if (mode === "color") fields.color = value("color");
    if (mode === "pixelate") fields.block = value("block");
    return { fields, backdrop: mode === "image" ? backdrop : null };
  }

  /** Shows only the fields of the chosen background mode; no JPEG for a transparent background. */
  function syncControls() {
    const mode = value("mode");
    for (const field of form.querySelectorAll("[data-mode]")) field.hidden = field.dataset.mode !== mode;
    const jpeg = form.elements.format.querySelector("option[value=jpeg]");
    jpeg.disabled = mode === "transparent";
    if (jpeg.disabled && value("format") === "jpeg") form.elements.format.value = "png";
    for (const name of ["blur", "block", "feather"]) $(`${name}-out`).textContent = value(name);
  }

  async function run() {
    clearTimeout(retryTimer);
    const file = ctx.file();
    if (!file) return;
    inFlight?.abort();
    inFlight = null;
    say($("compose-error"), "");
    const request = params();
    if (request.problem) {
      say($("compose-status"), request.problem);
      return;
    }
    const abort = new AbortController();
    inFlight = abort;
    say($("compose-status"), "Composing…", { busy: true });
    try {
      const reply = await composePhoto(file, request.fields, request.backdrop, abort.signal);
      if (inFlight !== abort) return; // a newer request owns the preview
      preview.src = previewUrl.set(reply.blob);
      const { fields } = request;
      const name = `${stem(file.name)}.${fields.mode}.${SUFFIX[fields.format]}`;
      setDownload($("dl-composed"), downloadUrl, reply.blob, name);
      $("composed-caption").textContent = `keep=${fields.keep}${fields.invert === "true" ? " (inverted)" : ""} · ` +
        `${fields.mode} · ${fields.format.toUpperCase()} ${formatBytes(reply.blob.size)}`;
      preview.alt = `Preview of the composed picture: ${$("composed-caption").textContent}`;
      say($("compose-status"), `Composed in ${reply.seconds.toFixed(2)} s` +
        (reply.cached ? " (parsing from the server's cache)." : "."));
      preview.dataset.request = JSON.stringify(fields); // what the preview shows (read by the tests)
      ctx.peopleCount(reply.people);
    } catch (err) {
      if (err.name === "AbortError" || abort.signal.aborted) return;
      say($("compose-status"), "");
      if (err instanceof ApiError && err.status === 503 && err.retryAfter !== null) {
        say($("compose-status"), `The server is busy; trying again in ${err.retryAfter} s…`, { busy: true });
        retryTimer = setTimeout(run, err.retryAfter * 1000);
      } else {
        say($("compose-error"), errorText(file, err));
      }
    } finally {
      if (inFlight === abort) inFlight = null;
    }
  }

  const later = debounce(run, DEBOUNCE_MS);

  form.addEventListener("submit", (e) => e.preventDefault());
  form.addEventListener("input", () => { syncControls(); later(); });
  form.addEventListener("change", (e) => {
    syncControls();
    if (e.target.name === "keep" && e.target.value === "chosen-people") void ctx.ensurePeople();
    if (e.target.type !== "range") later(); // ranges already fired "input"
  });
  syncControls();

  return {
    /** A new photo: forget the old preview and any request for it. */
    reset() {
      clearTimeout(retryTimer);
      inFlight?.abort();
      inFlight = null;
      previewUrl.clear();
      preview.removeAttribute("src");
      delete preview.dataset.request;
      setDownload($("dl-composed"), downloadUrl, null);
      $("composed-caption").textContent = "Composed picture";
      say($("compose-status"), "");
      say($("compose-error"), "");
    },
    /** Something the composition may depend on changed. */
    refresh({ now = false, because = null } = {}) {
      const keep = value("keep");
      if (because === "classes" && keep !== "chosen-classes") return;
      if (because === "people" && keep !== "chosen-people") return;
      if (now) void run();
      else later();
    },
  };
}
