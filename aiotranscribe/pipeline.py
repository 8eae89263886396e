"""One job's way from upload to result, resumable from what its record says.

convert (ffmpeg) -> plan slices -> queue the slices not done in the model's pool -> publish
segments (in file order) and progress as slices are committed -> merge. Every step is
written to the store before it is acted on: conversion and slicing are committed together
(the upload is deleted only after), and segments go out with the record's counters in one
atomic append, so a job resumed after a crash neither repeats nor skips an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from aiotranscribe import audio, chunking
from aiotranscribe.admission import Admission
from aiotranscribe.blobstore import BlobError
from aiotranscribe.config import Settings
from aiotranscribe.jobs import PROCESSING, Job, utcnow_iso
from aiotranscribe.pool import InferencePool
from aiotranscribe.store import EventSpec, JobStore, SliceRecord
from aiotranscribe.store.base import DONE
from aiotranscribe.transcript import build_result, slice_segments

# Share of overall progress given to conversion; the rest follows transcribed audio.
CONVERT_SHARE = 0.1
# Conversions at once: each is an ffmpeg process with its own CPU appetite.
MAX_CONVERSIONS = 2
# A conversion that has decoded nothing new for this long gives its slot to the next job
# and runs on, outside the slots, until its own wall-clock limit: a hung decoder then costs
# one idle process (and at most its CPU rlimit), not every other upload's turn. A working
# ffmpeg reports progress every 0.25 s.
SLOT_STALL_S = 3.0
UPLOAD, WAV = "upload", "audio.wav"

log = structlog.get_logger(__name__)


class ConversionSlot:
    """One of ``MAX_CONVERSIONS`` slots, held while a conversion makes progress."""

    def __init__(self, slots: asyncio.Semaphore, job_id: str) -> None:
        self._slots, self._job_id = slots, job_id
        self._held = False
        self._last = 0.0
        self._watch: asyncio.Task[None] | None = None

    def progressed(self) -> None:
        self._last = time.monotonic()

    async def __aenter__(self) -> ConversionSlot:
        await self._slots.acquire()
        self._held, self._last = True, time.monotonic()
        self._watch = asyncio.create_task(self._watchdog())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._watch is not None
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        self._give_up()

    def _give_up(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()

    async def _watchdog(self) -> None:
        while (idle := time.monotonic() - self._last) < SLOT_STALL_S:
            await asyncio.sleep(SLOT_STALL_S - idle)
        log.warning("conversion_stalled", job_id=self._job_id, slot="given up")
        self._give_up()


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        admission: Admission,
        active: dict[str, str],
    ) -> None:
        self.settings = settings
        self.store = store
        self.admission = admission
        self.active = active  # job id -> status, kept up to date for metrics
        self._conversions = asyncio.Semaphore(MAX_CONVERSIONS)
        # With --blob-store: puts (job id, converted WAV) where remote workers fetch slices.
        self.publish: Callable[[str, Path], Awaitable[None]] | None = None

    async def _emit(self, job: Job, events: list[EventSpec], **changes: Any) -> None:
        for name, value in changes.items():
            setattr(job, name, value)
        await self.store.append_events(job.id, events, **changes)

    async def _status(self, job: Job, pool: InferencePool, status: str, stage: str) -> None:
        self.active[job.id] = status
        position = pool.queue_position(job.id)
        await self._emit(
            job,
            [("status", {"status": status, "stage": stage, "queue_position": position})],
            status=status,
            stage=stage,
        )

    def _progress(self, job: Job, progress: float, **fields: Any) -> EventSpec:
        # Progress never goes backwards, whatever order slices finish in.
        job.progress = max(job.progress, min(progress, 1.0))
        return ("progress", {"stage": job.stage, "progress": round(job.progress, 4), **fields})

    async def run(
        self, job: Job, pool: InferencePool, workdir: Path, timings: dict[str, float]
    ) -> dict[str, Any]:
        """Take the job from where its record says it is to its result (the caller writes
        the terminal event). Raises AudioError, ModelUnavailable or WorkerError."""
        wav = workdir / WAV
        records = await self.store.slices(job.id)
        announced = None  # the queue position the job's last status event gave
        if not records:
            records, announced = await self._convert(job, pool, workdir, timings)
        elif not await asyncio.to_thread(wav.exists):
            raise audio.AudioError(
                410, "audio_missing", "the job's converted audio is gone from the spool"
            )
        duration = job.duration_s or 0.0
        timings.setdefault("audio_s", duration)
        if self.publish is not None and any(r.state != DONE for r in records):
            try:
                await self.publish(job.id, wav)
            except BlobError as exc:
                log.error("blob_publish_failed", job_id=job.id, error=str(exc))
                raise audio.AudioError(
                    503, "blob_store_unavailable", "the audio could not be stored for the workers"
                ) from None
        segments = await self._infer(job, pool, wav, records, duration, timings, announced)
        job.stage = "finalizing"
        caps = pool.capabilities or {}
        result = build_result(
            segments,
            filename=job.filename,
            model=job.model,
            language=job.language,
            duration=duration,
            include_words=job.include_timestamps,
            finished_at=utcnow_iso(),
        )
        result["task"] = job.task
        result["word_timestamps"] = bool(caps.get("word_timestamps", True))
        result["job_id"] = job.id
        return result

    async def _convert(
        self, job: Job, pool: InferencePool, workdir: Path, timings: dict[str, float]
    ) -> tuple[list[SliceRecord], int]:
        """Upload -> 16 kHz WAV -> slices, committed together; then the upload goes.
        Returns the slices and the queue position announced with them."""
        settings = self.settings
        upload, wav = workdir / UPLOAD, workdir / WAV
        if not await asyncio.to_thread(upload.exists):
            raise audio.AudioError(410, "audio_missing", "the job's upload is gone from the spool")
        limits = audio.Limits(settings.ffmpeg_max_memory_mb, settings.ffmpeg_max_cpu_s)
        async with ConversionSlot(self._conversions, job.id) as slot:
            await self._status(job, pool, PROCESSING, "converting")
            t0 = time.perf_counter()
            declared = await audio.probe_duration(
                upload, job.kind, ffprobe=settings.ffprobe, limits=limits
            )
            if declared is not None and declared > settings.max_audio_seconds:
                raise audio.AudioError(
                    413,
                    "audio_too_long",
                    f"the audio is {declared:.0f} s long; this server accepts at most "
                    f"{settings.max_audio_seconds:.0f} s",
                )
            if declared is not None:
                self.admission.update(job.id, declared)
            last_report = furthest = 0.0
            reports: set[asyncio.Task[None]] = set()

            def converted(seconds: float) -> None:
                nonlocal last_report, furthest
                if seconds > furthest:
                    furthest = seconds
                    slot.progressed()
                if declared and seconds - last_report >= max(declared / 20, 0.5):
                    last_report = seconds
                    event = self._progress(
                        job,
                        CONVERT_SHARE * min(seconds / declared, 1.0),
                        chunks_done=0,
                        chunks_total=None,
                        audio_done_s=0.0,
                        audio_total_s=round(declared, 3),
                        eta_s=None,
                    )
                    report = asyncio.ensure_future(self._emit(job, [event], progress=job.progress))
                    reports.add(report)
                    report.add_done_callback(reports.discard)

            try:
                duration = await audio.convert(
                    upload,
                    job.kind,
                    wav,
                    max_seconds=settings.max_audio_seconds,
                    timeout=audio.conversion_limit(
                        declared, settings.convert_min_timeout_s, settings.convert_timeout_s
                    ),
                    declared_s=declared,
                    ffmpeg=settings.ffmpeg,
                    limits=limits,
                    on_progress=converted,
                )
            finally:
                await asyncio.gather(*reports, return_exceptions=True)
            timings["convert_s"] = time.perf_counter() - t0
            timings["audio_s"] = duration
        self.admission.update(job.id, duration)
        try:
            await asyncio.to_thread(_fsync, wav)
        except OSError as exc:
            if audio.out_of_space(exc):
                raise audio.insufficient_storage() from None
            raise
        slices = await asyncio.to_thread(chunking.plan_slices, wav, self.chunk_seconds(pool))
        job.stage, job.duration_s = "transcribing", duration
        self.active[job.id] = PROCESSING
        # Where the job joins the model's line (``_infer`` corrects it once it has).
        position = pool.queue.expected_position(job.id)
        events: list[EventSpec] = [
            (
                "status",
                {"status": PROCESSING, "stage": "transcribing", "queue_position": position},
            ),
            self._progress(
                job,
                CONVERT_SHARE,
                chunks_done=0,
                chunks_total=len(slices),
                audio_done_s=0.0,
                audio_total_s=round(duration, 3),
                eta_s=self._eta(pool, job.id, duration),
            ),
        ]
        await self.store.add_slices(
            job.id,
            slices,
            events,
            status=PROCESSING,
            stage="transcribing",
            progress=job.progress,
            duration_s=duration,
        )
        # The slices are committed: from here a restart resumes from the WAV.
        await asyncio.to_thread(upload.unlink, missing_ok=True)
        return await self.store.slices(job.id), position

    def chunk_seconds(self, pool: InferencePool) -> float:
        """The slice length for ``pool``'s model: ``--chunk-seconds``, else 20 s on CPU (slow
        per slice; short slices give steady progress) and 60 s on a GPU (it eats long slices
        at once and pays per call); never above the model's ``max_slice_s`` (Canary: 40 s)."""
        chosen = self.settings.chunk_seconds
        if not chosen:
            chosen = 60.0 if str(pool.info.get("device", "cpu")).startswith("cuda") else 20.0
        cap = (pool.capabilities or {}).get("max_slice_s")
        return min(chosen, float(cap)) if cap else chosen

    def _eta(self, pool: InferencePool, job_id: str, remaining_audio_s: float) -> float | None:
        """Seconds until the job is transcribed: its own remaining audio plus what other
        jobs will be served meanwhile (round-robin: about as much as it has waiting, each),
        at the speed of all the model's workers together; None until a batch has run."""
        speed = pool.throughput
        if not speed:
            return None
        own = int(remaining_audio_s * pool.sample_rate)
        others = pool.queue.competing_frames(job_id, own) / pool.sample_rate
        return round((remaining_audio_s + others) / speed, 2)

    async def _announce_position(
        self, job: Job, pool: InferencePool, announced: int | None
    ) -> int | None:
        """A status event when the job's place in line changed since ``announced``: while it
        waits, and once more (null) when a worker takes its first slice."""
        position = pool.wait_position(job.id)
        if position != announced:
            status = {"status": PROCESSING, "stage": "transcribing", "queue_position": position}
            await self._emit(job, [("status", status)])
        return position

    async def _infer(
        self,
        job: Job,
        pool: InferencePool,
        wav: Path,
        records: list[SliceRecord],
        duration: float,
        timings: dict[str, float],
        announced: int | None = None,
    ) -> list[dict[str, Any]]:
        rate = pool.sample_rate
        results: list[dict[str, Any] | None] = [
            r.result if r.state == DONE else None for r in records
        ]
        waiting = [r for r in records if r.state != DONE]
        queued_at = time.perf_counter()
        futures = pool.submit(
            job.id, [(r.idx, str(wav), r.start_frame, r.num_frames) for r in waiting], job.options
        )
        index_of = {fut: r.idx for fut, r in zip(futures, waiting, strict=True)}
        first_done: float | None = None
        pending = set(futures)
        position = announced
        try:
            await self._publish_ready(
                job, pool, records, results, duration, rate, pending, initial=True
            )
            if pending:
                position = await self._announce_position(job, pool, position)
            while pending:
                # While the job waits for its first turn, places in line are watched too.
                turn = pool.queue.turned() if position is not None else None
                waits: set[asyncio.Future[Any]] = set(pending)
                if turn is not None:
                    waits.add(turn)
                finished, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if turn in finished:
                    position = await self._announce_position(job, pool, position)
                done = pending & finished
                if not done:
                    continue
                pending -= done
                if first_done is None:
                    first_done = time.perf_counter()
                missing = False
                for fut in done:
                    value = fut.result()
                    results[index_of[fut]] = value
                    missing |= value is None
                if missing:  # committed, but not by our call: read it back
                    stored = await self.store.slices(job.id)
                    for r in stored:
                        if r.state == DONE and results[r.idx] is None:
                            results[r.idx] = r.result
                await self._publish_ready(job, pool, records, results, duration, rate, pending)
        finally:
            for fut in pending:
                fut.cancel()
        end = time.perf_counter()
        timings["queue_s"] = (first_done or end) - queued_at
        timings["inference_s"] = end - queued_at
        segments = []
        for r, result in zip(records, results, strict=True):
            segments += slice_segments(result or {}, r.start_frame / rate, r.num_frames / rate)
        return segments

    async def _publish_ready(
        self,
        job: Job,
        pool: InferencePool,
        records: list[SliceRecord],
        results: list[dict[str, Any] | None],
        duration: float,
        rate: int,
        pending: set[Any],
        initial: bool = False,
    ) -> None:
        """Segments of every slice now done, in file order (only once every earlier slice is
        done), and a progress event; one atomic append with the record's counters."""
        events: list[EventSpec] = []
        emitted, segment_id = job.slices_emitted, job.segments_emitted
        while emitted < len(records) and results[emitted] is not None:
            r = records[emitted]
            for seg in slice_segments(
                results[emitted] or {}, r.start_frame / rate, r.num_frames / rate
            ):
                events.append(("segment", {"segment": {"id": segment_id, **seg}}))
                segment_id += 1
            emitted += 1
        done = [r for r, res in zip(records, results, strict=True) if res is not None]
        audio_done = sum(r.num_frames for r in done) / rate
        self.admission.update(job.id, duration - audio_done)
        if initial and not events:  # nothing new since the last event (a fresh or resumed job)
            return
        events.append(
            self._progress(
                job,
                CONVERT_SHARE + (1 - CONVERT_SHARE) * audio_done / max(duration, 1e-9),
                chunks_done=len(done),
                chunks_total=len(records),
                audio_done_s=round(audio_done, 3),
                audio_total_s=round(duration, 3),
                eta_s=self._eta(pool, job.id, duration - audio_done) if pending else 0.0,
            )
        )
        await self._emit(
            job,
            events,
            slices_emitted=emitted,
            segments_emitted=segment_id,
            progress=job.progress,
        )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
