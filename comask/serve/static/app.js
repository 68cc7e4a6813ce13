// The page: upload an image, draw the predicted instances, filter by score, hover to highlight.
"use strict";

const el = (id) => document.getElementById(id);
const canvas = el("overlay");
const ctx = canvas.getContext("2d");
const slider = el("score-slider");
const rows = el("instance-rows");

// State kept on window so that the browser test (and a curious user) can inspect it.
const state = window.comask = {
  image: null,        // HTMLImageElement of the upload
  width: 0, height: 0, // its size in pixels, as the server decoded it
  instances: [],      // from /predict, each with .color, .mask (Uint8Array), .layer (canvas)
  threshold: 0.5,
  highlight: null,    // id of the hovered instance
  drawn: 0,           // instances drawn in the last render
  busy: false,
};

const params = new URLSearchParams(location.search);
if (params.has("score")) {
  const v = Math.min(1, Math.max(0, parseFloat(params.get("score")) || 0));
  slider.value = String(v);
}
state.threshold = parseFloat(slider.value);
el("score-value").textContent = state.threshold.toFixed(3);

function colorFor(label) {
  // Distinct hues per class via the golden angle; same class, same color.
  const hue = (label * 137.508) % 360;
  return { css: `hsl(${hue.toFixed(0)}, 85%, 50%)`, rgb: hslToRgb(hue / 360, 0.85, 0.5) };
}

function hslToRgb(h, s, l) {
  const f = (n) => {
    const k = (n + h * 12) % 12;
    const a = s * Math.min(l, 1 - l);
    return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

function showError(msg) {
  const box = el("error");
  box.textContent = msg;
  box.hidden = !msg;
}

function setStatus(msg) { el("status").textContent = msg; }

async function loadMetadata() {
  try {
    const r = await fetch("/metadata");
    const m = await r.json();
    const parts = [m.config || "model", `${m.num_classes} classes`];
    if (m.device) parts.push(m.device);
    parts.push(`v${m.version}`);
    el("model-info").textContent = parts.join(" · ");
    el("model-info").title = (m.classes || []).join(", ");
  } catch (e) {
    el("model-info").textContent = "model information unavailable";
  }
}

function makeLayer(inst, w, h) {
  // One offscreen canvas per instance holding its mask in its color, built once per upload.
  const layer = document.createElement("canvas");
  layer.width = w; layer.height = h;
  const lctx = layer.getContext("2d");
  const img = lctx.createImageData(w, h);
  const [r, g, b] = inst.color.rgb;
  const m = inst.mask;
  for (let i = 0; i < m.length; i++) {
    if (m[i]) {
      const o = i * 4;
      img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = 255;
    }
  }
  lctx.putImageData(img, 0, 0);
  return layer;
}

function visible() {
  return state.instances.filter((d) => d.score >= state.threshold);
}

function fitCanvas() {
  // The canvas has the displayed size in device pixels, so labels stay crisp whatever the image
  // size; the image and masks are scaled onto it.
  if (!state.image) return;
  const stage = el("stage");
  const avail = Math.max(200, stage.clientWidth - 2);
  // Fit below the controls, so the whole image is visible without scrolling.
  const maxH = Math.max(240, window.innerHeight - stage.getBoundingClientRect().top - 16);
  const scale = Math.min(avail / state.width, maxH / state.height, 4);
  const cssW = Math.round(state.width * scale), cssH = Math.round(state.height * scale);
  const dpr = window.devicePixelRatio || 1;
  canvas.style.width = cssW + "px";
  canvas.style.height = cssH + "px";
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
}

function render() {
  if (!state.image) return;
  const s = canvas.width / state.width;
  const dpr = window.devicePixelRatio || 1;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const showMasks = el("show-masks").checked, showBoxes = el("show-boxes").checked;
  const vis = visible();
  const hl = state.highlight;
  const lw = 2 * dpr;
  const font = Math.round(12 * dpr);
  // Draw the highlighted instance last so it sits on top.
  const order = vis.slice().sort((a, b) => (a.id === hl) - (b.id === hl));
  for (const d of order) {
    const dim = hl !== null && d.id !== hl;
    if (showMasks) {
      ctx.globalAlpha = dim ? 0.12 : (d.id === hl ? 0.7 : 0.45);
      // Nearest-neighbour: show the mask's real pixels rather than a blur.
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(d.layer, 0, 0, canvas.width, canvas.height);
    }
    ctx.globalAlpha = dim ? 0.3 : 1;
    if (showBoxes) {
      const x = d.bbox[0] * s, y = d.bbox[1] * s, bw = d.bbox[2] * s, bh = d.bbox[3] * s;
      ctx.lineWidth = d.id === hl ? lw * 2 : lw;
      ctx.strokeStyle = d.color.css;
      ctx.strokeRect(x, y, bw, bh);
      const text = `${d.class_name} ${d.score.toFixed(2)}`;
      ctx.font = `${font}px system-ui, sans-serif`;
      const tw = ctx.measureText(text).width + 6 * dpr;
      const th = font + 4 * dpr;
      const ty = y - th >= 0 ? y - th : y;
      ctx.fillStyle = d.color.css;
      ctx.fillRect(x, ty, tw, th);
      ctx.fillStyle = "#fff";
      ctx.textBaseline = "top";
      ctx.fillText(text, x + 3 * dpr, ty + 2 * dpr);
    }
    ctx.globalAlpha = 1;
  }
  state.drawn = vis.length;
  canvas.dataset.drawn = String(vis.length);
  canvas.dataset.highlight = hl === null ? "" : String(hl);
  updateList(vis);
}

function updateList(vis) {
  const shown = new Set(vis.map((d) => d.id));
  for (const tr of rows.children) {
    const id = Number(tr.dataset.id);
    tr.classList.toggle("filtered", !shown.has(id));
    tr.classList.toggle("active", id === state.highlight);
  }
  el("count").textContent = state.instances.length
    ? `${vis.length} of ${state.instances.length}` : "";
  el("empty").hidden = vis.length > 0;
  if (state.image && vis.length === 0) {
    el("empty").textContent = state.instances.length
      ? "No instance above the score threshold: lower the slider." : "The model found no instances.";
  }
}

function buildList() {
  rows.textContent = "";
  for (const d of state.instances) {
    const tr = document.createElement("tr");
    tr.dataset.id = String(d.id);
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = d.color.css;
    const cells = [sw, String(d.id + 1), d.class_name, d.score.toFixed(3), String(d.area)];
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      if (typeof c === "string") td.textContent = c; else td.appendChild(c);
      if (i === 1 || i >= 3) td.className = "num";
      tr.appendChild(td);
    });
    tr.addEventListener("mouseenter", () => { state.highlight = d.id; render(); });
    tr.addEventListener("mouseleave", () => { state.highlight = null; render(); });
    rows.appendChild(tr);
  }
}

