// The server status line in the header, from /health: the default model's state (loading,
// ready, failed with its error), other models that are not ready, and the model list for the
// picker. Polled quickly while a model loads, slowly once it is ready.

import { getHealth } from "./api.js";

const READY_POLL_MS = 30000;
const LOADING_POLL_MS = 3000;
const DOWN_POLL_MS = 5000;

/** Keep `box` (with a `[data-role=text]` child) up to date; `onModels` gets the names. */
export function watchHealth(box, onModels) {
  const text = box.querySelector("[data-role=text]");
  const refresh = async () => {
    let next = READY_POLL_MS;
    try {
      const health = await getHealth();
      const models = health.models || [];
      const main = models.find((m) => m.name === health.model_name) || {};
      // `models` is ours; a seed-style server only says model_loaded.
      const state = main.state || (health.model_loaded ? "ready" : "loading");
      box.dataset.state = state;
      let line = `Model ${health.model_name}: `;
      if (state === "ready") {
        line += main.device ? `ready (${main.device})` : "ready";
      } else if (state === "failed") {
        line += `failed to load — ${main.error || "see the server log"}`;
      } else {
        line += "loading…";
      }
      for (const m of models) {
        if (m.name === health.model_name || m.state === "ready") continue;
        line += ` · ${m.name}: ${m.state}`;
      }
      text.textContent = line;
      onModels(models);
      if (state !== "ready") next = LOADING_POLL_MS;
    } catch {
      box.dataset.state = "down";
      text.textContent = "The server cannot be reached.";
      next = DOWN_POLL_MS;
    }
    setTimeout(refresh, next);
  };
  refresh();
}
