// Microphone recording with MediaRecorder. The result is uploaded as recorded (webm/opus in
// Chromium and Firefox, mp4/aac in Safari): the server sniffs and decodes all of those.

// In order of preference; the first the browser can record is used.
const TYPES = [
  ["audio/webm;codecs=opus", "webm"],
  ["audio/ogg;codecs=opus", "ogg"],
  ["audio/webm", "webm"],
  ["audio/mp4", "m4a"],
];

export function canRecord() {
  const media = navigator.mediaDevices;
  return Boolean(media && media.getUserMedia && window.MediaRecorder);
}

export class Recorder {
  constructor() {
    this.recorder = null;
    this.stream = null;
    this.chunks = [];
    this.startedAt = 0;
  }

  get recording() {
    return Boolean(this.recorder && this.recorder.state === "recording");
  }

  /** Ask for the microphone and start. Rejects with a plain-words Error. */
  async start() {
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      if (err && (err.name === "NotAllowedError" || err.name === "SecurityError")) {
        throw new Error("Microphone access was refused. Allow it in the browser to record.");
      }
      if (err && err.name === "NotFoundError") throw new Error("No microphone was found.");
      throw new Error(`The microphone could not be opened (${(err && err.name) || err}).`);
    }
    const [mimeType, ext] = TYPES.find(([t]) => MediaRecorder.isTypeSupported(t)) || ["", "webm"];
    this.ext = ext;
    this.recorder = new MediaRecorder(this.stream, mimeType ? { mimeType } : undefined);
    this.chunks = [];
    this.recorder.addEventListener("dataavailable", (e) => {
      if (e.data && e.data.size) this.chunks.push(e.data);
    });
    // A timeslice makes the data arrive in pieces, so a long recording is not one huge
    // buffer handed over only at the end.
    this.recorder.start(1000);
    this.startedAt = performance.now();
  }

  elapsed() {
    return this.recording ? (performance.now() - this.startedAt) / 1000 : 0;
  }

  /** Stop and resolve with a File ready to upload. */
  stop() {
    return new Promise((resolve, reject) => {
      const rec = this.recorder;
      if (!rec) {
        reject(new Error("Not recording."));
        return;
      }
      rec.addEventListener(
        "stop",
        () => {
          this.release();
          const type = rec.mimeType || "audio/webm";
          const blob = new Blob(this.chunks, { type });
          this.chunks = [];
          if (!blob.size) {
            reject(new Error("The recording is empty."));
            return;
          }
          const stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-");
          resolve(new File([blob], `recording-${stamp}.${this.ext}`, { type }));
        },
        { once: true },
      );
      rec.stop();
    });
  }

  /** Let go of the microphone (the browser's recording indicator goes off). */
  release() {
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.stream = null;
    this.recorder = null;
  }
}
