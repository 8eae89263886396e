"""The ``JobStore`` interface every store implements, and what they share.

A job is a record plus an append-only event log (``seq`` 1, 2, 3... per job) plus the slices
its audio was cut into. Writes that belong together happen in one atomic step: an event and
the record change it reports, a slice's result and its commit check, the terminal event and
the terminal status. Rules every store keeps (the contract tests check them):

- Nothing is appended after a job's terminal event, and ``finish`` writes at most one.
- ``commit_slices`` accepts a result only from the current lease (same ``epoch``, slice still
  leased, job not ended): a late or duplicate result is refused, never applied twice.
- ``requeue_slices`` and ``recover`` put leased slices back with ``epoch + 1``, fencing off
  whoever held them.
- ``wait_events`` returns as soon as events past ``seq`` exist, so a watcher that reads
  history and then waits can never miss or repeat one.

The event ids map one to one onto Redis stream ids ``<seq>-0``, so ``?after=SEQ`` works the
same on every store.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiotranscribe.jobs import Job, utcnow_iso

EventSpec = tuple[str, dict[str, Any]]
"""An event to append: its ``type`` and its own fields (the store adds job_id, seq, ts)."""

SliceKey = tuple[str, int]
"""(job id, slice index)."""

JobPosition = tuple[str, str]
"""A job's place in the newest-first order: (``created_at``, id). Neither ever changes, and
ids are unique, so the order is total: paging by it returns every job once."""

QUEUED, LEASED, DONE = "queued", "leased", "done"


class StoreClosed(Exception):
    """The store was closed (the server is stopping)."""


@dataclass
class SliceRecord:
    job_id: str
    idx: int
    start_frame: int
    num_frames: int
    state: str = QUEUED
    epoch: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None
    attempts: int = 0
    result: dict[str, Any] | None = None


def make_event(job_id: str, seq: int, type_: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": type_, "job_id": job_id, "seq": seq, "ts": utcnow_iso(), **fields}


def apply_changes(job: Job, changes: dict[str, Any]) -> None:
    for name, value in changes.items():
        if not hasattr(job, name):
            raise AttributeError(f"a job has no field {name!r}")
        setattr(job, name, value)


def position_of(job: Job) -> JobPosition:
    return (job.created_at, job.id)


@dataclass(frozen=True)
class JobQuery:
    """Which jobs one page of ``page_jobs`` holds: ``tenant``'s (None: those submitted
    without a key), newest first by position, at most ``limit``."""

    tenant: str | None
    limit: int
    status: str | None = None
    model: str | None = None
    since: str | None = None
    """Created at this time or later: an ISO 8601 UTC string in ``created_at``'s format."""
    before: JobPosition | None = None
    """Strictly older than this position: the previous page's last job's."""

    def matches(self, job: Job) -> bool:
        return (
            job.tenant == self.tenant
            and (self.status is None or job.status == self.status)
            and (self.model is None or job.model == self.model)
            and (self.since is None or job.created_at >= self.since)
            and (self.before is None or position_of(job) < self.before)
        )


