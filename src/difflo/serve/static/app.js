// difflo serve: the page. Plain JavaScript, no libraries, talks only to this server's /api.
"use strict";

const $ = (id) => document.getElementById(id);
let INFO = null;

// ------------------------------------------------------------------ helpers
function showError(msg) {
  const box = $("error");
  box.textContent = msg;
  box.hidden = !msg;
}

async function api(method, url, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res, data;
  try {
    res = await fetch(url, opts);
    data = await res.json();
  } catch (e) {
    throw new Error("the server did not answer (is difflo serve still running?)");
  }
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

function fillClassSelect(sel, withAll) {
  sel.innerHTML = "";
  if (withAll) sel.add(new Option("all classes", "all"));
  INFO.class_names.forEach((name, i) => {
    sel.add(new Option(name === String(i) ? `${i}` : `${i}: ${name}`, String(i)));
  });
}

function fillSelect(sel, values, selected) {
  sel.innerHTML = "";
  values.forEach((v) => sel.add(new Option(v, v, false, v === selected)));
}

function bindOutput(input, output) {
  const f = () => { output.textContent = input.value; };
  input.addEventListener("input", f);
  f();
}

function placeholder(canvas, text) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#d9dde3";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "#6b7280";
  ctx.font = "14px sans-serif";
  ctx.textAlign = "center";
  ctx.fillText(text, canvas.width / 2, canvas.height / 2);
  canvas.dataset.placeholder = "1";
}

// Draw a PNG into a canvas, enlarged by an integer factor (no smoothing) to about `target` pixels.
function drawInto(canvas, url, target) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const k = Math.max(1, Math.floor(target / Math.max(img.width, img.height)));
      canvas.width = img.width * k;
      canvas.height = img.height * k;
      const ctx = canvas.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
      canvas.dataset.placeholder = "0";
      resolve();
    };
    img.onerror = () => reject(new Error("could not load " + url));
    img.src = url;
  });
}

function setLink(a, url) {
  if (url) { a.href = url; a.classList.remove("disabled"); }
  else { a.removeAttribute("href"); a.classList.add("disabled"); }
}

// ------------------------------------------------------------------ jobs: submit, poll, cancel
// One job per tab at a time; the server keeps each job's results under its own id.
class JobRunner {
  constructor(prefix, onProgress, onDone) {
    this.p = prefix;
    this.onProgress = onProgress;
    this.onDone = onDone;
    this.job = null;
    $(prefix + "-cancel").addEventListener("click", () => this.cancel());
  }

  status(text) { $(this.p + "-status").textContent = text; }

  async start(url, body) {
    if (this.job && this.running) this.cancel();       // a new request replaces the one running
    showError("");
    $(this.p + "-progress").value = 0;
    this.status("sending ...");
    let job;
    try {
      job = await api("POST", url, body);
    } catch (e) {
      this.status("error");
      showError(e.message);
      return;
    }
    this.job = job.id;
    this.running = true;
    $(this.p + "-cancel").disabled = false;
    this.poll(job);
  }

  async poll(job) {
    while (true) {
      if (job.id !== this.job) return;                 // a newer job replaced this one
      const prog = $(this.p + "-progress");
      prog.max = Math.max(job.total, 1);
      prog.value = job.done;
      if (job.status === "queued") this.status(`queued (${job.ahead || 0} ahead)`);
      else if (job.status === "running") this.status(`running: ${job.done} / ${job.total}`);
      if (this.onProgress) this.onProgress(job);
      if (["done", "error", "cancelled"].includes(job.status)) break;
      await new Promise((r) => setTimeout(r, 150));
      try {
        job = await api("GET", `/api/jobs/${job.id}`);
      } catch (e) {
        this.status("error");
        showError(e.message);
        return;
      }
    }
    this.running = false;
    $(this.p + "-cancel").disabled = true;
    if (job.status === "error") {
      this.status("error");
      showError(job.error);
    } else if (job.status === "cancelled") {
      this.status("cancelled");
    } else {
      await this.onDone(job);
      this.status("done");
    }
  }

  async cancel() {
    if (!this.job) return;
    try { await api("POST", `/api/jobs/${this.job}/cancel`); } catch (e) { showError(e.message); }
  }
}

// ------------------------------------------------------------------ Sample tab
let frames = { job: null, n: 0, timer: null, shown: -1 };

