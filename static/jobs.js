// This browser session's jobs, kept in sessionStorage so they survive a reload of the tab
// but are not shared with other tabs or kept after it closes (results expire on the server).

const KEY = "aiotranscribe.jobs";
const MAX_JOBS = 50;

export function loadJobs() {
  try {
    const jobs = JSON.parse(sessionStorage.getItem(KEY) || "[]");
    return Array.isArray(jobs) ? jobs : [];
  } catch {
    return [];
  }
}

function save(jobs) {
  try {
    sessionStorage.setItem(KEY, JSON.stringify(jobs.slice(0, MAX_JOBS)));
  } catch {
    // Storage full or disabled (private mode): the list just is not remembered.
  }
}

/** Add a job or update its fields; newest first. Returns the stored record. */
export function upsertJob(id, fields) {
  const jobs = loadJobs();
  let job = jobs.find((j) => j.id === id);
  if (job) Object.assign(job, fields);
  else {
    job = { id, created: new Date().toISOString(), ...fields };
    jobs.unshift(job);
  }
  save(jobs);
  return job;
}


/** Draw the list into `list` (a <ul>); `onOpen(id)` runs when a job's button is used. */
export function renderJobList(list, emptyNote, currentId, onOpen) {
  const jobs = loadJobs();
  emptyNote.hidden = jobs.length > 0;
  list.replaceChildren(
    ...jobs.map((job) => {
      const name = job.filename || job.id;
      const status = job.status || "unknown";
      const li = document.createElement("li");
      li.className = "job";
      li.dataset.jobId = job.id;
      const open = document.createElement("button");
      open.type = "button";
      open.className = "job-open";
      open.textContent = name;
      open.setAttribute("aria-label", `Open ${name}, ${status}`);
      if (job.id === currentId) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => onOpen(job.id));
      const badge = document.createElement("span");
      badge.className = `badge status-${status}`;
      badge.textContent = status;
      const when = document.createElement("time");
      when.className = "muted";
      when.dateTime = job.created;
      when.textContent = new Date(job.created).toLocaleTimeString([], {
        hour: "2-digit",
        minute: "2-digit",
      });
      li.append(open, badge, when);
      return li;
    }),
  );
}
