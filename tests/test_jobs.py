"""Jobs: async submission, live events over WebSocket, batching across jobs, cancel, limits."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from typing import Any

import aiohttp

from aiotranscribe.keys import pools_key, service_key, store_key
from tests.helpers import events_of, eventually, form, jobs_of

TERMINAL = {"completed", "failed", "cancelled"}


async def submit(client, path, **fields) -> str:
    resp = await client.post("/transcribe/async", data=form(path, **fields))
    assert resp.status in (200, 202), await resp.text()
    return (await resp.json())["job_id"]


async def watch(client, job_id: str, after: int = 0) -> tuple[list[dict[str, Any]], int | None]:
    """All events until the server closes the socket, and the close code."""
    events = []
    async with client.ws_connect(f"/jobs/{job_id}/events?after={after}") as ws:
        async for msg in ws:
            assert msg.type == aiohttp.WSMsgType.TEXT
            events.append(msg.json())
        return events, ws.close_code


async def wait_for(predicate, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def pool_of(client):
    return next(iter(client.app[pools_key].values()))


async def test_two_minute_job_events_and_polling_agree(make_client, long_audio):
    path, texts = long_audio
    client = await make_client(chunk_seconds=20, batch_size=2)
    job_id = await submit(client, path)
    events, code = await watch(client, job_id)
    assert code == 1000
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1))
    assert all(e["job_id"] == job_id and e["ts"] for e in events)
    progress = [e["progress"] for e in events if e["type"] == "progress"]
    assert progress == sorted(progress) and len(set(progress)) >= 3
    assert progress[-1] == 1.0
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "completed" and "segment" in kinds
    assert max(i for i, k in enumerate(kinds) if k == "segment") < kinds.index("completed")
    stages = [e["stage"] for e in events if e["type"] == "status"]
    assert stages[:3] == ["queued", "converting", "transcribing"]
    completed = events[-1]["result"]
    fetched = await (await client.get(f"/jobs/{job_id}/result")).json()
    assert completed == fetched
    segments = [e["segment"] for e in events if e["type"] == "segment"]
    assert [s["text"] for s in segments] == [s["text"] for s in fetched["segments"]]
    assert [s["id"] for s in segments] == list(range(len(segments)))
    assert fetched["text"] == " ".join(texts)
    starts = [w["start"] for s in fetched["segments"] for w in s["words"]]
    assert starts == sorted(starts) and starts[-1] < fetched["duration"]

    # The seed clients' polling flow gives the same transcript.
    info = await (await client.get(f"/jobs/{job_id}/status")).json()
    assert info["status"] == "completed" and info["result"]["text"] == fetched["text"]

    # A second subscriber, and a late one resuming after seq 5, get the same history.
    again, _ = await watch(client, job_id)
    assert again == events
    late, _ = await watch(client, job_id, after=5)
    assert late == events[5:]


async def test_two_jobs_are_batched_together(make_client, long_audio, voices):
    path, texts = long_audio
    client = await make_client(chunk_seconds=5, batch_size=4)
    first, second = await asyncio.gather(submit(client, path), submit(client, path))
    (ev1, _), (ev2, _) = await asyncio.gather(watch(client, first), watch(client, second))
    assert ev1[-1]["type"] == ev2[-1]["type"] == "completed"
    assert ev1[-1]["result"]["text"] == ev2[-1]["result"]["text"] == " ".join(texts)
    stats = pool_of(client).stats
    assert stats.mixed_batches >= 1, stats
    assert stats.max_batch_size == 4


async def test_cancel_queued_and_running_jobs(make_client, long_audio, voices):
    path, _ = long_audio
    client = await make_client(chunk_seconds=5, batch_size=1)
    pool = pool_of(client)
    running = await submit(client, path)
    await wait_for(lambda: pool.stats.batches >= 1)
    # A short job queued behind the long one: cancelled before any of its slices ran.
    queued = await submit(client, voices["hello"])
    store = client.app[store_key]
    await wait_for(lambda: pool.queue_position(queued) is not None)
    resp = await client.post(f"/jobs/{queued}/cancel")
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    assert pool.queue_position(queued) is None
    events, _ = await watch(client, queued)
    assert events[-1]["type"] == "cancelled" and events[-1]["reason"]
    assert not any(e["type"] == "segment" for e in events)
    # The long job is still running: cancel it mid-batch.
    assert (await store.get(running)).status == "processing"
    resp = await client.post(f"/jobs/{running}/cancel")
    assert (await resp.json())["status"] == "cancelled"
    status = await (await client.get(f"/jobs/{running}/status")).json()
    assert status["status"] == "cancelled" and status["result"] is None
    assert pool.queued == 0
    result = await client.get(f"/jobs/{running}/result")
    assert result.status == 409
    # Another job afterwards is unaffected.
    resp = await client.post("/transcribe", data=form(voices["hello"]))
    assert (await resp.json())["text"] == "hello world"


async def test_queue_full_is_503_with_retry_after(make_client, long_audio, voices):
    path, _ = long_audio
    # Room for the two-minute job, not for a second job on top.
    client = await make_client(chunk_seconds=5, batch_size=1, max_queued_audio_s=150)
    pool = pool_of(client)
    job = await submit(client, path)
    await wait_for(lambda: pool.queued >= 3)
    resp = await client.post("/transcribe/async", data=form(voices["hello"]))
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["code"] == "queue_full"
    assert client.app[service_key].admission.rejected[pool.name] == 1
    await client.post(f"/jobs/{job}/cancel")


async def test_unknown_job_events_is_404_before_upgrade(client):
    resp = await client.get("/jobs/nope/events")
    assert resp.status == 404
    assert (await resp.json())["code"] == "job_not_found"


async def test_shutdown_past_the_drain_budget_keeps_the_job_and_closes_1012(
    make_client, long_audio
):
    path, _ = long_audio
    client = await make_client(chunk_seconds=5, batch_size=1, shutdown_timeout_s=0.2)
    job_id = await submit(client, path)
    ws = await client.ws_connect(f"/jobs/{job_id}/events")
    await wait_for(lambda: pool_of(client).stats.batches >= 1)
    await client.server.app.shutdown()
    events = [msg.json() async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]
    # "Restarting, resume": no terminal event, and the job stays unfinished in the store.
    assert not {e["type"] for e in events} & TERMINAL
    assert ws.close_code == 1012
    await ws.close()
    job = await client.app[store_key].get(job_id)
    assert job is not None and job.status == "processing"
    # New work is refused while the server stops.
    resp = await client.post("/transcribe/async", data=form(path))
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    # Its audio is kept for the next start.
    kept = client.app[service_key].job_dir(job_id)
    assert (kept / "audio.wav").is_file()
    shutil.rmtree(kept)


async def test_sync_client_disconnect_cancels_its_job(make_client, long_audio):
    client = await make_client(chunk_seconds=5, batch_size=1)

    async def post() -> None:
        async with client.post("/transcribe", data=form(long_audio[0])) as resp:
            await resp.read()

    async def processing() -> bool:
        return any(job.status == "processing" for job in await jobs_of(client))

    request = asyncio.create_task(post())
    await eventually(processing)
    request.cancel()  # closes the connection mid-request
    with contextlib.suppress(asyncio.CancelledError):
        await request
    (job,) = await jobs_of(client)
    job = await asyncio.wait_for(client.app[service_key].wait_done(job.id), 10)
    assert job.status == "cancelled"
    assert (await events_of(client, job.id))[-1]["reason"] == "client disconnected"


async def test_shutdown_with_the_memory_store_cancels_what_cannot_resume(make_client, long_audio):
    """``--store memory`` keeps nothing across a restart, so shutdown ends running jobs
    with ``cancelled`` (a final answer) instead of 1012 (a promise to resume)."""
    path, _ = long_audio
    client = await make_client(
        store="memory", chunk_seconds=5, batch_size=1, shutdown_timeout_s=0.2
    )
    job_id = await submit(client, path)
    ws = await client.ws_connect(f"/jobs/{job_id}/events")
    await wait_for(lambda: pool_of(client).stats.batches >= 1)
    await client.server.app.shutdown()
    events = [msg.json() async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]
    assert events[-1]["type"] == "cancelled"
    assert events[-1]["reason"] == "server shutting down"
    assert ws.close_code == 1000
    await ws.close()


async def test_events_after_must_be_a_seq(client, voices):
    job_id = await submit(client, voices["hello"])
    for bad in ("-1", "x", "1.5"):
        resp = await client.get(f"/jobs/{job_id}/events?after={bad}")
        assert resp.status == 400, bad
        assert (await resp.json())["code"] == "bad_request"
    await client.app[service_key].wait_done(job_id)
