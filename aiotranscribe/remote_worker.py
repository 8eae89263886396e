"""``aiotranscribe worker``: one model on one device, fed by a Redis work stream.

The loop (``SCALEOUT.md`` §2.3, with answers instead of commits: the API replica that sent a
slice commits its result under its own lease, so a slice computed twice still counts once):

1. stale work first: ``XAUTOCLAIM`` entries idle for 3 heartbeats (a worker died or hangs);
   one delivered more than ``max_deliveries`` times goes to ``q:dlq`` and is answered with
   an error instead of taking this worker down again;
2. else new work: ``XREADGROUP COUNT batch_size`` (slices of any replica's batches);
3. slices of replicas that are gone are skipped (acknowledged, not computed); slices of
   jobs that have ended (``store.redis.ended_jobs``: a terminal status, or no record) are
   answered ``skipped`` and acknowledged, not computed (skip-on-read, SCALEOUT §2.5);
4. each slice's audio is found from what the entry names (``claimcheck``: a path, a name in
   ``--shared-dir``, or the slice's bytes fetched from S3); one model call per set of
   options, with ``XCLAIM … JUSTID`` heartbeats while it runs;
5. answers on each slice's reply stream, then ``XACK`` + ``XDEL`` (answer first: losing the
   acknowledgement only means computing it again).

A crash of the model process leaves the batch unacknowledged (it is reclaimed) and restarts
the model. SIGTERM finishes the batch under way, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from aiotranscribe.claimcheck import AudioUnavailable, Claims
from aiotranscribe.config import Settings, env_default, model_table
from aiotranscribe.remote import (
    ANNOUNCE_S,
    BLOCK_MS,
    DLQ,
    GROUP,
    SKIPPED,
    dumps,
    queue_key,
    workers_key,
)
from aiotranscribe.store.redis import alive_key, connect, ended_jobs
from aiotranscribe.supervise import stop_tasks
from aiotranscribe.worker_metrics import WorkerCounters, metrics_server
from aiotranscribe.workers import Worker, WorkerCrashed, WorkerError, make_worker

log = structlog.get_logger(__name__)

HEARTBEAT_S = 5.0
MAX_DELIVERIES = 3
# Back-off between restarts of a model process that keeps dying.
RESTART_S = (1.0, 30.0)
# Answers nobody reads (a replica that went away) do not stay in Redis.
REPLY_TTL_S = 3600


@dataclass
class Entry:
    id: str
    fields: dict[str, str]
    delivered: int = 1


@dataclass
class StreamWorker:
    redis: aioredis.Redis
    model: str
    make: Callable[[], Worker]
    consumer: str
    batch_size: int = 8
    heartbeat_s: float = HEARTBEAT_S
    max_deliveries: int = MAX_DELIVERIES
    worker: Worker | None = None
    info: dict[str, Any] = field(default_factory=dict)
    claims: Claims = field(default_factory=lambda: Claims(None, Path(tempfile.gettempdir())))
    counters: WorkerCounters = field(default_factory=WorkerCounters)

    @property
    def queue(self) -> str:
        return queue_key(self.model)

    async def run(self, stopping: asyncio.Event) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(self.queue, GROUP, id="0", mkstream=True)
        await self._load()
        announcing = asyncio.create_task(self._announce(), name="worker-announce")
        try:
            while not stopping.is_set():
                entries = await self._claim() or await self._read()
                if entries:
                    await self._process(entries)
        finally:
            await stop_tasks([announcing])
            await self.redis.hdel(workers_key(self.model), self.consumer)
            if self.worker is not None:
                await self.worker.stop()
            await self._leave()

    async def _load(self) -> None:
        self.worker = self.make()
        self.info = await self.worker.load()
        log.info("worker_model_loaded", model=self.model, consumer=self.consumer, **self.info)

    async def _restart(self) -> None:
        """The model process died: start another (with back-off while it keeps failing)."""
        delay = RESTART_S[0]
        while True:
            if self.worker is not None:
                await self.worker.stop()
                self.worker = None
            try:
                await self._load()
                return
            except WorkerError as exc:
                log.error("worker_restart_failed", model=self.model, error=exc.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_S[1])

    async def _announce(self) -> None:
        while True:
            body = {"info": self.info, "seen": time.time(), "pid": os.getpid()}
            await self.redis.hset(workers_key(self.model), self.consumer, dumps(body))
            await asyncio.sleep(min(ANNOUNCE_S, self.heartbeat_s))

    async def _leave(self) -> None:
        """Drop this consumer from the group unless it still holds entries (others claim
        those; the name then goes with the next worker of the same name)."""
        with contextlib.suppress(ResponseError):
            pending = cast(dict[str, Any], await self.redis.xpending(self.queue, GROUP))
            mine = [c for c in pending.get("consumers") or [] if c["name"] == self.consumer]
            if not mine or not int(mine[0]["pending"]):
                await self.redis.xgroup_delconsumer(self.queue, GROUP, self.consumer)

    # -- reading -------------------------------------------------------------------------------

    async def _read(self) -> list[Entry]:
        reply = cast(
            list[tuple[str, list[tuple[str, dict[str, str] | None]]]],
            await self.redis.xreadgroup(
                GROUP, self.consumer, {self.queue: ">"}, count=self.batch_size, block=BLOCK_MS
            ),
        )
        return [Entry(i, f) for _, entries in reply or [] for i, f in entries if f is not None]

    async def _claim(self) -> list[Entry]:
        min_idle_ms = int(3 * self.heartbeat_s * 1000)
        reply = await self.redis.xautoclaim(
            self.queue, GROUP, self.consumer, min_idle_ms, "0-0", count=self.batch_size
        )
        claimed = [Entry(i, f) for i, f in reply[1] if f is not None]
        if not claimed:
            return []
        for entry in claimed:
            pending = await self.redis.xpending_range(
                self.queue, GROUP, min=entry.id, max=entry.id, count=1
            )
            entry.delivered = int(pending[0]["times_delivered"]) if pending else 1
        self.counters.reclaimed += len(claimed)
        log.warning(
            "worker_reclaimed",
            model=self.model,
            consumer=self.consumer,
            slices=len(claimed),
            deliveries=max(e.delivered for e in claimed),
        )
        poison = [e for e in claimed if e.delivered > self.max_deliveries]
        if poison:
            await self._dead_letter(poison)
        return [e for e in claimed if e.delivered <= self.max_deliveries]

    async def _dead_letter(self, entries: list[Entry]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                dead: dict[Any, Any] = {
                    **entry.fields,
                    "id": entry.id,
                    "delivered": entry.delivered,
                }
                pipe.xadd(DLQ, dead)
            await pipe.execute()
        self.counters.dead_lettered += len(entries)
        log.error("worker_dead_lettered", model=self.model, slices=len(entries))
        error = WorkerError(
            "inference_failed", f"the slice took down its worker {self.max_deliveries} times"
        )
        await self._answer(entries, error=error)

    # -- computing and answering ---------------------------------------------------------------

    async def _process(self, entries: list[Entry]) -> None:
        replicas = sorted({e.fields["replica"] for e in entries})
        async with self.redis.pipeline(transaction=False) as pipe:
            for replica in replicas:
                pipe.exists(alive_key(replica))
            alive = {r for r, up in zip(replicas, await pipe.execute(), strict=True) if up}
        gone = [e for e in entries if e.fields["replica"] not in alive]
        if gone:
            self.counters.skipped += len(gone)
            await self._done(gone)
        live = [e for e in entries if e.fields["replica"] in alive]
        # Skip-on-read: a job cancelled (or ended any other way) while its slices waited
        # costs no model time. The answer tells the replica there is nothing to commit.
        ended = await ended_jobs(self.redis, [e.fields["job"] for e in live if "job" in e.fields])
        skipped = [e for e in live if e.fields.get("job") in ended]
        if skipped:
            self.counters.skipped += len(skipped)
            await self._answer(skipped, error=WorkerError(SKIPPED, "the slice's job has ended"))
        groups: dict[str, list[Entry]] = {}
        for entry in live:
            if entry.fields.get("job") not in ended:
                groups.setdefault(entry.fields["opts"], []).append(entry)
        if skipped and not groups:
            self._log_batch([], 0.0, skipped=len(skipped), fetched=0)
        for opts, group in groups.items():
            if not await self._compute(group, json.loads(opts), skipped=len(skipped)):
                return  # the model died: the rest is reclaimed after the idle time
            skipped = []  # counted in the first batch's line

    async def _resolve(self, entries: list[Entry]) -> tuple[list[Entry], list[Any]]:
        """The entries whose audio this worker reaches, with their ``(path, start, frames)``;
        the others are answered with an error (their replica fails or retries them)."""
        found = await asyncio.gather(
            *(self.claims.resolve(e.id, e.fields) for e in entries), return_exceptions=True
        )
        ready = [
            (e, item) for e, item in zip(entries, found, strict=True) if isinstance(item, tuple)
        ]
        lost = [
            (e, item) for e, item in zip(entries, found, strict=True) if not isinstance(item, tuple)
        ]
        for _, exc in lost:
            if not isinstance(exc, AudioUnavailable):
                raise exc
        if lost:
            message = str(lost[0][1])
            log.warning(
                "worker_audio_unavailable", model=self.model, slices=len(lost), error=message
            )
            await self._answer(
                [e for e, _ in lost], error=WorkerError("audio_unavailable", message)
            )
        return [e for e, _ in ready], [item for _, item in ready]

    async def _compute(
        self, entries: list[Entry], options: dict[str, Any], skipped: int = 0
    ) -> bool:
        assert self.worker is not None
        beating = asyncio.create_task(self._heartbeat([e.id for e in entries]))
        started = time.perf_counter()
        fetched = self.claims.fetched_bytes
        try:
            entries, items = await self._resolve(entries)
            if not entries:
                return True
            results = await self.worker.transcribe(items, options)
        except WorkerCrashed as exc:
            log.error("worker_model_crashed", model=self.model, error=exc.message)
            await self._restart()
            return False
        except WorkerError as exc:
            log.warning("worker_batch_failed", model=self.model, slices=len(entries), code=exc.code)
            await self._answer(entries, error=exc)
            return True
        finally:
            await stop_tasks([beating])
            self.claims.release([e.id for e in entries])
        busy_s = time.perf_counter() - started
        self.counters.batches += 1
        self.counters.slices += len(entries)
        self.counters.busy_s += busy_s
        self._log_batch(entries, busy_s, skipped, self.claims.fetched_bytes - fetched)
        await self._answer(entries, results=results)
        return True

    def _log_batch(self, entries: list[Entry], busy_s: float, skipped: int, fetched: int) -> None:
        """One line per model call (``slices`` 0: a read whose slices were all skipped)."""
        log.info(
            "worker_batch",
            model=self.model,
            consumer=self.consumer,
            slices=len(entries),
            requests=len({e.fields["rid"] for e in entries}),
            replicas=len({e.fields["replica"] for e in entries}),
            redelivered=sum(e.delivered > 1 for e in entries),
            skipped=skipped,
            fetched_bytes=fetched,
            busy_s=round(busy_s, 4),
        )

    async def _heartbeat(self, ids: list[Any]) -> None:
        """Keep the batch's entries fresh while the model runs, so nobody reclaims them."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.redis.xclaim(self.queue, GROUP, self.consumer, 0, list(ids), justid=True)

    async def _answer(
        self,
        entries: list[Entry],
        results: list[dict[str, Any]] | None = None,
        error: WorkerError | None = None,
    ) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for n, entry in enumerate(entries):
                body: dict[Any, Any] = {"rid": entry.fields["rid"], "i": entry.fields["i"]}
                if error is not None:
                    body["error"] = dumps({"code": error.code, "message": error.message})
                else:
                    assert results is not None
                    body["result"] = dumps(results[n])
                pipe.xadd(entry.fields["reply"], body)
                pipe.expire(entry.fields["reply"], REPLY_TTL_S)
            await pipe.execute()
        await self._done(entries)

    async def _done(self, entries: list[Entry]) -> None:
        ids = [e.id for e in entries]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.queue, GROUP, *ids)
            pipe.xdel(self.queue, *ids)  # delivered entries only: lag stays known
            await pipe.execute()


