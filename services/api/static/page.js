// imgpipe's web page: upload a CSV, then poll GET /status/<id> about once a second until the job completes.
// Every text from the API or the CSV goes in with textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const PAGE_SIZE = 50;
const $ = (id) => document.getElementById(id);

let job = null; // {id, offset, timer, round}: round counts restarts, so only the newest poll schedules the next

function apiHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// An answer other than 2xx becomes an Error whose message is "code (status): message".
async function callApi(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...apiHeaders(), ...(options.headers || {}) } });
  } catch (error) {
    throw new Error(`the API does not answer: ${error.message}`);
  }
  if (response.ok) return response;
  let detail = `${response.status} ${response.statusText}`;
  try {
    const { error } = await response.json();
    detail = `${error.code} (${response.status}): ${error.message || ""}`;
  } catch (_) { /* not the JSON error shape: keep the HTTP status */ }
  // 429 and 503 say when to come back: a limit or a busy moment, not a broken request.
  const retryAfter = response.headers.get("Retry-After");
  if (retryAfter) detail += ` Try again in ${retryAfter} s.`;
  throw new Error(detail);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function chooseFile(file) {
  const transfer = new DataTransfer();
  transfer.items.add(file);
  $("csv-file").files = transfer.files;
  $("drop-hint").textContent = file.name;
}

function setUpDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length) chooseFile(event.dataTransfer.files[0]);
  });
  $("csv-file").addEventListener("change", () => {
    const file = $("csv-file").files[0];
    $("drop-hint").textContent = file ? file.name : "Drop a CSV here, or click to choose one";
  });
}

async function upload(event) {
  event.preventDefault();
  showError("");
  const file = $("csv-file").files[0];
  if (!file) return showError("Choose a CSV first.");
  const form = new FormData();
  form.append("file", file);
  form.append("webhook_url", $("webhook-url").value.trim());
  $("upload-button").disabled = true;
  try {
    const accepted = await (await callApi("/upload", { method: "POST", body: form })).json();
    watch(accepted.request_id);
  } catch (error) {
    showError(error.message);
  } finally {
    $("upload-button").disabled = false;
  }
}

function watch(requestId) {
  if (job) clearTimeout(job.timer);
  job = { id: requestId, offset: 0, timer: null, round: 0 };
  history.replaceState(null, "", `#${requestId}`); // a reload keeps watching this job
  $("request-id").textContent = requestId;
  $("download-button").hidden = true;
  $("job").hidden = false;
  poll();
}

async function poll() {
  const current = job;
  const round = ++current.round;
  const isStale = () => current !== job || round !== current.round; // another job, or another page asked for
  let status = null;
  try {
    const query = `offset=${current.offset}&limit=${PAGE_SIZE}`;
    status = await (await callApi(`/status/${encodeURIComponent(current.id)}?${query}`)).json();
    if (isStale()) return;
    showError("");
    render(status);
  } catch (error) {
    if (isStale()) return;
    showError(error.message);
  }
  // Keep polling until completed and its webhook settled, and through passing errors (an API
  // restart, a database hiccup).
  const webhookSettling = status && status.webhook && ["waiting", "pending"].includes(status.webhook.status);
  if (!status || status.status !== "completed" || webhookSettling) current.timer = setTimeout(poll, POLL_MS);
}

function render(status) {
  const { total, processed, failed, pending } = status.counts;
  $("job-status").textContent = status.status;
  $("job-status").className = `badge ${status.status}`;
  $("progress").max = Math.max(total, 1);
  $("progress").value = processed + failed;
  $("counts").textContent =
    `${processed + failed} of ${total} done: ${processed} processed, ${failed} failed, ${pending} pending`;
  $("dispatch").textContent = releaseText(status.dispatch);
  const webhook = status.webhook;
  $("webhook").hidden = !webhook;
  if (webhook) {
    $("webhook").textContent = `Webhook ${webhook.url}: ${webhook.status}, ${webhook.attempts} attempt(s)` +
      (webhook.last_error ? ` (last error: ${webhook.last_error})` : "");
  }
  $("download-button").hidden = status.status !== "completed";
  renderImages(status.images);
  renderPager(status.page, total);
}

