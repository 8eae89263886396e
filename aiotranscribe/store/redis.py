"""A store in Redis (``--store redis://host:port/db``), through redis-py's asyncio client.

Every write is one Lua script, so it is atomic on the server: an event and the record change
it reports, a slice's result and its commit check, the terminal event and the terminal status.
Keys (per job, all under the hash tag ``{id}``; then the indexes listing needs):

=====================  ===========  =========================================================
``job:{id}``           hash         the Job record, one field per attribute (JSON values)
``ev:{id}``            stream       the events, stream ids ``<seq>-0`` (``?after=SEQ`` maps
                                    onto ``XRANGE``/``XREAD`` one to one)
``sl:{id}``            hash         slices: ``p<i>`` (start frames), ``s<i>`` state, ``e<i>``
                                    epoch, ``a<i>`` attempts, ``o<i>``/``u<i>`` lease holder
``res:{id}``           hash         slice index -> result JSON; ``HSETNX`` gates the commit
``ops:{id}``           hash         replies of recent writes by token (see below), 10 min TTL
``jobs:order``         sorted set   ``created_at id`` of every job (lexical order)
``jobs:tenant:<t>``    sorted set   the same, one tenant's
``jobs:live``          set          ids of jobs not ended
``jobs:ended``         sorted set   ids of ended jobs by ``finished_at`` (retention)
``jobs:hooks``         set          ids whose webhook is still to be delivered
``alive:<replica>``    string       this API replica is up (expires ``owner_ttl_s`` after its
                                    last renewal); a job's ``_owner`` field names its replica
``cancels``            stream       job ids whose cancel was asked for, for their owner
=====================  ===========  =========================================================

Ownership: several API replicas share the store. The replica that accepts a job runs it (its
batches, its events); one whose ``alive:`` key expired (killed, cut off) loses its jobs to
``adopt`` on another replica, which takes each over with a compare-and-set of ``_owner`` and
requeues its leased slices with ``epoch + 1``, so anything the old owner still computes is
refused at commit. A cancel made on a replica that does not run the job is added to
``cancels``; the owner also finds it in its periodic ``disowned`` check.

Retries: redis-py resends a command whose connection broke (Redis restarting, a network
blip), even when the first one ran and only its reply was lost. Writes that are not
idempotent (events, commits, create) therefore carry a token; a resent script finds its
first reply under the token and returns it instead of running twice.

Durability is Redis's: with ``appendonly yes`` and ``appendfsync always`` an acknowledged
write survives ``kill -9`` of redis-server; with ``everysec`` about the last second may be
lost on an OS crash. With replicas, a new job is acknowledged after ``WAIT 1`` (bounded).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import time
from dataclasses import fields
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from aiotranscribe.jobs import TERMINAL, WEBHOOK_PENDING, Job
from aiotranscribe.store.base import (
    EventSpec,
    JobQuery,
    JobStore,
    SliceKey,
    SliceRecord,
    StoreClosed,
    make_event,
)
from aiotranscribe.store.redis_lua import (
    ADOPT,
    COMMIT,
    CREATE,
    DELETE,
    LEASE,
    REQUEUE,
    SET_FIELDS,
    UPDATE,
)
from aiotranscribe.store.redis_pump import EventPump
from aiotranscribe.supervise import raise_if_cancelling, stop_tasks

log = structlog.get_logger(__name__)

SCHEMES = ("redis", "rediss", "unix")
# Query parameters redis-py reads from a URL (others would reach the connection as unknown
# keyword arguments and fail at the first command, far from the flag that set them).
URL_OPTIONS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "max_connections",
        "health_check_interval",
        "ssl_check_hostname",
        "timeout",
        "protocol",
    }
)
# Every caller gets a connection from one bounded pool and waits for a free one (the default
# pool raises MaxConnectionsError past its size instead: measured at 200 concurrent scripts).
MAX_CONNECTIONS = 64
POOL_WAIT_S = 20.0
SOCKET_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0
# How long closing waits for Redis to drop this replica's liveness key (else it expires).
CLOSE_TIMEOUT_S = 1.0
# A broken connection is retried with back-off (random, up to 1 s a wait): about 10 s in all,
# what a Redis restart with a small AOF takes.
RETRIES = 20
# With replicas attached, a new job is acknowledged once one has it (or after this long).
WAIT_REPLICA_MS = 100
MIN_VERSION = (6, 2)
# Most jobs read per round trip when paging through an index.
PAGE = 100

JOB_FIELDS = frozenset(f.name for f in fields(Job))


def check_url(url: str) -> None:
    """Raise ValueError unless ``url`` is a Redis URL this store can open."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"expected redis://host:port/db, rediss://... or unix://...: {url!r}")
    if parts.scheme != "unix" and parts.path not in ("", "/") and not parts.path[1:].isdigit():
        raise ValueError(f"the database must be a number (redis://host:port/0): {parts.path!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("unix:// needs the socket's path (unix:///run/redis.sock?db=0)")
    unknown = sorted({k for k, _ in parse_qsl(parts.query)} - URL_OPTIONS)
    if unknown:
        raise ValueError(f"unknown Redis URL options {unknown} (known: {sorted(URL_OPTIONS)})")


def redacted(url: str) -> str:
    """``url`` without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


def connect(url: str) -> aioredis.Redis:
    """A client for ``url`` (connects at its first command): a bounded pool callers wait
    on, replies as str, broken connections retried with back-off."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        decode_responses=True,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), RETRIES),
    )
    return aioredis.Redis(connection_pool=pool, auto_close_connection_pool=True)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _keys(job_id: str) -> dict[str, str]:
    tag = "{" + job_id + "}"
    return {name: f"{name}:{tag}" for name in ("job", "ev", "sl", "res", "ops")}  # one slot per job


