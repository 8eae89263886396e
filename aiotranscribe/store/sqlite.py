"""The default store (``--store sqlite``): one SQLite file in WAL mode, through aiosqlite.

One writer connection owns every write. Writes queue up for it and are group-committed: each
in its own savepoint, all of one round in one ``BEGIN IMMEDIATE`` transaction, so many small
writes (progress events of many jobs) cost one fsync together instead of one each. Reads use
a second connection; in WAL mode they never wait for the writer.

Durability: a committed transaction survives a crash of this process (``kill -9``, OOM)
whatever ``synchronous`` says; with ``synchronous=FULL`` (the default) it also survives a
power loss or OS crash, with ``NORMAL`` the last transactions before one may roll back.
Waiters are woken only after the commit, so nobody ever sees an event that could vanish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog

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
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
Op = Callable[[aiosqlite.Connection, set[str]], Awaitable[Any]]

SCHEMA_VERSION = 1
# The record's tenant, '' for none (keys never name an empty tenant): what jobs_tenant_page
# indexes, so a query must spell it exactly this way to use the index.
TENANT = "IFNULL(json_extract(record, '$.tenant'), '')"
WEBHOOK_PENDING = "json_extract(record, '$.webhook.state') = 'pending'"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs(
  id TEXT PRIMARY KEY,
  status TEXT NOT NULL,
  created_at TEXT NOT NULL,
  finished_at REAL,
  record TEXT NOT NULL              -- the Job record as JSON
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(status) WHERE status IN ('pending','processing');
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
-- Ended jobs whose webhook is still to be delivered (read at start-up, kept by expire).
CREATE INDEX IF NOT EXISTS jobs_webhook_pending ON jobs(finished_at) WHERE {WEBHOOK_PENDING};
-- GET /jobs: one tenant's jobs newest first, a page after a (created_at, id) cursor.
CREATE INDEX IF NOT EXISTS jobs_tenant_page ON jobs({TENANT}, created_at, id);
CREATE TABLE IF NOT EXISTS slices(
  job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  idx INTEGER NOT NULL,
  start_frame INTEGER NOT NULL,
  num_frames INTEGER NOT NULL,
  state TEXT NOT NULL DEFAULT 'queued',   -- queued | leased | done
  epoch INTEGER NOT NULL DEFAULT 0,
  lease_owner TEXT,
  lease_until REAL,
  attempts INTEGER NOT NULL DEFAULT 0,
  result TEXT,
  PRIMARY KEY(job_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS slices_leased ON slices(state) WHERE state = 'leased';
CREATE TABLE IF NOT EXISTS events(
  job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  seq INTEGER NOT NULL,
  body TEXT NOT NULL,               -- the whole event as JSON
  PRIMARY KEY(job_id, seq)
) WITHOUT ROWID;
"""
SYNCHRONOUS = ("full", "normal")
# Most writes grouped in one transaction.
GROUP_MAX = 128
BUSY_TIMEOUT_MS = 5000
ACTIVE = "('pending','processing')"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class SqliteStore(JobStore):
    name = "sqlite"

    def __init__(self, path: Path, ttl_s: float = 3600.0, synchronous: str = "full") -> None:
        super().__init__(ttl_s)
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
        self.path = path
        self.synchronous = synchronous
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[tuple[Op, asyncio.Future[Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    # -- lifetime ------------------------------------------------------------------------------

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves (a deferred transaction
        # that later writes gets SQLITE_BUSY without waiting for busy_timeout).
        db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        return db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        mode = await (await self._writer.execute("PRAGMA journal_mode=WAL")).fetchone()
        if mode is None or mode[0] != "wal":
            raise RuntimeError(f"{self.path}: could not switch to WAL mode (got {mode})")
        version = await (await self._writer.execute("PRAGMA user_version")).fetchone()
        if version is not None and version[0] > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was written by a newer aiotranscribe (schema {version[0]})"
            )
        await self._writer.executescript(SCHEMA)
        await self._writer.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._reader = await self._connect()
        self._task = asyncio.create_task(self._write_loop(), name="sqlite-writer")

    async def close(self) -> None:
        """Commit what is queued, then close both connections."""
        self.notifier.close()
        if self._task is not None:
            # The loop empties the queue before it notices the sentinel.
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait((_stop, done))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for conn in (self._writer, self._reader):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._writer = self._reader = None

    # -- the writer ------------------------------------------------------------------------------

    async def _write(self, op: Op) -> Any:
        if self._task is None or self._task.done():
            raise StoreClosed("the job store is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, fut))
        return await fut

    async def _write_loop(self) -> None:
        db = self._writer
        assert db is not None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < GROUP_MAX:
                batch.append(self._queue.get_nowait())
            stop = any(op is _stop for op, _ in batch)
            work = [(op, fut) for op, fut in batch if op is not _stop]
            if work:
                await self._run_group(db, work)
            if stop:
                for op, fut in batch:
                    if op is _stop and not fut.done():
                        fut.set_result(None)
                return

    async def _run_group(
        self, db: aiosqlite.Connection, work: list[tuple[Op, asyncio.Future[Any]]]
    ) -> None:
        touched: set[str] = set()
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        # Savepoints let one write fail alone in a group; a group of one needs none.
        alone = len(work) == 1
        try:
            await db.execute("BEGIN IMMEDIATE")
            for op, fut in work:
                if not alone:
                    await db.execute("SAVEPOINT op")
                mine: set[str] = set()
                try:
                    value = await op(db, mine)
                except Exception as exc:  # this write fails alone; the others still commit
                    if not alone:
                        await db.execute("ROLLBACK TO op")
                        await db.execute("RELEASE op")
                    else:
                        await db.execute("ROLLBACK")
                        if not fut.done():
                            fut.set_exception(exc)
                        return
                    outcomes.append((fut, None, exc))
                    continue
                if not alone:
                    await db.execute("RELEASE op")
                touched |= mine
                outcomes.append((fut, value, None))
            await db.execute("COMMIT")
        except Exception as exc:  # BEGIN or COMMIT failed (disk full, I/O error): none landed
            log.error("sqlite_commit_failed", error=str(exc), writes=len(work))
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            for _, fut in work:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for fut, value, error in outcomes:
            if fut.done():  # the caller gave up; the write landed all the same
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)
        for job_id in touched:
            self.notifier.notify(job_id)

    # -- reads -----------------------------------------------------------------------------------

    async def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        if self._reader is None:
            raise StoreClosed("the job store is closed")
        # Statement and fetch in one call on the connection's thread: reads that interleaved
        # there would share one WAL snapshot and could keep it open, hiding newer commits.
        return list(await self._reader.execute_fetchall(sql, params))

    async def get(self, job_id: str) -> Job | None:
        rows = await self._rows("SELECT record FROM jobs WHERE id=?", (job_id,))
        return Job.from_dict(json.loads(rows[0][0])) if rows else None

    async def list_jobs(self, *, active: bool = False, limit: int | None = None) -> list[Job]:
        where = f"WHERE status IN {ACTIVE}" if active else ""
        rows = await self._rows(
            f"SELECT record FROM jobs {where} ORDER BY created_at DESC LIMIT ?",
            (limit if limit is not None else -1,),
        )
        return [Job.from_dict(json.loads(r[0])) for r in rows]

    async def page_jobs(self, query: JobQuery) -> list[Job]:
        where, params = [f"{TENANT}=?"], [query.tenant or ""]
        if query.before is not None:
            where.append("(created_at, id) < (?, ?)")
            params += query.before
        for condition, value in (
            ("created_at >= ?", query.since),
            ("status=?", query.status),
            ("json_extract(record, '$.model')=?", query.model),
        ):
            if value is not None:
                where.append(condition)
                params.append(value)
        rows = await self._rows(
            f"SELECT record FROM jobs WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, query.limit),
        )
        return [Job.from_dict(json.loads(r[0])) for r in rows]

    async def events_after(
        self, job_id: str, seq: int, limit: int | None = None
    ) -> list[dict[str, Any]]:
        rows = await self._rows(
            "SELECT body FROM events WHERE job_id=? AND seq>? ORDER BY seq LIMIT ?",
            (job_id, seq, -1 if limit is None else limit),  # SQLite: -1 is no limit
        )
        return [json.loads(r[0]) for r in rows]

    async def slices(self, job_id: str) -> list[SliceRecord]:
        rows = await self._rows(
            "SELECT job_id, idx, start_frame, num_frames, state, epoch, lease_owner, lease_until,"
            " attempts, result FROM slices WHERE job_id=? ORDER BY idx",
            (job_id,),
        )
        return [
            SliceRecord(
                job_id=row[0],
                idx=row[1],
                start_frame=row[2],
                num_frames=row[3],
                state=row[4],
                epoch=row[5],
                lease_owner=row[6],
                lease_until=row[7],
                attempts=row[8],
                result=json.loads(row[9]) if row[9] is not None else None,
            )
            for row in rows
        ]

    async def live_ids(self) -> set[str]:
        rows = await self._rows(f"SELECT id FROM jobs WHERE status IN {ACTIVE}")
        return {r[0] for r in rows}

    # -- writes ----------------------------------------------------------------------------------

    @staticmethod
    async def _load(db: aiosqlite.Connection, job_id: str) -> Job | None:
        async with db.execute("SELECT record FROM jobs WHERE id=?", (job_id,)) as cur:
            row = await cur.fetchone()
        return Job.from_dict(json.loads(row[0])) if row else None

    @staticmethod
    async def _save(db: aiosqlite.Connection, job: Job) -> None:
        await db.execute(
            "UPDATE jobs SET status=?, finished_at=?, record=? WHERE id=?",
            (job.status, job.finished_at, _dumps(job.to_dict()), job.id),
        )

    @staticmethod
    async def _append(
        db: aiosqlite.Connection, job: Job, events: list[EventSpec]
    ) -> list[dict[str, Any]]:
        out = []
        for type_, fields in events:
            job.last_seq += 1
            out.append(make_event(job.id, job.last_seq, type_, fields))
        await db.executemany(
            "INSERT INTO events(job_id, seq, body) VALUES (?,?,?)",
            [(job.id, e["seq"], _dumps(e)) for e in out],
        )
        return out

    async def _live_update(
        self,
        job_id: str,
        events: list[EventSpec],
        changes: dict[str, Any],
        before: Callable[[aiosqlite.Connection, Job], Awaitable[None]] | None = None,
    ) -> list[dict[str, Any]]:
        async def op(db: aiosqlite.Connection, touched: set[str]) -> list[dict[str, Any]]:
            job = await self._load(db, job_id)
            if job is None or job.terminal:
                return []
            if before is not None:
                await before(db, job)
            apply_changes(job, changes)
            out = await self._append(db, job, events)
            await self._save(db, job)
            touched.add(job_id)
            return out

        result: list[dict[str, Any]] = await self._write(op)
        return result

    async def create(self, job: Job, events: list[EventSpec]) -> list[dict[str, Any]]:
        async def op(db: aiosqlite.Connection, touched: set[str]) -> list[dict[str, Any]]:
            record = Job.from_dict(job.to_dict())
            await db.execute(
                "INSERT INTO jobs(id, status, created_at, record) VALUES (?,?,?,?)",
                (record.id, record.status, record.created_at, "{}"),
            )
            out = await self._append(db, record, events)
            await self._save(db, record)
            touched.add(record.id)
            return out

        result: list[dict[str, Any]] = await self._write(op)
        return result

    async def set_status(self, job_id: str, **changes: Any) -> Job | None:
        async def op(db: aiosqlite.Connection, _touched: set[str]) -> Job | None:
            job = await self._load(db, job_id)
            if job is None or job.terminal:
                return None
            apply_changes(job, changes)
            await self._save(db, job)
            return job

        result: Job | None = await self._write(op)
        return result

    async def set_webhook(self, job_id: str, state: dict[str, Any]) -> Job | None:
        async def op(db: aiosqlite.Connection, _touched: set[str]) -> Job | None:
            job = await self._load(db, job_id)
            if job is not None:
                job.webhook = state
                await self._save(db, job)
            return job

        result: Job | None = await self._write(op)
        return result

    async def pending_webhooks(self) -> list[Job]:
        rows = await self._rows(
            f"SELECT record FROM jobs WHERE {WEBHOOK_PENDING} AND finished_at IS NOT NULL"
            " ORDER BY finished_at"
        )
        return [Job.from_dict(json.loads(r[0])) for r in rows]

    async def append_events(
        self, job_id: str, events: list[EventSpec], **changes: Any
    ) -> list[dict[str, Any]]:
        return await self._live_update(job_id, events, changes)

    async def finish(
        self, job_id: str, status: str, fields: dict[str, Any], **changes: Any
    ) -> dict[str, Any] | None:
        assert status in TERMINAL
        changes = {**changes, "status": status, "finished_at": time.time()}
        events = await self._live_update(job_id, [(status, fields)], changes)
        return events[0] if events else None

    async def request_cancel(self, job_id: str, reason: str) -> Job | None:
        async def op(db: aiosqlite.Connection, _touched: set[str]) -> Job | None:
            job = await self._load(db, job_id)
            if job is not None and not job.terminal:
                job.cancel_requested, job.cancel_reason = True, reason
                await self._save(db, job)
            return job

        result: Job | None = await self._write(op)
        return result

    async def add_slices(
        self,
        job_id: str,
        slices: list[tuple[int, int]],
        events: list[EventSpec],
        **changes: Any,
    ) -> list[dict[str, Any]]:
        async def insert(db: aiosqlite.Connection, _job: Job) -> None:
            await db.execute("DELETE FROM slices WHERE job_id=?", (job_id,))
            await db.executemany(
                "INSERT INTO slices(job_id, idx, start_frame, num_frames) VALUES (?,?,?,?)",
                [(job_id, i, start, frames) for i, (start, frames) in enumerate(slices)],
            )

        return await self._live_update(job_id, events, changes, before=insert)

    async def lease_slices(
        self, keys: list[SliceKey], owner: str, lease_s: float
    ) -> dict[SliceKey, int]:
        until = time.time() + lease_s

        async def op(db: aiosqlite.Connection, _touched: set[str]) -> dict[SliceKey, int]:
            leased: dict[SliceKey, int] = {}
            for job_id, idx in keys:
                async with db.execute(
                    "UPDATE slices SET state=?, lease_owner=?, lease_until=?,"
                    " attempts=attempts+1 WHERE job_id=? AND idx=? AND state IN (?,?)"
                    f" AND EXISTS (SELECT 1 FROM jobs WHERE id=? AND status IN {ACTIVE})"
                    " RETURNING epoch",
                    (LEASED, owner, until, job_id, idx, QUEUED, LEASED, job_id),
                ) as cur:
                    row = await cur.fetchone()
                if row is not None:
                    leased[(job_id, idx)] = row[0]
            return leased

        result: dict[SliceKey, int] = await self._write(op)
        return result

    async def requeue_slices(self, keys: list[SliceKey]) -> None:
        async def op(db: aiosqlite.Connection, _touched: set[str]) -> None:
            await db.executemany(
                "UPDATE slices SET state=?, epoch=epoch+1, lease_owner=NULL, lease_until=NULL"
                " WHERE job_id=? AND idx=? AND state=?",
                [(QUEUED, job_id, idx, LEASED) for job_id, idx in keys],
            )

        await self._write(op)

    async def commit_slices(self, items: list[tuple[str, int, int, dict[str, Any]]]) -> list[bool]:
        async def op(db: aiosqlite.Connection, _touched: set[str]) -> list[bool]:
            accepted = []
            for job_id, idx, epoch, result in items:
                cur = await db.execute(
                    "UPDATE slices SET state=?, result=?, lease_owner=NULL, lease_until=NULL"
                    " WHERE job_id=? AND idx=? AND state=? AND epoch=?"
                    f" AND EXISTS (SELECT 1 FROM jobs WHERE id=? AND status IN {ACTIVE})",
                    (DONE, _dumps(result), job_id, idx, LEASED, epoch, job_id),
                )
                accepted.append(cur.rowcount == 1)
                await cur.close()
            return accepted

        result: list[bool] = await self._write(op)
        return result

    async def recover(self) -> list[Job]:
        async def op(db: aiosqlite.Connection, _touched: set[str]) -> int:
            cur = await db.execute(
                "UPDATE slices SET state=?, epoch=epoch+1, lease_owner=NULL, lease_until=NULL"
                " WHERE state=?",
                (QUEUED, LEASED),
            )
            count = cur.rowcount
            await cur.close()
            return count

        requeued = await self._write(op)
        if requeued:
            log.info("sqlite_leases_requeued", slices=requeued)
        jobs = await self.list_jobs(active=True)
        return sorted(jobs, key=lambda j: j.created_at)

    async def expire(self, now: float) -> list[str]:
        cutoff = now - self.ttl_s

        async def op(db: aiosqlite.Connection, _touched: set[str]) -> list[str]:
            async with db.execute(
                "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?"
                f" AND NOT IFNULL({WEBHOOK_PENDING}, 0) RETURNING id",
                (cutoff,),
            ) as cur:
                return [row[0] for row in await cur.fetchall()]

        result: list[str] = await self._write(op)
        return result

    async def delete_job(self, job_id: str) -> bool:
        async def op(db: aiosqlite.Connection, touched: set[str]) -> bool:
            # Events and slices go with the row (ON DELETE CASCADE).
            cur = await db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            found = cur.rowcount == 1
            await cur.close()
            touched.add(job_id)  # wake its watchers once the delete is committed
            return found

        result: bool = await self._write(op)
        return result

    async def integrity(self) -> str:
        """``PRAGMA integrity_check``'s answer ("ok" when the file is sound)."""
        rows = await self._rows("PRAGMA integrity_check")
        return str(rows[0][0])


async def _stop(_db: aiosqlite.Connection, _touched: set[str]) -> None:
    """Sentinel op: the writer loop returns once the writes before it are committed."""
