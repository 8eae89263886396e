// Talking to the server: upload, job events (WebSocket, with resume and a polling fallback),
// cancel, delete, the job list, health. Nothing here touches the page; callers get data and
// plain-words errors.

const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/** An error meant for a person: `message` is plain words, `detail` what the server said. */
export class ApiError extends Error {
  constructor(message, { status = 0, code = "", detail = "", retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

/** Turn a server error (status, JSON body {detail, code}, Retry-After) into plain words. */
export function explain(status, body, retryAfter = null) {
  const detail = (body && body.detail) || "";
  const code = (body && body.code) || "";
  const options = { status, code, detail, retryAfter };
  switch (status) {
    case 413:
      // The server's detail names its limit ("... limit of 512 MiB"); keep it verbatim.
      return new ApiError(`The file is too large. ${sentence(detail)}`, options);
    case 415: {
      // The detail lists the accepted formats; say that part, not the same words twice.
      const allowed = /allowed: ([^)]+)/.exec(detail);
      const rest = allowed ? `It accepts ${allowed[1]}.` : sentence(detail);
      return new ApiError(`That file is not audio this server can read. ${rest}`, options);
    }
    case 422:
      return new ApiError(`${UNDECODABLE}${detail ? ` (${detail})` : ""}`, options);
    case 503: {
      const wait = retryAfter ? ` Try again in ${retryAfter} s.` : " Try again shortly.";
      if (code === "model_unavailable") {
        return new ApiError(`The model is not ready: ${sentence(detail)}${wait}`, options);
      }
      return new ApiError(`The server is busy.${wait}`, options);
    }
    case 404:
      return new ApiError("That job is gone (unknown, or expired on the server).", options);
    default:
      return new ApiError(
        detail
          ? `The server refused the request: ${sentence(detail)}`
          : `Server error (${status}).`,
        options,
      );
  }
}

const UNDECODABLE =
  "The audio could not be decoded: the file may be damaged, cut short, or use a codec " +
  "the server cannot read.";

/** A job's `failed` event error {code, message} in plain words (no HTTP status there). */
export function explainJobError(error) {
  const code = (error && error.code) || "";
  const message = (error && error.message) || "the job failed";
  if (code === "gone") return message; // already plain words, from the client side
  if (["undecodable", "no_audio_stream", "truncated", "conversion_timeout"].includes(code)) {
    return `${UNDECODABLE} (${message})`;
  }
  if (code === "audio_too_long") return `The audio is too long: ${sentence(message)}`;
  if (code === "model_unavailable") return `The model is not available: ${sentence(message)}`;
  return `Transcription failed: ${sentence(message)}`;
}

function sentence(text) {
  if (!text) return "";
  const t = text.charAt(0).toUpperCase() + text.slice(1);
  return /[.!?]$/.test(t) ? t : `${t}.`;
}

async function readError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page, say): the status alone has to do.
  }
  return explain(response.status, body, response.headers.get("Retry-After"));
}

// A server started with API keys answers 401 without one. The page asks once, keeps the
// key for this browser tab (sessionStorage, gone when the tab closes) and sends it as a
// header; WebSockets, which cannot carry headers from a browser, offer it as a subprotocol.
const KEY_STORE = "aiotranscribe.apiKey";

export const apiKey = () => sessionStorage.getItem(KEY_STORE) || "";

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Ask the person for a key; false when they decline. */
function askForKey(wrong) {
  const question = wrong
    ? "That API key was not accepted. Enter a valid key:"
    : "This server needs an API key. Enter yours:";
  const key = window.prompt(question, "");
  if (!key || !key.trim()) return false;
  sessionStorage.setItem(KEY_STORE, key.trim());
  return true;
}

async function getJson(url, options = {}) {
  for (;;) {
    let response;
    try {
      const headers = { ...authHeaders(), ...(options.headers || {}) };
      response = await fetch(url, { cache: "no-store", ...options, headers });
    } catch {
      throw new ApiError("Cannot reach the server. Check the connection and try again.");
    }
    if (response.status === 401 && askForKey(Boolean(apiKey()))) continue;
    if (response.status === 401) {
      throw new ApiError("This server needs an API key.", { status: 401, code: "unauthorized" });
    }
    if (!response.ok) throw await readError(response);
    return response.json();
  }
}

/** Make sure requests carry a key the server accepts, if it wants one (asks on 401). */
export const ensureKey = () => getJson("/v1/models");

