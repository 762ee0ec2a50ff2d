// NovelCrafter console: a little vanilla JS on server-rendered pages (no build step).
// Upload with progress, live training over server-sent events, streamed side-by-side text.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

function showError(el, message) {
  el.textContent = message;
  el.hidden = !message;
}

// --- Books: drag and drop or file picker, streamed upload with progress -----------------------
function setupUpload(form) {
  const input = form.querySelector("#file");
  const drop = form.querySelector("#drop");
  const bar = form.querySelector("#upload-progress");
  const status = form.querySelector("#upload-status");
  const error = form.querySelector("#upload-error");
  const button = form.querySelector("#upload-button");
  const limitMb = parseFloat(form.dataset.limit);

  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) { input.files = e.dataTransfer.files; status.textContent = input.files[0].name; }
  });

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    showError(error, "");
    const file = input.files[0];
    if (!file) { showError(error, "Choose a PDF first."); return; }
    if (!file.name.toLowerCase().endsWith(".pdf")) { showError(error, `${file.name} is not a PDF: choose a .pdf file.`); return; }
    if (file.size > limitMb * 1048576) { showError(error, `${file.name} is larger than the ${limitMb} MB limit.`); return; }
    const params = new URLSearchParams({ filename: file.name });
    for (const name of ["title", "parts", "chunk_sentences"]) {
      const value = form.elements[name].value.trim();
      if (value) params.set(name, value);
    }
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/books?${params}`);
    xhr.setRequestHeader("X-CSRF-Token", csrf());
    xhr.setRequestHeader("Content-Type", "application/pdf");
    bar.hidden = false; bar.value = 0; button.disabled = true;
    status.textContent = `Uploading ${file.name}…`;
    xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) bar.value = (100 * ev.loaded) / ev.total; };
    xhr.upload.onload = () => { bar.value = 100; status.textContent = "Uploaded. Extracting, cleaning and chunking the text…"; };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (_) { body = { error: `upload failed (HTTP ${xhr.status})` }; }
      if (xhr.status >= 200 && xhr.status < 300) {
        status.textContent = body.already_existed ? "Already ingested: opening it." : "Done: opening the book.";
        window.location.assign(body.url);
      } else {
        button.disabled = false; bar.hidden = true; status.textContent = "";
        showError(error, body.error || `upload failed (HTTP ${xhr.status})`);
      }
    };
    xhr.onerror = () => { button.disabled = false; showError(error, "The upload was interrupted: check the connection and try again."); };
    xhr.send(file);
  });
}

// --- Training: live events from WatchJob ------------------------------------------------------
function drawCurve(svg, values) {
  const line = svg.querySelector("polyline");
  if (values.length < 2) return;
  const low = Math.min(...values), high = Math.max(...values), span = high - low || 1;
  const step = 160 / (values.length - 1);
  line.setAttribute("points", values.map((v, i) => `${(i * step).toFixed(1)},${(38 - ((v - low) / span) * 36).toFixed(1)}`).join(" "));
}

function setupJob(root) {
  const jobId = root.dataset.job;
  const statusBox = document.getElementById("job-status");
  const log = document.getElementById("events");
  const curves = {};
  let refreshing = null;

  const redrawRunning = () => {
    for (const [part, values] of Object.entries(curves)) {
      const row = document.getElementById(`part-${part}`);
      if (row && row.dataset.state !== "SUCCEEDED") drawCurve(row.querySelector("svg.curve"), values);
    }
  };
  const refresh = () => {
    if (refreshing) return refreshing;
    refreshing = fetch(`/jobs/${encodeURIComponent(jobId)}/status`, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
      .then((html) => { statusBox.innerHTML = html; redrawRunning(); })  // server-rendered, escaped
      .catch(() => {})
      .finally(() => { refreshing = null; });
    return refreshing;
  };
  const note = (text) => {
    if (!text) return;
    const li = document.createElement("li");
    li.textContent = text;
    log.appendChild(li);
    while (log.children.length > 300) log.removeChild(log.firstChild);
    log.scrollTop = log.scrollHeight;
  };

  const source = new EventSource(`/jobs/${encodeURIComponent(jobId)}/events`);
  source.addEventListener("job", (e) => {
    const ev = JSON.parse(e.data);
    note(ev.text);
    if (ev.kind === "progress") {
      if (ev.loss && ev.phase === "train") (curves[ev.part] = curves[ev.part] || []).push(ev.loss);
      const row = document.getElementById(`part-${ev.part}`);
      if (row && ev.total) {
        row.querySelector("td.step progress").value = (100 * ev.step) / ev.total;
        row.querySelector("td.step span").textContent = `${ev.step}/${ev.total}`;
        if (curves[ev.part]) drawCurve(row.querySelector("svg.curve"), curves[ev.part]);
      }
    } else {
      refresh();
    }
  });
  source.addEventListener("end", (e) => {
    source.close();
    note(`job finished: ${JSON.parse(e.data).state}`);
    refresh().then(() => { document.body.dataset.jobDone = "yes"; });
    const cancel = document.getElementById("cancel-form");
    if (cancel) cancel.hidden = true;
  });
  source.addEventListener("failure", (e) => { source.close(); note(`lost the job's events: ${JSON.parse(e.data).error}`); });
}

// --- Try it: base and tuned streamed side by side --------------------------------------------
function setupTry(form) {
  const error = document.getElementById("try-error");
  const button = document.getElementById("generate-button");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError(error, "");
    button.disabled = true;
    document.body.dataset.generated = "no";
    const prompt = form.elements.prompt.value;
    for (const side of ["base", "tuned"]) {
      const box = document.getElementById(`${side}-text`);
      box.textContent = "";
      const span = document.createElement("span");
      span.className = "prompt";
      span.textContent = prompt;
      box.appendChild(span);
      document.getElementById(`${side}-version`).textContent = "…";
    }
    try {
      const response = await fetch("/try/stream", {
        method: "POST", credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf(), "Content-Type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams(new FormData(form)),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.error || `HTTP ${response.status}`);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n")) >= 0) {
          const piece = JSON.parse(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 1);
          if (piece.error) { showError(error, `${piece.side}: ${piece.error}`); continue; }
          if (piece.version) document.getElementById(`${piece.side}-version`).textContent = piece.version;
          if (piece.text) document.getElementById(`${piece.side}-text`).append(piece.text);
        }
      }
      document.body.dataset.generated = "yes";
    } catch (err) {
      showError(error, err.message);
    } finally {
      button.disabled = false;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const upload = document.getElementById("upload");
  if (upload) setupUpload(upload);
  const job = document.getElementById("job");
  if (job) setupJob(job);  // a finished job replays its events, then ends
  const tryForm = document.getElementById("try");
  if (tryForm) setupTry(tryForm);
});
