// The page: pick or record audio, upload it, follow the job live, show the result.
// Server calls live in api.js, the transcript/player in player.js, the server's job list
// in jobs.js, the microphone in recorder.js.

import {
  ApiError,
  cancelJob,
  deleteJob,
  ensureKey,
  explainJobError,
  followJob,
  getResult,
  getStatus,
  resultUrl,
  uploadAudio,
} from "./api.js";
import { JobList } from "./jobs.js";
import { TranscriptView, formatClock } from "./player.js";
import { Recorder, canRecord } from "./recorder.js";
import { watchHealth } from "./status.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const REFRESH_MS = 10000;
const STAGES = {
  queued: "Waiting in the queue",
  converting: "Converting the audio",
  transcribing: "Transcribing",
  finalizing: "Finishing",
};

const state = {
  file: null, // the File chosen, dropped or recorded
  upload: null, // {abort} while uploading
  jobId: null, // the job on screen
  follower: null, // {stop} while following it
  cancelling: false,
  capabilities: {}, // model name -> what it can do (from /health), null while unknown
};
// Object URLs of the local audio by job id, so a job reopened in this tab still plays.
// They die with the page; after a reload the user can attach the file again.
const audioUrls = new Map();

const audio = $("audio");
const transcript = new TranscriptView($("transcript"), audio);
const recorder = new Recorder();
const jobList = new JobList($("jobs"), $("jobs-empty"), $("jobs-more"), {
  onOpen: openJob,
  onDelete: removeJob,
});

// ---------------------------------------------------------------------------------------
// Messages

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function formatEta(seconds) {
  if (seconds == null) return "estimating time left…";
  if (seconds <= 0) return "";
  if (seconds < 60) return `about ${Math.ceil(seconds)} s left`;
  return `about ${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s left`;
}

function setBar(bar, label, fraction) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  $(bar).value = f;
  $(label).textContent = `${Math.floor(f * 100)}%`;
}

// ---------------------------------------------------------------------------------------
// Input: file picker, drag and drop anywhere on the page, microphone

function selectFile(file) {
  if (!file) return;
  state.file = file;
  $("selected-name").textContent = file.name;
  $("selected-size").textContent = `(${formatBytes(file.size)})`;
  $("selected").hidden = false;
  showError("");
  updateControls();
}

$("file").addEventListener("change", (e) => {
  selectFile(e.target.files[0]);
  e.target.value = ""; // so choosing the same file again still fires "change"
});

// Counting enter/leave: dragleave fires when moving over child elements too.
let dragDepth = 0;
document.addEventListener("dragenter", (e) => {
  if (![...e.dataTransfer.types].includes("Files")) return;
  dragDepth += 1;
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) document.body.classList.remove("dragging");
});
document.addEventListener("dragover", (e) => e.preventDefault()); // allows the drop
document.addEventListener("drop", (e) => {
  e.preventDefault(); // else the browser navigates to the file
  dragDepth = 0;
  document.body.classList.remove("dragging");
  const file = e.dataTransfer.files[0];
  if (file) selectFile(file);
});

let recordTimer = 0;
$("record").addEventListener("click", async () => {
  if (recorder.recording) {
    clearInterval(recordTimer);
    try {
      selectFile(await recorder.stop());
    } catch (err) {
      showError(err.message);
    }
    setRecording(false);
    return;
  }
  showError("");
  try {
    await recorder.start();
  } catch (err) {
    showError(err.message);
    return;
  }
  setRecording(true);
  recordTimer = setInterval(() => {
    $("record-label").textContent = `Stop recording (${formatClock(recorder.elapsed())})`;
  }, 250);
});

function setRecording(on) {
  $("record").setAttribute("aria-pressed", String(on));
  $("record").classList.toggle("recording", on);
  $("record-label").textContent = on ? "Stop recording (0:00)" : "Record from microphone";
  updateControls();
}

function updateControls() {
  const busy = Boolean(state.upload) || recorder.recording;
  $("start").disabled = !state.file || busy;
  $("file").disabled = Boolean(state.upload);
}

// ---------------------------------------------------------------------------------------
// Upload and follow

$("start").addEventListener("click", startJob);

async function startJob() {
  const file = state.file;
  if (!file) return;
  stopFollowing();
  showError("");
  const url = URL.createObjectURL(file);
  resetJobView(file.name, url);
  $("progress-card").hidden = false;
  $("stage").textContent = "Uploading…";

  // The model field only shows (and is only sent) when the server offers a choice.
  const model = $("model-field").hidden ? "" : $("model").value;
  const fields = { language: $("language").value.trim(), model };
  if (!$("task-field").hidden && $("task").value === "translate") {
    fields.task = "translate";
    fields.target_language = $("target-language").value.trim();
  }
  const upload = uploadAudio(file, fields, (f) => setBar("upload-progress", "upload-pct", f));
  state.upload = upload;
  updateControls();
  let accepted;
  try {
    accepted = await upload.promise;
  } catch (err) {
    state.upload = null;
    updateControls();
    URL.revokeObjectURL(url);
    $("progress-card").hidden = true;
    $("result-card").hidden = true;
    // Cancelling the upload is the user's own doing, not an error to report.
    if (!(err instanceof ApiError && err.code === "aborted")) {
      showError(err instanceof ApiError ? err.message : String(err));
    }
    return;
  }
  state.upload = null;
  updateControls();
  const jobId = accepted.job_id;
  audioUrls.set(jobId, url);
  jobList.note(jobId, { filename: file.name, status: "pending" });
  refreshList();
  follow(jobId, file.name);
}

