"""The transcription service: runs each job from upload to result, and owns job lifetimes.

One job: convert (ffmpeg) -> plan slices -> queue slices in the model's pool -> publish
progress and segments as slices finish -> merge -> completed. Whatever happens, the job
ends in exactly one terminal event and its spool directory goes to the janitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from aiotranscribe import audio, chunking
from aiotranscribe.config import Settings
from aiotranscribe.janitor import Janitor
from aiotranscribe.jobs import CANCELLED, COMPLETED, FAILED, PROCESSING, Job, JobStore, utcnow_iso
from aiotranscribe.pool import InferencePool, ModelUnavailable
from aiotranscribe.transcript import build_result, slice_segments
from aiotranscribe.workers import WorkerError

log = structlog.get_logger(__name__)

# Share of overall progress given to conversion; the rest follows transcribed audio.
CONVERT_SHARE = 0.1
# Conversions at once: each is an ffmpeg process with its own CPU appetite.
MAX_CONVERSIONS = 2
SEED_MODEL_ALIASES = ("parakeet", "canary")


class UnknownModel(Exception):
    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; this server serves: {', '.join(served)}")
        self.detail = str(self)


@dataclass
class Submission:
    upload_path: Path
    kind: str
    filename: str
    size: int
    model: str
    language: str | None = None
    include_timestamps: bool = True


def new_job_id() -> str:
    return uuid.uuid4().hex


class TranscriptionService:
    def __init__(
        self, settings: Settings, store: JobStore, pools: dict[str, InferencePool], janitor: Janitor
    ) -> None:
        self.settings = settings
        self.store = store
        self.pools = pools
        self.janitor = janitor
        self.reserved: set[str] = set()  # job ids whose upload is still arriving
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._conversions = asyncio.Semaphore(MAX_CONVERSIONS)
        self.closing = False
        # Called once per job as it ends, with its stage timings (seconds) and ``total_s``.
        self.on_finish: list[Callable[[Job, dict[str, float]], None]] = []

    # -- names and admission -----------------------------------------------------------------

    def resolve_model(self, requested: str | None) -> str:
        """The served model a request's ``model`` field names (seed aliases included)."""
        served = list(self.pools)
        if not requested:
            return served[0]
        if requested in self.pools:
            return requested
        if len(served) == 1 and requested.lower() in SEED_MODEL_ALIASES:
            return served[0]
        raise UnknownModel(requested, served)

    def admit(self, model: str) -> None:
        """Raise ModelUnavailable / QueueFull before an upload is read."""
        if self.closing:
            raise ModelUnavailable("the server is shutting down")
        pool = self.pools[model]
        pool.ensure_ready()
        pool.check_capacity(1)

    def job_dir(self, job_id: str) -> Path:
        return self.settings.spool_dir / job_id

    def live_ids(self) -> set[str]:
        return set(self.reserved) | {j.id for j in self.store if not j.terminal} | set(self._tasks)

    # -- running -----------------------------------------------------------------------------

    def start(self, job_id: str, sub: Submission) -> Job:
        job = Job(
            id=job_id,
            filename=sub.filename,
            model=sub.model,
            language=sub.language,
            include_timestamps=sub.include_timestamps,
            upload_bytes=sub.size,
        )
        self.store.add(job)
        self.reserved.discard(job_id)
        job.set_stage("pending", "queued", queue_position=None)
        task = asyncio.create_task(self._run(job, sub), name=f"job:{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))
        return job

    def cancel(self, job: Job, reason: str = "cancelled by client") -> bool:
        task = self._tasks.get(job.id)
        if job.terminal or task is None:
            return False
        self.pools[job.model].cancel(job.id)
        task.cancel(reason)
        return True

    async def _run(self, job: Job, sub: Submission) -> None:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        try:
            await self._transcribe(job, sub, timings)
        except asyncio.CancelledError as exc:
            self.pools[job.model].cancel(job.id)
            reason = str(exc.args[0]) if exc.args else "cancelled"
            job.finish(CANCELLED, reason=reason)
        except audio.AudioError as exc:
            self._fail(job, exc.status, exc.code, exc.detail)
        except ModelUnavailable as exc:
            self._fail(job, 503, "model_unavailable", exc.detail)
        except WorkerError as exc:
            self._fail(job, 500, exc.code, exc.message)
        except Exception as exc:
            log.exception("job_crashed", job_id=job.id)
            self._fail(job, 500, "internal_error", f"internal error: {type(exc).__name__}")
        finally:
            self.janitor.discard(self.job_dir(job.id))
            total = time.perf_counter() - started
            for hook in self.on_finish:
                hook(job, {**timings, "total_s": total})
            audio_s = timings.get("audio_s", 0.0)
            log.info(
                "transcription",
                job_id=job.id,
                status=job.status,
                model=job.model,
                bytes=sub.size,
                audio_s=round(audio_s, 3),
                convert_s=round(timings.get("convert_s", 0.0), 3),
                queue_s=round(timings.get("queue_s", 0.0), 3),
                inference_s=round(timings.get("inference_s", 0.0), 3),
                total_s=round(total, 3),
                rtf=round(total / audio_s, 4) if audio_s else None,
            )

    def _fail(self, job: Job, status: int, code: str, message: str) -> None:
        job.error, job.error_code, job.error_status = message, code, status
        job.finish(FAILED, error={"code": code, "message": message})

    async def _transcribe(self, job: Job, sub: Submission, timings: dict[str, float]) -> None:
        settings = self.settings
        pool = self.pools[job.model]
        workdir = self.job_dir(job.id)
        wav = workdir / "audio.wav"

        async with self._conversions:
            job.set_stage(PROCESSING, "converting")
            t0 = time.perf_counter()
            declared = await audio.probe_duration(
                sub.upload_path, sub.kind, ffprobe=settings.ffprobe
            )
            if declared is not None and declared > settings.max_audio_seconds:
                raise audio.AudioError(
                    413,
                    "audio_too_long",
                    f"the audio is {declared:.0f} s long; this server accepts at most "
                    f"{settings.max_audio_seconds:.0f} s",
                )
            last_report = 0.0

            def converted(seconds: float) -> None:
                nonlocal last_report
                if declared and seconds - last_report >= max(declared / 20, 0.5):
                    last_report = seconds
                    job.report_progress(
                        CONVERT_SHARE * min(seconds / declared, 1.0),
                        chunks_done=0,
                        chunks_total=None,
                        audio_done_s=0.0,
                        audio_total_s=round(declared, 3),
                        eta_s=None,
                    )

            duration = await audio.convert(
                sub.upload_path,
                sub.kind,
                wav,
                max_seconds=settings.max_audio_seconds,
                timeout=settings.convert_timeout_s,
                declared_s=declared,
                ffmpeg=settings.ffmpeg,
                on_progress=converted,
            )
            # The WAV is all we need from here; unlink off the loop (a big file takes a while).
            await asyncio.to_thread(sub.upload_path.unlink, missing_ok=True)
            timings["convert_s"] = time.perf_counter() - t0
            timings["audio_s"] = duration
        slices = await asyncio.to_thread(chunking.plan_slices, wav, self.chunk_seconds(pool))
        job.set_stage(PROCESSING, "transcribing")
        job.report_progress(
            CONVERT_SHARE,
            chunks_done=0,
            chunks_total=len(slices),
            audio_done_s=0.0,
            audio_total_s=round(duration, 3),
            eta_s=self._eta(pool, duration),
        )
        segments = await self._infer(job, pool, wav, slices, duration, timings)
        job.stage = "finalizing"
        result = build_result(
            segments,
            filename=job.filename,
            model=job.model,
            language=job.language,
            duration=duration,
            include_words=job.include_timestamps,
            finished_at=utcnow_iso(),
        )
        result["job_id"] = job.id
        job.result = result
        job.finish(COMPLETED, result=result)

    def chunk_seconds(self, pool: InferencePool) -> float:
        if self.settings.chunk_seconds:
            return self.settings.chunk_seconds
        # CPU inference is slow per slice; short slices give steady progress. A GPU eats
        # long slices at once and pays per call.
        return 60.0 if str(pool.info.get("device", "cpu")).startswith("cuda") else 20.0

    def _eta(self, pool: InferencePool, remaining_audio_s: float) -> float | None:
        speed = pool.stats.speed
        if not speed:
            return None
        backlog = pool.queued * self.chunk_seconds(pool)
        return round((remaining_audio_s + backlog) / speed, 2)

    async def _infer(
        self,
        job: Job,
        pool: InferencePool,
        wav: Path,
        slices: list[tuple[int, int]],
        duration: float,
        timings: dict[str, float],
    ) -> list[dict[str, Any]]:
        rate = pool.sample_rate
        queued_at = time.perf_counter()
        futures = pool.submit(job.id, [(str(wav), start, count) for start, count in slices])
        index_of = {fut: i for i, fut in enumerate(futures)}
        results: list[dict[str, Any] | None] = [None] * len(slices)
        segments: list[dict[str, Any]] = []
        emitted = 0
        audio_done = 0.0
        first_done: float | None = None
        pending = set(futures)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if first_done is None:
                    first_done = time.perf_counter()
                for fut in done:
                    i = index_of[fut]
                    results[i] = fut.result()
                    audio_done += slices[i][1] / rate
                # Segments go out in file order: only once every earlier slice is done.
                while emitted < len(slices) and results[emitted] is not None:
                    start, count = slices[emitted]
                    for seg in slice_segments(results[emitted] or {}, start / rate, count / rate):
                        job.publish("segment", segment={"id": len(segments), **seg})
                        segments.append(seg)
                    emitted += 1
                chunks_done = len(slices) - len(pending)
                job.report_progress(
                    CONVERT_SHARE + (1 - CONVERT_SHARE) * audio_done / max(duration, 1e-9),
                    chunks_done=chunks_done,
                    chunks_total=len(slices),
                    audio_done_s=round(audio_done, 3),
                    audio_total_s=round(duration, 3),
                    eta_s=self._eta(pool, duration - audio_done) if pending else 0.0,
                )
        finally:
            for fut in pending:
                fut.cancel()
        end = time.perf_counter()
        timings["queue_s"] = (first_done or end) - queued_at
        timings["inference_s"] = end - queued_at
        return segments

    # -- shutdown ----------------------------------------------------------------------------

    async def close(self, timeout: float) -> None:
        """Cancel running jobs (each ends with a ``cancelled`` event) and wait for them."""
        self.closing = True
        tasks = list(self._tasks.values())
        for job_id in list(self._tasks):
            job = self.store.get(job_id)
            if job is not None:
                self.cancel(job, "server shutting down")
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*tasks, return_exceptions=True)
