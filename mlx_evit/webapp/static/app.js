// The Segment Anything page: prompts in, masks drawn over the image. Talks only to this server's /api.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const COLOR = [30, 144, 255];
  const PALETTE = [[30, 144, 255], [255, 64, 64], [64, 200, 64], [255, 200, 0], [200, 64, 255],
    [0, 220, 220], [255, 128, 0], [160, 160, 160]];
  const DRAG_PX = 6;  // a press that moves further than this (screen pixels) draws a box

  const state = {
    image: null,        // {id, width, height, name}
    actions: [],        // prompts in order: {kind: "point", x, y, label} or {kind: "box", box: [x0, y0, x1, y1]}
    candidates: [],     // [{png, score, mask: Uint8Array}] best first
    chosen: 0,
    everything: null,   // {masks: [...], decoded: [Uint8Array], top: Int32Array}
    hover: -1,
    seq: 0,             // the latest predict request; older answers are dropped
    clickStart: 0,
    clickTimes: [],
    drag: null,
  };

  // -- small helpers ---------------------------------------------------------------------------

  function setStatus(kind, text) {
    const s = $("status");
    s.dataset.state = kind;
    s.textContent = text;
  }

  function showError(message) {
    const e = $("error");
    e.textContent = message;
    e.hidden = !message;
    if (message) setStatus("error", "Error");
  }

  async function api(path, options = {}) {
    const response = await fetch(path, options);
    const body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  function postJSON(path, payload) {
    return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(payload)});
  }

  function ms(value) {
    return `${value < 10 ? value.toFixed(1) : Math.round(value)} ms`;
  }

  function median(values) {
    const s = [...values].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  }

  function download(name, href) {
    const a = document.createElement("a");
    a.href = href;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  function stem() {
    return (state.image && state.image.name ? state.image.name.replace(/\.[^.]*$/, "") : "image") || "image";
  }

  // A base64 PNG (0/255) -> Uint8Array of 0/1 at the image size.
  async function decodeMask(png) {
    const img = new Image();
    img.src = `data:image/png;base64,${png}`;
    await img.decode();
    const c = document.createElement("canvas");
    c.width = state.image.width;
    c.height = state.image.height;
    const ctx = c.getContext("2d", {willReadFrequently: true});
    ctx.drawImage(img, 0, 0);
    const rgba = ctx.getImageData(0, 0, c.width, c.height).data;
    const mask = new Uint8Array(c.width * c.height);
    for (let i = 0; i < mask.length; i++) mask[i] = rgba[4 * i] > 127 ? 1 : 0;
    return mask;
  }

  // COCO's uncompressed RLE of a row-major 0/1 mask: column-major runs, starting with zeros.
  function maskToRLE(mask, h, w) {
    const counts = [];
    let value = 0, run = 0;
    for (let x = 0; x < w; x++) {
      for (let y = 0; y < h; y++) {
        const v = mask[y * w + x];
        if (v !== value) { counts.push(run); run = 0; value = v; }
        run++;
      }
    }
    counts.push(run);
    return {size: [h, w], counts};
  }

  function rleToMask(rle) {
    const [h, w] = rle.size;
    const mask = new Uint8Array(h * w);
    let pos = 0, value = 0;
    for (const n of rle.counts) {
      if (value) for (let k = pos; k < pos + n; k++) mask[(k % h) * w + Math.floor(k / h)] = 1;
      pos += n;
      value = 1 - value;
    }
    return mask;
  }

  // -- drawing ---------------------------------------------------------------------------------

  function sizeCanvases(w, h) {
    for (const id of ["image", "overlay", "marks"]) {
      $(id).width = w;
      $(id).height = h;
    }
  }

  function drawOverlay() {
    const c = $("overlay");
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    if (!state.image) return;
    const out = ctx.createImageData(c.width, c.height);
    const px = out.data;
    if ($("show-all").checked && state.everything) {
      const {decoded, top} = state.everything;
      for (let i = 0; i < top.length; i++) {
        const k = top[i];
        if (k < 0) continue;
        const col = PALETTE[k % PALETTE.length];
        px[4 * i] = col[0]; px[4 * i + 1] = col[1]; px[4 * i + 2] = col[2];
        px[4 * i + 3] = k === state.hover ? 200 : 110;
      }
      if (state.hover >= 0) {  // the hovered mask whole, also where smaller masks cover it
        const m = decoded[state.hover];
        for (let i = 0; i < m.length; i++) if (m[i]) px[4 * i + 3] = 200;
      }
    } else if (state.candidates.length) {
      const m = state.candidates[state.chosen].mask;
      for (let i = 0; i < m.length; i++) {
        if (!m[i]) continue;
        px[4 * i] = COLOR[0]; px[4 * i + 1] = COLOR[1]; px[4 * i + 2] = COLOR[2]; px[4 * i + 3] = 128;
      }
    }
    ctx.putImageData(out, 0, 0);
  }

  function drawMarks(rubber) {
    const c = $("marks");
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    const scale = c.width / Math.max(1, c.getBoundingClientRect().width);  // image pixels per screen pixel
    ctx.lineWidth = 2 * scale;
    const box = currentBox();
    for (const b of rubber ? [rubber] : box ? [box] : []) {
      ctx.strokeStyle = "#3f3";
      ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
    }
    for (const a of state.actions) {
      if (a.kind !== "point") continue;
      ctx.beginPath();
      ctx.arc(a.x, a.y, 6 * scale, 0, 2 * Math.PI);
      ctx.fillStyle = a.label ? "#2c2" : "#e33";
      ctx.fill();
      ctx.strokeStyle = "#fff";
      ctx.stroke();
    }
  }

  function renderPrompts() {
    const list = $("prompts");
    list.replaceChildren();
    for (const a of state.actions) {
      const li = document.createElement("li");
      if (a.kind === "point") {
        li.dataset.kind = "point";
        li.dataset.x = a.x; li.dataset.y = a.y; li.dataset.label = a.label;
        li.textContent = `${a.label ? "foreground" : "background"} (${a.x}, ${a.y})`;
      } else {
        li.dataset.kind = "box";
        li.dataset.box = a.box.join(",");
        li.textContent = `box (${a.box.join(", ")})`;
      }
      list.appendChild(li);
    }
    $("undo").disabled = $("clear").disabled = !state.actions.length;
  }

  function renderCandidates() {
    const div = $("candidates");
    div.replaceChildren();
    state.candidates.forEach((c, k) => {
      const b = document.createElement("button");
      b.className = k === state.chosen ? "candidate chosen" : "candidate";
      b.dataset.score = c.score;
      b.textContent = `mask ${k + 1} · IoU ${c.score.toFixed(3)}`;
      b.addEventListener("click", () => { state.chosen = k; renderCandidates(); drawOverlay(); });
      div.appendChild(b);
    });
    $("save-png").disabled = !state.candidates.length;
    $("save-json").disabled = !state.candidates.length && !state.everything;
  }

  // -- prompts ---------------------------------------------------------------------------------

  function currentBox() {
    for (let i = state.actions.length - 1; i >= 0; i--) if (state.actions[i].kind === "box") return state.actions[i].box;
    return null;
  }

  async function predict() {
    const seq = ++state.seq;
    renderPrompts();
    drawMarks();
    if (!state.actions.length) {
      state.candidates = [];
      renderCandidates();
      drawOverlay();
      setStatus("ready", "Click on the image.");
      return;
    }
    const points = state.actions.filter((a) => a.kind === "point").map((a) => [a.x, a.y, a.label]);
    setStatus("decoding", "Decoding…");
    try {
      const answer = await postJSON("/api/predict", {id: state.image.id, points, box: currentBox(),
        multimask: $("multimask").checked});
      const masks = await Promise.all(answer.masks.map((m) => decodeMask(m.png)));
      if (seq !== state.seq) return;  // a newer prompt is on its way
      state.candidates = answer.masks.map((m, k) => ({png: m.png, score: m.score, mask: masks[k]}));
      state.chosen = 0;
      $("show-all").checked = false;
      state.hover = -1;
      renderCandidates();
      drawOverlay();
      const click = performance.now() - state.clickStart;
      state.clickTimes.push(click);
      $("t-decode").textContent = ms(answer.decode_ms) + (answer.encode_ms ? ` (+ encoder ${ms(answer.encode_ms)})` : "");
      $("t-click").textContent = `${ms(click)} (median of ${state.clickTimes.length}: ${ms(median(state.clickTimes))})`;
      showError("");
      setStatus("shown", `${answer.masks.length} mask${answer.masks.length > 1 ? "s" : ""} shown.`);
    } catch (err) {
      if (seq === state.seq) showError(err.message);
    }
  }

  function imagePoint(event) {
    const r = $("marks").getBoundingClientRect();
    const x = Math.min(Math.max((event.clientX - r.left) * state.image.width / r.width, 0), state.image.width);
    const y = Math.min(Math.max((event.clientY - r.top) * state.image.height / r.height, 0), state.image.height);
    return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
  }

  function onPointerDown(event) {
    if (!state.image || (event.button !== 0 && event.button !== 2)) return;
    event.preventDefault();
    state.drag = {button: event.button, shift: event.shiftKey || event.altKey, sx: event.clientX, sy: event.clientY,
      start: imagePoint(event)};
    $("marks").setPointerCapture(event.pointerId);
  }

  function onPointerMove(event) {
    if (!state.image) return;
    if (state.drag) {
      const d = state.drag;
      if (d.button === 0 && Math.hypot(event.clientX - d.sx, event.clientY - d.sy) >= DRAG_PX) {
        const [x, y] = imagePoint(event);
        drawMarks([Math.min(d.start[0], x), Math.min(d.start[1], y), Math.max(d.start[0], x), Math.max(d.start[1], y)]);
      }
      return;
    }
    if ($("show-all").checked && state.everything) {
      const [x, y] = imagePoint(event);
      const i = Math.min(Math.floor(y), state.image.height - 1) * state.image.width + Math.min(Math.floor(x), state.image.width - 1);
      const k = state.everything.top[i];
      if (k !== state.hover) {
        state.hover = k;
        const m = k >= 0 ? state.everything.masks[k] : null;
        $("everything-info").textContent = m ? `mask ${k + 1}: area ${m.area} px, IoU ${m.predicted_iou.toFixed(3)}, ` +
          `stability ${m.stability_score.toFixed(3)}` : `${state.everything.masks.length} masks`;
        drawOverlay();
      }
    }
  }

  function onPointerUp(event) {
    const d = state.drag;
    if (!d) return;
    state.drag = null;
    state.clickStart = performance.now();
    const [x, y] = imagePoint(event);
    if (d.button === 0 && Math.hypot(event.clientX - d.sx, event.clientY - d.sy) >= DRAG_PX) {
      const box = [Math.min(d.start[0], x), Math.min(d.start[1], y), Math.max(d.start[0], x), Math.max(d.start[1], y)];
      state.actions.push({kind: "box", box});
    } else {
      const label = d.button === 2 || d.shift ? 0 : 1;
      state.actions.push({kind: "point", x: d.start[0], y: d.start[1], label});
    }
    predict();
  }

  // -- images ----------------------------------------------------------------------------------

  async function showImage(info, name) {
    state.image = {id: info.id, width: info.width, height: info.height, name};
    state.actions = [];
    state.candidates = [];
    state.everything = null;
    state.hover = -1;
    $("show-all").checked = false;
    $("show-all").disabled = true;
    $("everything-info").textContent = "";
    const img = new Image();
    img.src = `/api/images/${info.id}`;
    await img.decode();
    sizeCanvases(info.width, info.height);
    $("image").getContext("2d").drawImage(img, 0, 0);
    $("canvases").hidden = false;
    $("drop-hint").hidden = true;
    $("everything").disabled = false;
    $("t-encode").textContent = info.encode_ms ? ms(info.encode_ms) : "cached";
    renderPrompts();
    renderCandidates();
    drawOverlay();
    drawMarks();
    showError("");
    setStatus("ready", `${name} (${info.width}×${info.height}): click on the image.`);
  }

  async function upload(file) {
    if (!file) return;
    setStatus("encoding", `Encoding ${file.name}…`);
    try {
      const info = await api("/api/images", {method: "POST", body: file,
        headers: {"Content-Type": file.type && file.type.startsWith("image/") ? file.type : "application/octet-stream"}});
      await showImage(info, file.name);
    } catch (err) {
      showError(`${file.name}: ${err.message}`);
    }
  }

  async function openFromLibrary(name) {
    if (!name) return;
    setStatus("encoding", `Encoding ${name}…`);
    try {
      await showImage(await postJSON("/api/library", {name}), name);
    } catch (err) {
      showError(`${name}: ${err.message}`);
    }
  }

  // -- segment everything ----------------------------------------------------------------------

  async function segmentEverything() {
    if (!state.image) return;
    const id = state.image.id;
    const bar = $("progress");
    bar.hidden = false;
    bar.removeAttribute("value");
    $("everything").disabled = true;
    setStatus("everything", "Segmenting everything…");
    const timer = setInterval(async () => {
      try {
        const p = await api(`/api/progress?id=${encodeURIComponent(id)}`);
        if (p.total && p.running) { bar.max = p.total; bar.value = p.done; }
      } catch (err) { /* the answer below reports errors */ }
    }, 250);
    try {
      const answer = await postJSON("/api/everything", {id, points_per_side: Number($("pps").value),
        pred_iou_thresh: Number($("iou-thresh").value), stability_score_thresh: Number($("stab-thresh").value),
        box_nms_thresh: Number($("nms-thresh").value)});
      if (!state.image || state.image.id !== id) return;
      const decoded = answer.masks.map((m) => rleToMask(m.rle));
      const top = new Int32Array(state.image.width * state.image.height).fill(-1);
      decoded.forEach((m, k) => { for (let i = 0; i < m.length; i++) if (m[i]) top[i] = k; });  // largest first: small on top
      state.everything = {masks: answer.masks, decoded, top};
      state.hover = -1;
      $("show-all").disabled = false;
      $("show-all").checked = true;
      $("everything-info").textContent = `${answer.masks.length} masks in ${ms(answer.ms)}` +
        (answer.masks.length ? "; hover to highlight." : "; lower the thresholds to keep more.");
      renderCandidates();
      drawOverlay();
      showError("");
      setStatus("everything-done", `${answer.masks.length} masks found.`);
    } catch (err) {
      showError(err.message);
    } finally {
      clearInterval(timer);
      bar.hidden = true;
      $("everything").disabled = false;
    }
  }

  // -- saving ----------------------------------------------------------------------------------

  function savePNG() {
    const c = state.candidates[state.chosen];
    if (c) download(`${stem()}_mask.png`, `data:image/png;base64,${c.png}`);
  }

  function saveJSON() {
    const {width: w, height: h} = state.image;
    let annotations;
    if (state.everything && ($("show-all").checked || !state.candidates.length)) {
      annotations = state.everything.masks.map((m) => ({segmentation: m.rle, area: m.area, bbox: m.bbox,
        predicted_iou: m.predicted_iou, stability_score: m.stability_score, point_coords: m.point_coords,
        crop_box: m.crop_box}));
    } else {
      annotations = state.candidates.map((c) => ({segmentation: maskToRLE(c.mask, h, w),
        area: c.mask.reduce((s, v) => s + v, 0), predicted_iou: c.score}));
    }
    const doc = {image: {file_name: state.image.name, height: h, width: w}, annotations};
    const url = URL.createObjectURL(new Blob([JSON.stringify(doc)], {type: "application/json"}));
    download(`${stem()}_masks.json`, url);
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // -- wiring ----------------------------------------------------------------------------------

  async function start() {
    const marks = $("marks");
    marks.addEventListener("pointerdown", onPointerDown);
    marks.addEventListener("pointermove", onPointerMove);
    marks.addEventListener("pointerup", onPointerUp);
    marks.addEventListener("pointerleave", () => {
      if (state.hover >= 0 && !state.drag) { state.hover = -1; drawOverlay(); }
    });
    marks.addEventListener("contextmenu", (e) => e.preventDefault());
    $("file").addEventListener("change", (e) => upload(e.target.files[0]));
    $("library").addEventListener("change", (e) => openFromLibrary(e.target.value));
    $("undo").addEventListener("click", () => { state.clickStart = performance.now(); state.actions.pop(); predict(); });
    $("clear").addEventListener("click", () => { state.actions = []; predict(); });
    $("multimask").addEventListener("change", () => { if (state.actions.length) { state.clickStart = performance.now(); predict(); } });
    $("everything").addEventListener("click", segmentEverything);
    $("show-all").addEventListener("change", () => { state.hover = -1; drawOverlay(); });
    $("save-png").addEventListener("click", savePNG);
    $("save-json").addEventListener("click", saveJSON);
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer && e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
    });
    try {
      const health = await api("/api/health");
      $("model").textContent = `${health.model} · encoder ${health.image_size}px`;
      if (health.library) {
        const {images} = await api("/api/library");
        const select = $("library");
        for (const name of images) {
          const o = document.createElement("option");
          o.value = o.textContent = name;
          select.appendChild(o);
        }
        select.hidden = false;
      }
    } catch (err) {
      showError(`server: ${err.message}`);
    }
  }

  start();
})();