# -- the command ----------------------------------------------------------------------------------


def add_worker_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = Settings()
    p = sub.add_parser("worker", help="run one model for servers started with --no-workers")
    p.add_argument(
        "--store",
        default=env_default("store"),
        help="the servers' Redis, redis://[:password@]host:port/db",
    )
    p.add_argument("--model", default="demo", help="the model, SOURCE or NAME=SOURCE")
    p.add_argument("--models-file", default=None, help="a TOML file of [models.NAME] tables")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--executor", default="process", choices=["process", "thread"])
    p.add_argument("--torch-threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="most slices a call")
    p.add_argument(
        "--heartbeat-s",
        type=float,
        default=HEARTBEAT_S,
        help="heartbeat period; slices idle 3 periods are reclaimed by other workers",
    )
    p.add_argument("--max-deliveries", type=int, default=MAX_DELIVERIES)
    p.add_argument("--consumer", default=None, help="this worker's name (default: host:device:id)")
    p.add_argument(
        "--shared-dir",
        default=env_default("shared-dir"),
        help="where this host mounts the servers' --shared-dir (slices name audio inside it)",
    )
    p.add_argument(
        "--s3-endpoint-url",
        default=env_default("s3-endpoint-url"),
        help="S3-compatible endpoint of the servers' --blob-store (default: AWS; credentials "
        "from the usual AWS env vars/files)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve this worker's counters there"
    )
    p.add_argument("--metrics-host", default="0.0.0.0", help="the address --metrics-port binds")
    p.add_argument("--log-format", default=None, choices=["json", "console"])
    p.add_argument("--log-level", default="info")


def run_worker(args: argparse.Namespace) -> int:
    from aiotranscribe.logsetup import configure_logging

    configure_logging(args.log_format, args.log_level)
    settings = Settings(
        models=tuple(m.strip() for m in str(args.model).split(",") if m.strip())[:1],
        models_file=Path(args.models_file) if args.models_file else None,
        device=args.device,
        executor=args.executor,
        torch_threads=args.torch_threads,
        batch_size=args.batch_size,
    )
    model = next(iter(model_table(settings).values())).resolved(settings)
    device = model.worker_devices()[0]
    consumer = args.consumer or f"{os.uname().nodename}:{device}:{os.urandom(4).hex()}"

    def make() -> Worker:
        return make_worker(
            settings.executor, model.source, device, settings.torch_threads, model.engine_config()
        )

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        redis = connect(args.store)
        scratch = Path(tempfile.mkdtemp(prefix="aiotranscribe-worker-"))
        claims = Claims(
            Path(args.shared_dir) if args.shared_dir else None, scratch, args.s3_endpoint_url
        )
        worker = StreamWorker(
            redis,
            model.name,
            make,
            consumer,
            batch_size=model.batch_size or settings.batch_size,
            heartbeat_s=args.heartbeat_s,
            max_deliveries=args.max_deliveries,
            claims=claims,
        )
        serving = metrics_server(
            worker.counters, model.name, consumer, args.metrics_host, args.metrics_port
        )
        try:
            async with serving:
                await worker.run(stopping)
        finally:
            await claims.close()
            shutil.rmtree(scratch, ignore_errors=True)
            await redis.aclose()

    try:
        asyncio.run(main())
    except WorkerError as exc:
        log.error("worker_failed", model=model.name, code=exc.code, error=exc.message)
        return 1
    return 0