function showFrame(k) {
  if (!frames.job || k < 0 || k >= frames.n) return;
  $("s-frame").value = k;
  $("s-frame-img").src = `/api/jobs/${frames.job.id}/frames/${k}.png`;
  const f = frames.job.frames[k];
  $("s-frame-t").textContent = f ? `step ${f.i + 1}, t = ${f.t}` : "";
  frames.shown = k;
}

function stopPlay() {
  if (frames.timer) clearInterval(frames.timer);
  frames.timer = null;
  $("s-play").textContent = "Play";
}

function setupSample() {
  fillClassSelect($("s-class"), true);
  fillSelect($("s-sampler"), INFO.samplers, INFO.defaults.sampler);
  fillSelect($("s-spacing"), INFO.spacings, INFO.defaults.spacing);
  $("s-steps").value = INFO.defaults.steps;
  $("s-steps").max = INFO.limits.steps;
  $("s-n").max = INFO.limits.n;
  $("s-w").value = INFO.defaults.w;
  $("s-interval").value = INFO.defaults.guidance_interval;       // "" = off: guidance at every noise level
  $("s-rescale").value = INFO.defaults.guidance_rescale;
  $("s-interval").title = INFO.help.guidance_interval;            // the --guidance-* help texts (difflo.edit.registry)
  $("s-rescale").title = INFO.help.guidance_rescale;
  bindOutput($("s-w"), $("s-w-out"));
  if (!INFO.num_classes) $("s-class").closest("label").hidden = true;
  placeholder($("s-grid"), "samples appear here");

  const runner = new JobRunner("s", (job) => {
    // live preview: the latest recorded step while it runs
    frames.job = job;
    frames.n = job.frames.length;
    if (job.status === "running" && frames.n > 0 && frames.shown !== frames.n - 1) showFrame(frames.n - 1);
  }, async (job) => {
    const base = `/api/jobs/${job.id}/files/`;
    await drawInto($("s-grid"), base + job.result.files.png, 560);
    $("s-grid").dataset.job = job.id;
    setLink($("s-png"), base + job.result.files.png);
    setLink($("s-npz"), base + job.result.files.npz);
    $("s-strip").src = base + job.result.files.trajectory;
    $("s-command").textContent = job.result.command;
    $("s-summary").textContent = job.result.summary;
    frames.job = job;
    frames.n = job.frames.length;
    $("s-frame").max = Math.max(frames.n - 1, 0);
    $("s-frame").disabled = $("s-play").disabled = frames.n === 0;
    showFrame(frames.n - 1);
  });

  // The fields a fast preview reads too: the student samples these classes, seeds and n at its own settings.
  const shared = () => ({
    classes: $("s-class").value || "all",
    seed: Number($("s-seed").value),
    n: Number($("s-n").value),
  });
  $("sample-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    stopPlay();
    runner.start("/api/sample", {
      ...shared(),
      w: Number($("s-w").value),
      sampler: $("s-sampler").value,
      steps: Number($("s-steps").value),
      spacing: $("s-spacing").value,
      guidance_interval: $("s-interval").value.trim(),
      guidance_rescale: $("s-rescale").value,        // as typed: the server names a bad or empty one
    });
  });
  if (INFO.fast) {
    // A distilled student (difflo serve --fast): the same classes, seeds and n, at the student's own sampler and
    // steps (the sampler, steps, w and guidance fields are the full sampler's and are not sent).
    const f = INFO.fast;
    $("s-fast").textContent = `Fast preview (${f.sample_steps} steps, student of ${f.teacher})`;
    $("s-fast").title = `${f.ckpt}: ${f.method} distillation, ${f.sampler}, ` +
      `${f.evals} network evaluation${f.evals === 1 ? "" : "s"} per image, guidance w=${f.w} ` +
      (f.w_range.length ? `as its input (distilled for w in [${f.w_range[0]}, ${f.w_range[1]}])` : "distilled in");
    $("s-fast").hidden = false;
    $("s-fast").addEventListener("click", () => {
      stopPlay();
      runner.start("/api/sample", { ...shared(), fast: true });
    });
  }
  $("s-frame").addEventListener("input", () => { stopPlay(); showFrame(Number($("s-frame").value)); });
  $("s-play").addEventListener("click", () => {
    if (frames.timer) return stopPlay();
    $("s-play").textContent = "Pause";
    let k = frames.shown >= frames.n - 1 ? 0 : frames.shown + 1;
    frames.timer = setInterval(() => {
      showFrame(k);
      k += 1;
      if (k >= frames.n) stopPlay();
    }, 180);
  });
}

