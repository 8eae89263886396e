"""InferencePool: one model's queue, batcher and workers.

Slices of every job wait in one ``SliceQueue``. Each worker of the model (a ``Lane``: one
per ``--device`` entry, times ``--workers``) takes the next batch when it is free (see
``SliceQueue.take``: like lengths, bounded by count and padded audio, a ramp for jobs that
just started), waiting up to ``max_batch_wait_ms`` from the oldest slice's arrival to fill
it. A batch is leased in the store, run, and its results committed (a result counts only
once the store accepted it under its lease); then each slice's future resolves.

Supervision: whatever goes wrong, no future is left pending and the loops go on.
- A worker dies mid-batch: that batch's slices are requeued with a new lease epoch and go
  back to the head of the queue once (a slice in two crashed batches fails: it may be the
  cause); that worker is restarted with back-off (``supervisor.Lane``) while the others
  go on serving. With every worker restarting, admitted slices wait ("restarting").
- A batch raises an error: it is retried slice by slice, so a poisonous slice fails only
  its own job and no job sees another job's error text.
- A respawn that fails (``Process.start()`` raising, a process that survives kill) is
  retried with back-off, then that worker is failed; once every worker has, the pool is
  failed and every waiting slice fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from aiotranscribe.slicequeue import SliceQueue, SliceTask
from aiotranscribe.store import JobStore
from aiotranscribe.supervisor import (
    FAILED,
    LOADING,
    READY,
    RESTARTING,
    STOPPED,
    Lane,
    RestartPolicy,
)
from aiotranscribe.workers import Worker, WorkerCrashed, WorkerError

log = structlog.get_logger(__name__)

RESTART_BACKOFF_S = (0.5, 2.0, 10.0, 30.0)
# Failed restarts in a row before a worker is given up.
MAX_RESTARTS = 5
# How long a lease is marked valid in the store (informational on one host: a restart
# requeues every lease; a shared queue would reclaim after it).
LEASE_S = 600.0
# A slice shorter than this share of the longest in its batch waits for a batch of its
# own size (benchmarks/batching.py). On a CPU padding costs what audio costs and a wider
# batch gains nothing: 16 uploads of 5-19 s went 1.60x (0.5), 1.82x (0.75) and 1.97x (0.9)
# as fast as round-robin batches. A GPU runs a wider batch nearly free until it is busy,
# so there more padding buys bigger batches.
MIN_FILL_CPU = 0.9
MIN_FILL_GPU = 0.5

__all__ = ["FAILED", "LOADING", "READY", "RESTARTING", "STOPPED", "InferencePool"]


class ModelUnavailable(Exception):
    """The model is loading, failed, or the pool is stopped; ``detail`` says which."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class PoolStats:
    batches: int = 0
    slices_done: int = 0
    mixed_batches: int = 0
    """Batches that held slices of more than one job."""
    max_batch_size: int = 0
    dropped_results: int = 0
    """Results not delivered: their job ended or their lease was taken while they ran."""
    worker_restarts: int = 0
    batcher_restarts: int = 0
    split_batches: int = 0
    """Batches that failed and were retried slice by slice."""
    audio_s: float = 0.0
    busy_s: float = 0.0
    """Time workers spent in inference calls, all workers together."""
    queue_wait_s: float = 0.0

    @property
    def speed(self) -> float | None:
        """Audio seconds transcribed per busy second of one worker, once measured."""
        return self.audio_s / self.busy_s if self.busy_s > 0 else None