function instanceAt(px, py) {
  // Topmost (best scoring) visible instance whose mask, or else box, contains the pixel.
  const w = state.width;
  const vis = visible();
  for (const d of vis) if (d.mask[py * w + px]) return d.id;
  for (const d of vis) {
    const [x, y, bw, bh] = d.bbox;
    if (px >= x && px <= x + bw && py >= y && py <= y + bh) return d.id;
  }
  return null;
}

canvas.addEventListener("mousemove", (ev) => {
  if (!state.image) return;
  const r = canvas.getBoundingClientRect();
  const px = Math.floor((ev.clientX - r.left) * state.width / r.width);
  const py = Math.floor((ev.clientY - r.top) * state.height / r.height);
  if (px < 0 || py < 0 || px >= state.width || py >= state.height) return;
  const id = instanceAt(px, py);
  if (id !== state.highlight) { state.highlight = id; render(); }
});
canvas.addEventListener("mouseleave", () => { state.highlight = null; render(); });

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this file"));
    img.src = url;
  });
}

async function predict(file) {
  if (state.busy) return;
  state.busy = true;
  showError("");
  setStatus(`uploading ${file.name} (${(file.size / 1024).toFixed(0)} kB)...`);
  document.body.dataset.state = "busy";
  try {
    const form = new FormData();
    form.append("file", file, file.name);
    // Ask for everything; the slider filters here, without another round trip.
    const [resp, img] = await Promise.all([
      fetch("/predict?score_thr=0&max_det=100", { method: "POST", body: form }),
      loadImage(file).catch(() => null),
    ]);
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      throw new Error((body && body.error) || `server answered ${resp.status}`);
    }
    if (!img) throw new Error("the browser cannot display this image, although the server read it");
    const { width, height } = body.image;
    state.image = img;
    state.width = width; state.height = height;
    state.highlight = null;
    state.instances = body.instances.map((d) => {
      const inst = Object.assign({}, d, { color: colorFor(d.label) });
      inst.mask = rleDecode(d.segmentation);
      inst.layer = makeLayer(inst, width, height);
      return inst;
    });
    buildList();
    fitCanvas();
    render();
    setStatus(`${file.name}: ${width}×${height}, ${state.instances.length} instances, ` +
      `${body.time_ms.toFixed(0)} ms on the server`);
    document.body.dataset.state = "done";
  } catch (e) {
    showError(e.message || String(e));
    setStatus("");
    document.body.dataset.state = "error";
  } finally {
    state.busy = false;
  }
}

el("file-input").addEventListener("change", (ev) => {
  const f = ev.target.files && ev.target.files[0];
  if (f) predict(f);
});

const dz = el("dropzone");
["dragenter", "dragover"].forEach((t) => dz.addEventListener(t, (ev) => {
  ev.preventDefault(); dz.classList.add("over");
}));
["dragleave", "drop"].forEach((t) => dz.addEventListener(t, (ev) => {
  ev.preventDefault(); dz.classList.remove("over");
}));
dz.addEventListener("drop", (ev) => {
  const f = ev.dataTransfer && ev.dataTransfer.files[0];
  if (f) predict(f);
});
// Dropping next to the zone should not navigate away from the page.
window.addEventListener("dragover", (ev) => ev.preventDefault());
window.addEventListener("drop", (ev) => ev.preventDefault());

slider.addEventListener("input", () => {
  state.threshold = parseFloat(slider.value);
  el("score-value").textContent = state.threshold.toFixed(3);
  render();
});
el("show-masks").addEventListener("change", render);
window.addEventListener("resize", () => { fitCanvas(); render(); });
el("show-boxes").addEventListener("change", render);

loadMetadata();
