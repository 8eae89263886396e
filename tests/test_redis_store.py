"""The Redis store beyond the shared contract: a server on ``--store redis://`` end to end,
acknowledged writes surviving ``kill -9`` of redis-server, a write whose reply was lost
applied once when redis-py resends it, and the ``--store`` URL checks.

Every test runs a real redis-server (Debian's): the session's, or its own where it kills it.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from aiotranscribe.cli import main
from aiotranscribe.jobs import COMPLETED, Job
from aiotranscribe.keys import store_key
from aiotranscribe.store import check_store
from aiotranscribe.store.redis import RedisStore, redacted
from tests.helpers import form
from tests.redisserver import RedisServer, watch_through_a_kill


def new_job(job_id: str = "a" * 32) -> Job:
    return Job(id=job_id, filename="x.wav", model="demo", kind="wav")


async def test_a_server_on_redis_transcribes_and_serves_status_result_and_events(
    make_client, redis_url, voices
):
    client = await make_client(store=redis_url)
    assert isinstance(client.app[store_key], RedisStore)
    resp = await client.post("/transcribe/async", data=form(voices["digits"]))
    assert resp.status in (200, 202), await resp.text()
    job_id = (await resp.json())["job_id"]

    events = []
    async with client.ws_connect(f"/jobs/{job_id}/events") as ws:
        async for msg in ws:
            assert msg.type == aiohttp.WSMsgType.TEXT
            events.append(msg.json())
    assert ws.close_code == 1000
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == COMPLETED
    assert events[-1]["result"]["text"] == "one two three four five"

    status = await (await client.get(f"/jobs/{job_id}/status")).json()
    assert status["status"] == COMPLETED and status["result"]["text"] == "one two three four five"
    result = await (await client.get(f"/jobs/{job_id}/result")).json()
    assert result == events[-1]["result"]
    late = []
    async with client.ws_connect(f"/jobs/{job_id}/events?after=2") as ws:
        late = [msg.json() async for msg in ws]
    assert late == events[2:]

    # It all lives in Redis: the event stream's ids are <seq>-0, and a new server on the
    # same database (this one stopped) serves the finished job.
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        ids = [entry_id for entry_id, _ in await raw.xrange("ev:{" + job_id + "}")]
        assert ids == [f"{e['seq']}-0" for e in events]
    await client.close()
    again = await make_client(store=redis_url)
    status = await (await again.get(f"/jobs/{job_id}/status")).json()
    assert status["status"] == COMPLETED and status["result"] == result


async def test_a_waiter_hears_of_events_another_process_appends(redis_url):
    writer, reader = RedisStore(redis_url), RedisStore(redis_url)  # two servers, one Redis
    await writer.open()
    await reader.open()
    try:
        jobs = [new_job(f"{i:032x}") for i in range(50)]
        for job in jobs:
            await writer.create(job, [("status", {"stage": "queued"})])
        waiters = [asyncio.create_task(reader.wait_events(job.id, 1, timeout=30)) for job in jobs]
        await asyncio.sleep(0.3)  # every waiter has read the history and waits
        started = asyncio.get_running_loop().time()
        for i, job in enumerate(jobs):
            await writer.append_event(job.id, "progress", {"i": i})
        woken = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert asyncio.get_running_loop().time() - started < 2  # not the 30 s timeout
        assert [[(e["seq"], e["i"]) for e in events] for events in woken] == [
            [(2, i)] for i in range(50)
        ]
    finally:
        await writer.close()
        await reader.close()


async def test_another_server_on_the_same_redis_streams_a_jobs_events(
    make_client, redis_url, voices, tmp_path
):
    # The watcher's server starts first, so it finds no job to resume (one server per
    # database runs jobs until the worker role exists).
    watcher = await make_client(store=redis_url, spool_dir=tmp_path / "spool-2")
    runner = await make_client(store=redis_url)
    resp = await runner.post("/transcribe/async", data=form(voices["hello"]))
    job_id = (await resp.json())["job_id"]
    events = []
    async with watcher.ws_connect(f"/jobs/{job_id}/events") as ws:
        async with asyncio.timeout(60):
            events = [msg.json() async for msg in ws]
    assert ws.close_code == 1000
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == COMPLETED
    assert events[-1]["result"]["text"] == "hello world"


async def test_a_job_completes_once_across_a_kill_9_of_redis_server(
    make_client, long_audio, tmp_path
):
    path, texts = long_audio
    server = RedisServer(tmp_path / "redis").start()  # appendonly yes, appendfsync always
    try:
        client = await make_client(store=server.url(), chunk_seconds=2, batch_size=1)
        resp = await client.post("/transcribe/async", data=form(path))
        job_id = (await resp.json())["job_id"]
        events = await watch_through_a_kill(client, job_id, server)
        # The store's calls retried through the restart: one unbroken history, one end.
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["type"] for e in events].count(COMPLETED) == 1
        result = events[-1]["result"]
        assert len(result["text"].split()) > 0.9 * len(" ".join(texts).split())
        status = await (await client.get(f"/jobs/{job_id}/status")).json()
        assert status["status"] == COMPLETED and status["result"] == result
        await client.close()  # before the server goes
    finally:
        server.stop()


async def test_acknowledged_writes_survive_kill_9_of_redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()  # appendonly yes, appendfsync always
    store = RedisStore(server.url())
    try:
        await store.open()
        job = new_job()
        await store.create(job, [("status", {"stage": "queued"})])
        await store.add_slices(job.id, [(0, 10), (10, 10)], [("status", {"stage": "x"})])
        keys = [(job.id, 0), (job.id, 1)]
        assert await store.lease_slices(keys, "w", 60) == {keys[0]: 0, keys[1]: 0}
        assert await store.commit_slice(job.id, 0, 0, {"text": "kept"})

        server.kill()  # SIGKILL: no shutdown save; only the AOF has the writes
        server.start()  # same port and directory
        # The same store reconnects (its pool retries) and the server reloads the scripts.
        records = await store.slices(job.id)
        assert [(r.state, r.epoch, r.result) for r in records] == [
            ("done", 0, {"text": "kept"}),
            ("leased", 0, None),
        ]
        assert [j.id for j in await store.recover()] == [job.id]
        assert [(r.state, r.epoch) for r in await store.slices(job.id)] == [
            ("done", 0),
            ("queued", 1),
        ]
        assert await store.commit_slice(job.id, 1, 0, {"text": "late"}) is False
        assert await store.append_event(job.id, "progress", {}) == 3
        assert [e["seq"] for e in await store.events_after(job.id, 0)] == [1, 2, 3]
    finally:
        await store.close()
        server.stop()


async def test_a_redis_that_would_lose_jobs_is_reported(tmp_path):
    server = RedisServer(tmp_path / "redis", aof=False).start()
    store = RedisStore(server.url())
    try:
        with capture_logs() as logs:
            await store.open()
        assert "redis_without_aof" in [entry["event"] for entry in logs]
    finally:
        await store.close()
        server.stop()


class LosingProxy:
    """TCP between the store and Redis. Armed, it lets the next script through to Redis and
    then cuts the client's connection instead of passing the reply: the write ran, and the
    client only sees a broken connection (what a Redis restart or a network cut can do)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.cut = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LosingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        losing = asyncio.Event()  # the reply of the script just sent is to be lost

        async def up() -> None:
            while data := await client_r.read(65536):
                if self.armed and b"EVALSHA" in data.upper():
                    self.armed = False
                    losing.set()
                redis_w.write(data)
                await redis_w.drain()

        async def down() -> None:
            while data := await redis_r.read(65536):
                if losing.is_set():
                    self.cut += 1
                    client_w.transport.abort()
                    return
                client_w.write(data)
                await client_w.drain()

        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await asyncio.gather(up(), down())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(task)
            for writer in (client_w, redis_w):
                writer.transport.abort()


