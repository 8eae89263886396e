"""Admission shared by the API replicas of ``serve --no-workers``: one limit for the fleet.

Each replica keeps its jobs' waiting slices in its own pool queue and sends to
``q:slices:<model>`` only the batches it is about to run, so the stream holds a fraction of
the backlog: uploads under way, jobs being converted and slices waiting in each replica's
pool are not in it. The shared total is therefore what every live replica's admission holds
(the per-job shares of ``Admission``: provisional while uploading, then the audio still to
do), published per model:

``adm:<model>``  hash  replica -> ``<held seconds>:<Redis time, ms>``

A new job is admitted by one script that sums the other replicas' fields (dropping those
not refreshed for ``STALE_S``: a replica that is gone) and writes this replica's total, the
new job included, only if the sum stays within the limit: two replicas cannot both take the
last room. Every other change (a job probed, slices done, a job ended) is published by a
background task within moments, and every ``REFRESH_S`` anyway.

The stream's ``lag`` and ``pending`` (``XINFO GROUPS``) are not added to the total: each
entry there is a slice of a job some live replica holds already, so adding them would count
it twice. They are read for ``/metrics`` and ``/ready`` with the number of live workers.

Redis unreachable: admission fails closed (503 + Retry-After). The job could not be recorded
anyway (the job store is the same Redis), and a refusal before the body costs the client no
upload.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from aiohttp import web
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from aiotranscribe.admission import Admission, QueueFull
from aiotranscribe.remote import GROUP, RemoteHub, queue_key
from aiotranscribe.supervise import raise_if_cancelling, stop_tasks

log = structlog.get_logger(__name__)

# Shares are republished this often (and at once on a change).
REFRESH_S = 1.0
# A replica's share not refreshed for this long is dropped: that replica is gone.
STALE_S = 5.0
# An admission that cannot reach Redis within this long is refused.
ADMIT_TIMEOUT_S = 3.0
# Retry-After when Redis cannot be reached.
UNREACHABLE_RETRY_S = 5

# KEYS[1] adm:<model>; ARGV: replica, its total, limit, stale ms, check (1) or publish (0).
# Returns {admitted, the other replicas' sum}. Redis's clock stamps the fields, so the
# replicas' clocks need not agree.
PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = tonumber(ARGV[4])
local others = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] ~= ARGV[1] then
    local held, stamp = string.match(fields[i + 1], '^([^:]+):(%d+)$')
    if held == nil or now - tonumber(stamp) > stale then
      redis.call('HDEL', KEYS[1], fields[i])
    else
      others = others + tonumber(held)
    end
  end
end
if ARGV[5] == '1' and others + tonumber(ARGV[2]) > tonumber(ARGV[3]) then
  return {0, tostring(others)}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], 2 * stale)
return {1, tostring(others)}
"""


def shares_key(model: str) -> str:
    return f"adm:{model}"


@dataclass
class QueueState:
    """The shared queue of one model, as last read."""

    total_s: float = 0.0  # every live replica's held audio seconds, this one's included
    lag: int | None = None  # XINFO GROUPS: entries not yet delivered (None: unknown)
    pending: int | None = None  # delivered, not acknowledged
    entries_read: int | None = None
    workers: list[str] = field(default_factory=list)  # live workers' consumer names


