"""Load a NeMo ASR model and transcribe batches of audio slices with it.

One ``NemoEngine`` owns one model. ``transcribe`` is not safe to call concurrently (NeMo flips
train/eval and dither on shared modules), so callers keep one call in flight per engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from aiotranscribe.engine.families import Family, UnsupportedModel, adapter_for

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo.nemo"

# NeMo's restore keeps process-wide state (the model being restored, its unpacked folder):
# two models restored at once by thread workers of one process broke each other
# ("Can't instantiate abstract class ModelPT"). One restore at a time per process.
_RESTORE_LOCK = threading.Lock()

# NeMo pads clips under 1 s on both sides, which shifts timestamps; we pad on the right.
MIN_SLICE_SECONDS = 1.0


class ModelLoadError(RuntimeError):
    """The model could not be loaded. The message says why for the operator's log (paths
    included); ``code`` says it for clients (see ``workers.PUBLIC_REASONS``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            "device_unavailable", f"device {device!r} requested but CUDA is not available here"
        )
    return device


def autocast_dtype(
    precision: str | None, device: str, bf16_supported: bool | None = None
) -> Any | None:
    """The dtype inference autocasts to on ``device`` (``torch.bfloat16``/``float16``), or
    None for fp32: always on CPU (autocast there is slower than fp32 for these models), and
    bf16 becomes fp16 on a GPU without bf16 (before Ampere)."""
    if precision in (None, "fp32") or not device.startswith("cuda"):
        return None
    import torch

    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_supported else torch.float16
    raise ValueError(f"precision {precision!r}: choose fp32, bf16 or fp16")


def precision_name(dtype: Any | None) -> str:
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), "fp32")


def _load_model(spec: str, device: str) -> Any:
    import torch
    from nemo.collections.asr.models import ASRModel
    from nemo.core.classes.modelPT import ModelPT
    from nemo.utils import logging as nemo_logging

    # NeMo prints an info line on stdout for every transcribe call; keep warnings only.
    nemo_logging.setLevel(logging.WARNING)
    map_location = torch.device(device)
    path = DEMO_MODEL if spec == "demo" else Path(spec)
    if spec == "demo" or spec.endswith(".nemo"):
        if not path.is_file():
            raise ModelLoadError("model_not_found", f"model file not found: {path}")
        try:
            # ModelPT, not ASRModel: restore whatever class the file holds, so that one we do
            # not serve is named as such (engine.families) rather than failing obscurely.
            return ModelPT.restore_from(str(path), map_location=map_location)
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


class NemoEngine:
    """``config`` is the model's settings as plain data (``name``, ``decoder``,
    ``max_slice_s``, ``languages``: see ``config.ModelSettings.engine_config``)."""

    def __init__(
        self,
        spec: str,
        device: str = "auto",
        threads: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.requested_device = device
        self.threads = threads
        self.config = dict(config or {})
        self.model: Any = None
        self.family: Family | None = None
        self.info: dict[str, Any] = {}
        self.autocast: Any | None = None
        """The dtype calls autocast to on CUDA (``--precision``); None: fp32."""

    def load(self) -> dict[str, Any]:
        """Load the model and prove it transcribes; returns plain facts about it (name,
        device, sample rate, load time, capabilities)."""
        started = time.perf_counter()
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        device = resolve_device(self.requested_device)
        with _RESTORE_LOCK:
            model = _load_model(self.spec, device)
        model.eval()
        try:
            family = adapter_for(model, self.config)
        except (UnsupportedModel, ValueError) as exc:
            raise ModelLoadError("unsupported_model", str(exc)) from exc
        self.model, self.family = model, family
        self.sample_rate = family.sample_rate
        self.autocast = autocast_dtype(self.config.get("precision"), device)
        fallback = None
        if self.autocast is not None:
            try:
                self._self_check()
            except ModelLoadError as exc:
                # Where a model does not run in half precision, it runs in fp32.
                fallback = str(exc.__cause__ or exc)
                self.autocast = None
        if self.autocast is None:
            self._self_check()
        self.info = {
            "name": self.config.get("name") or self.spec,
            "spec": self.spec,
            "device": device,
            "sample_rate": self.sample_rate,
            "class": type(model).__name__,
            "capabilities": family.capabilities(),
            "precision": precision_name(self.autocast),
            "fast_decoding": family.fast_decoding,
            "cuda_alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF")
            or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "load_s": round(time.perf_counter() - started, 3),
        }
        if fallback is not None:
            self.info["precision_fallback"] = fallback
        return self.info

    def _self_check(self) -> None:
        """A short clip, then a two-item batch, with the model's default options: a model
        that cannot do this would fail every request, so it must not be called healthy."""
        rng = np.random.default_rng(0)
        clip = (rng.standard_normal(int(1.5 * self.sample_rate)) * 0.01).astype(np.float32)
        try:
            self._run([clip], {})
            self._run([clip, clip[: self.sample_rate]], {})
        except Exception as exc:
            raise ModelLoadError(
                "self_check_failed",
                f"{self.spec} loaded but could not transcribe a test clip: "
                f"{type(exc).__name__}: {exc}",
            ) from exc

    def _run(self, audio: list[np.ndarray], options: dict[str, Any]) -> list[Any]:
        assert self.family is not None
        model = self.model
        # transcribe() leaves modules in train mode and restore_from() returns train mode:
        # eval() before every call, and no dither so results are repeatable.
        model.eval()
        featurizer = getattr(getattr(model, "preprocessor", None), "featurizer", None)
        if featurizer is not None and hasattr(featurizer, "dither"):
            featurizer.dither = 0.0
        import torch

        autocast = (
            torch.autocast("cuda", dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            return self.family.transcribe(audio, options)

    def transcribe(
        self, slices: list[tuple[str, int, int]], options: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Transcribe slices ``(wav_path, start_frame, num_frames)`` of 16 kHz mono WAVs, all
        with the same ``options`` (``language``, ``task``, ``target_language``,
        ``punctuation``; checked by the server against the capabilities).

        Returns one ``{"text", "words": [{word, start, end}], "infer_s"}`` per slice, times in
        seconds from the slice's start, as plain floats; ``words`` is empty when the model
        gives no word times.
        """
        if self.family is None:
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
        hyps = self._run(audio, options or {})
        elapsed = time.perf_counter() - started
        family = self.family
        return [
            {"text": str(h.text).strip(), "words": family.words(h, d), "infer_s": elapsed}
            for h, d in zip(hyps, durations, strict=True)
        ]