ORDER, LIVE, ENDED, HOOKS = "jobs:order", "jobs:live", "jobs:ended", "jobs:hooks"
# Cancels asked for on one replica, read by all (the owner acts); a short history is kept.
CANCELS, CANCELS_KEPT, CANCELS_BLOCK_MS = "cancels", 10_000, 1000


def alive_key(replica: str) -> str:
    return f"alive:{replica}"


def replica_name() -> str:
    """A name no other process will have: host, pid and a random part (pids repeat)."""
    return f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"


def _tenant_key(tenant: str | None) -> str:
    return "jobs:tenant:" + (tenant or "")


def _member(created_at: str, job_id: str) -> str:
    """A job's place in the (created_at, id) order, as a lexically sorted member."""
    return f"{created_at} {job_id}"


def _changes(changes: dict[str, Any]) -> list[str]:
    """``changes`` as (count, name, JSON...) script arguments; unknown fields raise like
    ``apply_changes`` does."""
    for name in changes:
        if name not in JOB_FIELDS:
            raise AttributeError(f"a job has no field {name!r}")
    flat = [str(len(changes))]
    for name, value in changes.items():
        flat += [name, _dumps(value)]
    return flat


def _token() -> str:
    return os.urandom(8).hex()


def _webhook_pending(state: dict[str, Any] | None) -> bool:
    return state is not None and state.get("state") == WEBHOOK_PENDING


def _job(flat: dict[str, str] | list[str] | None) -> Job | None:
    if not flat:
        return None
    if isinstance(flat, list):
        flat = dict(zip(flat[::2], flat[1::2], strict=True))
    return Job.from_dict({k: json.loads(v) for k, v in flat.items() if not k.startswith("_")})