async def test_a_write_whose_reply_was_lost_is_applied_once(redis_server, redis_url):
    proxy = LosingProxy(redis_server.port)
    async with proxy:
        store = RedisStore(proxy.url)
        await store.open()
        try:
            job = new_job()
            await store.create(job, [("status", {"stage": "queued"})])
            await store.add_slices(job.id, [(0, 10)], [])
            await store.lease_slices([(job.id, 0)], "w", 60)

            # Sent twice (the first reply lost), appended once: the seqs stay 1, 2.
            proxy.armed = True
            events = await store.append_events(job.id, [("progress", {"i": 1})])
            assert proxy.cut == 1 and [e["seq"] for e in events] == [2]
            assert [e["seq"] for e in await store.events_after(job.id, 0)] == [1, 2]

            # A commit resent after its reply was lost is still the accepted one.
            proxy.armed = True
            assert await store.commit_slice(job.id, 0, 0, {"text": "once"}) is True
            assert proxy.cut == 2
            assert (await store.slices(job.id))[0].result == {"text": "once"}
        finally:
            await store.close()


@pytest.mark.parametrize(
    "spec",
    ["sqlite", "memory", "redis://127.0.0.1:6379/0", "redis://:pw@h:1/3", "unix:///r.sock?db=1"],
)
def test_store_specs_accepted(spec):
    check_store(spec)


@pytest.mark.parametrize(
    "spec",
    ["postgres://x", "redis://h:1/zero", "redis://h:1/0?max_conn=3", "unix://", "Redis"],
)
def test_store_specs_refused(spec):
    with pytest.raises(ValueError):
        check_store(spec)


def test_a_bad_store_url_stops_the_start(capsys, monkeypatch):
    monkeypatch.setenv("AIOTRANSCRIBE_STORE", "redis://h:1/zero")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "1"])
    assert exc.value.code == 2
    assert "--store" in capsys.readouterr().err


def test_the_password_is_not_logged():
    assert redacted("redis://:secret@h:1/0") == "redis://:***@h:1/0"
    assert redacted("redis://me:secret@h:1/0") == "redis://me:***@h:1/0"
    assert redacted("redis://h:1/0") == "redis://h:1/0"
