"""One model worker's life: load it, let the pool feed it batches, restart it after a crash.

A pool runs one ``Lane`` per worker (``--workers``, or one per ``--device`` entry), all fed
from its one queue. Each lane is supervised on its own: a crash requeues only that
worker's batch and restarts only that worker (with back-off, reset after a healthy
period); a lane that cannot be restarted, or whose model never loads, is ``failed`` while
the others go on. The pool fails only when every lane has.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from aiotranscribe.workers import Worker, WorkerCrashed, WorkerError, public_reason

if TYPE_CHECKING:
    from aiotranscribe.pool import PoolStats
    from aiotranscribe.slicequeue import SliceTask

log = structlog.get_logger(__name__)

LOADING, READY, RESTARTING, FAILED, STOPPED = "loading", "ready", "restarting", "failed", "stopped"
# A worker that served this long resets the back-off.
HEALTHY_S = 60.0


@dataclass
class RestartPolicy:
    backoff_s: tuple[float, ...]
    """Waits before the 1st, 2nd... restart in a row (the last one repeats)."""
    max_restarts: int
    """Failed restarts in a row before the lane gives up."""

    def delay(self, failures: int) -> float:
        return self.backoff_s[min(failures, len(self.backoff_s)) - 1]


class Host(Protocol):
    """What a lane needs of its pool."""

    name: str
    policy: RestartPolicy
    stats: PoolStats

    @property
    def draining(self) -> bool: ...

    async def serve(self, lane: Lane) -> None:
        """Run batches on ``lane.worker`` until draining; raises WorkerCrashed when it dies
        (its batch already requeued)."""

    def lane_changed(self, lane: Lane) -> None:
        """The lane loaded, or gave up for good."""


class Lane:
    def __init__(self, host: Host, index: int, device: str, factory: Callable[[], Worker]):
        self.host = host
        self.index = index
        self.device = device
        self._factory = factory
        self.label = f"{host.name}#{index}"
        self.worker: Worker | None = None
        self.state = LOADING
        self.error: str | None = None
        """What went wrong last, for the log (may hold paths and exception text)."""
        self.public_error: str | None = None
        """The same, in words clients may see."""
        self.reason = "worker_failed"
        self.info: dict[str, Any] = {}
        """What the worker said about the model at its last load (device, capabilities...)."""
        self.inflight: list[SliceTask] = []
        self.batches = 0
        self.restarts = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.worker.pid if self.worker is not None else None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"lane:{self.label}")

    async def run(self) -> None:
        """Load, serve, restart after crashes; returns when the pool drains or on giving up."""
        host, policy = self.host, self.host.policy
        failures = 0
        loaded_once = False
        loop = asyncio.get_running_loop()
        while not host.draining:
            if self.worker is None:
                if not await self._load():
                    if not loaded_once:  # a model that never loads is a configuration error
                        self.give_up(
                            f"model {host.name!r} failed to load: {public_reason(self.reason)}"
                        )
                        return
                    failures += 1
                    if failures > policy.max_restarts or not await self.stop_worker():
                        self.give_up(f"the model worker of {host.name!r} could not be restarted")
                        return
                    self.state = RESTARTING
                    await asyncio.sleep(policy.delay(failures))
                    continue
                loaded_once = True
            healthy_since = loop.time()
            try:
                await host.serve(self)
                return  # draining
            except WorkerCrashed as exc:
                self.restarts += 1
                host.stats.worker_restarts += 1
                log.error("worker_crashed", model=host.name, worker=self.index, error=exc.message)
                self.error = exc.message
                self.state = RESTARTING
                if not await self.stop_worker():
                    self.give_up(f"the crashed model worker of {host.name!r} could not be stopped")
                    return
            except Exception:  # a bug in the batcher: its batch failed, the worker is fine
                host.stats.batcher_restarts += 1
                log.exception("batcher_crashed", model=host.name, worker=self.index)
            if loop.time() - healthy_since > HEALTHY_S:
                failures = 0
            failures += 1
            delay = policy.delay(failures)
            log.info("worker_restart", model=host.name, worker=self.index, in_s=delay)
            await asyncio.sleep(delay)

    async def _load(self) -> bool:
        try:
            self.worker = self._factory()
            self.info = await self.worker.load()
        except WorkerError as exc:
            self.error, self.reason = exc.message, exc.code
        except Exception as exc:  # e.g. OSError from Process.start()
            self.error, self.reason = f"{type(exc).__name__}: {exc}", "worker_failed"
        else:
            self.state, self.error, self.public_error = READY, None, None
            log.info("model_loaded", model=self.host.name, worker=self.index, **self.info)
            self.host.lane_changed(self)
            return True
        log.error("model_load_failed", model=self.host.name, worker=self.index, error=self.error)
        return False

    async def stop_worker(self) -> bool:
        """Stop the worker; False when it could not be (e.g. a process that survives kill)."""
        worker, self.worker = self.worker, None
        if worker is None:
            return True
        try:
            await worker.stop()
        except Exception as exc:
            self.error = f"stopping the worker failed: {type(exc).__name__}: {exc}"
            log.error(
                "worker_stop_failed", model=self.host.name, worker=self.index, error=self.error
            )
            return False
        return True

    def give_up(self, public: str) -> None:
        """Fail for good: clients get ``public``; the log gets the detail too."""
        self.state, self.public_error = FAILED, public
        log.error(
            "worker_failed",
            model=self.host.name,
            worker=self.index,
            reason=public,
            error=self.error,
        )
        self.host.lane_changed(self)

    async def stop(self) -> None:
        """Cancel the supervision and stop the worker (nothing left running)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.state != FAILED:
            self.state = STOPPED
        await self.stop_worker()
