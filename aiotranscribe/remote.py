"""Model workers on other processes and machines, through Redis Streams: the API side.

With ``serve --no-workers`` a pool's lanes hold a ``RemoteWorker`` instead of a model: each
batch the pool forms becomes entries of the model's work stream, any ``aiotranscribe worker``
of that model reads them (``XREADGROUP COUNT``: slices of every replica's batches share its
model calls), and answers on this replica's reply stream. The pool then leases and commits
the results exactly as with a local worker: the store's epoch fence makes each result count
once, however often a slice was computed. Keys:

=========================  ======  ====================================================
``q:slices:<model>``       stream  one entry per slice (group ``asr``): rid, i, job,
                                   blob or path, start, frames, opts, reply, replica
``q:dlq``                  stream  slices that took down their worker too often
``rep:<replica>``          stream  this replica's answers: rid, i, and result or error
``alive:<replica>``        string  this replica is up (the store renews it): workers skip
                                   the slices of replicas that are gone
``workers:<model>``        hash    consumer -> what its model said at load, and when
=========================  ======  ====================================================

Redis never holds audio: an entry names it (``claimcheck``), as a path on this host, as a
name inside ``--shared-dir`` or as an object of ``--blob-store``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.exceptions import ConnectionError, TimeoutError

from aiotranscribe.blobstore import BlobError
from aiotranscribe.claimcheck import Tickets
from aiotranscribe.store.redis import connect
from aiotranscribe.supervise import raise_if_cancelling, stop_tasks
from aiotranscribe.workers import WorkerError

log = structlog.get_logger(__name__)

GROUP = "asr"
DLQ = "q:dlq"
# A worker refreshes its announcement this often; older than 3 of them, it counts as gone.
ANNOUNCE_S = 2.0
# One wait for replies or for a worker to appear.
BLOCK_MS = 1000
# How long closing waits for Redis to drop the reply stream (left there if it does not answer).
CLOSE_TIMEOUT_S = 1.0
# A worker's answer for a slice whose job had ended when it read it (skip-on-read).
SKIPPED = "skipped"


def queue_key(model: str) -> str:
    return f"q:slices:{model}"


def workers_key(model: str) -> str:
    return f"workers:{model}"


def reply_key(replica: str) -> str:
    return f"rep:{replica}"


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _Call:
    """One batch sent out: its slices' answers as they come."""

    def __init__(self, size: int) -> None:
        self.results: list[dict[str, Any] | None] = [None] * size
        self.answered: set[int] = set()
        self.missing = size
        self.done: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()

    def answer(self, i: int, fields: dict[str, str]) -> None:
        if self.done.done() or not 0 <= i < len(self.results) or i in self.answered:
            return  # a duplicate (the slice was computed twice) or too late
        if "error" in fields:
            error = json.loads(fields["error"])
            if error["code"] != SKIPPED:
                self.done.set_exception(WorkerError(error["code"], error["message"]))
                return
            # Its job had ended: no result (None), which the pool never commits.
        else:
            self.results[i] = json.loads(fields["result"])
        self.answered.add(i)
        self.missing -= 1
        if not self.missing:
            self.done.set_result(cast(list[dict[str, Any]], self.results))