// ------------------------------------------------------------------ Edit tab: drawing canvas
const draw = { source: null, dirty: false, last: null };

function clearImage() {
  const c = $("e-canvas"), ctx = c.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, c.width, c.height);
  draw.source = null;
  draw.dirty = false;
}

function clearMask() {
  const c = $("e-mask");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
}

function loadIntoCanvas(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const c = $("e-canvas"), ctx = c.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, c.width, c.height);
      ctx.drawImage(img, 0, 0, c.width, c.height);
      draw.source = url;            // sent as is until someone draws over it
      draw.dirty = false;
      resolve();
    };
    img.src = url;
  });
}

function setupCanvas() {
  clearImage();
  const top = $("e-mask");
  const brush = () => document.querySelector("input[name=brush]:checked").value;
  const pos = (ev) => {
    const r = top.getBoundingClientRect();
    return [(ev.clientX - r.left) * top.width / r.width, (ev.clientY - r.top) * top.height / r.height];
  };
  const stroke = (a, b) => {
    const mode = brush();
    const ctx = (mode === "mask" ? top : $("e-canvas")).getContext("2d");
    ctx.strokeStyle = mode === "mask" ? "#ff3b30" : mode === "erase" ? "#000" : "#fff";
    ctx.lineWidth = Number($("e-brush").value);
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a[0], a[1]);
    ctx.lineTo(b[0], b[1]);
    ctx.stroke();
    if (mode !== "mask") draw.dirty = true;
  };
  top.addEventListener("pointerdown", (ev) => {
    top.setPointerCapture(ev.pointerId);
    draw.last = pos(ev);
    stroke(draw.last, draw.last);
  });
  top.addEventListener("pointermove", (ev) => {
    if (!draw.last) return;
    const p = pos(ev);
    stroke(draw.last, p);
    draw.last = p;
  });
  const up = () => { draw.last = null; };
  top.addEventListener("pointerup", up);
  top.addEventListener("pointercancel", up);
  $("e-clear").addEventListener("click", clearImage);
  $("e-clear-mask").addEventListener("click", clearMask);

  $("e-file").addEventListener("change", () => {
    const file = $("e-file").files[0];
    if (!file) return;
    if (file.size > INFO.limits.upload_mb * 1048576) {
      showError(`${file.name} is larger than ${INFO.limits.upload_mb} MB; give a smaller image`);
      return;
    }
    const reader = new FileReader();
    reader.onload = async () => {
      try {
        const out = await api("POST", "/api/upload", { image: reader.result });
        showError("");
        await loadIntoCanvas(out.image);
        $("e-notes").textContent = [`loaded ${file.name}`].concat(out.notes).join("; ");
      } catch (e) {
        showError(`${file.name}: ${e.message}`);
      }
      $("e-file").value = "";
    };
    reader.readAsDataURL(file);
  });
}

// The image to send: the checked upload itself while untouched, else the canvas.
function imagePayload() {
  return draw.source && !draw.dirty ? draw.source : $("e-canvas").toDataURL("image/png");
}

// The mask as white (regenerate) on black.
function maskPayload() {
  const src = $("e-mask");
  const out = document.createElement("canvas");
  out.width = src.width;
  out.height = src.height;
  const a = src.getContext("2d").getImageData(0, 0, src.width, src.height);
  const b = out.getContext("2d").createImageData(src.width, src.height);
  for (let i = 0; i < a.data.length; i += 4) {
    const v = a.data[i + 3] >= 128 ? 255 : 0;
    b.data[i] = b.data[i + 1] = b.data[i + 2] = v;
    b.data[i + 3] = 255;
  }
  out.getContext("2d").putImageData(b, 0, 0);
  return out.toDataURL("image/png");
}

// ------------------------------------------------------------------ Edit tab: form
let lastResult = null;

