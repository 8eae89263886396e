"""The transcription service: owns job lifetimes, from accept to exactly one end.

It admits requests, commits accepted jobs, runs each in a task (the steps are the
``Pipeline``'s), maps what goes wrong to the job's terminal event, lets clients cancel and
watch, resumes unfinished jobs at start-up, and stops in order at shutdown.

Guarantees:
- Every accepted job reaches exactly one terminal event (also when it is cancelled before
  its task first runs), unless the server stops first: then it stays in the store as it is
  and the next start resumes it.
- On a store shared by several replicas (Redis), a job runs on the replica that owns it;
  jobs of a replica that is gone are adopted by another (``adopt_loop``), and a cancel
  asked for on one replica is carried out by the owner, which writes the one ``cancelled``.
- Shutdown is drain-then-stop: ``drain`` refuses new work and lets running jobs go on for
  a while; ``stop`` ends whatever still runs without a terminal event (durable for the next
  start) and tells watchers to resume (``ServerRestarting``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from aiotranscribe import audio
from aiotranscribe.admission import Admission
from aiotranscribe.config import Settings
from aiotranscribe.janitor import Janitor, move_job_dir, new_job_dir
from aiotranscribe.jobs import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    TERMINAL,
    Job,
    utcnow_iso,
)
from aiotranscribe.pipeline import Pipeline
from aiotranscribe.pool import InferencePool, ModelUnavailable
from aiotranscribe.store import JobStore
from aiotranscribe.supervise import raise_if_cancelling
from aiotranscribe.workers import WorkerError, public_reason

log = structlog.get_logger(__name__)

SEED_MODEL_ALIASES = ("parakeet", "canary")
# Seconds a client is told to wait while the server drains or restarts.
RESTART_RETRY_AFTER_S = 5


class UnknownModel(Exception):
    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; this server serves: {', '.join(served)}")
        self.detail = str(self)


class ServerRestarting(Exception):
    """The server is draining or stopping: try again (the job, if any, is kept)."""

    def __init__(self, detail: str = "the server is restarting; try again shortly") -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = RESTART_RETRY_AFTER_S


class JobGone(Exception):
    """The job is not in the store (unknown id, or expired)."""


@dataclass
class Submission:
    upload_path: Path
    kind: str
    filename: str
    size: int
    model: str
    language: str | None = None
    include_timestamps: bool = True
    tenant: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """Decoding options that reach the model (``decoding.allowed``)."""
    task: str = "transcribe"
    callback_url: str | None = None
    webhook: dict[str, Any] | None = None
    """The webhook's initial delivery state (``webhooks.new_delivery``) with a callback_url."""


def new_job_id() -> str:
    """128 random bits: ids are the only thing between a job and a stranger when no API keys
    are configured."""
    return secrets.token_hex(16)


