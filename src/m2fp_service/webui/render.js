// Client-side views of a parsing: the label map and person masks decoded once, every view change
// (class filter, person filter, highlight) repainted on a canvas without a round trip.

const DIMMED = 60; // alpha of pixels outside a highlight

/** Decodes a single-channel PNG (label map or mask) to {width, height, values: Uint8Array(width * height)}. */
export async function decodeGrey(blob) {
  // No colour management, no premultiplication: the pixel values are class ids, not colours.
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const { width, height } = bitmap;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const values = new Uint8Array(width * height);
  for (let i = 0, j = 0; i < values.length; i += 1, j += 4) values[i] = rgba[j];
  return { width, height, values };
}

/** Pixels per class id: Uint32Array(256). */
export function histogram(values) {
  const counts = new Uint32Array(256);
  for (let i = 0; i < values.length; i += 1) counts[values[i]] += 1;
  return counts;
}

/** Palette [[r, g, b], ...] -> Uint32Array(256) of opaque RGBA words in the platform's byte order. */
function colourWords(palette) {
  const words = new Uint32Array(256);
  const bytes = new Uint8Array(words.buffer);
  palette.forEach(([r, g, b], i) => bytes.set([r, g, b, 255], i * 4));
  return words;
}

/**
 * Paints the parsing on `canvas`.
 *
 * @param {HTMLCanvasElement} canvas sized to the label map by this function
 * @param {{width: number, height: number, values: Uint8Array}} labels the label map
 * @param {number[][]} palette RGB per class id
 * @param {object} view
 * @param {Set<number>} view.classes class ids to show; empty: every class except background
 * @param {Uint8Array|null} view.region 1 where the shown people are; null: everywhere
 * @param {number|null} view.hoverClass class id to emphasise (others dimmed)
 * @param {Uint8Array|null} view.hoverRegion a person's mask to emphasise (outside dimmed)
 * @param {number[]|null} view.hoverBox [x0, y0, x1, y1) outlined
 */
export function paint(canvas, labels, palette, view) {
  const { width, height, values } = labels;
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  const out = new Uint32Array(image.data.buffer);
  const colours = colourWords(palette);
  const shown = new Uint8Array(256);
  if (view.classes.size) for (const c of view.classes) shown[c] = 1;
  else shown.fill(1, 1); // background is left clear unless asked for
  const dim = new Uint32Array(256); // the same colours at DIMMED alpha
  const dimBytes = new Uint8Array(dim.buffer);
  dimBytes.set(new Uint8Array(colours.buffer));
  for (let i = 3; i < dimBytes.length; i += 4) dimBytes[i] = DIMMED;
  const { region, hoverRegion } = view;
  const hoverClass = view.hoverClass ?? -1;
  const highlighting = hoverClass >= 0 || hoverRegion !== null;
  for (let i = 0; i < values.length; i += 1) {
    const c = values[i];
    if (!shown[c] || (region !== null && !region[i])) continue; // stays transparent
    const emphasised = !highlighting || c === hoverClass || (hoverRegion !== null && hoverRegion[i] === 1);
    out[i] = emphasised ? colours[c] : dim[c];
  }
  ctx.putImageData(image, 0, 0);
  if (view.hoverBox) {
    const [x0, y0, x1, y1] = view.hoverBox;
    const line = Math.max(2, Math.round(Math.max(width, height) / 300));
    ctx.lineWidth = line;
    ctx.strokeStyle = "#ffd400";
    ctx.strokeRect(x0 + line / 2, y0 + line / 2, x1 - x0 - line, y1 - y0 - line);
  }
}

/** 1 where any of `masks` is 1 (Uint8Array each), or null when there are none. */
export function union(masks) {
  if (!masks.length) return null;
  const out = new Uint8Array(masks[0].length);
  for (const mask of masks) for (let i = 0; i < mask.length; i += 1) out[i] |= mask[i];
  return out;
}
