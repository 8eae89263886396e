"""A store in this process's memory (``--store memory``): fast, and gone when the server
stops. Every call runs without awaiting, so each is atomic on the event loop; records and
events are copied in and out, so callers can no more change stored state than with SQLite."""

from __future__ import annotations

import bisect
import copy
import time
from typing import Any

from aiotranscribe.jobs import TERMINAL, Job
from aiotranscribe.store.base import (
    DONE,
    LEASED,
    QUEUED,
    EventSpec,
    JobQuery,
    JobStore,
    SliceKey,
    SliceRecord,
    StoreClosed,
    apply_changes,
    make_event,
    position_of,
)


class MemoryStore(JobStore):
    name = "memory"
    durable = False

    def __init__(self, ttl_s: float = 3600.0) -> None:
        super().__init__(ttl_s)
        self._jobs: dict[str, Job] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._slices: dict[str, list[SliceRecord]] = {}
        self._open = False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False
        self.notifier.close()

    def _check(self) -> None:
        if not self._open:
            raise StoreClosed("the job store is closed")

    def _append(self, job: Job, events: list[EventSpec]) -> list[dict[str, Any]]:
        log = self._events.setdefault(job.id, [])
        out = []
        for type_, fields in events:
            job.last_seq += 1
            event = make_event(job.id, job.last_seq, type_, copy.deepcopy(fields))
            log.append(event)
            out.append(copy.deepcopy(event))
        if out:
            self.notifier.notify(job.id)
        return out

    def _live(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and not job.terminal else None

    async def create(self, job: Job, events: list[EventSpec]) -> list[dict[str, Any]]:
        self._check()
        if job.id in self._jobs:
            raise ValueError(f"job {job.id} exists")
        stored = copy.deepcopy(job)
        self._jobs[job.id] = stored
        return self._append(stored, events)

    async def get(self, job_id: str) -> Job | None:
        self._check()
        job = self._jobs.get(job_id)
        return copy.deepcopy(job) if job is not None else None

    async def list_jobs(self, *, active: bool = False, limit: int | None = None) -> list[Job]:
        self._check()
        jobs = [j for j in self._jobs.values() if not (active and j.terminal)]
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return [copy.deepcopy(j) for j in jobs[:limit]]

    async def page_jobs(self, query: JobQuery) -> list[Job]:
        self._check()
        jobs = sorted(filter(query.matches, self._jobs.values()), key=position_of, reverse=True)
        return [copy.deepcopy(j) for j in jobs[: query.limit]]

    async def delete_job(self, job_id: str) -> bool:
        self._check()
        found = self._jobs.pop(job_id, None) is not None
        self._events.pop(job_id, None)
        self._slices.pop(job_id, None)
        self.notifier.notify(job_id)
        return found

    async def set_status(self, job_id: str, **changes: Any) -> Job | None:
        self._check()
        job = self._live(job_id)
        if job is None:
            return None
        apply_changes(job, copy.deepcopy(changes))
        return copy.deepcopy(job)

    async def set_webhook(self, job_id: str, state: dict[str, Any]) -> Job | None:
        self._check()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        job.webhook = copy.deepcopy(state)
        return copy.deepcopy(job)

    async def pending_webhooks(self) -> list[Job]:
        self._check()
        jobs = [j for j in self._jobs.values() if j.terminal and j.webhook_pending]
        return [copy.deepcopy(j) for j in sorted(jobs, key=lambda j: j.finished_at or 0.0)]

    async def append_events(
        self, job_id: str, events: list[EventSpec], **changes: Any
    ) -> list[dict[str, Any]]:
        self._check()
        job = self._live(job_id)
        if job is None:
            return []
        apply_changes(job, copy.deepcopy(changes))
        return self._append(job, events)

    async def finish(
        self, job_id: str, status: str, fields: dict[str, Any], **changes: Any
    ) -> dict[str, Any] | None:
        self._check()
        assert status in TERMINAL
        job = self._live(job_id)
        if job is None:
            return None
        apply_changes(job, copy.deepcopy(changes))
        job.status, job.finished_at = status, time.time()
        return self._append(job, [(status, fields)])[0]

    async def events_after(
        self, job_id: str, seq: int, limit: int | None = None
    ) -> list[dict[str, Any]]:
        self._check()
        events = self._events.get(job_id, [])
        # Seqs are in order: find the first one past ``seq`` without scanning the history.
        start = bisect.bisect_right(events, seq, key=lambda e: e["seq"])
        end = len(events) if limit is None else start + limit
        return [copy.deepcopy(e) for e in events[start:end]]

    async def request_cancel(self, job_id: str, reason: str) -> Job | None:
        self._check()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if not job.terminal:
            job.cancel_requested, job.cancel_reason = True, reason
        return copy.deepcopy(job)

    async def add_slices(
        self,
        job_id: str,
        slices: list[tuple[int, int]],
        events: list[EventSpec],
        **changes: Any,
    ) -> list[dict[str, Any]]:
        self._check()
        job = self._live(job_id)
        if job is None:
            return []
        self._slices[job_id] = [
            SliceRecord(job_id, idx, start, frames) for idx, (start, frames) in enumerate(slices)
        ]
        apply_changes(job, copy.deepcopy(changes))
        return self._append(job, events)

    async def slices(self, job_id: str) -> list[SliceRecord]:
        self._check()
        return copy.deepcopy(self._slices.get(job_id, []))

    def _slice(self, key: SliceKey) -> SliceRecord | None:
        records = self._slices.get(key[0], [])
        return records[key[1]] if 0 <= key[1] < len(records) else None

    async def lease_slices(
        self, keys: list[SliceKey], owner: str, lease_s: float
    ) -> dict[SliceKey, int]:
        self._check()
        leased = {}
        until = time.time() + lease_s
        for key in keys:
            record = self._slice(key)
            if record is None or record.state == DONE or self._live(key[0]) is None:
                continue
            record.state, record.lease_owner, record.lease_until = LEASED, owner, until
            record.attempts += 1
            leased[key] = record.epoch
        return leased

    async def requeue_slices(self, keys: list[SliceKey]) -> None:
        self._check()
        for key in keys:
            record = self._slice(key)
            if record is not None and record.state == LEASED:
                record.state, record.lease_owner, record.lease_until = QUEUED, None, None
                record.epoch += 1

    async def commit_slices(self, items: list[tuple[str, int, int, dict[str, Any]]]) -> list[bool]:
        self._check()
        accepted = []
        for job_id, idx, epoch, result in items:
            record = self._slice((job_id, idx))
            ok = (
                record is not None
                and record.state == LEASED
                and record.epoch == epoch
                and self._live(job_id) is not None
            )
            if ok:
                assert record is not None
                record.state, record.result = DONE, copy.deepcopy(result)
                record.lease_owner = record.lease_until = None
            accepted.append(ok)
        return accepted

    async def recover(self) -> list[Job]:
        self._check()
        for records in self._slices.values():
            for record in records:
                if record.state == LEASED:
                    record.state, record.lease_owner, record.lease_until = QUEUED, None, None
                    record.epoch += 1
        jobs = [copy.deepcopy(j) for j in self._jobs.values() if not j.terminal]
        return sorted(jobs, key=lambda j: j.created_at)

    async def expire(self, now: float) -> list[str]:
        self._check()
        gone = [
            j.id
            for j in self._jobs.values()
            if j.finished_at is not None
            and now - j.finished_at > self.ttl_s
            and not j.webhook_pending
        ]
        for job_id in gone:
            del self._jobs[job_id]
            self._events.pop(job_id, None)
            self._slices.pop(job_id, None)
        return gone

    async def live_ids(self) -> set[str]:
        self._check()
        return {j.id for j in self._jobs.values() if not j.terminal}
