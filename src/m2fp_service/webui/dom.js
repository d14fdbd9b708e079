// Small DOM helpers shared by the views. No framework, no build step.

export const $ = (id) => document.getElementById(id);

/** Creates an element: el("li", {className: "x", dataset: {id: 1}}, child, "text"). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

/** Shows a message in a status (role=status) or error (role=alert) element; "" clears it. */
export function say(node, message, { busy = false } = {}) {
  node.textContent = message;
  node.classList.toggle("busy", busy && Boolean(message));
}

/** One object URL at a time: setting a new blob revokes the previous URL (no leaked blobs). */
export class UrlSlot {
  constructor() { this.url = null; }

  set(blob) {
    this.clear();
    this.url = URL.createObjectURL(blob);
    return this.url;
  }

  clear() {
    if (this.url) URL.revokeObjectURL(this.url);
    this.url = null;
  }
}

/** Points a download link at a blob (revoking what it pointed at before); null disables it. */
export function setDownload(link, slot, blob, filename) {
  if (!blob) {
    slot.clear();
    link.removeAttribute("href");
    return;
  }
  link.href = slot.set(blob);
  link.download = filename;
}

export function base64ToBlob(b64, type) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes], { type });
}

export function formatBytes(n) {
  if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(n >= 10 * 1024 * 1024 ? 0 : 1)} MB`;
  if (n >= 1024) return `${Math.round(n / 1024)} KB`;
  return `${n} bytes`;
}

/** The file name without its extension, safe for download names. */
export function stem(name) {
  const base = (name || "photo").replace(/\.[^.]*$/, "");
  return base.replace(/[^\w.-]+/g, "_").slice(0, 80) || "photo";
}

/** Calls fn at most once per `ms` of quiet (trailing edge). */
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