class SharedAdmission(Admission):
    """``Admission`` whose limit counts every live replica's jobs of the model."""

    def __init__(
        self,
        limit_s: float,
        provisional_s: float,
        speed_of: Callable[[str], float | None],
        hub: RemoteHub,
        models: Iterable[str],
    ) -> None:
        super().__init__(limit_s, provisional_s, speed_of)
        self.hub = hub
        self.models = list(models)
        self.queues = {model: QueueState() for model in self.models}
        self.reachable = True
        self._others = dict.fromkeys(self.models, 0.0)
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._script: AsyncScript | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def replica(self) -> str:
        return self.hub.replica

    def total(self, model: str) -> float:
        return self._others.get(model, 0.0) + self.used(model)

    def full(self, model: str) -> bool:
        """A new upload of ``model`` would be refused now (as last read)."""
        return not self.fits(model, self.provisional_s)

    # -- the shares ------------------------------------------------------------------------------

    async def admit(self, job_id: str, model: str) -> None:
        await self._take(job_id, model, self.provisional_s)

    async def readmit(self, job_id: str, model: str) -> None:
        current = self._held.get(job_id)
        if current is None or current[0] == model:
            return
        self._dropped(job_id)
        try:
            await self._take(job_id, model, current[1])
        except BaseException:
            self.hold(job_id, *current)
            raise

    async def _take(self, job_id: str, model: str, seconds: float) -> None:
        # Held here first, so that this replica's concurrent admissions count each other.
        self._held[job_id] = (model, seconds)
        try:
            admitted = await self._publish(model, check=True)
        except BaseException as exc:
            self._dropped(job_id)
            if isinstance(exc, RedisError | TimeoutError):
                self.reachable = False
                self.rejected[model] = self.rejected.get(model, 0) + 1
                log.warning("admission_unreachable", model=model, error=repr(exc))
                raise QueueFull(UNREACHABLE_RETRY_S) from exc
            raise
        if not admitted:
            self._dropped(job_id)
            self.rejected[model] = self.rejected.get(model, 0) + 1
            raise QueueFull(self.retry_after(model))

    def _dropped(self, job_id: str) -> None:
        self._held.pop(job_id, None)
        self._changed.set()

    def hold(self, job_id: str, model: str, seconds: float) -> None:
        super().hold(job_id, model, seconds)
        self._changed.set()

    def update(self, job_id: str, seconds: float) -> None:
        super().update(job_id, seconds)
        self._changed.set()

    def release(self, job_id: str) -> None:
        super().release(job_id)
        self._changed.set()

    async def _publish(self, model: str, check: bool) -> bool:
        """Write this replica's total for ``model`` (only if within the limit, with
        ``check``); learn the others' sum either way."""
        if self._script is None:
            raise RedisError("shared admission is not open")
        # One write at a time from this replica: each carries its total at the moment it
        # is sent, so writes overtaking each other could leave an older total in place.
        async with asyncio.timeout(ADMIT_TIMEOUT_S), self._lock:
            reply = await self._script(
                keys=[shares_key(model)],
                args=[
                    self.replica,
                    f"{self.used(model):.3f}",
                    f"{self.limit_s:.3f}",
                    int(STALE_S * 1000),
                    int(check),
                ],
            )
        admitted, others = cast(list[Any], reply)
        self._others[model] = float(others)
        self.reachable = True
        return bool(admitted)

    # -- the shared queue ------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Publish this replica's shares and read each model's stream and workers; on a
        Redis error the last reading stays (and ``reachable`` turns False)."""
        try:
            for model in self.models:
                await self._publish(model, check=False)
                self.queues[model] = await self._read_queue(model)
        except (RedisError, TimeoutError) as exc:
            raise_if_cancelling()
            self.reachable = False
            log.warning("shared_queue_unreadable", error=repr(exc))

    async def _read_queue(self, model: str) -> QueueState:
        state = QueueState(total_s=self.total(model))
        async with asyncio.timeout(ADMIT_TIMEOUT_S):
            state.workers = sorted(await self.hub.workers(model))
            try:
                groups = await self.hub.redis.xinfo_groups(queue_key(model))
            except ResponseError:  # no stream yet: no worker has started
                return state
        for group in cast(list[dict[str, Any]], groups):
            if group["name"] == GROUP:
                state.lag = group.get("lag")
                state.pending = int(group["pending"])
                state.entries_read = group.get("entries-read")
        return state

    async def _keep_published(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH_S):
                    await self._changed.wait()
            raise_if_cancelling()
            self._changed.clear()
            await self.refresh()
            if not self.reachable:
                await asyncio.sleep(REFRESH_S)

    # -- lifetime --------------------------------------------------------------------------------

    async def ctx(self, _app: web.Application) -> AsyncIterator[None]:
        """A cleanup context, inside the hub's (it uses the hub's Redis client)."""
        self._script = self.hub.redis.register_script(PUBLISH)
        await self.refresh()
        self._task = asyncio.create_task(self._keep_published(), name="shared-admission")
        yield
        await stop_tasks([self._task])
        # Gone at once rather than after STALE_S.
        with contextlib.suppress(RedisError, TimeoutError):
            async with asyncio.timeout(ADMIT_TIMEOUT_S):
                for model in self.models:
                    await self.hub.redis.hdel(shares_key(model), self.replica)
