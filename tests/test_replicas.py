"""Several API replicas on one Redis (issue 14): any replica serves any job, a killed
replica's jobs are adopted by another, and a cancel made on one replica reaches the replica
that runs the job. Real ``aiotranscribe serve`` and ``aiotranscribe worker`` processes on a
real redis-server.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from aiotranscribe.jobs import CANCELLED, COMPLETED
from tests.helpers import form
from tests.serverproc import Server
from tests.test_remote_workers import (  # noqa: F401 (workers: a fixture)
    check_history,
    queue_drained,
    wait_loaded,
    workers,
)

# A replica silent this long loses its jobs (the default is 15 s; short here, for speed).
OWNER_TTL_S = 2.0


def replica(root: Path, redis_url: str, shared: Path, *extra: str) -> Server:
    return Server(
        root,
        "--store",
        redis_url,
        "--no-workers",
        "--shared-dir",
        str(shared),  # every replica reaches every job's audio
        "--owner-ttl-s",
        str(OWNER_TTL_S),
        "--batch-size",
        "2",
        "--chunk-seconds",
        "2",
        *extra,
    )


async def submit(server: Server, path: Path) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/transcribe/async", data=form(path)) as resp:
            assert resp.status in (200, 202), await resp.text()
            return str((await resp.json())["job_id"])


async def read_events(
    ws: aiohttp.ClientWebSocketResponse, until: Any, timeout: float = 120.0
) -> list[dict[str, Any]]:
    """Events from ``ws`` until ``until(event)`` is true or the socket closes."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            events.append(msg.json())
            if until(events[-1]):
                break
    return events


async def test_a_client_of_a_killed_replica_goes_on_with_another(
    redis_url,
    workers,  # noqa: F811 (the fixture imported above)
    long_audio,
    tmp_path,
):
    path, texts = long_audio
    shared = tmp_path / "shared"
    worker = workers("w1", batch_size=2, extra=("--shared-dir", str(shared)))
    await wait_loaded(worker)
    one = replica(tmp_path / "one", redis_url, shared)
    two = replica(tmp_path / "two", redis_url, shared)
    try:
        await asyncio.gather(one.start(), two.start())
        job_id = await submit(one, path)
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{one.url}/jobs/{job_id}/events") as ws:
                before = await read_events(ws, lambda e: e["type"] == "segment")
            assert before[-1]["type"] == "segment", before
            # Hold the worker so the job cannot finish before its replica dies.
            os.kill(worker.proc.pid, signal.SIGSTOP)
            try:
                await one.kill9()
            finally:
                os.kill(worker.proc.pid, signal.SIGCONT)
            after_seq = before[-1]["seq"]
            url = f"{two.url}/jobs/{job_id}/events?after={after_seq}"
            async with session.ws_connect(url) as ws:
                after = await read_events(ws, lambda e: e["type"] in (COMPLETED, CANCELLED))
            status = await (await session.get(f"{two.url}/jobs/{job_id}/status")).json()
            result = await (await session.get(f"{two.url}/jobs/{job_id}/result")).json()
        events = before + after
        check_history(events)  # every event once, in order, one `completed`
        assert any(e.get("recovered") for e in after)  # replica two took the job over
        words = events[-1]["result"]["text"].split()
        assert len(words) > 0.9 * len(" ".join(texts).split())
        assert status["status"] == COMPLETED
        assert result == events[-1]["result"]
        assert "jobs_adopted" in two.log_text()
        await queue_drained(redis_url)
    finally:
        await asyncio.gather(one.close(), two.close())


async def slices_of(redis_url: str, job_id: str) -> int:
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        return int(await raw.hget(f"sl:{{{job_id}}}", "n") or 0)


async def test_a_cancel_on_another_replica_stops_the_work_of_the_owner(
    make_client,
    redis_url,
    workers,  # noqa: F811 (the fixture imported above)
    long_audio,
    voices,
    tmp_path,
):
    path, _ = long_audio
    worker = workers("w1", batch_size=2)
    await wait_loaded(worker)
    flags = {"store": redis_url, "no_workers": True, "batch_size": 2, "chunk_seconds": 2}
    one = await make_client(**flags)
    two = await make_client(spool_dir=tmp_path / "spool-2", **flags)
    long_id = await submit_to(one, path)
    async with one.ws_connect(f"/jobs/{long_id}/events") as ws:
        before = await read_events(ws, lambda e: e["type"] == "segment")
        # Cancelled through the replica that does not run it, while its slices wait.
        resp = await two.post(f"/jobs/{long_id}/cancel")
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["status"] == CANCELLED
        rest = await read_events(ws, lambda e: False)
    events = before + rest
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count(CANCELLED) == 1
    assert events[-1]["type"] == CANCELLED
    # Work goes on for other jobs, on both replicas.
    short_id = await submit_to(one, voices["digits"])
    async with two.ws_connect(f"/jobs/{short_id}/events") as ws:
        short = await read_events(ws, lambda e: False)
    check_history(short)
    assert short[-1]["result"]["text"] == "one two three four five"
    # The owner took the long job's waiting slices out: few were computed, not all.
    total = await slices_of(redis_url, long_id)
    computed = sum(b["slices"] for b in worker.batches()) - await slices_of(redis_url, short_id)
    assert total > 20
    assert computed <= len([e for e in before if e["type"] == "segment"]) + 3 * 2, (
        computed,
        total,
    )
    await queue_drained(redis_url)


async def submit_to(client: Any, path: Path) -> str:
    resp = await client.post("/transcribe/async", data=form(path))
    assert resp.status in (200, 202), await resp.text()
    return str((await resp.json())["job_id"])