class InferencePool:
    def __init__(
        self,
        name: str,
        worker_factory: Callable[[str], Worker],
        store: JobStore,
        *,
        devices: Sequence[str] = ("auto",),
        batch_size: int = 8,
        max_batch_audio_s: float | None = None,
        max_batch_wait_ms: float = 0.0,
        sample_rate: int = 16000,
        on_batch: Callable[[int, float, float], None] | None = None,
        restart_backoff_s: Sequence[float] = RESTART_BACKOFF_S,
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
        """``worker_factory(device)`` makes a worker handle; one worker runs per entry of
        ``devices`` (repeat an entry for several workers on one device)."""
        self.name = name
        self.store = store
        self.batch_size = batch_size
        self.max_batch_audio_s = max_batch_audio_s
        self.max_batch_wait_s = max_batch_wait_ms / 1000.0
        # How batches are formed (SliceQueue.take); settable for benchmarks/batching.py,
        # which measured these defaults against the alternatives.
        self.by_length = True
        self.min_fill: float | None = None
        """None: by the worker's device (``MIN_FILL_CPU``, ``MIN_FILL_GPU``)."""
        self.ramp = True
        self.sample_rate = sample_rate
        self._on_batch = on_batch
        self.policy = RestartPolicy(tuple(restart_backoff_s), max_restarts)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{name}"
        self.queue = SliceQueue()
        self.stats = PoolStats()
        self.lanes = [
            Lane(self, i, device, functools.partial(worker_factory, device))
            for i, device in enumerate(devices or ("auto",))
        ]
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._commits: asyncio.Queue[list[tuple[SliceTask, dict[str, Any]]]] = asyncio.Queue()
        self._committer: asyncio.Task[None] | None = None
        self._draining = False
        self._stopped = False

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``ready`` while any worker serves; else ``restarting``, ``loading``, or ``failed``
        once every worker has failed (``stopped`` after ``close``)."""
        if self._stopped:
            return STOPPED
        states = {lane.state for lane in self.lanes}
        return next((s for s in (READY, RESTARTING, LOADING) if s in states), FAILED)

    @property
    def error(self) -> str | None:
        """What went wrong last, for the log (may hold paths and exception text)."""
        return next((lane.error for lane in self.lanes if lane.error), None)

    @property
    def public_error(self) -> str | None:
        """The same, in words clients may see."""
        return next((lane.public_error for lane in self.lanes if lane.public_error), None)

    @property
    def info(self) -> dict[str, Any]:
        """What a worker said about the model at its last load (device, capabilities...)."""
        return next((lane.info for lane in self.lanes if lane.info), {})

    @property
    def worker(self) -> Worker | None:
        """The first worker (the only one unless several run)."""
        return self.lanes[0].worker

    @property
    def inflight(self) -> list[SliceTask]:
        """Slices every worker is running now."""
        return [t for lane in self.lanes for t in lane.inflight]

    @property
    def throughput(self) -> float | None:
        """Audio seconds per second all serving workers together get through, once measured."""
        speed = self.stats.speed
        if speed is None:
            return None
        return speed * max(1, sum(lane.state == READY for lane in self.lanes))

    @property
    def restart_backoff_s(self) -> tuple[float, ...]:
        return self.policy.backoff_s

    @restart_backoff_s.setter
    def restart_backoff_s(self, value: Sequence[float]) -> None:
        self.policy.backoff_s = tuple(value)

    @property
    def max_restarts(self) -> int:
        return self.policy.max_restarts

    @max_restarts.setter
    def max_restarts(self, value: int) -> None:
        self.policy.max_restarts = value

    @property
    def draining(self) -> bool:
        return self._draining

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model in the background (every worker); the server answers meanwhile."""
        for lane in self.lanes:
            lane.start()
        self._committer = asyncio.create_task(self._commit_loop(), name=f"commit:{self.name}")

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Take no new batch, let the batches in flight finish and commit (up to
        ``drain_timeout``), fail what waits, and stop the workers (nothing left running)."""
        self._draining = True
        self.queue.changed.set()
        if drain_timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._idle.wait()
                    await self._commits.join()
        self._stopped = True
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
        inflight = self.inflight
        await asyncio.gather(*(lane.stop() for lane in self.lanes))
        self._fail(self.queue.remove_all() + inflight, None)

    def lane_changed(self, lane: Lane) -> None:
        if lane.state == READY:
            self.sample_rate = int(lane.info.get("sample_rate", self.sample_rate))
        elif self.state == FAILED:
            log.error("pool_failed", model=self.name, reason=lane.public_error, error=lane.error)
            detail = lane.public_error or f"model {self.name!r} failed"
            self._fail(self.queue.remove_all(), ModelUnavailable(detail))

    @staticmethod
    def _fail(tasks: list[SliceTask], exc: Exception | None) -> None:
        for task in tasks:
            if not task.future.done():
                if exc is None:
                    task.future.cancel()
                else:
                    task.future.set_exception(exc)

    # -- admission ---------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether new jobs may queue here (a restarting worker comes back; jobs wait)."""
        return self.state in (READY, RESTARTING)

    def ensure_ready(self) -> None:
        if self.accepting:
            return
        if self.state == FAILED:
            raise ModelUnavailable(self.public_error or f"model {self.name!r} failed")
        if self.state == STOPPED:
            raise ModelUnavailable("the server is shutting down")
        raise ModelUnavailable(f"model {self.name!r} is still loading; try again shortly")

    def submit(
        self,
        job_id: str,
        slices: list[tuple[int, str, int, int]],
        options: dict[str, Any] | None = None,
    ) -> list[asyncio.Future[dict[str, Any] | None]]:
        """Queue ``(idx, path, start_frame, num_frames)`` slices of a job, to be decoded with
        ``options`` (language, task...: see ``engine.families``); one future each.

        Accepted while the model loads or its worker restarts: they wait in the queue."""
        if self.state in (FAILED, STOPPED):
            self.ensure_ready()
        loop = asyncio.get_running_loop()
        group = tuple(sorted((options or {}).items()))
        tasks = [
            SliceTask(job_id, idx, path, start, frames, loop.create_future(), group=group)
            for idx, path, start, frames in slices
        ]
        self.queue.put(tasks)
        return [t.future for t in tasks]

    def cancel(self, job_id: str) -> int:
        """Take every waiting slice of a job out at once; a batch already running finishes,
        and its results for this job are refused by the store."""
        tasks = self.queue.remove_job(job_id)
        self._fail(tasks, None)
        return len(tasks)

    @property
    def capabilities(self) -> dict[str, Any] | None:
        """What the model can do (``engine.families``), once it has loaded; else None."""
        caps = self.info.get("capabilities")
        return dict(caps) if isinstance(caps, dict) else None

    @property
    def queued(self) -> int:
        return len(self.queue)

    def queue_position(self, job_id: str) -> int | None:
        return self.queue.position(job_id)

    def wait_position(self, job_id: str) -> int | None:
        """The job's place in line until a worker takes its first slice; then None."""
        return self.queue.wait_position(job_id)

    # -- batching ----------------------------------------------------------------------------

    def _fill_delay(self) -> float:
        """How long to wait for more slices before taking a batch that is not full: up to
        ``max_batch_wait_ms`` after the oldest waiting slice arrived (Triton's queue delay),
        so slices that waited for a busy worker do not wait again."""
        queue = self.queue
        if self.max_batch_wait_s <= 0 or len(queue) >= self.batch_size:
            return 0.0
        if self._max_frames is not None and queue.frames >= self._max_frames:
            return 0.0
        oldest = queue.oldest()
        if oldest is None:
            return 0.0
        return max(0.0, oldest + self.max_batch_wait_s - time.monotonic())

    @property
    def _max_frames(self) -> int | None:
        if not self.max_batch_audio_s:
            return None
        return int(self.max_batch_audio_s * self.sample_rate)

    def _min_fill(self, lane: Lane) -> float:
        if self.min_fill is not None:
            return self.min_fill
        on_gpu = str(lane.info.get("device", "cpu")).startswith("cuda")
        return MIN_FILL_GPU if on_gpu else MIN_FILL_CPU

    async def serve(self, lane: Lane) -> None:
        """Feed ``lane`` batches until the pool drains (``supervisor.Host``)."""
        queue = self.queue
        while not self._draining:
            if not queue:
                queue.changed.clear()
                await queue.changed.wait()
                continue
            delay = self._fill_delay()
            if delay > 0:
                queue.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await queue.changed.wait()
                continue
            batch = queue.take(
                self.batch_size,
                max_frames=self._max_frames,
                min_fill=self._min_fill(lane),
                ramp=self.ramp,
                by_length=self.by_length,
            )
            lane.inflight = batch
            self._busy += 1
            self._idle.clear()
            try:
                await self._run_batch(lane, batch)
            except WorkerCrashed as exc:
                await self._retry_or_fail(batch, exc)
                raise
            except Exception as exc:
                self._fail(batch, WorkerError("internal_error", "internal error in the batcher"))
                raise exc
            finally:
                lane.inflight = []
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    async def _run_batch(self, lane: Lane, batch: list[SliceTask]) -> None:
        batch = [t for t in batch if not t.future.done()]
        if not batch:
            return
        now = time.monotonic()
        self.stats.batches += 1
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(batch))
        self.stats.mixed_batches += len({t.job_id for t in batch}) > 1
        self.stats.queue_wait_s += sum(now - t.queued_at for t in batch)
        # The lease is written while the model runs, not before: it is off the critical
        # path, and a result is still only committed under a lease that landed first.
        lease = asyncio.ensure_future(
            self.store.lease_slices([t.key for t in batch], f"{self.owner}#{lane.index}", LEASE_S)
        )
        try:
            results = await self._infer(lane, batch)
        except WorkerError as exc:
            await asyncio.wait({lease})  # a requeue must see the leases
            live = self._leased(batch, lease.result())
            if isinstance(exc, WorkerCrashed):
                raise
            if not live:  # every job of the batch ended meanwhile: nobody to tell
                return
            if len(live) == 1:
                log.error("slice_failed", model=self.name, job_id=live[0].job_id, error=exc.message)
                self._fail(live, exc)
                return
            # One slice may be poisonous: find it by running them one at a time.
            self.stats.split_batches += 1
            log.warning("batch_failed_retrying_singly", model=self.name, size=len(live))
            for task in live:
                await self._run_batch(lane, [task])
            return
        except BaseException:
            lease.cancel()
            raise
        epochs = await lease
        kept = [
            (t, r) for t, r in zip(batch, results, strict=True) if t.key in epochs and r is not None
        ]
        self._leased(batch, epochs)
        # A remote worker answers None for a slice whose job had ended when it read it
        # (skip-on-read): nothing to commit, ever; should its job somehow still run, the
        # slice fails it rather than leave a hole in the transcript.
        for task, result in zip(batch, results, strict=True):
            if result is None and not task.future.done():
                task.future.set_exception(WorkerError("skipped", "the slice was skipped"))
        for task, _ in kept:
            task.computed = True
        # Committed by the committer task, in batch order, while the next batch runs.
        self._commits.put_nowait(kept)

    @staticmethod
    def _leased(batch: list[SliceTask], epochs: dict[tuple[str, int], int]) -> list[SliceTask]:
        """The slices whose lease landed, with their epoch; the others (done already, or
        their job ended) resolve with None."""
        live = []
        for task in batch:
            if task.key in epochs:
                task.epoch = epochs[task.key]
                live.append(task)
            elif not task.future.done():
                task.future.set_result(None)
        return live

    async def _infer(self, lane: Lane, tasks: list[SliceTask]) -> list[dict[str, Any]]:
        worker = lane.worker
        assert worker is not None
        started = time.perf_counter()
        # A batch holds one group (SliceQueue.take), so one set of options serves it.
        results = await worker.transcribe(
            [(t.path, t.start_frame, t.num_frames) for t in tasks], dict(tasks[0].group)
        )
        busy = time.perf_counter() - started
        audio = sum(t.num_frames for t in tasks) / self.sample_rate
        self.stats.busy_s += busy
        self.stats.audio_s += audio
        self.stats.slices_done += len(tasks)
        lane.batches += 1
        log.debug(
            "batch",
            model=self.name,
            worker=lane.index,
            pid=lane.pid,
            slices=len(tasks),
            jobs=len({t.job_id for t in tasks}),
            audio_s=round(audio, 3),
            padded_s=round(len(tasks) * max(t.num_frames for t in tasks) / self.sample_rate, 3),
            busy_s=round(busy, 4),
        )
        if self._on_batch is not None:
            self._on_batch(len(tasks), busy, audio)
        return results

    async def _commit_loop(self) -> None:
        """Commit each batch's results (in batch order), then resolve their futures: a job
        hears of a result only once it is in the store."""
        while True:
            done = await self._commits.get()
            try:
                accepted = await self.store.commit_slices(
                    [(t.job_id, t.idx, t.epoch, r) for t, r in done]
                )
            except Exception:
                log.exception("commit_failed", model=self.name, slices=len(done))
                error = WorkerError("internal_error", "the result could not be stored")
                self._fail([t for t, _ in done], error)
            else:
                for (task, result), ok in zip(done, accepted, strict=True):
                    if not ok:
                        self.stats.dropped_results += 1
                    if not task.future.done():
                        task.future.set_result(result if ok else None)
            finally:
                self._commits.task_done()

    async def _retry_or_fail(self, batch: list[SliceTask], exc: WorkerCrashed) -> None:
        """Slices of a batch whose worker died go back with a new epoch, once (those whose
        result already came back are left to their commit)."""
        waiting = [t for t in batch if not t.future.done() and not t.computed]
        try:
            await self.store.requeue_slices([t.key for t in waiting])
        except Exception:
            log.exception("requeue_failed", model=self.name)
            self._fail(waiting, exc)
            return
        retry = [t for t in waiting if t.crashes == 0]
        self._fail([t for t in waiting if t.crashes > 0], exc)
        for task in retry:
            task.crashes += 1
        self.queue.put_front(retry)
