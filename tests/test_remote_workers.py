"""``serve --no-workers`` with ``aiotranscribe worker`` processes on one Redis (issue 14,
item 2): real worker subprocesses on a real redis-server; servers are apps in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from aiotranscribe.jobs import COMPLETED
from aiotranscribe.remote import GROUP, queue_key
from tests.conftest import MODEL
from tests.helpers import form

# Slices idle this long (3 heartbeats) are reclaimed by another worker.
HEARTBEAT_S = 0.5


class WorkerProc:
    """One ``aiotranscribe worker`` (the model in its own process: executor thread)."""

    def __init__(
        self, url: str, log: Path, name: str, batch_size: int = 8, extra: Sequence[str] = ()
    ) -> None:
        self.log = log
        self.name = name
        command = [
            sys.executable,
            "-m",
            "aiotranscribe",
            "worker",
            "--store",
            url,
            "--model",
            MODEL,
            "--device",
            "cpu",
            "--executor",
            "thread",
            "--torch-threads",
            "1",
            "--batch-size",
            str(batch_size),
            "--heartbeat-s",
            str(HEARTBEAT_S),
            "--consumer",
            name,
            "--log-format",
            "json",
            *extra,
        ]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def batches(self) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e.get("event") == "worker_batch"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProc] = []

    def start(name: str, batch_size: int = 8, extra: Sequence[str] = ()) -> WorkerProc:
        worker = WorkerProc(redis_url, tmp_path / f"{name}.log", name, batch_size, extra)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


async def watch(client: Any, job_id: str) -> list[dict[str, Any]]:
    events = []
    async with client.ws_connect(f"/jobs/{job_id}/events") as ws:
        async with asyncio.timeout(240):
            async for msg in ws:
                assert msg.type == aiohttp.WSMsgType.TEXT
                events.append(msg.json())
    assert ws.close_code == 1000
    return events


async def submit(client: Any, path: Path) -> str:
    resp = await client.post("/transcribe/async", data=form(path))
    assert resp.status in (200, 202), await resp.text()
    return str((await resp.json())["job_id"])


def check_history(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count(COMPLETED) == 1
    assert events[-1]["type"] == COMPLETED


async def queue_drained(redis_url: str) -> None:
    """Every slice answered and acknowledged: the stream and the pending list are empty."""
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        async with asyncio.timeout(10):
            while True:
                pending = await raw.xpending(queue_key("demo"), GROUP)
                if await raw.xlen(queue_key("demo")) == 0 and pending["pending"] == 0:
                    return
                await asyncio.sleep(0.05)


async def test_a_server_without_workers_transcribes_through_a_worker(
    make_client, redis_url, workers, voices
):
    worker = workers("w1")
    client = await make_client(store=redis_url, no_workers=True)
    health = await (await client.get("/health")).json()
    assert health["status"] in ("healthy", "ok"), health
    job_id = await submit(client, voices["digits"])
    events = await watch(client, job_id)
    check_history(events)
    assert events[-1]["result"]["text"] == "one two three four five"
    result = await (await client.get(f"/jobs/{job_id}/result")).json()
    assert result == events[-1]["result"]
    assert len(worker.batches()) >= 1
    await queue_drained(redis_url)


async def test_jobs_of_two_servers_share_batches_on_one_worker(
    make_client, redis_url, workers, long_audio, voices, tmp_path
):
    path, texts = long_audio
    worker = workers("w1", batch_size=8)
    # Small batches, two out at once per server: the worker's reads mix both servers'.
    flags = {"store": redis_url, "no_workers": True, "batch_size": 2, "workers": 2}
    one = await make_client(chunk_seconds=2, **flags)
    two = await make_client(chunk_seconds=2, spool_dir=tmp_path / "spool-2", **flags)
    jobs = await asyncio.gather(submit(one, path), submit(two, path), submit(one, voices["digits"]))
    histories = await asyncio.gather(watch(one, jobs[0]), watch(two, jobs[1]), watch(one, jobs[2]))
    for events in histories:
        check_history(events)
    long_one, long_two, short = (h[-1]["result"]["text"] for h in histories)
    assert long_one == long_two  # same file, same slices, each in slice order
    assert len(long_one.split()) > 0.9 * len(" ".join(texts).split())
    assert short == "one two three four five"
    batches = worker.batches()
    assert max(b["replicas"] for b in batches) == 2, batches  # a batch held both servers'
    assert max(b["slices"] for b in batches) <= 8
    await queue_drained(redis_url)


async def hold_stopped(worker: WorkerProc, redis_url: str) -> int:
    """SIGSTOP ``worker`` at a moment it holds slices; how many it holds."""
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        async with asyncio.timeout(120):
            while True:
                os.kill(worker.proc.pid, signal.SIGSTOP)
                info = await raw.xpending(queue_key("demo"), GROUP)
                held = {c["name"]: int(c["pending"]) for c in info.get("consumers") or []}
                if held.get(worker.name, 0) > 0:
                    return held[worker.name]
                os.kill(worker.proc.pid, signal.SIGCONT)
                await asyncio.sleep(0.02)


async def wait_loaded(*procs: WorkerProc) -> None:
    async with asyncio.timeout(120):
        while not all(
            any(e.get("event") == "worker_model_loaded" for e in w.lines()) for w in procs
        ):
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("fate", ["kill_9", "zombie"])
async def test_a_worker_lost_mid_batch_costs_a_recompute_not_a_result(
    fate, make_client, redis_url, workers, long_audio
):
    path, texts = long_audio
    lost, kept = workers("lost", batch_size=4), workers("kept", batch_size=4)
    await wait_loaded(lost, kept)
    client = await make_client(
        store=redis_url, no_workers=True, batch_size=4, workers=2, chunk_seconds=2
    )
    job_id = await submit(client, path)
    watching = asyncio.create_task(watch(client, job_id))
    held = await hold_stopped(lost, redis_url)
    if fate == "kill_9":
        lost.proc.kill()
        lost.proc.wait()
    events = await watching  # "kept" reclaims the held slices after 3 heartbeats
    check_history(events)
    assert len(events[-1]["result"]["text"].split()) > 0.9 * len(" ".join(texts).split())
    reclaimed = [e for e in kept.lines() if e.get("event") == "worker_reclaimed"]
    assert sum(e["slices"] for e in reclaimed) >= held
    assert any(b["redelivered"] for b in kept.batches())
    if fate == "zombie":
        # It wakes and finishes its stale batch (an answer, or an error when the finished
        # job's audio is gone already), then acknowledges it: nobody takes those answers.
        os.kill(lost.proc.pid, signal.SIGCONT)
        await queue_drained(redis_url)
        await asyncio.sleep(0.5)
        after = await (await client.get(f"/jobs/{job_id}/result")).json()
        assert after == events[-1]["result"]
        async with client.ws_connect(f"/jobs/{job_id}/events?after={len(events)}") as ws:
            assert [msg async for msg in ws] == []  # no event after the end
    await queue_drained(redis_url)
