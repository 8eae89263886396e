"""Jobs survive: ``kill -9`` of the whole server, SIGTERM with jobs running, a worker killed
mid-batch, a worker that cannot be respawned, admission under concurrent uploads.

The crash tests run real ``aiotranscribe serve`` processes on a real SQLite file and restart
them on the same directories.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aiotranscribe.app import create_app
from aiotranscribe.keys import pools_key, service_key, store_key
from aiotranscribe.workers import ProcessWorker, Worker
from tests.conftest import wait_ready
from tests.helpers import form
from tests.serverproc import Server

pytestmark = pytest.mark.durability
TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture(scope="session")
def six_minutes(tmp_path_factory, long_audio) -> Path:
    """The two-minute speech three times over."""
    out = tmp_path_factory.mktemp("six") / "speech-6min.wav"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-stream_loop", "2", "-i", str(long_audio[0]), str(out)],
        check=True,
    )
    return out


async def submit(server: Server, path: Path) -> str:
    status, body = await server.json("POST", "/transcribe/async", data=form(path))
    assert status in (200, 202), body
    return str(body["job_id"])


async def watch(
    server: Server, job_id: str, after: int = 0, until: Any = None
) -> tuple[list[dict[str, Any]], int | None]:
    """Events until the server closes the socket (or ``until(event)`` is true)."""
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/jobs/{job_id}/events?after={after}") as ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                events.append(json.loads(msg.data))
                if until is not None and until(events[-1]):
                    return events, None
            return events, ws.close_code


def chunks_done(event: dict[str, Any]) -> int:
    return int(event.get("chunks_done") or 0) if event["type"] == "progress" else 0


def db_rows(server: Server, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(server.data / "jobs.sqlite3") as db:
        return db.execute(sql).fetchall()


async def spool_emptied(server: Server) -> None:
    """The janitor removes a finished job's directory shortly after its end."""
    async with asyncio.timeout(10):
        while list(server.spool.iterdir()):
            await asyncio.sleep(0.05)


