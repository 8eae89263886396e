// The transcript next to the audio player: words are seek targets, and the word being
// played is highlighted. Works on live segments as they arrive and on the final result.

/** 75.3 -> "1:15", 3725 -> "1:02:05". */
export function formatClock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

// After a word ends, keep it highlighted through short gaps so the highlight does not
// flicker between words, but not through a real pause.
const LINGER_S = 0.5;

// Words under this confidence (0..1, from the model) are shaded as unsure.
const LOW_CONFIDENCE = 0.5;

export class TranscriptView {
  /** @param {HTMLElement} container  @param {HTMLAudioElement} audio */
  constructor(container, audio) {
    this.container = container;
    this.audio = audio;
    this.words = []; // [{el, start, end}] in time order
    this.current = null;
    this.frame = 0;

    // One delegated listener: transcripts can hold thousands of words.
    container.addEventListener("click", (e) => {
      const target = e.target.closest("[data-start]");
      if (target) this.seek(Number(target.dataset.start), target);
    });
    container.addEventListener("keydown", (e) => this.onKey(e));
    container.addEventListener("focusin", (e) => {
      if (e.target.classList.contains("word")) this.makeTabStop(e.target);
    });

    const tick = () => {
      this.highlight(this.audio.currentTime, true);
      this.frame = this.audio.paused ? 0 : requestAnimationFrame(tick);
    };
    audio.addEventListener("play", () => {
      cancelAnimationFrame(this.frame);
      this.frame = requestAnimationFrame(tick);
    });
    for (const name of ["pause", "seeked", "timeupdate", "ended"]) {
      audio.addEventListener(name, () => this.highlight(audio.currentTime, !audio.paused));
    }
  }

  clear() {
    this.container.replaceChildren();
    this.words = [];
    this.current = null;
  }

  /** Append one segment {start, end, text, words?}; segments arrive in time order. */
  addSegment(segment) {
    const p = document.createElement("p");
    p.className = "segment";
    const stamp = document.createElement("button");
    stamp.type = "button";
    stamp.className = "stamp";
    stamp.dataset.start = segment.start;
    stamp.textContent = formatClock(segment.start);
    stamp.setAttribute("aria-label", `Play from ${formatClock(segment.start)}`);
    p.append(stamp, " ");

    const words = segment.words || [];
    if (words.length === 0) {
      // Timestamps were not requested: the segment text, seekable by its stamp only.
      p.append(segment.text);
    }
    words.forEach((w, i) => {
      const span = document.createElement("span");
      span.className = "word";
      span.textContent = w.word;
      span.dataset.start = w.start;
      span.dataset.end = w.end;
      span.setAttribute("role", "button");
      span.title = `${formatClock(w.start)} (${w.start.toFixed(2)} s)`;
      if (typeof w.confidence === "number") {
        // Shade what the model was unsure of; the exact value is in the tooltip.
        span.dataset.confidence = w.confidence;
        span.title += ` · confidence ${Math.round(w.confidence * 100)} %`;
        if (w.confidence < LOW_CONFIDENCE) span.classList.add("unsure");
      }
      // Roving tab stop: the transcript is one Tab stop, arrow keys move between words.
      span.tabIndex = this.words.length === 0 ? 0 : -1;
      this.words.push({ el: span, start: w.start, end: w.end });
      p.append(span);
      if (i < words.length - 1) p.append(" ");
    });
    this.container.append(p);
  }

  setSegments(segments) {
    this.clear();
    for (const seg of segments) this.addSegment(seg);
  }

  seek(seconds, el) {
    if (!Number.isFinite(seconds)) return;
    // Seeking before metadata has loaded is ignored by some browsers: retry once it loads.
    if (this.audio.readyState === 0) {
      this.audio.addEventListener("loadedmetadata", () => this.seek(seconds, el), { once: true });
      return;
    }
    this.audio.currentTime = seconds;
    this.highlight(seconds, false);
    if (el && el.classList.contains("word")) this.makeTabStop(el);
  }

  makeTabStop(el) {
    for (const w of this.container.querySelectorAll('.word[tabindex="0"]')) w.tabIndex = -1;
    el.tabIndex = 0;
  }

  onKey(e) {
    const el = e.target;
    if (!el.classList || !el.classList.contains("word")) return;
    const i = this.words.findIndex((w) => w.el === el);
    let next = null;
    if (e.key === "ArrowRight" || e.key === "ArrowDown") next = this.words[i + 1];
    else if (e.key === "ArrowLeft" || e.key === "ArrowUp") next = this.words[i - 1];
    else if (e.key === "Home") next = this.words[0];
    else if (e.key === "End") next = this.words[this.words.length - 1];
    else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      this.seek(Number(el.dataset.start), el);
      return;
    } else return;
    e.preventDefault();
    if (next) {
      this.makeTabStop(next.el);
      next.el.focus();
    }
  }

  /** The word playing at time t: the last one started, unless a pause followed it. */
  wordAt(t) {
    let lo = 0;
    let hi = this.words.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.words[mid].start <= t + 0.01) {
        found = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    if (found < 0) return null;
    const w = this.words[found];
    return t <= w.end + LINGER_S ? w : null;
  }

  highlight(t, follow) {
    const w = this.wordAt(t);
    if (w === this.current) return;
    if (this.current) {
      this.current.el.classList.remove("current");
      this.current.el.removeAttribute("aria-current");
    }
    this.current = w;
    if (!w) return;
    w.el.classList.add("current");
    w.el.setAttribute("aria-current", "time");
    if (follow) this.keepVisible(w.el);
  }

  // Scroll the transcript box (not the page) so the playing word stays in view.
  keepVisible(el) {
    const box = this.container;
    const top = el.offsetTop; // the box is position: relative, so this is box-relative
    if (top < box.scrollTop || top + el.offsetHeight > box.scrollTop + box.clientHeight) {
      box.scrollTop = Math.max(0, top - box.clientHeight / 3);
    }
  }
}
