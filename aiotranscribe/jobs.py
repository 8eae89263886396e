"""Jobs, their event history and subscribers, and the store that keeps them.

A job's events are its single source of truth for watchers: each has ``type``, ``job_id``,
``seq`` (1, 2, 3, ...) and ``ts``. Subscribers each get a bounded queue; one that falls
behind is marked overflowed and cut off rather than buffered without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = (
    "pending",
    "processing",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})

SUBSCRIBER_QUEUE = 256


def utcnow_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Subscriber:
    """One watcher's bounded queue of live events."""

    def __init__(self, maxsize: int = SUBSCRIBER_QUEUE) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self.overflowed = False

    def offer(self, event: dict[str, Any]) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True


@dataclass
class Job:
    id: str
    filename: str
    model: str
    language: str | None = None
    include_timestamps: bool = True
    upload_bytes: int = 0
    created_at: str = field(default_factory=utcnow_iso)
    status: str = PENDING
    stage: str = "queued"
    completed_at: str | None = None
    error: str | None = None
    error_code: str | None = None
    error_status: int = 500
    result: dict[str, Any] | None = None
    progress: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    subscribers: set[Subscriber] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    finished_monotonic: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def publish(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type_, "job_id": self.id, "seq": len(self.events) + 1, "ts": utcnow_iso()}
        event.update(fields)
        self.events.append(event)
        for sub in list(self.subscribers):
            sub.offer(event)
        return event

    def set_stage(self, status: str, stage: str, queue_position: int | None = None) -> None:
        if (status, stage) == (self.status, self.stage) and self.events:
            return
        self.status, self.stage = status, stage
        self.publish("status", status=status, stage=stage, queue_position=queue_position)

    def report_progress(self, progress: float, **fields: Any) -> None:
        # Progress never goes backwards, whatever order slices finish in.
        self.progress = max(self.progress, min(progress, 1.0))
        self.publish("progress", stage=self.stage, progress=round(self.progress, 4), **fields)

    def finish(self, status: str, **fields: Any) -> None:
        """Move to a terminal status once; later calls are ignored."""
        if self.terminal:
            return
        self.status = status
        self.stage = "finalizing" if status == COMPLETED else self.stage
        self.completed_at = utcnow_iso()
        self.finished_monotonic = time.monotonic()
        self.publish(status, **fields)
        self.done.set()

    def subscribe(self, maxsize: int = SUBSCRIBER_QUEUE) -> Subscriber:
        sub = Subscriber(maxsize)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def info(self) -> dict[str, Any]:
        """The seed clients' ``JobInfo``."""
        return {
            "job_id": self.id,
            "status": self.status,
            "filename": self.filename,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "error": self.error,
            "result": self.result,
            "stage": self.stage,
            "progress": round(self.progress, 4),
            "model": self.model,
        }


class JobStore(Protocol):
    """Where jobs live. The in-memory store is the default; a durable one can replace it."""

    def add(self, job: Job) -> None: ...

    def get(self, job_id: str) -> Job | None: ...

    def __iter__(self) -> Iterator[Job]: ...

    def __len__(self) -> int: ...

    def evict_expired(self, ttl_s: float, now: float | None = None) -> list[str]: ...


class MemoryJobStore:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def evict_expired(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Forget jobs that ended more than ``ttl_s`` seconds ago and nobody is watching."""
        now = time.monotonic() if now is None else now
        gone = [
            job.id
            for job in self._jobs.values()
            if job.finished_monotonic is not None
            and now - job.finished_monotonic > ttl_s
            and not job.subscribers
        ]
        for job_id in gone:
            del self._jobs[job_id]
        return gone
