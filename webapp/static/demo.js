// The demo page: live worker states from /readyz, and generation with step-by-step progress streamed
// from /generate/stream, from text or from an image (an upload, or a result sent back with "edit this").
// Without JavaScript the form still posts to /demo.
"use strict";

const $ = (id) => document.getElementById(id);
let anyReady = false;
let busy = false;
let inputImage = null; // the image to edit, as a data: URL (the server takes one as the image field)

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function workerItem(w) {
  const parts = [el("strong", { textContent: `worker ${w.slot}` }), " ", el("span", { className: "state", textContent: w.state })];
  if (w.state === "LOADING") parts.push(" ", el("span", { textContent: `attempt ${w.attempt}/${w.max_attempts}` }));
  if (w.device) parts.push(" ", el("span", { textContent: w.device }));
  if (w.problem) parts.push(" ", el("span", { className: "problem", textContent: w.problem }));
  if (w.error) parts.push(" ", el("span", { className: "error", textContent: w.error }));
  return el("li", { className: `worker state-${w.state.toLowerCase()}` }, parts);
}

async function refreshHealth() {
  let body;
  try {
    const response = await fetch("/readyz", { cache: "no-store" });
    body = await response.json();
  } catch (error) {
    $("health-summary").textContent = "Server not answering";
    $("health-summary").className = "badge bad";
    anyReady = false;
    updateButton("The server is not answering.");
    return;
  }
  const ready = body.status === "ready";
  $("health-summary").textContent = `${ready ? "Ready" : "Not ready"}: ${body.reason}`;
  $("health-summary").className = `badge ${ready ? "ok" : "wait"}`;
  $("workers").replaceChildren(...body.workers.map(workerItem));
  anyReady = body.workers.some((w) => w.state === "READY" && !w.problem);
  updateButton(`No worker is ready yet: ${body.reason}. The button works once one is.`);
}

function updateButton(reason) {
  $("generate-button").disabled = busy || !anyReady;
  $("button-hint").textContent = busy ? "Generating…" : anyReady ? "" : reason;
}

function clearErrors() {
  for (const node of document.querySelectorAll("[data-error-for]")) node.textContent = "";
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  $("message").textContent = "";
  $("message").classList.remove("shown");
}

function showError(error, retryAfter, status) {
  if (status === 401 && $("api_key")) error = { ...error, field: "api_key" };
  const slot = error.field && document.querySelector(`[data-error-for="${error.field}"]`);
  if (slot) {
    slot.textContent = error.message;
    const input = $(error.field);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
    return;
  }
  const wait = retryAfter ? ` (retry in ${retryAfter} s)` : "";
  $("message").textContent = `${error.message}${wait}`;
  $("message").classList.add("shown");
}

function setInput(dataUrl, name = "") {
  inputImage = dataUrl;
  $("input-box").hidden = !dataUrl;
  $("input-name").textContent = name;
  if (dataUrl) $("input-preview").src = dataUrl;
  else $("image").value = "";
}

function readFile(input) {
  const file = input.files[0];
  if (!file) return setInput(null);
  const reader = new FileReader();
  reader.onload = () => setInput(reader.result, file.name);
  reader.readAsDataURL(file);
}

function payloadFromForm(form) {
  const data = new FormData(form);
  const payload = { prompt: data.get("prompt") };
  if ($("lora") && $("lora").value) payload.loras = [{ name: $("lora").value }];
  if (inputImage) {
    payload.image = inputImage;
    payload.strength = Number($("strength").value);
  }
  if (data.get("negative_prompt")) payload.negative_prompt = data.get("negative_prompt");
  // The number fields and their kinds come from the server's declaration of the request (data-kind).
  for (const input of form.querySelectorAll("input[data-kind]")) {
    const name = input.name;
    const raw = String(data.get(name) || "").trim();
    if (!raw || (name === "seed" && data.get("random_seed"))) continue;
    const value = Number(raw);
    if (input.dataset.kind === "integer") payload[name] = Number.isInteger(value) ? value : raw;
    else payload[name] = Number.isFinite(value) ? value : raw;
  }
  return payload;
}

function showImages(result) {
  const figures = result.images.map((image) => {
    const bytes = Uint8Array.from(atob(image.png_base64), (c) => c.charCodeAt(0));
    const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
    const img = el("img", { src: url, alt: `generated image, seed ${image.seed}`, width: result.width, height: result.height });
    const link = el("a", { href: url, download: `seed-${image.seed}.png`, textContent: "download" });
    const edited = result.edit ? ` · edited from ${result.edit.input_size}, strength ${result.edit.strength}` : "";
    const parts = [`seed ${image.seed}${edited} · ${Math.round(result.timings.total_ms)} ms · `, link];
    if ($("edit-box")) {
      const again = el("button", { type: "button", className: "secondary edit-this", textContent: "edit this" });
      again.addEventListener("click", () => {
        setInput(`data:image/png;base64,${image.png_base64}`, `seed ${image.seed}`);
        $("prompt").focus();
      });
      parts.push(" ", again);
    }
    const caption = el("figcaption", {}, parts);
    return el("figure", { className: "result" }, [img, caption]);
  });
  $("results").replaceChildren(...figures);
}

