"""An events WebSocket on a job that stays quiet past the server's wait (15 s) stays open."""

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
