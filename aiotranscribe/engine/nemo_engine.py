"""Load a NeMo ASR model and transcribe batches of audio slices with it.

One ``NemoEngine`` owns one model. ``transcribe`` is not safe to call concurrently (NeMo flips
train/eval and dither on shared modules), so callers keep one call in flight per engine.
"""

from __future__ import annotations

import logging
import os
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo.nemo"

# NeMo pads clips under 1 s on both sides, which shifts timestamps; we pad on the right.
MIN_SLICE_SECONDS = 1.0


class ModelLoadError(RuntimeError):
    """The model could not be loaded. The message says why for the operator's log (paths
    included); ``code`` says it for clients (see ``workers.PUBLIC_REASONS``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def model_display_name(spec: str) -> str:
    """The name clients use for a model: ``demo``, a hub name, or a ``.nemo`` file's stem."""
    if spec == "demo":
        return "demo"
    if spec.endswith(".nemo") or (os.sep in spec and Path(spec).exists()):
        return Path(spec).stem
    return spec


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            "device_unavailable", f"device {device!r} requested but CUDA is not available here"
        )
    return device


def _load_model(spec: str, device: str) -> Any:
    import torch
    from nemo.collections.asr.models import ASRModel
    from nemo.utils import logging as nemo_logging

    # NeMo prints an info line on stdout for every transcribe call; keep warnings only.
    nemo_logging.setLevel(logging.WARNING)
    map_location = torch.device(device)
    path = DEMO_MODEL if spec == "demo" else Path(spec)
    if spec == "demo" or spec.endswith(".nemo"):
        if not path.is_file():
            raise ModelLoadError("model_not_found", f"model file not found: {path}")
        try:
            return ASRModel.restore_from(str(path), map_location=map_location)
        except Exception as exc:
            raise ModelLoadError("model_unreadable", f"could not restore {path}: {exc}") from exc
    try:
        return ASRModel.from_pretrained(spec, map_location=map_location)
    except Exception as exc:
        raise ModelLoadError(
            "hub_unavailable",
            f"could not load {spec!r} from the Hugging Face/NGC hub or its local cache "
            f"(no network and not cached? pass a .nemo path instead): {type(exc).__name__}: {exc}",
        ) from exc


def read_slice(path: str, start_frame: int, num_frames: int) -> np.ndarray:
    """Read ``num_frames`` 16-bit mono frames from a WAV file as float32 in [-1, 1]."""
    with wave.open(path, "rb") as wav:
        wav.setpos(start_frame)
        raw = wav.readframes(num_frames)
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def _words_of(hyp: Any, duration: float) -> list[dict[str, Any]]:
    stamps = getattr(hyp, "timestamp", None) or {}
    words = []
    for item in stamps.get("word", []) or []:
        text = str(item.get("word", "")).strip()
        if not text:
            continue
        start = min(max(float(item.get("start", 0.0)), 0.0), duration)
        end = min(max(float(item.get("end", start)), start), duration)
        words.append({"word": text, "start": round(start, 3), "end": round(end, 3)})
    if words or not hyp.text.strip():
        return words
    # A model that gives no word times: spread the words evenly so clients still get them.
    tokens = hyp.text.split()
    step = duration / max(len(tokens), 1)
    return [
        {"word": t, "start": round(i * step, 3), "end": round((i + 1) * step, 3)}
        for i, t in enumerate(tokens)
    ]


class NemoEngine:
    def __init__(self, spec: str, device: str = "auto", threads: int | None = None) -> None:
        self.spec = spec
        self.requested_device = device
        self.threads = threads
        self.model: Any = None
        self.info: dict[str, Any] = {}

    def load(self) -> dict[str, Any]:
        """Load the model; returns plain facts about it (name, device, sample rate, load time)."""
        started = time.perf_counter()
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        device = resolve_device(self.requested_device)
        model = _load_model(self.spec, device)
        model.eval()
        self.model = model
        self.sample_rate = int(model.cfg.get("sample_rate", 16000))
        self.info = {
            "name": model_display_name(self.spec),
            "spec": self.spec,
            "device": device,
            "sample_rate": self.sample_rate,
            "class": type(model).__name__,
            "load_s": round(time.perf_counter() - started, 3),
        }
        return self.info

    def transcribe(self, slices: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
        """Transcribe slices ``(wav_path, start_frame, num_frames)`` of 16 kHz mono WAVs.

        Returns one ``{"text", "words": [{word, start, end}], "infer_s"}`` per slice, times in
        seconds from the slice's start, as plain floats.
        """
        if self.model is None:
            raise RuntimeError("model not loaded")
        min_frames = int(MIN_SLICE_SECONDS * self.sample_rate) + 1
        audio = []
        durations = []
        for path, start, count in slices:
            samples = read_slice(path, start, count)
            durations.append(len(samples) / self.sample_rate)
            if len(samples) < min_frames:
                samples = np.pad(samples, (0, min_frames - len(samples)))
            audio.append(samples)
        started = time.perf_counter()
        model = self.model
        # transcribe() leaves modules in train mode and restore_from() returns train mode:
        # eval() before every call, and no dither so results are repeatable.
        model.eval()
        featurizer = getattr(getattr(model, "preprocessor", None), "featurizer", None)
        if featurizer is not None and hasattr(featurizer, "dither"):
            featurizer.dither = 0.0
        import torch

        with torch.inference_mode():
            hyps = model.transcribe(
                audio, batch_size=len(audio), timestamps=True, verbose=False, num_workers=0
            )
        if isinstance(hyps, tuple):  # some models return (best, all)
            hyps = hyps[0]
        elapsed = time.perf_counter() - started
        return [
            {"text": str(h.text).strip(), "words": _words_of(h, d), "infer_s": elapsed}
            for h, d in zip(hyps, durations, strict=True)
        ]
