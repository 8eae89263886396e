"""Backpressure across API replicas (issue 14, item 4): two ``serve --no-workers`` replicas
(apps in this process) and one ``aiotranscribe worker`` subprocess on a real redis-server
share one admission limit; /ready, /metrics and the worker's --metrics-port show the shared
queue, the replica and the worker by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from aiotranscribe.admission import QueueFull
from aiotranscribe.jobs import COMPLETED
from aiotranscribe.keys import service_key
from aiotranscribe.remote import RemoteHub
from aiotranscribe.shared_admission import (
    ADMIT_TIMEOUT_S,
    UNREACHABLE_RETRY_S,
    SharedAdmission,
)
from tests.helpers import form
from tests.redisserver import RedisServer, free_port
from tests.test_durability import raw_upload
from tests.test_remote_workers import WorkerProc

# Room for one two-minute job plus a little: two uploads under way (60 s each until their
# length is known) fill it, and so does the two-minute job once probed.
LIMIT_S = 150.0
ESTIMATE_S = 60.0
SENT_FIRST = 64  # body bytes sent before waiting for an answer


@pytest.fixture
def redis_server_own(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: it is killed and restarted at the end."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def worker(redis_server_own: RedisServer, tmp_path: Path) -> Iterator[tuple[WorkerProc, int]]:
    """One ``aiotranscribe worker``, and the loopback port it serves its counters on."""
    port = free_port()
    flags = ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    proc = WorkerProc(redis_server_own.url(), tmp_path / "worker.log", "w-metrics", extra=flags)
    try:
        yield proc, port
    finally:
        proc.proc.send_signal(signal.SIGCONT)  # in case the test left it stopped
        proc.stop()


def samples(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[Any], name: str, **labels: str) -> float | None:
    for sample in found:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


async def open_upload(
    client: Any, path: Path, wait_s: float = 2.0
) -> tuple[Any, Any, bytes, bytes | None]:
    """Send an upload's head and its first bytes; (reader, writer, rest of the body, the
    answer if one came within ``wait_s``, i.e. before the body was sent)."""
    head, body = raw_upload(path)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head + body[:SENT_FIRST])
    await writer.drain()
    try:
        answer: bytes | None = await asyncio.wait_for(reader.read(4096), wait_s)
    except TimeoutError:
        answer = None  # admitted: the server waits for the rest of the body
    return reader, writer, body[SENT_FIRST:], answer


async def finish_upload(reader: Any, writer: Any, rest: bytes) -> str:
    writer.write(rest)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    assert reply.split(b" ", 2)[1] in (b"200", b"202"), reply
    return str(json.loads(reply.split(b"\r\n\r\n", 1)[1])["job_id"])


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


async def test_backpressure_holds_across_replicas(
    redis_server_own, worker, make_client, long_audio, voices, tmp_path
):
    """Fill the limit through replica 1: replica 2 refuses before reading the body; every
    accepted job completes; after the drain replica 2 accepts again."""
    worker, metrics_port = worker
    flags = {
        "store": redis_server_own.url(),
        "no_workers": True,
        "max_queued_audio_s": LIMIT_S,
        "admission_estimate_s": ESTIMATE_S,
        "chunk_seconds": 5,
        "batch_size": 2,
    }
    one = await make_client(**flags)
    two = await make_client(spool_dir=tmp_path / "spool-2", **flags)
    first, second = one.app[service_key].admission, two.app[service_key].admission
    assert isinstance(first, SharedAdmission) and isinstance(second, SharedAdmission)
    model = first.models[0]

    # Two uploads under way on replica 1 hold 2 x 60 s of the 150: the fleet is full.
    long_up = await open_upload(one, long_audio[0])
    short_up = await open_upload(one, voices["hello"])
    assert long_up[3] is None and short_up[3] is None, (long_up[3], short_up[3])
    assert first.used(model) == 2 * ESTIMATE_S

    # Replica 2 holds nothing itself, yet refuses before the body is read: it answered
    # while all but 64 bytes of the upload were still unsent.
    refused = await open_upload(two, long_audio[0])
    refused[1].close()
    answer = refused[3]
    assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
    assert b"queue_full" in answer and b"Retry-After:" in answer
    assert second.used(model) == 0 and second.rejected[model] == 1
    assert not (tmp_path / "spool-2").exists() or not list((tmp_path / "spool-2").iterdir())
    ready = await two.get("/ready")
    body = await ready.json()
    assert ready.status == 503 and body["queue_full"] is True, body
    assert body["queue"][model]["full"] and body["queue"][model]["admitted_audio_s"] == 120

    # The worker pauses while both uploads finish: their slices wait in the stream.
    worker.proc.send_signal(signal.SIGSTOP)
    try:
        jobs = await asyncio.gather(finish_upload(*long_up[:3]), finish_upload(*short_up[:3]))

        stream: list[float] = []

        async def backlog() -> bool:
            found = samples(await (await two.get("/metrics")).text())
            lag = value(found, "aiotranscribe_stream_lag", model=model) or 0
            pending = value(found, "aiotranscribe_stream_pending", model=model) or 0
            total = value(found, "aiotranscribe_shared_admitted_audio_seconds", model=model)
            stream[:] = [lag + pending, total or 0]
            return lag + pending > 0 and (total or 0) > 2 * ESTIMATE_S

        await wait_for(backlog)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    # Why admission counts the replicas' shares, not the stream: replica 1 sends one batch
    # (2 slices, at most 10 s) at a time, while its jobs still have over 120 s to do.
    assert stream[0] <= 2, stream

    # Scraped through the run on replica 2: the stream's lag is known at every scrape.
    lags, totals = [], []

    async def ended() -> bool:
        found = samples(await (await two.get("/metrics")).text())
        lags.append(value(found, "aiotranscribe_stream_lag", model=model))
        totals.append(value(found, "aiotranscribe_shared_admitted_audio_seconds", model=model))
        statuses = [await (await two.get(f"/jobs/{j}/status")).json() for j in jobs]
        return all(s["status"] == COMPLETED for s in statuses)

    await wait_for(ended, timeout=240)
    assert lags and all(lag is not None and not math.isnan(lag) for lag in lags), lags
    assert max(t or 0 for t in totals) > ESTIMATE_S  # the two-minute job counted, on replica 2
    results = [await (await two.get(f"/jobs/{j}/result")).json() for j in jobs]
    assert len(results[0]["text"].split()) > 0.9 * len(" ".join(long_audio[1]).split())
    assert results[1]["text"] == "hello world"

    # Drained: replica 2 takes uploads again, and the job completes.
    async def room() -> bool:
        return (await two.get("/ready")).status == 200

    await wait_for(room)
    resp = await two.post("/transcribe", data=form(voices["digits"]))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["text"] == "one two three four five"

    # Metrics name the replica and the worker.
    found = samples(await (await two.get("/metrics")).text())
    assert value(found, "aiotranscribe_replica_info", replica=second.replica) == 1
    assert value(found, "aiotranscribe_replica_info", replica=first.replica) is None
    assert value(found, "aiotranscribe_remote_worker_info", model=model, worker=worker.name) == 1
    assert value(found, "aiotranscribe_stream_pending", model=model) == 0
    assert value(found, "aiotranscribe_rejected_submissions_total", model=model) == 1

    # The worker's own counters, under its consumer name.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            found = samples(await resp.text())
    labels = {"model": model, "worker": worker.name}
    assert (value(found, "aiotranscribe_worker_batches_total", **labels) or 0) >= 2
    assert (value(found, "aiotranscribe_worker_slices_total", **labels) or 0) >= 3
    assert (value(found, "aiotranscribe_worker_busy_seconds_total", **labels) or 0) > 0
    assert value(found, "aiotranscribe_worker_dead_lettered_slices_total", **labels) == 0

    # Redis gone: admission fails closed, still before the body is read.
    redis_server_own.kill()
    try:
        refused = await open_upload(two, voices["hello"], ADMIT_TIMEOUT_S + 2)
        refused[1].close()
    finally:
        redis_server_own.start()
    answer = refused[3]
    assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
    assert f"Retry-After: {UNREACHABLE_RETRY_S}".encode() in answer
    await one.close()
    await two.close()


@contextlib.asynccontextmanager
async def replica(url: str, name: str, limit_s: float) -> AsyncIterator[SharedAdmission]:
    """One replica's admission on ``url``, without the rest of the app."""
    hub = RemoteHub(url, replica=name)
    await hub.open()
    admission = SharedAdmission(limit_s, ESTIMATE_S, lambda _model: None, hub, ["demo"])
    lifetime = admission.ctx(web.Application())
    await anext(lifetime)
    try:
        yield admission
    finally:
        async with asyncio.timeout(10):  # closing must not hang on its refresh loop
            await anext(lifetime, None)
            await hub.close()


async def test_two_replicas_admitting_at_once_never_pass_the_limit(redis_url):
    """200 admissions at once, alternating between two replicas, against room for 10:
    exactly 10 get in (one script checks and takes the room)."""
    async with replica(redis_url, "r1", 10 * ESTIMATE_S) as one:
        async with replica(redis_url, "r2", 10 * ESTIMATE_S) as two:

            async def admit(n: int) -> bool:
                try:
                    await (one, two)[n % 2].admit(f"job-{n}", "demo")
                except QueueFull:
                    return False
                return True

            admitted = await asyncio.gather(*(admit(n) for n in range(200)))
            assert sum(admitted) == 10
            assert one.used("demo") + two.used("demo") == 10 * ESTIMATE_S
            assert one.rejected["demo"] + two.rejected["demo"] == 190
            # Released on one replica: the other sees the room at its next admission.
            for n in range(0, 200, 2):
                one.release(f"job-{n}")
            async with asyncio.timeout(5):
                while True:
                    try:
                        await two.admit("late", "demo")
                        break
                    except QueueFull:
                        await asyncio.sleep(0.05)
        # A replica that closed took its shares with it.
        await one.refresh()
        assert one.reachable and one.total("demo") == one.used("demo") == 0