// The job's place in the release of images: what is out, what waits, its share, the estimates.
function releaseText(dispatch) {
  let text = `${dispatch.released} released to the processors, ${dispatch.waiting} waiting`;
  if (dispatch.share !== null) text += `; share of the processors ${Math.round(dispatch.share * 100)}%`;
  if (dispatch.started_at === null && dispatch.starts_within_seconds !== null) {
    text += `; starts within ${Math.ceil(dispatch.starts_within_seconds)} s`;
  }
  if (dispatch.expected_finish_seconds !== null) {
    text += `; about ${Math.ceil(dispatch.expected_finish_seconds)} s to go at that share`;
  }
  return text;
}

function renderImages(images) {
  const body = document.querySelector("#images tbody");
  body.replaceChildren(...images.map((image) => {
    const row = document.createElement("tr");
    row.className = image.status;
    const failed = image.status === "failed";
    row.append(
      cell(String(image.row_number)),
      imageCell(image.input_url),
      failed ? reasonCell(image.error) : imageCell(image.output_url),
      cell(image.status, "status"),
      cell(formatBytes(image.bytes_in), "number"),
      cell(formatBytes(image.bytes_out), "number"),
      cell(saving(image.bytes_in, image.bytes_out), "number saving"),
    );
    return row;
  }));
}

function cell(text, className = "") {
  const td = document.createElement("td");
  td.textContent = text;
  td.className = className;
  return td;
}

function isWebUrl(url) {
  try { return ["http:", "https:"].includes(new URL(url, location.href).protocol); } catch (_) { return false; }
}

function imageCell(url) {
  const td = document.createElement("td");
  if (!url) return td;
  if (isWebUrl(url)) { // never a javascript: link from a CSV
    const img = document.createElement("img");
    img.src = url;
    img.alt = "";
    img.loading = "lazy";
    img.referrerPolicy = "no-referrer";
    img.addEventListener("error", () => { img.hidden = true; }); // a failed download: its link stays
    const link = document.createElement("a");
    link.href = url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.append(img, url);
    td.append(link);
  } else {
    td.textContent = url;
  }
  return td;
}

function reasonCell(error) {
  const td = document.createElement("td");
  td.className = "reason";
  if (!error) return td;
  const code = document.createElement("code");
  code.textContent = error.code;
  td.append(code, document.createElement("br"), error.message || "");
  return td;
}

function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function saving(bytesIn, bytesOut) {
  if (!bytesIn || bytesOut === null || bytesOut === undefined) return "";
  return `${Math.round((1 - bytesOut / bytesIn) * 100)} %`;
}

function renderPager(page, total) {
  $("pager").hidden = total <= PAGE_SIZE;
  $("page-info").textContent = `images ${page.offset + 1}–${Math.min(page.offset + page.limit, total)} of ${total}`;
  $("previous-page").disabled = page.offset === 0;
  $("next-page").disabled = page.next_offset === null;
}

function turnPage(step) {
  if (!job) return;
  job.offset = Math.max(0, job.offset + step * PAGE_SIZE);
  clearTimeout(job.timer);
  poll();
}

// Fetched with the key (a plain link could not send it), then saved from a blob.
async function downloadOutputCsv() {
  try {
    const response = await callApi(`/output_csv/${encodeURIComponent(job.id)}`);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = `${job.id}.csv`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (error) {
    showError(error.message);
  }
}

setUpDropZone();
$("upload-form").addEventListener("submit", upload);
$("download-button").addEventListener("click", downloadOutputCsv);
$("previous-page").addEventListener("click", () => turnPage(-1));
$("next-page").addEventListener("click", () => turnPage(1));
if (location.hash.length > 1) watch(decodeURIComponent(location.hash.slice(1)));
