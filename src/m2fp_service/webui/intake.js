// Getting a photo in: the drop-zone button (click, Enter, Space), drag and drop, paste, and the
// client-side check of type and size. The server checks again and its message is shown when it refuses.

import { formatBytes } from "./dom.js";

const TYPES = { "image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WebP", "image/bmp": "BMP",
                "image/x-ms-bmp": "BMP" };
const EXTENSIONS = /\.(jpe?g|png|webp|bmp)$/i;
export const ACCEPTED = "JPEG, PNG, WebP or BMP";

/** Why `file` cannot be sent ("" when it can). `maxBytes` from /api/info limits. */
export function checkFile(file, maxBytes) {
  if (!file) return "No file arrived: choose, drop or paste a photo.";
  const typeKnown = file.type in TYPES;
  if (!typeKnown && !(file.type === "" && EXTENSIONS.test(file.name))) {
    const kind = file.type ? `it is ${file.type}` : "its type is unknown";
    return `${file.name || "This file"} is not a ${ACCEPTED} image (${kind}).`;
  }
  if (file.size === 0) return `${file.name || "This file"} is empty.`;
  if (maxBytes && file.size > maxBytes) {
    return `${file.name || "This photo"} is ${formatBytes(file.size)}; this server accepts photos up to ` +
      `${formatBytes(maxBytes)}.`;
  }
  return "";
}

/** The first file in a DataTransfer (drop or paste), images first. */
function firstFile(transfer) {
  if (!transfer) return null;
  const files = [...(transfer.files || [])];
  return files.find((f) => f.type.startsWith("image/")) || files[0] || null;
}

/**
 * Wires the intake. `onFile(file)` is called with every file that arrives, checked or not
 * (the caller checks it, so one message path serves all three ways in).
 */
export function setUpIntake({ button, input, onFile }) {
  button.addEventListener("click", () => {
    input.value = ""; // choosing the same file again still fires "change"
    input.click();
  });
  input.addEventListener("change", () => { if (input.files.length) onFile(input.files[0]); });

  // Drag and drop anywhere on the drop zone; the page itself must not navigate to a dropped file.
  let depth = 0;
  button.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; button.classList.add("over"); });
  button.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) button.classList.remove("over"); });
  button.addEventListener("dragover", (e) => { e.preventDefault(); e.dataTransfer.dropEffect = "copy"; });
  button.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    button.classList.remove("over");
    onFile(firstFile(e.dataTransfer));
  });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  // Paste an image from the clipboard anywhere on the page (but not into a text field).
  document.addEventListener("paste", (e) => {
    const target = e.target;
    if (target instanceof HTMLInputElement && target.type !== "file") return;
    const file = firstFile(e.clipboardData);
    if (!file) return;
    e.preventDefault();
    onFile(file);
  });
}