function setupEdit() {
  ["e-class", "e-a", "e-b", "e-low", "e-high"].forEach((id) => fillClassSelect($(id), false));
  if (INFO.num_classes > 9) { $("e-a").value = "6"; $("e-b").value = "9"; $("e-high").value = "1"; }
  fillSelect($("e-view"), INFO.views, "rot180");
  fillSelect($("e-sampler"), INFO.edit_samplers, INFO.defaults.edit_sampler);
  $("e-steps").value = INFO.defaults.steps;
  $("e-steps").max = INFO.limits.steps;
  $("e-n").max = INFO.limits.n;
  $("e-w").value = 3;
  bindOutput($("e-w"), $("e-w-out"));
  bindOutput($("e-strength"), $("e-strength-out"));
  placeholder($("e-result"), "the result appears here");

  const techChanged = () => {
    const t = $("e-tech").value;
    document.querySelectorAll("#edit-form [data-tech]").forEach((el) => {
      el.hidden = !el.dataset.tech.split(" ").includes(t);
    });
    $("e-canvas-box").classList.toggle("unused", t === "anagram" || t === "hybrid");
    if (t === "inpaint") document.querySelector("input[name=brush][value=mask]").checked = true;
  };
  $("e-tech").addEventListener("change", techChanged);
  techChanged();

  const runner = new JobRunner("e", null, async (job) => {
    const base = `/api/jobs/${job.id}/files/`;
    const f = job.result.files;
    await drawInto($("e-result"), base + f.png, 560);
    $("e-result").dataset.job = job.id;
    setLink($("e-png"), base + f.png);
    setLink($("e-npz"), base + f.npz);
    setLink($("e-input"), f.input ? base + f.input : null);
    setLink($("e-maskfile"), f.mask ? base + f.mask : null);
    $("e-command").textContent = job.result.command + (job.result.command_note ? `\n# ${job.result.command_note}` : "");
    $("e-summary").textContent = job.result.summary;
    $("e-caption").textContent = `${job.result.summary.split("\n").slice(-1)[0]}`;
    lastResult = job;
    $("e-use-result").disabled = false;
  });

  $("e-use-result").addEventListener("click", () => {
    // the first try of the last result, at the model's size, becomes the input image
    if (!lastResult) return;
    const img = new Image();
    img.onload = () => {
      const off = document.createElement("canvas");
      off.width = img.width;
      off.height = img.height;
      off.getContext("2d").drawImage(img, 0, 0);
      loadIntoCanvas(off.toDataURL("image/png"));
      clearMask();
    };
    img.src = `/api/jobs/${lastResult.id}/files/${lastResult.result.files.result}`;
  });

  $("edit-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("e-tech").value;
    const body = {
      technique: t, w: Number($("e-w").value), sampler: $("e-sampler").value,
      steps: Number($("e-steps").value), seed: Number($("e-seed").value), n: Number($("e-n").value),
    };
    if (t === "sdedit" || t === "inpaint") {
      body.image = imagePayload();
      body.class = Number($("e-class").value || 0);
    }
    if (t === "sdedit") body.strength = Number($("e-strength").value);
    if (t === "inpaint") {
      body.mask = maskPayload();
      body.jump_length = Number($("e-jump-length").value);
      body.jump_n_sample = Number($("e-jump-n").value);
    }
    if (t === "anagram") {
      body.a = Number($("e-a").value || 0);
      body.b = Number($("e-b").value || 0);
      body.view = $("e-view").value;
    }
    if (t === "hybrid") {
      body.low = Number($("e-low").value || 0);
      body.high = Number($("e-high").value || 0);
      body.kernel_size = Number($("e-kernel").value);
      body.sigma = Number($("e-sigma").value);
    }
    runner.start("/api/edit", body);
  });
}

// ------------------------------------------------------------------ tabs and start
function setupTabs() {
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((x) => x.classList.toggle("active", x === b));
    $("panel-sample").hidden = b.dataset.tab !== "sample";
    $("panel-edit").hidden = b.dataset.tab !== "edit";
  }));
}

async function main() {
  setupTabs();
  try {
    INFO = await api("GET", "/api/info");
  } catch (e) {
    showError(e.message);
    return;
  }
  const names = INFO.num_classes ? `${INFO.num_classes} classes` : "unconditional";
  $("model-info").textContent =
    `${INFO.ckpt} · ${INFO.objective} · ${INFO.data} · ${names} · ${INFO.image_size}×${INFO.image_size}` +
    ` · ${INFO.weights} weights` + (INFO.fast ? ` · fast: ${INFO.fast.ckpt}` : "");
  setupSample();
  setupCanvas();
  setupEdit();
  document.body.dataset.ready = "1";
}

main();
