"""InferencePool: a supervised batcher in front of one model worker.

Slices of every job wait in one ``SliceQueue``. When the worker is free the batcher takes
up to ``batch_size`` of them (from as many jobs as wait), leases them in the store, runs
them, commits the results (a result counts only once the store accepted it under its
lease), then resolves each slice's future.

Supervision: whatever goes wrong, no future is left pending and the loop goes on.
- The worker dies mid-batch: its slices are requeued with a new lease epoch and go back to
  the head of the queue once (a slice in two crashed batches fails: it may be the cause);
  the worker is restarted with back-off while admitted slices wait ("restarting").
- A batch raises an error: it is retried slice by slice, so a poisonous slice fails only
  its own job and no job sees another job's error text.
- A respawn that fails (``Process.start()`` raising, a process that survives kill) is
  retried with back-off, then the pool is marked failed and every waiting slice fails.
- The back-off resets after a healthy period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from aiotranscribe.slicequeue import SliceQueue, SliceTask
from aiotranscribe.store import JobStore
from aiotranscribe.workers import Worker, WorkerCrashed, WorkerError, public_reason

log = structlog.get_logger(__name__)

RESTART_BACKOFF_S = (0.5, 2.0, 10.0, 30.0)
# Failed restarts in a row before the pool gives up and fails what waits.
MAX_RESTARTS = 5
# A worker that served this long resets the back-off.
HEALTHY_S = 60.0
# How long a lease is marked valid in the store (informational on one host: a restart
# requeues every lease; a shared queue would reclaim after it).
LEASE_S = 600.0

LOADING, READY, RESTARTING, FAILED, STOPPED = "loading", "ready", "restarting", "failed", "stopped"


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
        store: JobStore,
        *,
        batch_size: int = 8,
        sample_rate: int = 16000,
        on_batch: Callable[[int, float, float], None] | None = None,
        restart_backoff_s: Sequence[float] = RESTART_BACKOFF_S,
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
        self.name = name
        self._factory = worker_factory
        self.store = store
        self.batch_size = batch_size
        self.sample_rate = sample_rate
        self._on_batch = on_batch
        self.restart_backoff_s = tuple(restart_backoff_s)
        self.max_restarts = max_restarts
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{name}"
        self.queue = SliceQueue()
        self.worker: Worker | None = None
        self.state = LOADING
        self.error: str | None = None
        """What went wrong last, for the log (may hold paths and exception text)."""
        self.public_error: str | None = None
        """The same, in words clients may see."""
        self._reason = "worker_failed"
        self.info: dict[str, Any] = {}
        """What the worker said about the model at its last load (device, capabilities...)."""
        self.stats = PoolStats()
        self._task: asyncio.Task[None] | None = None
        self._inflight: list[SliceTask] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._commits: asyncio.Queue[list[tuple[SliceTask, dict[str, Any]]]] = asyncio.Queue()
        self._committer: asyncio.Task[None] | None = None
        self._draining = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model in the background; the server answers meanwhile."""
        self._task = asyncio.create_task(self._supervise(), name=f"pool:{self.name}")
        self._committer = asyncio.create_task(self._commit_loop(), name=f"commit:{self.name}")

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Take no new batch, let the batch in flight finish and commit (up to
        ``drain_timeout``), fail what waits, and stop the worker (nothing left running)."""
        self._draining = True
        self.queue.changed.set()
        if drain_timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._idle.wait()
                    await self._commits.join()
        self.state = STOPPED
        for task in (self._task, self._committer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail(self.queue.remove_all(), None)
        await self._stop_worker()

    def _backoff(self, failures: int) -> float:
        return self.restart_backoff_s[min(failures, len(self.restart_backoff_s)) - 1]

    async def _supervise(self) -> None:
        failures = 0
        loaded_once = False
        loop = asyncio.get_running_loop()
        while not self._draining:
            if self.worker is None:
                if not await self._load():
                    if not loaded_once:  # a model that never loads is a configuration error
                        self._give_up(
                            f"model {self.name!r} failed to load: {public_reason(self._reason)}"
                        )
                        return
                    failures += 1
                    if failures > self.max_restarts or not await self._stop_worker():
                        self._give_up(f"the model worker of {self.name!r} could not be restarted")
                        return
                    self.state = RESTARTING
                    await asyncio.sleep(self._backoff(failures))
                    continue
                loaded_once = True
            healthy_since = loop.time()
            try:
                await self._serve()
                return  # draining
            except WorkerCrashed as exc:
                self.stats.worker_restarts += 1
                log.error("worker_crashed", model=self.name, error=exc.message)
                self.error = exc.message
                self.state = RESTARTING
                if not await self._stop_worker():
                    self._give_up(f"the crashed model worker of {self.name!r} could not be stopped")
                    return
            except Exception:
                self.stats.batcher_restarts += 1
                log.exception("batcher_crashed", model=self.name)
            if loop.time() - healthy_since > HEALTHY_S:
                failures = 0
            failures += 1
            delay = self._backoff(failures)
            log.info("pool_restart", model=self.name, in_s=delay, failures=failures)
            await asyncio.sleep(delay)

    async def _load(self) -> bool:
        try:
            self.worker = self._factory()
            self.info = await self.worker.load()
        except WorkerError as exc:
            self.error, self._reason = exc.message, exc.code
        except Exception as exc:  # e.g. OSError from Process.start()
            self.error, self._reason = f"{type(exc).__name__}: {exc}", "worker_failed"
        else:
            self.sample_rate = int(self.info.get("sample_rate", self.sample_rate))
            self.state, self.error, self.public_error = READY, None, None
            log.info("model_loaded", model=self.name, **self.info)
            return True
        log.error("model_load_failed", model=self.name, error=self.error)
        return False

    async def _stop_worker(self) -> bool:
        """Stop the worker; False when it could not be (e.g. a process that survives kill)."""
        worker, self.worker = self.worker, None
        if worker is None:
            return True
        try:
            await worker.stop()
        except Exception as exc:
            self.error = f"stopping the worker failed: {type(exc).__name__}: {exc}"
            log.error("worker_stop_failed", model=self.name, error=self.error)
            return False
        return True

    def _give_up(self, public: str) -> None:
        """Fail for good: clients get ``public``; the log gets the detail too."""
        self.state, self.public_error = FAILED, public
        log.error("pool_failed", model=self.name, reason=public, error=self.error)
        self._fail(self.queue.remove_all(), ModelUnavailable(public))

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

    # -- batching ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        while not self._draining:
            if not self.queue:
                self.queue.changed.clear()
                await self.queue.changed.wait()
                continue
            batch = self.queue.take(self.batch_size)
            self._inflight = batch
            self._idle.clear()
            try:
                await self._run_batch(batch)
            except WorkerCrashed as exc:
                await self._retry_or_fail(batch, exc)
                raise
            except Exception as exc:
                self._fail(batch, WorkerError("internal_error", "internal error in the batcher"))
                raise exc
            finally:
                self._inflight = []
                self._idle.set()

    async def _run_batch(self, batch: list[SliceTask]) -> None:
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
            self.store.lease_slices([t.key for t in batch], self.owner, LEASE_S)
        )
        try:
            results = await self._infer(batch)
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
                await self._run_batch([task])
            return
        except BaseException:
            lease.cancel()
            raise
        epochs = await lease
        kept = [(t, r) for t, r in zip(batch, results, strict=True) if t.key in epochs]
        self._leased(batch, epochs)
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

    async def _infer(self, tasks: list[SliceTask]) -> list[dict[str, Any]]:
        assert self.worker is not None
        started = time.perf_counter()
        # A batch holds one group (SliceQueue.take), so one set of options serves it.
        results = await self.worker.transcribe(
            [(t.path, t.start_frame, t.num_frames) for t in tasks], dict(tasks[0].group)
        )
        busy = time.perf_counter() - started
        audio = sum(t.num_frames for t in tasks) / self.sample_rate
        self.stats.busy_s += busy
        self.stats.audio_s += audio
        self.stats.slices_done += len(tasks)
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