class Notifier:
    """Wakes the coroutines waiting for a job's next events, after they are committed."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self.closed = False

    def register(self, job_id: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_result(None)
        self._waiters.setdefault(job_id, set()).add(fut)
        return fut

    def discard(self, job_id: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[job_id]

    def notify(self, job_id: str) -> None:
        for fut in self._waiters.get(job_id, ()):
            if not fut.done():
                fut.set_result(None)

    def close(self) -> None:
        self.closed = True
        for job_id in list(self._waiters):
            self.notify(job_id)


class JobStore(abc.ABC):
    """The protocol: every method is a coroutine and every write is atomic."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        """Finished jobs older than this (seconds since they ended) are deleted by ``expire``."""
        self.notifier = Notifier()

    name = "base"
    durable = True
    """Whether jobs outlive the process (then shutdown leaves them for the next start)."""
    shared = False
    """Whether several API replicas use this store at once. Then each job has an owner (the
    replica that runs it); a replica that stops renewing its liveness loses its jobs to
    ``adopt`` on another, and a cancel made on one replica reaches the owner through
    ``signal_cancel``."""
    replica = ""
    """This process's name among the replicas of a shared store."""
    owner_ttl_s = 15.0
    """How long a replica that stopped renewing its liveness still owns its jobs (seconds)."""
    on_cancel_signal: Callable[[str], None] | None = None
    """Called with a job id when another replica asked to cancel a job (shared stores)."""

    # -- lifetime ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources; waiters wake up and further calls raise ``StoreClosed``."""

    # -- jobs and events -----------------------------------------------------------------------

    @abc.abstractmethod
    async def create(self, job: Job, events: list[EventSpec]) -> list[dict[str, Any]]:
        """Store a new job and its first events in one step; returns the events."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def list_jobs(self, *, active: bool = False, limit: int | None = None) -> list[Job]:
        """Jobs newest first; ``active``: only those not ended."""

    @abc.abstractmethod
    async def page_jobs(self, query: JobQuery) -> list[Job]:
        """The jobs ``query`` matches, newest first by position, at most ``query.limit``.
        The next page asks ``before`` = the last one's position; jobs added meanwhile are
        newer, so paging returns every earlier job once."""

    @abc.abstractmethod
    async def delete_job(self, job_id: str) -> bool:
        """Remove the job's record, events and slices in one step, and wake its watchers
        (they find it gone). False when there was no such job. Whether it may be deleted
        (has it ended?) is the caller's decision."""

    @abc.abstractmethod
    async def set_status(self, job_id: str, **changes: Any) -> Job | None:
        """Change record fields without an event (refused once the job has ended)."""

    @abc.abstractmethod
    async def set_webhook(self, job_id: str, state: dict[str, Any]) -> Job | None:
        """Replace the job's webhook delivery state (``Job.webhook``), also after the job has
        ended (delivery goes on after it). None when there is no such job (deleted, expired)."""

    @abc.abstractmethod
    async def pending_webhooks(self) -> list[Job]:
        """Ended jobs whose webhook is still to be delivered, the earliest ended first."""

    @abc.abstractmethod
    async def append_events(
        self, job_id: str, events: list[EventSpec], **changes: Any
    ) -> list[dict[str, Any]]:
        """Append events with the next seqs and apply ``changes`` to the record, atomically.
        Returns the stored events; [] when the job has ended (or is unknown)."""

    @abc.abstractmethod
    async def finish(
        self, job_id: str, status: str, fields: dict[str, Any], **changes: Any
    ) -> dict[str, Any] | None:
        """Move the job to terminal ``status`` with its one terminal event (type = status).
        Returns the event, or None when the job had already ended."""

    @abc.abstractmethod
    async def events_after(
        self, job_id: str, seq: int, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The events after ``seq`` in order; at most ``limit`` of them (a reader pages
        through a long history instead of holding it all at once)."""

    @abc.abstractmethod
    async def request_cancel(self, job_id: str, reason: str) -> Job | None:
        """Record that the job should stop (the worker side reads it); None if unknown."""

    # -- slices ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_slices(
        self,
        job_id: str,
        slices: list[tuple[int, int]],
        events: list[EventSpec],
        **changes: Any,
    ) -> list[dict[str, Any]]:
        """Store the job's slices (``(start_frame, num_frames)`` in order) with events and
        record changes, atomically. Returns the events ([] if the job has ended)."""

    @abc.abstractmethod
    async def slices(self, job_id: str) -> list[SliceRecord]: ...

    @abc.abstractmethod
    async def lease_slices(
        self, keys: list[SliceKey], owner: str, lease_s: float
    ) -> dict[SliceKey, int]:
        """Lease queued slices to ``owner``; returns the epoch of each slice leased (slices
        done, unknown or of ended jobs are left out)."""

    @abc.abstractmethod
    async def requeue_slices(self, keys: list[SliceKey]) -> None:
        """Put leased slices back in the queue with ``epoch + 1``."""

    @abc.abstractmethod
    async def commit_slices(self, items: list[tuple[str, int, int, dict[str, Any]]]) -> list[bool]:
        """Store ``(job_id, idx, epoch, result)`` results; each is accepted only from its
        current lease. Returns, per item, whether it was accepted."""

    async def commit_slice(self, job_id: str, idx: int, epoch: int, result: dict[str, Any]) -> bool:
        (accepted,) = await self.commit_slices([(job_id, idx, epoch, result)])
        return accepted

    # -- start-up and retention ------------------------------------------------------------------

    @abc.abstractmethod
    async def recover(self) -> list[Job]:
        """After a restart: every leased slice goes back to the queue (``epoch + 1``; its
        holder is gone); returns the jobs that had not ended, oldest first."""

    async def adopt(self) -> list[Job]:
        """Take over the jobs whose owner is gone (their leased slices go back to the queue,
        ``epoch + 1``); returns them, oldest first. Only shared stores have other owners."""
        return []

    async def disowned(self, job_ids: list[str]) -> tuple[set[str], set[str]]:
        """Of the jobs this process runs: those another replica has adopted meanwhile, and
        those whose cancel was asked for elsewhere (a missed ``signal_cancel``)."""
        return set(), set()

    async def signal_cancel(self, job_id: str) -> None:
        """Tell the replica running ``job_id`` that its cancel was requested (after
        ``request_cancel``). One process runs every job of an unshared store: nothing to do."""
        return None

    @abc.abstractmethod
    async def expire(self, now: float) -> list[str]:
        """Delete jobs that ended more than ``ttl_s`` before ``now`` (Unix seconds); a job
        whose webhook is still pending is kept until it is delivered or given up."""

    @abc.abstractmethod
    async def live_ids(self) -> set[str]:
        """Ids of the jobs that have not ended."""

    # -- shared helpers --------------------------------------------------------------------------

    async def append_event(
        self, job_id: str, type_: str, fields: dict[str, Any], **changes: Any
    ) -> int | None:
        """One event; returns its seq (None when the job has ended)."""
        events = await self.append_events(job_id, [(type_, fields)], **changes)
        return events[0]["seq"] if events else None

    async def wait_events(self, job_id: str, seq: int, timeout: float) -> list[dict[str, Any]]:
        """The events after ``seq``, waiting up to ``timeout`` seconds for one to exist."""
        fut = self.notifier.register(job_id)
        try:
            events = await self.events_after(job_id, seq)
            if events or self.notifier.closed:
                return events
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await fut
            if self.notifier.closed:
                return []
            return await self.events_after(job_id, seq)
        finally:
            self.notifier.discard(job_id, fut)