def check_history(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count("completed") == 1
    assert events[-1]["type"] == "completed"
    assert not {e["type"] for e in events[:-1]} & TERMINAL


async def slow_upload(server: Server, path: Path, sent: asyncio.Event) -> None:
    """An upload that sends its first bytes, then stalls (until the server dies)."""
    data = path.read_bytes()

    async def body():
        yield data[: len(data) // 4]
        sent.set()
        await asyncio.sleep(3600)
        yield data[len(data) // 4 :]

    with aiohttp.MultipartWriter("form-data") as mp:
        part = mp.append(body())
        part.set_content_disposition("form-data", name="file", filename="slow.wav")
    async with aiohttp.ClientSession() as session:
        await session.post(f"{server.url}/transcribe/async", data=mp)


async def test_kill_9_mid_job_and_mid_upload(tmp_path, long_audio):
    path, texts = long_audio
    server = Server(tmp_path / "srv", "--chunk-seconds", "2", "--batch-size", "1")
    try:
        await server.start()
        job_id = await submit(server, path)
        upload_started = asyncio.Event()
        uploading = asyncio.create_task(slow_upload(server, path, upload_started))
        before, _ = await watch(server, job_id, until=lambda e: chunks_done(e) >= 3)
        await upload_started.wait()
        await asyncio.sleep(0.3)  # the partial upload reaches the spool
        spool_before = {p.name for p in server.spool.iterdir()}
        assert len(spool_before) == 2  # the running job and the upload
        await server.kill9()
        with pytest.raises(aiohttp.ClientError):
            await uploading
        assert before[-1]["type"] != "completed", "the job ended before the kill"

        await server.start()
        # The WebSocket resumes after the last event it saw: no gap, no duplicate.
        rest, code = await watch(server, job_id, after=before[-1]["seq"])
        assert code == 1000
        history = before + rest
        check_history(history)
        assert any(e.get("recovered") for e in rest)
        full, _ = await watch(server, job_id)
        assert full == history
        result = history[-1]["result"]
        assert len(result["text"].split()) > 0.9 * len(" ".join(texts).split())
        # The same file without a crash gives the same transcript.
        again = await submit(server, path)
        clean, _ = await watch(server, again)
        assert clean[-1]["result"]["text"] == result["text"]
        assert [s["text"] for s in clean[-1]["result"]["segments"]] == [
            s["text"] for s in result["segments"]
        ]
        # Finished slices were not redone: only the one leased at the kill has epoch 1.
        epochs = db_rows(
            server, f"SELECT epoch, COUNT(*) FROM slices WHERE job_id='{job_id}' GROUP BY epoch"
        )
        assert dict(epochs).get(1, 0) <= 1 and dict(epochs)[0] >= 3, epochs
        # The cut-off upload left no job and nothing in the spool.
        assert {r[0] for r in db_rows(server, "SELECT id FROM jobs")} == {job_id, again}
        await spool_emptied(server)
        assert "jobs_recovered" in server.log_text()
        assert await server.terminate() < 30
        assert db_rows(server, "PRAGMA integrity_check") == [("ok",)]
    finally:
        await server.close()


async def test_sigterm_drains_short_jobs_and_keeps_long_ones(tmp_path, six_minutes, voices):
    server = Server(
        tmp_path / "srv", "--chunk-seconds", "2", "--batch-size", "1", "--shutdown-timeout-s", "3"
    )
    try:
        await server.start()
        # The long job comes from the CLI, which must ride out the restart.
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiotranscribe",
            "transcribe",
            str(six_minutes),
            "--url",
            server.url,
            "--quiet",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            while not (rows := db_rows(server, "SELECT id FROM jobs")):
                await asyncio.sleep(0.1)
        long_id = rows[0][0]
        before, _ = await watch(server, long_id, until=lambda e: chunks_done(e) >= 2)
        short_id = await submit(server, voices["hello"])
        watching = asyncio.create_task(watch(server, long_id, after=before[-1]["seq"]))
        short_events = asyncio.create_task(watch(server, short_id))
        await asyncio.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
        # Draining: still listening, but not ready and not taking work.
        status, body = await server.json("GET", "/ready")
        assert status == 503 and body["draining"] is True
        status, body = await server.json("POST", "/transcribe/async", data=form(voices["hello"]))
        assert status == 503 and body["code"] == "server_restarting"
        exited_in = await asyncio.wait_for(server.proc.wait(), 60)  # type: ignore[union-attr]
        assert exited_in == 0
        # The short job finished before the exit; the long one was left, not cancelled.
        short, code = await short_events
        assert short[-1]["type"] == "completed" and code == 1000
        middle, code = await watching
        assert code == 1012
        assert not {e["type"] for e in middle} & TERMINAL
        assert db_rows(server, f"SELECT status FROM jobs WHERE id='{long_id}'") == [("processing",)]

        await server.start()
        seen = before + middle
        rest, code = await watch(server, long_id, after=seen[-1]["seq"])
        assert code == 1000
        check_history(seen + rest)
        out, err = await asyncio.wait_for(cli.communicate(), 120)
        assert cli.returncode == 0, err.decode()
        assert out.decode().strip() == rest[-1]["result"]["text"]
        await spool_emptied(server)
    finally:
        await server.close()


async def sync_post(server: Server, path: Path) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/transcribe", data=form(path)) as resp:
            return resp.status, dict(resp.headers), await resp.json()


async def test_sigterm_exit_time_is_bounded(tmp_path, six_minutes):
    """With a job that cannot finish in the budget the server exits within it (plus the
    batch in flight and teardown), and the sync request still waiting for that job gets
    503 + Retry-After (its job is kept), not a 409 "cancelled"."""
    server = Server(tmp_path / "srv", "--chunk-seconds", "1", "--shutdown-timeout-s", "1")
    try:
        await server.start()
        request = asyncio.create_task(sync_post(server, six_minutes))
        async with asyncio.timeout(60):
            while not (rows := db_rows(server, "SELECT id FROM jobs")):
                await asyncio.sleep(0.1)
        await watch(server, rows[0][0], until=lambda e: chunks_done(e) >= 1)
        took = await server.terminate()
        assert took < 10, took
        status, headers, body = await request
        assert status == 503 and body["code"] == "server_restarting", body
        assert int(headers["Retry-After"]) >= 1
        assert "jobs_left_for_restart" in server.log_text()
        assert db_rows(server, "SELECT status FROM jobs") == [("processing",)]
    finally:
        await server.close()
        for entry in server.spool.iterdir():
            assert (entry / "audio.wav").exists()  # kept for the next start


async def test_worker_killed_mid_batch_redoes_its_slices_once(make_client, long_audio):
    path, texts = long_audio
    client = await make_client(executor="process", chunk_seconds=2, batch_size=4)
    pool = next(iter(client.app[pools_key].values()))
    store = client.app[store_key]
    resp = await client.post("/transcribe/async", data=form(path))
    job_id = (await resp.json())["job_id"]
    async with asyncio.timeout(60):
        while pool.stats.batches < 2 or not pool.inflight:
            await asyncio.sleep(0.005)
    killed = [t.key for t in pool.inflight]
    assert pool.worker is not None and pool.worker.pid
    os.kill(pool.worker.pid, signal.SIGKILL)
    job = await asyncio.wait_for(client.app[service_key].wait_done(job_id), 180)
    assert job.status == "completed", job.error
    assert job.result is not None and job.result["text"] == " ".join(texts)
    assert pool.stats.worker_restarts == 1
    records = {(r.job_id, r.idx): r for r in await store.slices(job_id)}
    redone = [k for k, r in records.items() if r.epoch == 1]
    # The killed batch went back once with a new epoch (unless it finished first).
    assert set(redone) <= set(killed) and all(records[k].state == "done" for k in records)
    for key in redone:
        # A late result from the dead worker's lease (epoch 0) is refused.
        assert await store.commit_slice(key[0], key[1], 0, {"text": "late"}) is False
        assert records[key].attempts == 2
    events = await store.events_after(job_id, 0)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count("completed") == 1


async def test_a_respawn_that_raises_fails_jobs_clearly(aiohttp_client, settings, long_audio):
    """The worker dies, and starting a new one raises (as ``Process.start()`` can with
    EAGAIN): the job ends with a clear error, a later request gets 503, nothing hangs."""
    spawned: list[ProcessWorker] = []

    def factory(spec: str) -> Worker:
        if spawned:
            raise OSError(11, "Resource temporarily unavailable")
        spawned.append(ProcessWorker(spec, "cpu", 1))
        return spawned[0]

    app = create_app(settings.replace(chunk_seconds=5, batch_size=1), worker_factory=factory)
    client = await aiohttp_client(app)
    await wait_ready(client)
    pool = next(iter(app[pools_key].values()))
    pool.restart_backoff_s = (0.05,)
    pool.max_restarts = 2
    resp = await client.post("/transcribe/async", data=form(long_audio[0]))
    job_id = (await resp.json())["job_id"]
    async with asyncio.timeout(60):
        while pool.stats.batches < 1:
            await asyncio.sleep(0.01)
    os.kill(spawned[0].pid or 0, signal.SIGKILL)
    job = await asyncio.wait_for(app[service_key].wait_done(job_id), 60)
    assert job.status == "failed"
    assert job.error_code == "model_unavailable"
    assert "could not be restarted" in (job.error or "")
    # The OSError is the operator's to read (the log, and the pool's own record), not
    # the client's.
    assert "Resource temporarily unavailable" not in (job.error or "")
    assert "Resource temporarily unavailable" in (pool.error or "")
    resp = await client.post("/transcribe/async", data=form(long_audio[0]))
    assert resp.status == 503
    assert pool.state == "failed"


def raw_upload(path: Path) -> tuple[bytes, bytes]:
    """Request head and body of a multipart upload, for sending by hand."""
    boundary = "durabilityboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{path.name}"\r\nContent-Type: audio/wav\r\n\r\n'
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /transcribe/async HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head, body


async def test_concurrent_uploads_are_admitted_against_the_limit(make_client, voices):
    """8 uploads at once against room for 2 jobs: 6 are refused before their body is read,
    while the first two are still uploading; both admitted jobs complete."""
    client = await make_client(max_queued_audio_s=120, admission_estimate_s=60)
    head, body = raw_upload(voices["hello"])
    conns = [await asyncio.open_connection(client.host, client.port) for _ in range(8)]
    for _, writer in conns:
        writer.write(head + body[:64])  # headers and a first few bytes only
        await writer.drain()
    answers: list[bytes | None] = []
    for reader, _ in conns:
        try:
            answers.append(await asyncio.wait_for(reader.read(4096), 1.0))
        except TimeoutError:
            answers.append(None)  # admitted: the server waits for the rest of the body
    refused = [a for a in answers if a is not None]
    assert len(refused) == 6, answers
    for answer in refused:
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After:" in answer
        assert b"queue_full" in answer
    job_ids = []
    for (reader, writer), answer in zip(conns, answers, strict=True):
        if answer is None:
            writer.write(body[64:])
            await writer.drain()
            reply = await asyncio.wait_for(reader.read(), 30)
            assert reply.startswith(b"HTTP/1.1 200"), reply
            job_ids.append(json.loads(reply.split(b"\r\n\r\n", 1)[1])["job_id"])
        writer.close()
    service = client.app[service_key]
    for job_id in job_ids:
        job = await asyncio.wait_for(service.wait_done(job_id), 60)
        assert job.status == "completed" and job.result["text"] == "hello world"
    assert service.admission.used(next(iter(client.app[pools_key]))) == 0


async def test_a_recovered_job_whose_audio_is_gone_fails_clearly(make_client, settings):
    """A job the store says is running, with no audio left in the spool (removed by hand,
    a lost volume): at start-up it fails with ``audio_missing`` instead of hanging."""
    from aiotranscribe.jobs import Job
    from aiotranscribe.store import SqliteStore

    store = SqliteStore(settings.data_dir / "jobs.sqlite3")
    await store.open()
    job = Job(id="f" * 32, filename="gone.wav", model="demo", kind="wav")
    await store.create(job, [("status", {"status": "pending", "stage": "queued"})])
    await store.close()
    client = await make_client()
    final = await asyncio.wait_for(client.app[service_key].wait_done(job.id), 30)
    assert final.status == "failed" and final.error_code == "audio_missing"
    events = await client.app[store_key].events_after(job.id, 0)
    assert [e["type"] for e in events] == ["status", "status", "failed"]
    assert events[1]["recovered"] is True
    resp = await client.get(f"/jobs/{job.id}/result")
    assert resp.status == 409 and (await resp.json())["code"] == "audio_missing"