/** Empty progress and transcript, with the local audio (if any) in the player. */
function resetJobView(name, url) {
  $("job-name").textContent = name ? `— ${name}` : "";
  setBar("upload-progress", "upload-pct", 0);
  setBar("job-progress", "job-pct", 0);
  $("eta").textContent = "";
  $("connection").textContent = "";
  $("cancel").hidden = false;
  $("cancel").disabled = false;
  transcript.clear();
  $("result-actions").hidden = true;
  $("copied").textContent = "";
  setAudio(url);
  $("result-card").hidden = false;
}

function setAudio(url) {
  if (url) audio.src = url;
  else audio.removeAttribute("src");
  audio.load();
  audio.hidden = !url;
  $("no-audio").hidden = Boolean(url);
}

function follow(jobId, name) {
  state.jobId = jobId;
  $("progress-card").hidden = false;
  $("stage").textContent = "Waiting…";
  state.follower = followJob(jobId, {
    onEvent: (event) => onJobEvent(jobId, event),
    onConnection: (how) => {
      $("connection").textContent = {
        live: "",
        reconnecting: "· connection lost, reconnecting…",
        restarting: "· the server is restarting; the job is kept and resumes after it…",
        polling: "· checking every few seconds",
      }[how];
    },
  });
  state.follower.done.then(() => {
    if (state.jobId === jobId) {
      state.follower = null;
      $("cancel").hidden = true;
      $("connection").textContent = "";
    }
  });
  jobList.setCurrent(jobId);
}

function stopFollowing() {
  if (state.follower) state.follower.stop();
  state.follower = null;
  state.jobId = null;
  state.cancelling = false;
}

function onJobEvent(jobId, event) {
  if (state.jobId !== jobId) return;
  switch (event.type) {
    case "status":
      showStage(event.stage, event.queue_position);
      jobList.note(jobId, { status: event.status });
      break;
    case "polled": // from the polling fallback: no ETA, no segments
      showStage(event.stage);
      setBar("job-progress", "job-pct", event.progress);
      break;
    case "progress":
      showStage(event.stage);
      setBar("job-progress", "job-pct", event.progress);
      $("eta").textContent = event.progress < 1 ? formatEta(event.eta_s) : "";
      break;
    case "segment":
      transcript.addSegment(event.segment);
      break;
    case "completed":
      setBar("job-progress", "job-pct", 1);
      $("stage").textContent = "Done.";
      $("eta").textContent = "";
      showResult(jobId, event.result);
      jobList.note(jobId, { status: "completed" });
      refreshList();
      break;
    case "failed":
      $("stage").textContent = "Failed.";
      $("eta").textContent = "";
      showError(explainJobError(event.error));
      jobList.note(jobId, {
        status: event.error && event.error.code === "gone" ? "expired" : "failed",
      });
      refreshList();
      break;
    case "cancelled":
      // The user's own cancel needs no reason; another (a client that left) does.
      $("stage").textContent =
        event.reason && event.reason !== "cancelled by client"
          ? `Cancelled: ${event.reason}.`
          : "Cancelled.";
      $("eta").textContent = "";
      jobList.note(jobId, { status: "cancelled" });
      refreshList();
      break;
    default:
      break;
  }
}

function showStage(stage, queuePosition) {
  let text = STAGES[stage] || stage || "Working";
  if (stage === "queued" && queuePosition) text += ` (position ${queuePosition})`;
  $("stage").textContent = `${text}…`;
}

$("cancel").addEventListener("click", async () => {
  if (state.upload) {
    state.upload.abort();
    return;
  }
  const jobId = state.jobId;
  if (!jobId || state.cancelling) return;
  state.cancelling = true;
  $("cancel").disabled = true;
  $("stage").textContent = "Cancelling…";
  try {
    // The server answers once the job has stopped; the events socket reports "cancelled"
    // too, so the view updates from there (or from here, if the socket is slow).
    const answer = await cancelJob(jobId);
    if (state.jobId === jobId && answer.status === "cancelled") {
      onJobEvent(jobId, { type: "cancelled" });
    }
  } catch (err) {
    showError(err.message);
    $("cancel").disabled = false;
  } finally {
    state.cancelling = false;
  }
});

// ---------------------------------------------------------------------------------------
// Result

let currentText = "";

