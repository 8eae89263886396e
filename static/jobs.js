// The server's jobs for this API key (GET /jobs, newest first, a page at a time), not only
// this tab's: any of them can be reopened or deleted. The job on screen updates its entry
// from its events at once; the whole list is refreshed from the server every few seconds.

import { listJobs } from "./api.js";

const position = (job) => `${job.created_at}\u0000${job.job_id}`; // the server's order

export class JobList {
  /** `onOpen(id)` and `onDelete(id, name)` run when a job's buttons are used. */
  constructor(list, emptyNote, moreButton, { onOpen, onDelete }) {
    this.list = list;
    this.emptyNote = emptyNote;
    this.moreButton = moreButton;
    this.onOpen = onOpen;
    this.onDelete = onDelete;
    this.jobs = [];
    this.next = null; // cursor of the page after those shown
    this.extended = false; // older pages were loaded with "Show older jobs"
    this.asked = 0; // refreshes started: only the latest one's answer is used
    this.currentId = null;
    moreButton.addEventListener("click", () => this.more());
  }

  find(id) {
    return this.jobs.find((j) => j.job_id === id);
  }

  /** Reload the newest page; older pages already shown stay (those past it). */
  async refresh() {
    const asked = ++this.asked;
    const page = await listJobs();
    if (asked !== this.asked) return; // a later refresh started: its answer is newer
    if (this.extended && page.next_cursor) {
      const last = position(page.jobs[page.jobs.length - 1]);
      this.jobs = [...page.jobs, ...this.jobs.filter((j) => position(j) < last)];
    } else {
      this.jobs = page.jobs;
      this.next = page.next_cursor;
      this.extended = false;
    }
    this.render();
  }

  async more() {
    if (!this.next) return;
    this.moreButton.disabled = true;
    try {
      const page = await listJobs(this.next);
      const have = new Set(this.jobs.map((j) => j.job_id));
      this.jobs.push(...page.jobs.filter((j) => !have.has(j.job_id)));
      this.next = page.next_cursor;
      this.extended = true;
    } finally {
      this.moreButton.disabled = false;
      this.render();
    }
  }

  /** Add a job or update its fields (from this tab's events), without asking the server. */
  note(id, fields) {
    const job = this.find(id);
    if (job) Object.assign(job, fields);
    else this.jobs.unshift({ job_id: id, created_at: new Date().toISOString(), ...fields });
    this.render();
  }

  remove(id) {
    this.jobs = this.jobs.filter((j) => j.job_id !== id);
    this.render();
  }

  setCurrent(id) {
    this.currentId = id;
    this.render();
  }

  render() {
    this.emptyNote.hidden = this.jobs.length > 0;
    this.moreButton.hidden = !this.next;
    this.list.replaceChildren(...this.jobs.map((job) => this.item(job)));
  }

  item(job) {
    const name = job.filename || job.job_id;
    const status = job.status || "unknown";
    const li = document.createElement("li");
    li.className = "job";
    li.dataset.jobId = job.job_id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "job-open";
    open.textContent = name;
    open.setAttribute("aria-label", `Open ${name}, ${status}`);
    if (job.job_id === this.currentId) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => this.onOpen(job.job_id));
    const badge = document.createElement("span");
    badge.className = `badge status-${status}`;
    badge.textContent = status;
    const when = document.createElement("time");
    when.className = "muted";
    when.dateTime = job.created_at;
    when.textContent = shortTime(new Date(job.created_at));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "job-delete";
    remove.textContent = "Delete";
    remove.setAttribute("aria-label", `Delete ${name}`);
    remove.addEventListener("click", () => this.onDelete(job.job_id, name));
    li.append(open, badge, when, remove);
    return li;
  }
}

/** The time of day for today's jobs, the date too for older ones. */
function shortTime(date) {
  const time = { hour: "2-digit", minute: "2-digit" };
  if (date.toDateString() === new Date().toDateString()) {
    return date.toLocaleTimeString([], time);
  }
  return date.toLocaleString([], { month: "short", day: "numeric", ...time });
}