export const getHealth = () => getJson("/health");
export const getStatus = (jobId) => getJson(`/jobs/${encodeURIComponent(jobId)}/status`);
export const getResult = (jobId) => getJson(`/jobs/${encodeURIComponent(jobId)}/result`);
export const cancelJob = (jobId) =>
  getJson(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
/** Delete a job and its data; the server cancels a running one first. */
export const deleteJob = (jobId) =>
  getJson(`/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" });

const JOBS_PAGE = 50;

/** A page of this key's jobs, newest first: {jobs, next_cursor}. */
export function listJobs(cursor = "") {
  const after = cursor ? `&cursor=${encodeURIComponent(cursor)}` : "";
  return getJson(`/jobs?limit=${JOBS_PAGE}${after}`);
}

export function resultUrl(jobId, format) {
  const url = `/jobs/${encodeURIComponent(jobId)}/result?format=${encodeURIComponent(format)}`;
  // A download link cannot send a header: the key rides in the query (the server keeps it
  // out of its access log).
  const key = apiKey();
  return key ? `${url}&api_key=${encodeURIComponent(key)}` : url;
}

/**
 * POST the file to /transcribe/async. XHR rather than fetch because only XHR reports
 * upload progress. Resolves with {job_id, ...}; rejects with an ApiError.
 * Returns {promise, abort}.
 */
export function uploadAudio(file, fields, onProgress) {
  const xhr = new XMLHttpRequest();
  const promise = new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("file", file, file.name);
    for (const [name, value] of Object.entries(fields)) {
      if (value) form.append(name, value);
    }
    xhr.open("POST", "/transcribe/async");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300 && xhr.response && xhr.response.job_id) {
        onProgress(1);
        resolve(xhr.response);
      } else {
        reject(explain(xhr.status, xhr.response, xhr.getResponseHeader("Retry-After")));
      }
    });
    xhr.addEventListener("error", () => {
      // The server may answer 413 before the body is sent and close the connection; the
      // browser then reports a network error instead of the answer, so mention both.
      reject(
        new ApiError(
          "The upload failed: the server could not be reached, or it closed the " +
            "connection (a file over its size limit does that).",
        ),
      );
    });
    xhr.addEventListener("abort", () =>
      reject(new ApiError("Upload cancelled.", { code: "aborted" })),
    );
    xhr.send(form);
  });
  return { promise, abort: () => xhr.abort() };
}

const RECONNECT_DELAYS_MS = [500, 1000, 2000, 4000, 8000];
const POLL_MS = 1500;
// Close code 1012: the server is restarting and keeps the job. Try again this often, for
// about as long as a restart with a model load takes, before falling back to polling.
const SERVICE_RESTART = 1012;
const RESTART_RETRY_MS = 2000;
const RESTART_RETRIES = 150;

/**
 * Follow a job until it ends. `onEvent` gets each event once, in seq order (the WebSocket
 * history replays from `after`, so a resumed socket never repeats one). `onConnection`
 * gets "live" | "reconnecting" | "restarting" | "polling". Returns {stop}; `done` resolves
 * with the terminal event.
 */
export function followJob(jobId, { onEvent, onConnection = () => {} }) {
  let lastSeq = 0;
  let stopped = false;
  let ws = null;
  let timer = null;
  let attempt = 0;
  let restartTries = 0; // > 0 while the server restarts (it closed with 1012)
  let resolveDone;
  const done = new Promise((resolve) => {
    resolveDone = resolve;
  });

  const finish = (event) => {
    if (stopped) return;
    stopped = true;
    clearTimeout(timer);
    resolveDone(event);
  };

  const deliver = (event) => {
    if (stopped || event.seq <= lastSeq) return;
    lastSeq = event.seq;
    onEvent(event);
    if (TERMINAL.has(event.type)) finish(event);
  };

  const connect = () => {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const path = `/jobs/${encodeURIComponent(jobId)}/events?after=${lastSeq}`;
    const url = `${proto}//${location.host}${path}`;
    let opened = false;
    try {
      const key = apiKey();
      ws = key ? new WebSocket(url, ["aiotranscribe", `key.${key}`]) : new WebSocket(url);
    } catch {
      startPolling();
      return;
    }
    ws.addEventListener("open", () => {
      opened = true;
      attempt = 0;
      restartTries = 0;
      onConnection("live");
    });
    ws.addEventListener("message", (msg) => {
      try {
        deliver(JSON.parse(msg.data));
      } catch {
        // A frame we cannot parse is not worth dropping the job view for.
      }
    });
    ws.addEventListener("close", (ev) => {
      ws = null;
      if (stopped) return;
      // The server is restarting: it kept the job; come back after it, from lastSeq.
      if (ev.code === SERVICE_RESTART || (restartTries > 0 && restartTries < RESTART_RETRIES)) {
        restartTries += 1;
        onConnection("restarting");
        timer = setTimeout(connect, RESTART_RETRY_MS);
        return;
      }
      // Not terminal yet: the socket dropped (network, proxy, or the server went away).
      // A socket that never opened may mean WebSockets are blocked on the way: poll instead.
      if (!opened && attempt >= 2) {
        startPolling();
        return;
      }
      if (attempt >= RECONNECT_DELAYS_MS.length) {
        startPolling();
        return;
      }
      onConnection("reconnecting");
      timer = setTimeout(connect, RECONNECT_DELAYS_MS[attempt++]);
    });
  };

  // The seed clients' way: /status every so often. No segments or ETA, but it ends right.
  let failures = 0;
  const poll = async () => {
    if (stopped) return;
    try {
      const info = await getStatus(jobId);
      failures = 0;
      onConnection("polling");
      if (stopped) return;
      if (TERMINAL.has(info.status)) {
        // Synthesize the terminal event the socket would have sent.
        const event = { type: info.status, job_id: jobId, seq: lastSeq + 1, polled: true };
        if (info.status === "completed") event.result = info.result;
        if (info.status === "failed") event.error = { code: "", message: info.error || "" };
        if (info.status === "cancelled") event.reason = "";
        deliver(event);
        return;
      }
      onEvent({
        type: "polled",
        job_id: jobId,
        status: info.status,
        stage: info.stage,
        progress: info.progress,
      });
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        const error = { code: "gone", message: err.message };
        deliver({ type: "failed", job_id: jobId, seq: lastSeq + 1, error });
        return;
      }
      failures += 1;
      onConnection("reconnecting");
    }
    timer = setTimeout(poll, Math.min(POLL_MS * 2 ** Math.min(failures, 3), 10000));
  };

  const startPolling = () => {
    if (stopped) return;
    onConnection("polling");
    poll();
  };

  if (typeof WebSocket === "function") connect();
  else startPolling();

  return {
    done,
    stop() {
      stopped = true;
      clearTimeout(timer);
      if (ws) ws.close(1000);
    },
  };
}
