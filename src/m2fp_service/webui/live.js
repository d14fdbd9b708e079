// Live page: the webcam's frames go to /api/live over a WebSocket; the composed frames come back and are
// drawn on a canvas. At most two frames are in flight: the server keeps only the newest waiting frame,
// so the picture stays current however slow the machine. Relative URLs only.
"use strict";

const $ = (id) => document.getElementById(id);
const IN_FLIGHT = 2;

let stream = null;
let socket = null;
let inFlight = 0;
let frames = 0;
let sentAt = new Map(); // send order -> performance.now(), for the frames not answered yet
let sentCount = 0;
let rtts = [];
let fpsWindow = [];
let pendingHeader = null;
let info = null;

function wsUrl(path, params) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null) url.searchParams.set(k, v);
  return url.toString();
}

function say(text) { $("live-status").textContent = text; }
function fail(text) { $("live-error").textContent = text; }

function options() {
  const [w, h] = $("live-size").value.split("x").map(Number);
  const mode = $("live-mode").value;
  return {
    width: w, height: h,
    params: {
      mode, keep: $("live-keep").value, invert: $("live-invert").checked ? "true" : "",
      blur: $("live-blur").value, color: $("live-color").value,
      // Transparent frames need alpha: PNG; the rest travel as JPEG (smaller, faster to encode).
      format: mode === "transparent" ? "png" : "jpeg", quality: "80",
      session: $("live-session").value.trim(), api_key: $("live-key").value,
    },
  };
}

function percentile(values, p) {
  if (!values.length) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

function showStats(header) {
  frames += 1;
  const now = performance.now();
  fpsWindow.push(now);
  while (fpsWindow.length && now - fpsWindow[0] > 2000) fpsWindow.shift();
  $("stat-frames").textContent = String(frames);
  if (fpsWindow.length > 1) {
    $("stat-fps").textContent = ((fpsWindow.length - 1) * 1000 / (now - fpsWindow[0])).toFixed(1);
  }
  $("stat-rtt").textContent = `${percentile(rtts, 0.5).toFixed(0)} / ${percentile(rtts, 0.95).toFixed(0)} ms`;
  $("stat-server").textContent = `${header.server_ms} ms`;
  $("stat-dropped").textContent = String(header.dropped);
  $("stat-parts").textContent = header.parts_age_frames === null ? "–" : `${header.parts_age_frames} frames`;
  $("live-canvas").dataset.frames = String(frames);
}

async function draw(blob) {
  const canvas = $("live-canvas");
  const bitmap = await createImageBitmap(blob);
  if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
}

const grab = document.createElement("canvas");

function sendFrames() {
  const video = $("live-video");
  if (!socket || socket.readyState !== WebSocket.OPEN || !stream || video.readyState < 2) return;
  const { width, height } = options();
  while (inFlight < IN_FLIGHT) {
    grab.width = width;
    grab.height = height;
    grab.getContext("2d").drawImage(video, 0, 0, width, height);
    inFlight += 1;
    grab.toBlob((blob) => {
      if (!blob || !socket || socket.readyState !== WebSocket.OPEN) { inFlight = sentAt.size; return; }
      sentAt.set(sentCount, performance.now());
      sentCount += 1;
      socket.send(blob);
    }, "image/jpeg", 0.8);
  }
}

function onMessage(event) {
  if (typeof event.data === "string") {
    const message = JSON.parse(event.data);
    if (message.type === "ready") {
      say(`streaming${message.session ? ` · session ${message.session}` : ""}${message.parts ? " · M2FP key frames" : ""}`);
      sendFrames();
    } else if (message.type === "frame") {
      pendingHeader = message;
    } else if (message.type === "error") {
      fail(message.message);
      const oldest = sentAt.keys().next();
      if (!oldest.done) sentAt.delete(oldest.value); // that frame gets no answer
      inFlight = sentAt.size;
      sendFrames();
    }
    return;
  }
  const header = pendingHeader;
  pendingHeader = null;
  if (header) {
    // The server answers the newest frame it has and drops the older waiting ones: the answered frame
    // is number seq + dropped in send order, and every frame before it is done with.
    const answered = header.seq + header.dropped;
    const t = sentAt.get(answered);
    if (t !== undefined) rtts.push(performance.now() - t);
    if (rtts.length > 60) rtts = rtts.slice(-60);
    for (const k of sentAt.keys()) if (k <= answered) sentAt.delete(k);
    inFlight = sentAt.size;
  }
  draw(event.data).then(() => { if (header) showStats(header); sendFrames(); });
}

async function start() {
  fail("");
  const { width, height, params } = options();
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: width }, height: { ideal: height } } });
  } catch (err) {
    fail(`cannot open the camera: ${err.message || err}`);
    return;
  }
  const video = $("live-video");
  video.srcObject = stream;
  await video.play();
  frames = 0; rtts = []; sentAt = new Map(); sentCount = 0; inFlight = 0; fpsWindow = [];
  socket = new WebSocket(wsUrl("api/live", params));
  socket.binaryType = "blob";
  socket.addEventListener("message", onMessage);
  socket.addEventListener("close", (event) => {
    if (event.code !== 1000 && event.code !== 1005) fail(`stream closed (${event.code}) ${event.reason || ""}`.trim());
    stop();
  });
  $("live-start").disabled = true;
  $("live-stop").disabled = false;
  say("connecting…");
}

function stop() {
  if (socket) { const s = socket; socket = null; if (s.readyState <= WebSocket.OPEN) s.close(1000); }
  if (stream) { for (const track of stream.getTracks()) track.stop(); stream = null; }
  $("live-start").disabled = false;
  $("live-stop").disabled = true;
  if (!$("live-error").textContent) say("stopped");
}

function restart() { if (socket) { stop(); start(); } }

function obsLink() {
  const name = $("live-session").value.trim();
  const link = $("live-obs-link");
  const url = `obs?session=${encodeURIComponent(name)}`;
  link.href = url;
  link.textContent = url;
}

async function loadInfo() {
  try {
    info = await (await fetch("api/info", { cache: "no-store" })).json();
  } catch { return; }
  $("live-untrained").hidden = info.trained !== false;
  $("live-key-row").hidden = !info.api_key_required;
}

$("live-start").addEventListener("click", start);
$("live-stop").addEventListener("click", stop);
for (const id of ["live-mode", "live-keep", "live-invert", "live-size", "live-session"]) {
  $(id).addEventListener("change", restart);
}
for (const id of ["live-blur", "live-color"]) $(id).addEventListener("change", restart);
$("live-session").addEventListener("input", obsLink);
window.addEventListener("pagehide", stop);
obsLink();
loadInfo();
