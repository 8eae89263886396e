"""Several workers per model: all fed from one queue, each supervised on its own."""

from __future__ import annotations

import asyncio
import os
import signal

from structlog.testing import capture_logs

from aiotranscribe.keys import pools_key, service_key, store_key
from tests.helpers import form
from tests.test_jobs import pool_of, submit, wait_for
from tests.test_metrics import scrape, value


async def test_two_workers_share_the_queue_and_a_kill_requeues_only_its_batch(
    make_client, long_audio
):
    path, texts = long_audio
    client = await make_client(executor="process", workers=2, chunk_seconds=2, batch_size=2)
    pool = pool_of(client)
    victim, survivor = pool.lanes
    assert (victim.device, survivor.device) == ("cpu", "cpu")
    pids = (victim.pid, survivor.pid)
    assert None not in pids and pids[0] != pids[1]
    with capture_logs() as logs:
        job_id = await submit(client, path)
        async with asyncio.timeout(60):
            # Both workers have served batches of the one job, and both are busy now.
            while not (
                victim.batches and survivor.batches and victim.inflight and survivor.inflight
            ):
                await asyncio.sleep(0.002)
        killed = {t.key for t in victim.inflight}
        running = {t.key for t in survivor.inflight}
        os.kill(pids[0], signal.SIGKILL)
        job = await asyncio.wait_for(client.app[service_key].wait_done(job_id), 180)
    assert job.status == "completed", job.error
    await wait_for(lambda: victim.state == "ready")  # restarted
    assert job.result is not None and job.result["text"] == " ".join(texts)
    # Only the killed worker was restarted; the other kept its process throughout.
    assert (victim.restarts, survivor.restarts) == (1, 0)
    assert pool.stats.worker_restarts == 1
    assert survivor.pid == pids[1] and victim.pid not in (None, pids[0])
    # Only the killed batch went back (new epoch), unless it had finished first.
    records = await client.app[store_key].slices(job_id)
    redone = {(r.job_id, r.idx) for r in records if r.epoch > 0}
    assert redone <= killed and not redone & running
    # Both workers took batches: in the batch log, and in /metrics.
    batch_pids = {e["pid"] for e in logs if e["event"] == "batch"}
    assert {pids[0], pids[1]} <= batch_pids
    samples = await scrape(client)
    model = pool.name
    for worker in ("0", "1"):
        assert value(samples, "aiotranscribe_worker_batches_total", model=model, worker=worker) > 0
        assert value(samples, "aiotranscribe_worker_ready", model=model, worker=worker) == 1
    reported = {value(samples, "aiotranscribe_worker_pid", model=model, worker=w) for w in "01"}
    assert reported == {float(victim.pid or 0), float(pids[1])}


async def test_a_worker_that_cannot_load_leaves_the_others_serving(make_client, voices):
    """``--device cpu,cuda:7`` here: the CUDA worker fails (no such device), the CPU one
    serves, and /health says which is which."""
    client = await make_client(device="cpu,cuda:7")
    pool = next(iter(client.app[pools_key].values()))
    await wait_for(lambda: pool.lanes[1].state != "loading")
    assert [lane.state for lane in pool.lanes] == ["ready", "failed"]
    assert pool.state == "ready"
    resp = await client.post("/transcribe", data=form(voices["hello"]))
    assert resp.status == 200 and (await resp.json())["text"] == "hello world"
    health = await (await client.get("/health")).json()
    assert health["models"][0]["workers"] == [
        {"worker": 0, "device": "cpu", "state": "ready"},
        {"worker": 1, "device": "cuda:7", "state": "failed"},
    ]
    assert (await client.get("/ready")).status == 200


async def test_a_model_fails_only_when_every_worker_has(make_client, voices):
    client = await make_client(device="cuda:6,cuda:7")
    pool = next(iter(client.app[pools_key].values()))
    assert pool.state == "failed"
    resp = await client.post("/transcribe", data=form(voices["hello"]))
    assert resp.status == 503
    assert "device is not available" in (await resp.json())["detail"]