class RedisStore(JobStore):
    name = "redis"
    shared = True

    def __init__(self, url: str, ttl_s: float = 3600.0, owner_ttl_s: float = 15.0) -> None:
        super().__init__(ttl_s)
        check_url(url)
        self.url = url
        self.owner_ttl_s = owner_ttl_s
        self.replica = replica_name()
        self._redis: aioredis.Redis | None = None
        self._replicas = 0
        self._pump = EventPump(lambda job_id: _keys(job_id)["ev"], self.notifier.notify)
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifetime ------------------------------------------------------------------------------

    async def open(self) -> None:
        client = connect(self.url)
        try:
            info = await client.info()
        except Exception:
            await client.aclose()
            raise
        version = tuple(int(x) for x in str(info.get("redis_version", "0.0")).split(".")[:2])
        if version < MIN_VERSION:
            await client.aclose()
            raise RuntimeError(f"{redacted(self.url)}: Redis {version} is older than 6.2")
        self._replicas = int(info.get("connected_slaves", 0))
        self._redis = client
        self.notifier.closed = False
        self._create = client.register_script(CREATE)
        self._update = client.register_script(UPDATE)
        self._set_fields = client.register_script(SET_FIELDS)
        self._lease = client.register_script(LEASE)
        self._requeue = client.register_script(REQUEUE)
        self._commit = client.register_script(COMMIT)
        self._delete = client.register_script(DELETE)
        self._adopt = client.register_script(ADOPT)
        await self._warn_if_not_durable(client)
        await self._renew()
        self._pump.start(client)
        self._tasks = [
            asyncio.create_task(self._keep_alive(), name="redis-keep-alive"),
            asyncio.create_task(self._cancel_signals(), name="redis-cancel-signals"),
        ]
        log.info(
            "redis_store_open",
            url=redacted(self.url),
            version=info.get("redis_version"),
            replica=self.replica,
        )

    async def _warn_if_not_durable(self, client: aioredis.Redis) -> None:
        """Jobs outlive a Redis restart only with persistence, and survive memory pressure
        only without eviction: say so when the server is set up otherwise."""
        try:
            config = await client.config_get("appendonly")
            config.update(await client.config_get("maxmemory-policy"))
        except ResponseError:  # CONFIG disabled (managed Redis): nothing to check
            return
        if config.get("appendonly") != "yes":
            log.warning("redis_without_aof", hint="appendonly yes, appendfsync always|everysec")
        if config.get("maxmemory-policy", "noeviction") != "noeviction":
            log.warning("redis_evicts_keys", policy=config["maxmemory-policy"])

    async def close(self) -> None:
        self.notifier.close()
        tasks, self._tasks = self._tasks, []
        # redis-py 8.2 can lose a cancel (see stop_tasks): closing the client below fails
        # the reads of tasks still running, which then end.
        stuck = await self._pump.stop()
        stuck |= await stop_tasks(tasks)
        client, self._redis = self._redis, None
        if client is not None:
            # Gone at once rather than after the TTL: another replica adopts the jobs left
            # running (a rolling deploy hands them over in seconds).
            with contextlib.suppress(ConnectionError, TimeoutError, builtins.TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await client.delete(alive_key(self.replica))
            await client.aclose()
        await stop_tasks(stuck)

    # -- liveness and ownership ------------------------------------------------------------------

    async def _renew(self) -> None:
        await self._r.set(alive_key(self.replica), "1", px=int(self.owner_ttl_s * 1000))

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.owner_ttl_s / 3)
            try:
                await self._renew()
            except (ConnectionError, TimeoutError) as exc:
                raise_if_cancelling()
                log.warning("redis_keep_alive_failed", error=str(exc))

    async def _cancel_signals(self) -> None:
        """Hand cancels signalled by other replicas to ``on_cancel_signal``. A stream rather
        than pub/sub: a reader that reconnects goes on from the last entry it saw (and a
        blocked XREAD is cancellable; redis-py's pub/sub listener did not stop on cancel)."""
        # From now on: what was signalled before this replica started is not its business.
        newest = cast(list[tuple[str, Any]], await self._r.xrevrange(CANCELS, count=1))
        last = newest[0][0] if newest else "0-0"
        while True:
            try:
                reply = cast(
                    list[tuple[str, list[tuple[str, dict[str, str]]]]],
                    await self._r.xread({CANCELS: last}, block=CANCELS_BLOCK_MS),
                )
            except (ConnectionError, TimeoutError) as exc:
                raise_if_cancelling()
                log.warning("redis_cancel_signals_retrying", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            for _, entries in reply or []:
                for entry_id, entry in entries:
                    last = entry_id
                    if self.on_cancel_signal is not None:
                        self.on_cancel_signal(entry["job"])

    async def signal_cancel(self, job_id: str) -> None:
        await self._r.xadd(CANCELS, {"job": job_id}, maxlen=CANCELS_KEPT, approximate=True)

    async def _owners(self, ids: list[str]) -> list[tuple[str | None, str | None]]:
        """Each job's (owner, cancel_requested JSON), None where the job is gone."""
        async with self._r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(_keys(job_id)["job"], "_owner", "cancel_requested")
            rows = await pipe.execute()
        return [(row[0], row[1]) for row in rows]

    async def adopt(self, *, own: bool = False) -> list[Job]:
        """``own``: this process's jobs too (at start-up, when none of them runs here)."""
        ids = sorted(await self._set_members(LIVE))
        if not ids:
            return []
        owners = await self._owners(ids)
        others = sorted({o for o, _ in owners if o and o != self.replica})
        alive = set()
        if others:
            flags = await asyncio.gather(*(self._r.exists(alive_key(o)) for o in others))
            alive = {o for o, flag in zip(others, flags, strict=True) if flag}
        taken = []
        for job_id, (owner, _) in zip(ids, owners, strict=True):
            if (owner == self.replica and not own) or owner in alive:
                continue
            if await self._adopt(self._slice_keys(job_id), [owner or "", self.replica]):
                taken.append(job_id)
        if taken:
            log.info("redis_jobs_adopted", jobs=len(taken), replica=self.replica)
        jobs = await self._load(taken)
        return sorted((j for j in jobs if not j.terminal), key=lambda j: j.created_at)

    async def disowned(self, job_ids: list[str]) -> tuple[set[str], set[str]]:
        if not job_ids:
            return set(), set()
        lost, cancelled = set(), set()
        for job_id, (owner, cancel) in zip(job_ids, await self._owners(job_ids), strict=True):
            if owner is not None and owner != self.replica:
                lost.add(job_id)
            elif cancel == "true":
                cancelled.add(job_id)
        return lost, cancelled

    @property
    def _r(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreClosed("the job store is closed")
        return self._redis

    # -- reads -----------------------------------------------------------------------------------

    # redis-py types replies as bytes | str whatever decode_responses says: these few helpers
    # say what this client (decode_responses=True) gets.

    async def _set_members(self, key: str) -> list[str]:
        return cast(list[str], list(await self._r.smembers(key)))

    async def _lex_desc(self, key: str, high: str, low: str, count: int | None) -> list[str]:
        """Members from ``high`` down to ``low`` (ZREVRANGEBYLEX), at most ``count``."""
        limit = (0, count) if count is not None else ()
        return cast(list[str], await self._r.zrevrangebylex(key, high, low, *limit))

    async def get(self, job_id: str) -> Job | None:
        return _job(cast(dict[str, str], await self._r.hgetall(_keys(job_id)["job"])))

    async def _load(self, ids: list[str]) -> list[Job]:
        """The records of ``ids`` that still exist, in that order."""
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(_keys(job_id)["job"])
            rows = await pipe.execute()
        return [job for job in map(_job, rows) if job is not None]

    async def list_jobs(self, *, active: bool = False, limit: int | None = None) -> list[Job]:
        if active:
            jobs = await self._load(await self._set_members(LIVE))
            jobs.sort(key=lambda j: j.created_at, reverse=True)
            return jobs[:limit]
        members = await self._lex_desc(ORDER, "+", "-", limit)
        return await self._load([m.rsplit(" ", 1)[1] for m in members])

    async def page_jobs(self, query: JobQuery) -> list[Job]:
        key = _tenant_key(query.tenant)
        high = "+" if query.before is None else "(" + _member(*query.before)
        low = "-" if query.since is None else "[" + query.since
        found: list[Job] = []
        while len(found) < query.limit:
            members = await self._lex_desc(key, high, low, max(query.limit, PAGE))
            if not members:
                break
            jobs = await self._load([m.rsplit(" ", 1)[1] for m in members])
            found += [j for j in jobs if query.matches(j)]
            high = "(" + members[-1]
        return found[: query.limit]

    async def events_after(
        self, job_id: str, seq: int, limit: int | None = None
    ) -> list[dict[str, Any]]:
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await self._r.xrange(_keys(job_id)["ev"], f"{max(seq, 0) + 1}-0", "+", count=limit),
        )
        return [
            {
                "type": entry["t"],
                "job_id": job_id,
                "seq": int(entry_id.split("-", 1)[0]),
                "ts": entry["ts"],
                **json.loads(entry["f"]),
            }
            for entry_id, entry in entries
        ]

    async def slices(self, job_id: str) -> list[SliceRecord]:
        keys = _keys(job_id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys["sl"])
            pipe.hgetall(keys["res"])
            raw, results = await pipe.execute()
        records = []
        for idx in range(int(raw.get("n", 0))):
            i = str(idx)
            start, frames = raw["p" + i].split()
            until = raw.get("u" + i)
            records.append(
                SliceRecord(
                    job_id=job_id,
                    idx=idx,
                    start_frame=int(start),
                    num_frames=int(frames),
                    state=raw["s" + i],
                    epoch=int(raw["e" + i]),
                    lease_owner=raw.get("o" + i),
                    lease_until=float(until) if until is not None else None,
                    attempts=int(raw["a" + i]),
                    result=json.loads(results[i]) if i in results else None,
                )
            )
        return records

    async def live_ids(self) -> set[str]:
        return set(await self._set_members(LIVE))

    async def pending_webhooks(self) -> list[Job]:
        jobs = await self._load(await self._set_members(HOOKS))
        ended = [j for j in jobs if j.terminal and j.webhook_pending]
        return sorted(ended, key=lambda j: j.finished_at or 0.0)

    async def wait_events(self, job_id: str, seq: int, timeout: float) -> list[dict[str, Any]]:
        # Events another process appends wake this waiter through the pump. A wake-up can
        # find nothing new (the pump reported what this waiter had already read): wait on,
        # unless the job is gone.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self._pump.watching(job_id, seq):
            while True:
                left = deadline - loop.time()
                events = await super().wait_events(job_id, seq, max(left, 0.0))
                if events or self.notifier.closed or left <= 0 or loop.time() >= deadline:
                    return events
                if not await self._r.exists(_keys(job_id)["job"]):
                    return []

    # -- writes ----------------------------------------------------------------------------------

    async def create(self, job: Job, events: list[EventSpec]) -> list[dict[str, Any]]:
        keys = _keys(job.id)
        record = job.to_dict()
        member = _member(job.created_at, job.id)
        stored = [make_event(job.id, 0, type_, fields) for type_, fields in events]
        try:
            first = await self._create(
                [keys["job"], keys["ev"], keys["ops"], ORDER, _tenant_key(job.tenant), LIVE, HOOKS],
                [
                    _token(),
                    job.id,
                    member,
                    "0" if job.terminal else "1",
                    "1" if job.webhook_pending else "0",
                    self.replica,
                    *_changes(record),
                    *self._event_args(stored),
                ],
            )
        except ResponseError as exc:
            raise ValueError(str(exc)) from None
        if self._replicas:
            # Acknowledge the job once a replica has it too (bounded: never hang a submit).
            await self._r.execute_command("WAIT", 1, WAIT_REPLICA_MS)
        return self._numbered(stored, int(first))

    @staticmethod
    def _event_args(events: list[dict[str, Any]]) -> list[str]:
        flat = [str(len(events))]
        for event in events:
            body = {k: v for k, v in event.items() if k not in ("type", "job_id", "seq", "ts")}
            flat += [event["type"], event["ts"], _dumps(body)]
        return flat

    @staticmethod
    def _numbered(events: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
        for offset, event in enumerate(events):
            event["seq"] = first + offset
        return events

    async def _update_live(
        self,
        job_id: str,
        events: list[EventSpec],
        changes: dict[str, Any],
        *,
        finished_at: float | None = None,
        slices: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Any]]:
        keys = _keys(job_id)
        stored = [make_event(job_id, 0, type_, fields) for type_, fields in events]
        slice_args = ["-1"]
        if slices is not None:
            slice_args = [str(len(slices))]
            for start, frames in slices:
                slice_args += [str(int(start)), str(int(frames))]
        first = await self._update(
            [keys["job"], keys["ev"], keys["ops"], LIVE, ENDED, keys["sl"], keys["res"]],
            [
                _token(),
                job_id,
                repr(finished_at) if finished_at is not None else "",
                *_changes(changes),
                *self._event_args(stored),
                *slice_args,
            ],
        )
        if first == "":
            return []
        self.notifier.notify(job_id)
        return self._numbered(stored, int(first))

    async def append_events(
        self, job_id: str, events: list[EventSpec], **changes: Any
    ) -> list[dict[str, Any]]:
        return await self._update_live(job_id, events, changes)

    async def finish(
        self, job_id: str, status: str, fields: dict[str, Any], **changes: Any
    ) -> dict[str, Any] | None:
        assert status in TERMINAL
        now = time.time()
        changes = {**changes, "status": status, "finished_at": now}
        events = await self._update_live(job_id, [(status, fields)], changes, finished_at=now)
        return events[0] if events else None

    async def add_slices(
        self,
        job_id: str,
        slices: list[tuple[int, int]],
        events: list[EventSpec],
        **changes: Any,
    ) -> list[dict[str, Any]]:
        return await self._update_live(job_id, events, changes, slices=slices)

    async def _set(
        self, mode: str, job_id: str, changes: dict[str, Any], hook: bool = False
    ) -> Job | None:
        args = [mode, job_id, *(["1" if hook else "0"] if mode == "webhook" else [])]
        flat = await self._set_fields([_keys(job_id)["job"], HOOKS], [*args, *_changes(changes)])
        return _job(flat)

    async def set_status(self, job_id: str, **changes: Any) -> Job | None:
        return await self._set("status", job_id, changes)

    async def request_cancel(self, job_id: str, reason: str) -> Job | None:
        return await self._set(
            "cancel", job_id, {"cancel_requested": True, "cancel_reason": reason}
        )

    async def set_webhook(self, job_id: str, state: dict[str, Any]) -> Job | None:
        return await self._set("webhook", job_id, {"webhook": state}, _webhook_pending(state))

    # -- slices ----------------------------------------------------------------------------------

    @staticmethod
    def _by_job(keys: list[SliceKey]) -> dict[str, list[int]]:
        grouped: dict[str, list[int]] = {}
        for job_id, idx in keys:
            grouped.setdefault(job_id, []).append(idx)
        return grouped

    async def lease_slices(
        self, keys: list[SliceKey], owner: str, lease_s: float
    ) -> dict[SliceKey, int]:
        # One script per job, concurrently (not a pipeline: a script call on its own reloads
        # the script when a restarted Redis has forgotten it).
        grouped = self._by_job(keys)
        until = repr(time.time() + lease_s)
        replies = await asyncio.gather(
            *(
                self._lease(self._slice_keys(job_id), [owner, until, *map(str, idxs)])
                for job_id, idxs in grouped.items()
            )
        )
        leased = {}
        for (job_id, idxs), epochs in zip(grouped.items(), replies, strict=True):
            for idx, epoch in zip(idxs, epochs, strict=True):
                if epoch >= 0:
                    leased[(job_id, idx)] = int(epoch)
        return leased

    async def requeue_slices(self, keys: list[SliceKey]) -> None:
        await asyncio.gather(
            *(
                self._requeue(self._slice_keys(job_id), list(map(str, idxs)))
                for job_id, idxs in self._by_job(keys).items()
            )
        )

    async def commit_slices(self, items: list[tuple[str, int, int, dict[str, Any]]]) -> list[bool]:
        grouped: dict[str, list[int]] = {}
        for position, (job_id, *_) in enumerate(items):
            grouped.setdefault(job_id, []).append(position)

        async def commit(job_id: str, positions: list[int]) -> str:
            k = _keys(job_id)
            args = [_token()]
            for position in positions:
                _, idx, epoch, result = items[position]
                args += [str(idx), str(epoch), _dumps(result)]
            reply: str = await self._commit([k["job"], k["ev"], k["ops"], k["sl"], k["res"]], args)
            return reply

        replies = await asyncio.gather(*(commit(j, ps) for j, ps in grouped.items()))
        accepted = [False] * len(items)
        for positions, flags in zip(grouped.values(), replies, strict=True):
            for position, flag in zip(positions, flags, strict=True):
                accepted[position] = flag == "1"
        return accepted

    @staticmethod
    def _slice_keys(job_id: str) -> list[str]:
        k = _keys(job_id)
        return [k["job"], k["sl"]]

    # -- start-up and retention ------------------------------------------------------------------

    async def recover(self) -> list[Job]:
        # Other replicas may be running jobs on this Redis: only orphans are ours to resume.
        return await self.adopt(own=True)

    async def _delete_one(self, job_id: str, keep_hooked: bool) -> bool:
        k = _keys(job_id)
        tenant_key = await self._r.hget(k["job"], "_tenant")
        if tenant_key is None:
            return False
        deleted = await self._delete(
            [k["job"], k["ev"], k["sl"], k["res"], k["ops"], ORDER, tenant_key, LIVE, ENDED, HOOKS],
            [job_id, "1" if keep_hooked else "0"],
        )
        return bool(deleted)

    async def delete_job(self, job_id: str) -> bool:
        found = await self._delete_one(job_id, keep_hooked=False)
        self.notifier.notify(job_id)
        return found

    async def expire(self, now: float) -> list[str]:
        cutoff = now - self.ttl_s
        ids = cast(list[str], await self._r.zrangebyscore(ENDED, "-inf", f"({cutoff!r}"))
        return [job_id for job_id in ids if await self._delete_one(job_id, keep_hooked=True)]


async def ended_jobs(redis: aioredis.Redis, ids: set[str] | list[str]) -> set[str]:
    """Those of ``ids`` whose job has ended (a terminal ``status`` in ``job:{id}``) or whose
    record is gone (deleted, expired): a worker skips their slices (skip-on-read)."""
    wanted = sorted(set(ids))
    if not wanted:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in wanted:
            pipe.hget(_keys(job_id)["job"], "status")
        found = cast(list[str | None], await pipe.execute())
    return {
        job_id
        for job_id, status in zip(wanted, found, strict=True)
        if not status or json.loads(status) in TERMINAL
    }
