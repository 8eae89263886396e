"""Events WebSockets at the edges: a job quiet past the server's wait (15 s) keeps its socket;
a resume after the end of an ended job closes at once."""

from __future__ import annotations

import asyncio

import aiohttp

from aiotranscribe.jobs import Job
from aiotranscribe.keys import store_key


async def test_a_quiet_job_keeps_its_events_socket_open(make_client):
    client = await make_client(store="memory")
    store = client.app[store_key]
    # A job nobody runs: it sends its first event, then nothing for longer than one wait.
    job = Job(id="q" * 32, filename="x.wav", model="demo")
    await store.create(job, [("status", {"status": "pending", "stage": "queued"})])
    async with client.ws_connect(f"/jobs/{job.id}/events") as ws:
        assert (await ws.receive_json())["seq"] == 1
        await asyncio.sleep(16)  # the server's wait times out once: it was closed 1011 there
        await store.append_event(job.id, "progress", {"progress": 0.5})
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.TEXT and msg.json()["seq"] == 2


async def test_resuming_after_the_end_of_an_ended_job_closes_at_once(make_client):
    client = await make_client(store="memory")
    store = client.app[store_key]
    job = Job(id="e" * 32, filename="x.wav", model="demo")
    await store.create(job, [("status", {"status": "pending", "stage": "queued"})])
    await store.finish(job.id, "cancelled", {"reason": "test"})
    async with client.ws_connect(f"/jobs/{job.id}/events?after=2") as ws:
        msg = await ws.receive(timeout=5)  # was: waited forever (closed 1011 after 15 s)
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1000