function showResult(jobId, result) {
  $("result-card").hidden = false;
  transcript.setSegments(result.segments || []);
  if (!(result.segments || []).length) {
    $("transcript").textContent = "(no speech was recognised)";
  }
  currentText = result.text || "";
  const base = (result.filename || "transcript").replace(/\.[^.]+$/, "") || "transcript";
  for (const [fmt, ext] of [["text", "txt"], ["srt", "srt"], ["vtt", "vtt"], ["json", "json"]]) {
    const link = $(`dl-${fmt}`);
    link.href = resultUrl(jobId, fmt);
    link.download = `${base}.${ext}`;
  }
  $("result-actions").hidden = false;
}

$("copy").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText(currentText);
  } catch {
    // No async clipboard (plain http on another host, or denied): the old way.
    const area = document.createElement("textarea");
    area.value = currentText;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (!ok) {
      $("copied").textContent = "Copying is not allowed here; select the text instead.";
      return;
    }
  }
  $("copied").textContent = "Copied.";
});

$("attach").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (!file) return;
  const url = URL.createObjectURL(file);
  if (state.jobId) audioUrls.set(state.jobId, url);
  setAudio(url);
});

// ---------------------------------------------------------------------------------------
// The server's jobs

async function openJob(jobId) {
  if (state.upload) return; // one thing at a time while an upload is running
  stopFollowing();
  showError("");
  const listed = jobList.find(jobId) || {};
  let info;
  try {
    info = await getStatus(jobId);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) jobList.remove(jobId);
    showError(err.message);
    return;
  }
  jobList.note(jobId, { status: info.status });
  state.jobId = jobId;
  jobList.setCurrent(jobId);
  resetJobView(info.filename || listed.filename, audioUrls.get(jobId));
  if (info.status === "completed") {
    $("progress-card").hidden = true;
    // /status carries the result already; /result is the fallback for a trimmed one.
    showResult(jobId, info.result || (await getResult(jobId)));
    return;
  }
  if (TERMINAL.has(info.status)) {
    $("progress-card").hidden = true;
    $("result-card").hidden = true;
    showError(
      info.status === "failed"
        ? explainJobError({ message: info.error })
        : "This job was cancelled before it finished.",
    );
    return;
  }
  setBar("upload-progress", "upload-pct", 1);
  follow(jobId, info.filename);
}

async function removeJob(jobId, name) {
  if (!window.confirm(`Delete "${name}" and its transcript from the server?`)) return;
  try {
    // A running job is cancelled first; the answer comes once it is gone.
    await deleteJob(jobId);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) {
      showError(err.message);
      return;
    }
  }
  if (state.jobId === jobId) {
    stopFollowing();
    showError("");
    $("progress-card").hidden = true;
    $("result-card").hidden = true;
    setAudio("");
  }
  if (audioUrls.has(jobId)) URL.revokeObjectURL(audioUrls.get(jobId));
  audioUrls.delete(jobId);
  jobList.remove(jobId);
  refreshList();
}

// Jobs change on the server (other tabs, other clients): read the list again now and then.
function refreshList() {
  jobList.refresh().catch(() => {
    // Unreachable for now: the server status line says so; the next refresh tries again.
  });
}

// ---------------------------------------------------------------------------------------
// Server status and the model picker

function fillModels(models) {
  state.capabilities = Object.fromEntries(models.map((m) => [m.name, m.capabilities || null]));
  const names = models.map((m) => m.name);
  const select = $("model");
  const have = [...select.options].map((o) => o.value).join("\n");
  if (have !== names.join("\n")) {
    const chosen = select.value;
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    if (names.includes(chosen)) select.value = chosen;
    // One model: no choice to make, and the field would only be noise.
    $("model-field").hidden = names.length < 2;
  }
  offerDecoding();
}

// Language and task are offered only where the chosen model has them (its capabilities,
// from /health); a model whose languages are unknown takes a language as a hint.
function offerDecoding() {
  const caps = (state.capabilities || {})[$("model").value || ""] || null;
  const languages = caps && caps.languages;
  $("languages").replaceChildren(...(languages || []).map((code) => new Option(code, code)));
  $("language-help").textContent = !caps
    ? "Leave empty for the model's default."
    : languages
      ? `This model takes: ${languages.join(", ")}. Leave empty for its default.`
      : "A hint only: this model does not say which languages it knows.";
  const translates = Boolean(caps && (caps.tasks || []).includes("translate"));
  $("task-field").hidden = !translates;
  if (!translates) $("task").value = "transcribe";
  $("target-field").hidden = !translates || $("task").value !== "translate";
}
$("model").addEventListener("change", offerDecoding);
$("task").addEventListener("change", offerDecoding);

// ---------------------------------------------------------------------------------------

if (!canRecord()) {
  $("record").disabled = true;
  $("record").title = "This browser cannot record audio here (it needs https or localhost).";
}
watchHealth($("server"), fillModels);
// A server with API keys: ask for one first, so the job list and uploads carry it. Without
// one (the person declined) the list is not polled: each poll would ask again.
ensureKey()
  .then(
    () => true,
    (err) => {
      showError(err.message);
      return !(err instanceof ApiError && err.status === 401);
    },
  )
  .then((keyed) => {
    if (!keyed) return;
    refreshList();
    setInterval(refreshList, REFRESH_MS);
  });