class RemoteHub:
    """This replica's end of the streams: sends batches, routes the answers back."""

    def __init__(self, url: str, replica: str, tickets: Tickets | None = None) -> None:
        self.url = url
        # The store's name for this process: its liveness key is the store's (RedisStore).
        self.replica = replica
        self.tickets = tickets or Tickets()
        self._redis: aioredis.Redis | None = None
        self._calls: dict[str, _Call] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._sent = 0

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("the remote hub is not open")
        return self._redis

    async def open(self) -> None:
        self._redis = connect(self.url)
        self._tasks = [asyncio.create_task(self._replies(), name="remote-replies")]
        log.info("remote_hub_open", replica=self.replica)

    async def close(self) -> None:
        stuck = await stop_tasks(self._tasks)
        self._tasks = []
        for call in self._calls.values():
            if not call.done.done():
                call.done.set_exception(WorkerError("internal_error", "the server is stopping"))
        if self._redis is not None:
            with contextlib.suppress(ConnectionError, TimeoutError, builtins.TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._redis.delete(reply_key(self.replica))
            await self._redis.aclose()
            self._redis = None
        await stop_tasks(stuck)  # a read that lost its cancel fails once its client is closed

    async def ctx(self, _app: web.Application) -> AsyncIterator[None]:
        """A cleanup context: open before the pools start, closed after they stop."""
        await self.open()
        yield
        await self.close()

    def worker(self, model: str) -> RemoteWorker:
        return RemoteWorker(self, model)

    async def workers(self, model: str) -> dict[str, dict[str, Any]]:
        """The workers of ``model`` that announced themselves lately, by consumer name."""
        raw = cast(dict[str, str], await self.redis.hgetall(workers_key(model)))
        now = time.time()
        found = {name: json.loads(body) for name, body in raw.items()}
        return {n: w for n, w in found.items() if now - w["seen"] < 3 * ANNOUNCE_S}

    async def call(
        self, model: str, slices: list[tuple[str, int, int]], options: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Send one batch; its results in order once every slice is answered (by whichever
        worker). A worker's error for one slice fails the call, as a local worker's would.
        A slice the worker skipped because its job had ended has None for a result."""
        if not slices:
            return []
        try:
            tickets = await self.tickets.many([path for path, _, _ in slices])
        except (OSError, BlobError) as exc:  # the WAV is gone or is not one
            raise WorkerError("inference_failed", f"cannot name the audio: {exc}") from None
        self._sent += 1
        rid = f"{self.replica}/{self._sent}"
        call = self._calls[rid] = _Call(len(slices))
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i, (path, start, frames) in enumerate(slices):
                    entry: dict[Any, Any] = {
                        "rid": rid,
                        "i": i,
                        **tickets[path],
                        "start": start,
                        "frames": frames,
                        "opts": dumps(options),
                        "reply": reply_key(self.replica),
                        "replica": self.replica,
                    }
                    pipe.xadd(queue_key(model), entry)
                await pipe.execute()
            return await call.done
        finally:
            del self._calls[rid]

    async def _replies(self) -> None:
        key, last = reply_key(self.replica), "0-0"
        while True:
            try:
                reply = cast(
                    list[tuple[str, list[tuple[str, dict[str, str]]]]],
                    await self.redis.xread({key: last}, count=256, block=BLOCK_MS),
                )
            except (ConnectionError, TimeoutError) as exc:
                raise_if_cancelling()
                log.warning("remote_replies_retrying", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    call = self._calls.get(fields.get("rid", ""))
                    if call is not None:
                        call.answer(int(fields["i"]), fields)
                if entries:
                    await self.redis.xdel(key, *[entry_id for entry_id, _ in entries])


class RemoteWorker:
    """A pool lane's worker handle (``workers.Worker``) whose model runs elsewhere."""

    def __init__(self, hub: RemoteHub, model: str) -> None:
        self.hub = hub
        self.model = model

    @property
    def pid(self) -> int | None:
        return None

    async def load(self) -> dict[str, Any]:
        """Wait until a worker of this model has announced itself; what its model said at
        load (device, capabilities, sample rate) is this lane's."""
        waited = False
        while True:
            found = await self.hub.workers(self.model)
            if found:
                first = found[min(found)]
                return {**first["info"], "remote": True, "workers": sorted(found)}
            if not waited:
                log.info("remote_waiting_for_worker", model=self.model)
                waited = True
            await asyncio.sleep(BLOCK_MS / 1000)

    async def transcribe(
        self, slices: list[tuple[str, int, int]], options: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """The results in order; None for a slice skipped because its job had ended (the
        pool commits nothing for it)."""
        return await self.hub.call(self.model, slices, options or {})

    async def stop(self, timeout: float = 5.0) -> None:
        """Nothing runs here; slices already sent are answered to nobody."""
