"""Wakes this process's event waiters when another process appends to a job's events.

Writes made here wake waiters directly (the store's Notifier). Writes made by another
process on the same Redis (another server, later a remote worker) are seen by one pump per
store: a single ``XREAD`` over the event streams of every watched job, so a thousand open
WebSockets cost one connection, not a thousand blocked ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError, TimeoutError

from aiotranscribe.supervise import raise_if_cancelling, stop_tasks

log = structlog.get_logger(__name__)

# How long one XREAD waits. A waiter that starts meanwhile is included from the next read,
# so this bounds how late it hears of another process's first event (its own are at once).
BLOCK_MS = 200
# Back-off while Redis is unreachable (the store's own calls retry and then fail).
RETRY_S = (0.1, 5.0)


class EventPump:
    def __init__(self, stream_of: Callable[[str], str], notify: Callable[[str], None]) -> None:
        self._stream_of = stream_of
        self._notify = notify
        self._waiting: dict[str, list[int]] = {}
        """Per watched job, the seq each of its waiters has read up to."""
        self._seen: dict[str, int] = {}
        """Per watched job, the newest seq the pump has already reported."""
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, client: aioredis.Redis) -> None:
        self._task = asyncio.create_task(self._run(client), name="redis-event-pump")

    async def stop(self) -> set[asyncio.Task[None]]:
        """Stop reading; the task if it did not end (see ``stop_tasks``)."""
        task, self._task = self._task, None
        return await stop_tasks([task])

    @contextlib.contextmanager
    def watching(self, job_id: str, seq: int) -> Iterator[None]:
        """Report ``job_id``'s events past ``seq`` while the block runs."""
        self._waiting.setdefault(job_id, []).append(seq)
        self._changed.set()
        try:
            yield
        finally:
            seqs = self._waiting[job_id]
            seqs.remove(seq)
            if not seqs:
                del self._waiting[job_id]
                self._seen.pop(job_id, None)

    async def _run(self, client: aioredis.Redis) -> None:
        pause = RETRY_S[0]
        while True:
            if not self._waiting:
                self._changed.clear()
                await self._changed.wait()
                continue
            # From the oldest seq a waiter still needs, but never back to what was reported:
            # a waiter reads the history itself after it registers, so nothing is missed.
            streams: dict[Any, Any] = {}
            jobs: dict[str, str] = {}
            for job_id, seqs in self._waiting.items():
                stream = self._stream_of(job_id)
                streams[stream] = f"{max(min(seqs), self._seen.get(job_id, 0))}-0"
                jobs[stream] = job_id
            try:
                reply: list[tuple[str, list[tuple[str, Any]]]] = cast(
                    list[tuple[str, list[tuple[str, Any]]]],
                    await client.xread(streams, count=1, block=BLOCK_MS),
                )
            except (ConnectionError, TimeoutError) as exc:
                raise_if_cancelling()
                log.warning("redis_event_pump_retrying", error=str(exc), in_s=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_S[1])
                continue
            pause = RETRY_S[0]
            for stream, entries in reply or []:
                job_id = jobs[stream]
                waiting = self._waiting.get(job_id)
                if entries and waiting:  # one entry (COUNT 1) says enough
                    newest = int(entries[-1][0].split("-", 1)[0])
                    self._seen[job_id] = max(self._seen.get(job_id, 0), newest)
                    # Waiters may have moved past it while the read was under way (woken by
                    # a write of this process): tell only if one still waits for it.
                    if newest > min(waiting):
                        self._notify(job_id)
