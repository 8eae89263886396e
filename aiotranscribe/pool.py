"""InferencePool: admission control and a dynamic batcher in front of one model worker.

Slices from every job wait in one bounded queue (one FIFO per job, served round-robin so a
short job is not stuck behind a long one). When the worker is free, the batcher takes up to
``batch_size`` slices, from as many jobs as are waiting, and resolves each slice's future.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from aiotranscribe.workers import Worker, WorkerCrashed, WorkerError

log = structlog.get_logger(__name__)

RESTART_BACKOFF_S = (0.5, 2.0, 10.0, 30.0)


class QueueFull(Exception):
    """Admitting the slices would pass the queue limit; ``retry_after`` is a wait in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the transcription queue is full")
        self.retry_after = retry_after


class ModelUnavailable(Exception):
    """The model is loading or failed to load; ``detail`` says which."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class SliceTask:
    job_id: str
    path: str
    start_frame: int
    num_frames: int
    future: asyncio.Future[dict[str, Any]]
    queued_at: float = field(default_factory=time.monotonic)
    attempts: int = 0


@dataclass
class PoolStats:
    batches: int = 0
    slices_done: int = 0
    mixed_batches: int = 0
    """Batches that held slices of more than one job."""
    max_batch_size: int = 0
    dropped_results: int = 0
    """Slices whose job was cancelled while their batch ran."""
    worker_restarts: int = 0
    rejected: int = 0
    audio_s: float = 0.0
    busy_s: float = 0.0
    queue_wait_s: float = 0.0

    @property
    def speed(self) -> float | None:
        """Audio seconds transcribed per busy second, once measured."""
        return self.audio_s / self.busy_s if self.busy_s > 0 else None


class InferencePool:
    def __init__(
        self,
        name: str,
        worker_factory: Callable[[], Worker],
        *,
        batch_size: int = 8,
        max_queued: int = 2000,
        sample_rate: int = 16000,
        on_batch: Callable[[int, float, float], None] | None = None,
    ) -> None:
        self.name = name
        self._factory = worker_factory
        self.batch_size = batch_size
        self.max_queued = max_queued
        self.sample_rate = sample_rate
        self._on_batch = on_batch
        self._waiting: OrderedDict[str, deque[SliceTask]] = OrderedDict()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self.worker: Worker | None = None
        self.state = "loading"  # loading | ready | failed | stopped
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.stats = PoolStats()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model in the background; the server answers meanwhile."""
        self._task = asyncio.create_task(self._run(), name=f"pool:{self.name}")

    async def close(self) -> None:
        """Stop batching, fail what is queued, and stop the worker (nothing left running)."""
        self.state = "stopped"
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job_id in list(self._waiting):
            self.cancel(job_id)
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None

    async def _load(self) -> bool:
        self.state = "loading"
        self.worker = self._factory()
        try:
            self.info = await self.worker.load()
        except WorkerError as exc:
            self.state, self.error = "failed", exc.message
            log.error("model_load_failed", model=self.name, error=exc.message)
            await self.worker.stop()
            self.worker = None
            return False
        self.sample_rate = int(self.info.get("sample_rate", self.sample_rate))
        self.state, self.error = "ready", None
        log.info("model_loaded", model=self.name, **self.info)
        return True

    async def _run(self) -> None:
        if not await self._load():
            return
        restarts = 0
        while True:
            try:
                await self._serve()
            except WorkerCrashed:
                self.stats.worker_restarts += 1
                delay = RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)]
                restarts += 1
                log.error("worker_crashed", model=self.name, restart_in_s=delay)
                if self.worker is not None:
                    await self.worker.stop()
                await asyncio.sleep(delay)
                if not await self._load():
                    self._fail_waiting(
                        WorkerCrashed(f"the model could not be reloaded: {self.error}")
                    )
                    return

    def _retry_or_fail(self, batch: list[SliceTask], exc: WorkerCrashed) -> None:
        """Slices of a batch whose worker died go back to the front of the queue once; a
        slice that was in two crashed batches fails (it may be what kills the worker)."""
        for task in reversed(batch):
            if task.future.done():
                continue
            if task.attempts >= 1:
                task.future.set_exception(exc)
                continue
            task.attempts += 1
            self._waiting.setdefault(task.job_id, deque()).appendleft(task)
            self._waiting.move_to_end(task.job_id, last=False)
            self._queued += 1

    def _fail_waiting(self, exc: Exception) -> None:
        for queue in self._waiting.values():
            for task in queue:
                if not task.future.done():
                    task.future.set_exception(exc)
        self._waiting.clear()
        self._queued = 0

    # -- admission ---------------------------------------------------------------------------

    def ensure_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "failed":
            raise ModelUnavailable(f"model {self.name!r} failed to load: {self.error}")
        if self.state == "stopped":
            raise ModelUnavailable("the server is shutting down")
        raise ModelUnavailable(f"model {self.name!r} is still loading; try again shortly")

    def retry_after(self) -> int:
        """A wait, in whole seconds, after which the queue has likely drained a batch or more."""
        speed = self.stats.speed or 10.0
        per_slice = 20.0 / speed
        return max(1, min(300, int(self._queued * per_slice / max(self.batch_size, 1)) + 1))

    def check_capacity(self, count: int) -> None:
        if self._queued + count > self.max_queued:
            self.stats.rejected += 1
            raise QueueFull(self.retry_after())

    def submit(self, job_id: str, slices: list[tuple[str, int, int]]) -> list[asyncio.Future[Any]]:
        """Queue a job's slices; returns one future per slice, in order.

        Admission happened at the front door (``check_capacity``): an admitted job always
        gets to queue all its slices, so the limit can be passed by one job's worth."""
        self.ensure_ready()
        loop = asyncio.get_running_loop()
        queue = self._waiting.setdefault(job_id, deque())
        futures = []
        for path, start, frames in slices:
            fut: asyncio.Future[Any] = loop.create_future()
            queue.append(SliceTask(job_id, path, start, frames, fut))
            futures.append(fut)
        self._queued += len(slices)
        self._wakeup.set()
        return futures

    def cancel(self, job_id: str) -> int:
        """Drop a job's waiting slices at once; a batch already running finishes, unseen."""
        queue = self._waiting.pop(job_id, None)
        if not queue:
            return 0
        for task in queue:
            task.future.cancel()
        self._queued -= len(queue)
        return len(queue)

    @property
    def queued(self) -> int:
        return self._queued

    def queue_position(self, job_id: str) -> int | None:
        """1 for the job served next, None when none of its slices wait."""
        for position, waiting in enumerate(self._waiting, start=1):
            if waiting == job_id:
                return position
        return None

    # -- batching ----------------------------------------------------------------------------

    def _take_batch(self) -> list[SliceTask]:
        batch: list[SliceTask] = []
        while self._waiting and len(batch) < self.batch_size:
            job_id, queue = next(iter(self._waiting.items()))
            batch.append(queue.popleft())
            self._queued -= 1
            # Round-robin: the job goes to the back of the line after giving one slice.
            if queue:
                self._waiting.move_to_end(job_id)
            else:
                del self._waiting[job_id]
        return batch

    async def _serve(self) -> None:
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            assert self.worker is not None
            now = time.monotonic()
            jobs = {t.job_id for t in batch}
            self.stats.batches += 1
            self.stats.max_batch_size = max(self.stats.max_batch_size, len(batch))
            self.stats.mixed_batches += len(jobs) > 1
            self.stats.queue_wait_s += sum(now - t.queued_at for t in batch)
            started = time.perf_counter()
            try:
                results = await self.worker.transcribe(
                    [(t.path, t.start_frame, t.num_frames) for t in batch]
                )
            except WorkerCrashed as exc:
                self._retry_or_fail(batch, exc)
                raise
            except WorkerError as exc:
                log.error("batch_failed", model=self.name, error=exc.message, size=len(batch))
                for t in batch:
                    if not t.future.done():
                        t.future.set_exception(exc)
                continue
            busy = time.perf_counter() - started
            audio = sum(t.num_frames for t in batch) / self.sample_rate
            self.stats.busy_s += busy
            self.stats.audio_s += audio
            self.stats.slices_done += len(batch)
            if self._on_batch is not None:
                self._on_batch(len(batch), busy, audio)
            for task, result in zip(batch, results, strict=True):
                if task.future.done():  # cancelled while the batch ran: drop the result
                    self.stats.dropped_results += 1
                else:
                    task.future.set_result(result)
