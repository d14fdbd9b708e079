// OBS output page: the composed frames of one live session (?session=NAME) on a transparent page.
// Add it to OBS as a Browser Source; the Live page (or any /api/live client) produces the frames.
"use strict";

const canvas = document.getElementById("obs-canvas");
const status = document.getElementById("obs-status");
const params = new URLSearchParams(window.location.search);
const session = params.get("session") || "studio";
let shown = 0;

function connect() {
  const url = new URL("api/live/watch", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("session", session);
  if (params.get("api_key")) url.searchParams.set("api_key", params.get("api_key"));
  const socket = new WebSocket(url);
  socket.binaryType = "blob";
  socket.addEventListener("open", () => { status.textContent = `waiting for session ${session}…`; });
  socket.addEventListener("message", async (event) => {
    if (typeof event.data === "string") {
      const message = JSON.parse(event.data);
      if (message.type === "error") status.textContent = message.message;
      return;
    }
    const bitmap = await createImageBitmap(event.data);
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    shown += 1;
    canvas.dataset.frames = String(shown);
    status.hidden = true; // frames flow: nothing but the picture on the page
  });
  socket.addEventListener("close", () => {
    status.hidden = false;
    status.textContent = "disconnected; retrying…";
    setTimeout(connect, 1000);
  });
}

connect();