class TranscriptionService:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        pools: dict[str, InferencePool],
        janitor: Janitor,
        admission: Admission,
    ) -> None:
        self.settings = settings
        self.store = store
        self.pools = pools
        self.janitor = janitor
        self.admission = admission
        self.reserved: set[str] = set()  # job ids whose upload is still arriving
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started: set[str] = set()  # job tasks whose coroutine began
        self._cancelling: dict[str, str] = {}  # job id -> reason, cancels asked by clients
        self._released: set[str] = set()  # jobs another replica adopted: stop, do not end
        self._aux: set[asyncio.Task[Any]] = set()
        self.active: dict[str, str] = {}  # job id -> status, for metrics
        self.pipeline = Pipeline(settings, store, admission, self.active)
        self.draining = False
        self.stopping = asyncio.Event()
        # Called once per job as it ends, with its stage timings (seconds) and ``total_s``.
        self.on_finish: list[Callable[[Job, dict[str, float]], None]] = []
        # Called with a job's id when its audio goes (ended, deleted, expired, abandoned).
        self.on_discard: list[Callable[[str], None]] = []

    # -- names and admission -----------------------------------------------------------------

    def capabilities(self, model: str) -> dict[str, Any] | None:
        """What ``model`` can do (None until it has loaded), with the slice length in use."""
        pool = self.pools[model]
        caps = pool.capabilities
        if caps is not None:
            caps["max_slice_s"] = self.pipeline.chunk_seconds(pool)
        return caps

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

    def _check_open(self) -> None:
        if self.draining or self.stopping.is_set():
            raise ServerRestarting("the server is shutting down; try again shortly")

    async def admit(self, job_id: str, model: str | None) -> str:
        """Reserve room for a new job before its upload is read; returns the model charged.

        ``model`` None: the default model, or the first one that can take work (a failed
        default does not block a healthy second model). Raises ServerRestarting,
        ModelUnavailable or QueueFull."""
        self._check_open()
        if model is None:
            default = self.pools[self.resolve_model(None)]
            model = next((n for n, p in self.pools.items() if p.accepting), default.name)
        self.pools[model].ensure_ready()
        await self.admission.admit(job_id, model)
        self.reserved.add(job_id)
        return model

    async def readmit(self, job_id: str, model: str) -> None:
        """The form named ``model``: charge the job to it (it must be able to take work)."""
        self.pools[model].ensure_ready()
        await self.admission.readmit(job_id, model)

    def new_job_dir(self, job_id: str) -> Path:
        """Create the directory an upload streams into (``upload_dir``)."""
        return new_job_dir(self.settings.spool_dir, job_id)

    def abandon(self, job_id: str) -> None:
        """An upload that will not become a job: release it and remove what it wrote."""
        self.reserved.discard(job_id)
        self.admission.release(job_id)
        self.janitor.discard(self.upload_dir(job_id))  # never moved nor published

    def job_dir(self, job_id: str) -> Path:
        """Where a job's directory (its upload, then its converted audio) is once the job is
        in the store: under ``--shared-dir`` when set, where every replica and worker finds
        it; else in this replica's spool. The one answer to that question."""
        return (self.settings.shared_dir or self.settings.spool_dir) / job_id

    def upload_dir(self, job_id: str) -> Path:
        """Where an upload arrives: always this replica's own spool (``new_job_dir``)."""
        return self.settings.spool_dir / job_id

    async def _share(self, job_id: str) -> None:
        """With ``--shared-dir``: move the job's directory from the spool into the shared dir.

        Done here, in the job's task, so only once the job is in the store, hence in the
        live set every replica's janitor consults. A janitor of another replica that lists
        the shared dir and then reads the live set can therefore never see this directory
        without its job (uploads still arriving are in no store at all: they stay in the
        local spool, covered by this replica's ``reserved``). Also not in ``accept``: a big
        upload copied to a network volume would hold up the 202. A job resumed after a crash
        mid-move moves again (a copy is redone whole)."""
        if self.settings.shared_dir is None:
            return
        try:
            await asyncio.to_thread(move_job_dir, self.upload_dir(job_id), self.job_dir(job_id))
        except OSError as exc:
            if audio.out_of_space(exc):
                raise audio.insufficient_storage() from None
            raise

    def discard(self, job_id: str) -> None:
        """The job's audio goes: its directories (never blocks) and ``on_discard``'s copies."""
        self.janitor.discard(self.job_dir(job_id))
        if self.upload_dir(job_id) != self.job_dir(job_id):
            self.janitor.discard(self.upload_dir(job_id))  # ended before it moved
        for hook in self.on_discard:
            hook(job_id)

    async def live_ids(self) -> set[str]:
        reserved, running = set(self.reserved), set(self._tasks)
        return reserved | running | await self.store.live_ids()

    # -- accepting and running ---------------------------------------------------------------

    async def accept(self, job_id: str, sub: Submission) -> Job:
        """Commit the job (its upload is already durable), then start it. Shielded: once the
        row is written, the job task starts even if the request is cancelled meanwhile."""
        job = Job(
            id=job_id,
            filename=sub.filename,
            model=sub.model,
            kind=sub.kind,
            language=sub.language,
            include_timestamps=sub.include_timestamps,
            upload_bytes=sub.size,
            tenant=sub.tenant,
            options=sub.options,
            task=sub.task,
            callback_url=sub.callback_url,
            webhook=sub.webhook,
        )

        async def commit_and_start() -> Job:
            try:
                await self.store.create(
                    job,
                    [("status", {"status": PENDING, "stage": "queued", "queue_position": None})],
                )
            except BaseException:
                self.abandon(job_id)
                raise
            self.reserved.discard(job_id)
            self._start(job)
            return job

        return await asyncio.shield(asyncio.ensure_future(commit_and_start()))

    def _start(self, job: Job) -> None:
        self.active[job.id] = job.status
        task = asyncio.create_task(self._run(job.id), name=f"job:{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(functools.partial(self._task_done, job.id))

    def _task_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        # Whatever way the task ended, it holds nothing any more.
        self.active.pop(job_id, None)
        self.admission.release(job_id)
        started = job_id in self._started
        self._started.discard(job_id)
        reason = self._cancelling.pop(job_id, None)
        if task.cancelled() and not started and reason is not None:
            # Cancelled before its first step: its own handler never ran, so end it here.
            self._spawn(self._finish_cancelled(job_id, reason))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)

    async def _finish_cancelled(self, job_id: str, reason: str) -> None:
        job = await self.store.get(job_id)
        if job is not None:
            await self._end(job, CANCELLED, {"reason": reason}, {}, {})

    async def cancel(self, job_id: str, reason: str = "cancelled by client") -> Job:
        """Cancel a job; returns its record after the fact (terminal unless it had ended
        before with another status, which it keeps)."""
        job = await self.store.request_cancel(job_id, reason)
        if job is None:
            raise JobGone(job_id)
        task = self._tasks.get(job_id)
        if not job.terminal:
            if task is not None:
                self._cancelling[job_id] = reason
                task.cancel(reason)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task})
                # A job cancelled before its first step is ended by a helper task.
                me = asyncio.current_task()
                await asyncio.gather(*(t for t in self._aux if t is not me), return_exceptions=True)
            elif self.store.shared:
                await self._cancel_elsewhere(job, reason)
            else:  # no task here (cancel raced the end of a stop): end it in the store
                await self._end(job, CANCELLED, {"reason": reason}, {}, {})
        final = await self.store.get(job_id)
        if final is None:
            raise JobGone(job_id)
        return final

    async def _cancel_elsewhere(self, job: Job, reason: str) -> None:
        """The job runs on another replica (or on none: its owner is gone). Ask its owner,
        which takes its slices out of its queue and writes the one ``cancelled``; if no
        owner has ended it by the time an adoption would have, end it here."""
        await self.store.signal_cancel(job.id)
        deadline = time.monotonic() + 2 * self.store.owner_ttl_s
        seen = 0
        while time.monotonic() < deadline:
            events = await self.store.wait_events(job.id, seen, deadline - time.monotonic())
            if events:
                seen = events[-1]["seq"]
                if events[-1]["type"] in TERMINAL:
                    return
        await self._end(job, CANCELLED, {"reason": reason}, {}, {})

    def _cancel_signalled(self, job_id: str) -> None:
        """Another replica asked to cancel a job: act on it if it runs here."""
        if job_id in self._tasks and job_id not in self._cancelling:
            self._spawn(self._cancel_from_store(job_id))

    async def _cancel_from_store(self, job_id: str) -> None:
        job = await self.store.get(job_id)
        if job is not None and job.cancel_requested and job_id in self._tasks:
            await self.cancel(job_id, job.cancel_reason or "cancelled")

    async def _run(self, job_id: str) -> None:
        self._started.add(job_id)
        # "t0" becomes "total_s" when the job ends.
        timings: dict[str, float] = {"t0": time.perf_counter()}
        job = await self.store.get(job_id)
        if job is None or job.terminal:
            log.error("job_task_without_live_job", job_id=job_id, found=job is not None)
            return
        try:
            if job.cancel_requested:
                raise asyncio.CancelledError(job.cancel_reason or "cancelled")
            pool = self.pools.get(job.model)
            if pool is None:
                raise ModelUnavailable(f"model {job.model!r} is not served here any more")
            await self._share(job.id)
            result = await self.pipeline.run(job, pool, self.job_dir(job.id), timings)
            await self._end(
                job,
                COMPLETED,
                {"result": result},
                timings,
                {"result": result, "stage": "finalizing", "progress": 1.0},
            )
        except asyncio.CancelledError as exc:
            self._drop_slices(job)
            if job_id not in self._cancelling and (
                self.stopping.is_set() or job_id in self._released
            ):
                # Server stopping, or the job is another replica's now: it stays as it is.
                self._released.discard(job_id)
                raise
            reason = self._cancelling.pop(job_id, None) or (
                str(exc.args[0]) if exc.args else "cancelled"
            )
            await asyncio.shield(self._end(job, CANCELLED, {"reason": reason}, timings, {}))
        except audio.AudioError as exc:
            await self._fail(job, exc.status, exc.code, exc.detail, timings)
        except ModelUnavailable as exc:
            await self._fail(job, 503, "model_unavailable", exc.detail, timings)
        except WorkerError as exc:
            # The message can hold paths and exception text: the log gets it, clients the code.
            log.error("job_worker_error", job_id=job.id, code=exc.code, error=exc.message)
            await self._fail(job, 500, exc.code, public_reason(exc.code), timings)
        except Exception:
            log.exception("job_crashed", job_id=job.id)
            await self._fail(job, 500, "internal_error", "internal error", timings)
        finally:
            self._drop_slices(job)

    def _drop_slices(self, job: Job) -> None:
        pool = self.pools.get(job.model)
        if pool is not None:
            pool.cancel(job.id)

    async def _fail(
        self, job: Job, status: int, code: str, message: str, timings: dict[str, float]
    ) -> None:
        changes = {"error": message, "error_code": code, "error_status": status}
        await self._end(
            job, FAILED, {"error": {"code": code, "message": message}}, timings, changes
        )

    async def _end(
        self,
        job: Job,
        status: str,
        fields: dict[str, Any],
        timings: dict[str, float],
        changes: dict[str, Any],
    ) -> None:
        """Write the one terminal event; then clean up after the job (once, by the winner)."""
        event = await self.store.finish(
            job.id, status, fields, completed_at=utcnow_iso(), **changes
        )
        if event is None:
            return
        for name, value in changes.items():
            setattr(job, name, value)
        job.status = status
        if "t0" in timings:
            timings["total_s"] = time.perf_counter() - timings.pop("t0")
        self.active.pop(job.id, None)
        self.admission.release(job.id)
        self.discard(job.id)
        for hook in self.on_finish:
            hook(job, timings)
        audio_s = timings.get("audio_s", 0.0)
        total = timings.get("total_s", 0.0)
        log.info(
            "transcription",
            job_id=job.id,
            status=status,
            model=job.model,
            bytes=job.upload_bytes,
            audio_s=round(audio_s, 3),
            convert_s=round(timings.get("convert_s", 0.0), 3),
            queue_s=round(timings.get("queue_s", 0.0), 3),
            inference_s=round(timings.get("inference_s", 0.0), 3),
            rtf=round(total / audio_s, 4) if audio_s and total else None,
        )

    # -- watching ----------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        job = await self.store.get(job_id)
        if job is None:
            raise JobGone(job_id)
        return job

    async def next_events(self, job_id: str, after: int, timeout: float) -> list[dict[str, Any]]:
        """Events after ``after`` (waiting up to ``timeout``); ServerRestarting once the
        server stops, so watchers know to come back rather than treat it as an end."""
        if self.stopping.is_set():
            raise ServerRestarting()
        getter = asyncio.ensure_future(self.store.wait_events(job_id, after, timeout))
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not getter.done():
                getter.cancel()
        if not getter.done() or getter.cancelled():
            raise ServerRestarting()
        return getter.result()

    async def wait_done(self, job_id: str) -> Job:
        """Wait for the job's terminal event; returns the final record."""
        last = 0
        while True:
            events = await self.next_events(job_id, last, timeout=30.0)
            if events:
                last = events[-1]["seq"]
                if events[-1]["type"] in TERMINAL:
                    return await self.get(job_id)
            elif await self.store.get(job_id) is None:
                raise JobGone(job_id)

    # -- start-up, retention and shutdown ------------------------------------------------------

    async def recover(self) -> list[str]:
        """Resume every job the store says had not ended (call once, at start-up)."""
        if self.store.shared:
            self.store.on_cancel_signal = self._cancel_signalled
        resumed = [job.id for job in await self.store.recover() if await self._resume(job)]
        if resumed:
            log.info("jobs_recovered", resumed=len(resumed), ids=resumed)
        return resumed

    async def _resume(self, job: Job) -> bool:
        """Run a job that was running elsewhere or before; False if it was to be cancelled."""
        if job.cancel_requested:
            await self._end(job, CANCELLED, {"reason": job.cancel_reason or "cancelled"}, {}, {})
            return False
        remaining = (job.duration_s or self.admission.provisional_s) * (1 - job.progress)
        self.admission.hold(job.id, job.model, remaining)
        await self.store.append_events(
            job.id,
            [
                (
                    "status",
                    {
                        "status": job.status,
                        "stage": job.stage,
                        "queue_position": None,
                        "recovered": True,
                    },
                )
            ],
        )
        self._start(job)
        return True

    async def adopt_loop(self) -> None:
        """On a shared store: take over the jobs of replicas that are gone, give up jobs
        another replica took over (this one was cut off too long), and carry out cancels
        whose signal was lost. Runs until cancelled; a failed round is logged and retried."""
        while True:
            await asyncio.sleep(self.store.owner_ttl_s / 3)
            if self.stopping.is_set():
                return
            try:
                await self._adopt_round()
            except Exception:
                raise_if_cancelling()
                log.exception("adoption_round_failed")

    async def _adopt_round(self) -> None:
        adopted = []
        if not self.draining:  # a draining replica takes nothing new on
            adopted = [
                job.id
                for job in await self.store.adopt()
                if job.id not in self._tasks and await self._resume(job)
            ]
        if adopted:
            log.info("jobs_adopted", jobs=len(adopted), ids=adopted)
        lost, cancelled = await self.store.disowned(list(self._tasks))
        for job_id in lost:
            task = self._tasks.get(job_id)
            if task is not None:
                log.warning("job_adopted_elsewhere", job_id=job_id)
                self._released.add(job_id)
                task.cancel("adopted by another replica")
        for job_id in cancelled - lost:
            self._cancel_signalled(job_id)

    async def expire(self) -> None:
        for job_id in await self.store.expire(time.time()):
            self.discard(job_id)

    async def drain(self, timeout: float) -> bool:
        """Refuse new work (``/ready`` 503) and let running jobs go on for up to ``timeout``
        seconds. True when every job ended."""
        if self.draining:  # drained already (the CLI starts it on SIGTERM, while listening)
            return not self._tasks
        self.draining = True
        tasks = list(self._tasks.values())
        if tasks:
            log.info("draining", jobs=len(tasks), timeout_s=timeout)
            await asyncio.wait(tasks, timeout=timeout)
        return not self._tasks

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every job still running without ending it (the next start resumes it);
        watchers and waiting requests get ServerRestarting. A store that does not outlive
        the process cannot resume anything: there, the jobs are cancelled instead."""
        self.draining = True
        if not self.store.durable:
            for job_id in list(self._tasks):
                self._spawn(self.cancel(job_id, "server shutting down"))
            if self._aux:
                await asyncio.wait(list(self._aux), timeout=timeout)
        self.stopping.set()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel("server restarting")
        if tasks:
            log.info("jobs_left_for_restart", jobs=len(tasks))
            await asyncio.wait(tasks, timeout=timeout)
        if self._aux:
            await asyncio.wait(list(self._aux), timeout=timeout)