function setProgress(step, total) {
  $("progress-box").hidden = false;
  $("progress").max = total;
  $("progress").value = step;
  $("progress-text").textContent = `step ${step} of ${total}`;
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = $("api_key");
  if (key) {
    // Kept for this tab only: sessionStorage is gone when the tab closes, and the key never enters the URL.
    sessionStorage.setItem("api_key", key.value);
    headers.Authorization = `Bearer ${key.value}`;
  }
  return headers;
}

// -- jobs (docs/api.md, Asynchronous jobs): the job's id is kept in localStorage, so a reload follows it again.

function blobToBase64(blob) {
  return new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",")[1]);
    reader.readAsDataURL(blob);
  });
}

async function showJob(job) {
  if (job.status === "succeeded") {
    const images = await Promise.all(
      job.output.images.map(async (image) => {
        const response = await fetch(image.url, { headers: authHeaders() });
        return { seed: image.seed, png_base64: await blobToBase64(await response.blob()) };
      }),
    );
    showImages({ ...job.output, images });
    $("progress-box").hidden = true;
  } else if (job.error) {
    showError(job.error);
    $("progress-box").hidden = true;
  }
  $("job-text").textContent = `job ${job.id}: ${job.status}`;
}

async function followJob(jobId) {
  $("job-text").textContent = `job ${jobId}: following`;
  const response = await fetch(`/v1/jobs/${jobId}/events`, { headers: authHeaders() });
  if (!response.ok) {
    localStorage.removeItem("job_id");
    $("job-text").textContent = `job ${jobId}: ${(await response.json()).error.message}`;
    return;
  }
  await readEvents(response, async (name, job) => {
    $("job-text").textContent = `job ${job.id}: ${job.status}`;
    if (job.progress) setProgress(job.progress.step, job.progress.total || job.progress.step);
    if (["succeeded", "failed", "canceled"].includes(name)) await showJob(job);
  });
}

async function submitJob(payload) {
  const response = await fetch("/v1/jobs", {
    method: "POST",
    headers: authHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify(payload),
  });
  const body = await response.json();
  if (!response.ok) {
    showError(body.error, response.headers.get("Retry-After"), response.status);
    $("progress-box").hidden = true;
    return;
  }
  localStorage.setItem("job_id", body.id);
  await followJob(body.id);
}

async function generate(event) {
  event.preventDefault();
  if (busy) return;
  clearErrors();
  busy = true;
  updateButton("");
  const payload = payloadFromForm(event.target);
  const headers = authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" });
  setProgress(0, payload.num_inference_steps || Number(event.target.dataset.maxSteps));
  if ($("as_job").checked) {
    try {
      await submitJob(payload);
    } catch (error) {
      showError({ message: `The request failed: ${error.message}` });
    } finally {
      busy = false;
      updateButton("");
    }
    return;
  }
  try {
    const response = await fetch("/generate/stream", { method: "POST", headers, body: JSON.stringify(payload) });
    if (!response.ok) {
      const body = await response.json();
      showError(body.error, response.headers.get("Retry-After"), response.status);
      $("progress-box").hidden = true;
      return;
    }
    await readEvents(response);
  } catch (error) {
    showError({ message: `The request failed: ${error.message}` });
  } finally {
    busy = false;
    updateButton("");
    refreshHealth();
  }
}

async function readEvents(response, onEvent = streamEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
      await onEvent(name, data);
    }
  }
}

function streamEvent(name, data) {
  if (name === "queued") setProgress(0, data.total);
  if (name === "progress") setProgress(data.step, data.total);
  if (name === "done") showImages(data);
  if (name === "error") {
    showError(data);
    $("progress-box").hidden = true;
  }
}

function syncSeed() {
  $("seed").disabled = $("random_seed").checked;
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", generate);
  $("random_seed").addEventListener("change", syncSeed);
  for (const example of document.querySelectorAll("a.example")) {
    example.addEventListener("click", (event) => {
      event.preventDefault();
      $("prompt").value = example.dataset.prompt;
      if ($("lora")) $("lora").value = example.dataset.lora || "";
      $("prompt").focus();
    });
  }
  if ($("lora-box")) $("lora-box").hidden = false;
  if ($("edit-box")) {
    $("edit-box").hidden = false;
    $("image").addEventListener("change", () => readFile($("image")));
    $("clear-input").addEventListener("click", () => setInput(null));
    $("strength").addEventListener("input", () => ($("strength-value").textContent = $("strength").value));
  }
  if ($("api_key")) $("api_key").value = sessionStorage.getItem("api_key") || "";
  $("as-job-box").hidden = false;
  const kept = localStorage.getItem("job_id");
  if (kept) {
    $("as_job").checked = true;
    followJob(kept).catch((error) => showError({ message: `Following job ${kept} failed: ${error.message}` }));
  }
  syncSeed();
  refreshHealth();
  setInterval(refreshHealth, 2000);
});
