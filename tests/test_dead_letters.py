"""Remote workers when things break (issue 14): a slice that keeps taking its worker down
goes to the dead-letter stream and fails only its own job (the "poison" is played by
SIGSTOP: the slice's first worker stops while holding it, so the second one finds it
delivered once already); a ``kill -9`` of redis-server mid-job costs nothing accepted.
"""

from __future__ import annotations

import asyncio
import os
import signal

import redis.asyncio as aioredis

from aiotranscribe.jobs import COMPLETED, FAILED
from aiotranscribe.remote import DLQ, GROUP, queue_key
from tests.redisserver import RedisServer, watch_through_a_kill
from tests.test_remote_workers import (  # noqa: F401 (workers: a fixture)
    WorkerProc,
    check_history,
    hold_stopped,
    queue_drained,
    submit,
    wait_loaded,
    watch,
    workers,
)


async def lag_of(redis_url: str) -> object:
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        groups = await raw.xinfo_groups(queue_key("demo"))
        return groups[0]["lag"]


async def test_a_slice_that_keeps_failing_is_dead_lettered_and_fails_only_its_job(
    make_client,
    redis_url,
    workers,  # noqa: F811 (the fixture imported above)
    voices,
):
    once = ("--max-deliveries", "1")  # a second delivery is one too many
    first = workers("first", batch_size=2, extra=once)
    await wait_loaded(first)
    client = await make_client(store=redis_url, no_workers=True)
    poisoned = await submit(client, voices["digits"])  # one slice
    watching = asyncio.create_task(watch(client, poisoned))
    await hold_stopped(first, redis_url)
    lags = [await lag_of(redis_url)]
    second = workers("second", batch_size=2, extra=once)
    try:
        events = await watching  # "second" reclaims it: its second delivery
        lags.append(await lag_of(redis_url))
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    assert events[-1]["type"] == FAILED
    assert events[-1]["error"]["code"] == "inference_failed"
    assert [e["type"] for e in events].count(FAILED) == 1
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        dead = await raw.xrange(DLQ)
    assert len(dead) == 1
    assert dead[0][1]["delivered"] == "2" and dead[0][1]["job"] == poisoned
    assert any(e.get("event") == "worker_dead_lettered" for e in second.lines())
    # Only that job: the next one completes, on either worker.
    healthy = await submit(client, voices["digits"])
    after = await watch(client, healthy)
    assert after[-1]["type"] == COMPLETED
    assert after[-1]["result"]["text"] == "one two three four five"
    lags.append(await lag_of(redis_url))
    assert None not in lags, lags  # KEDA's lagCount stays usable (no XDEL of undelivered)
    await queue_drained(redis_url)
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        assert (await raw.xpending(queue_key("demo"), GROUP))["pending"] == 0


async def test_a_job_through_a_worker_completes_once_across_a_kill_9_of_redis_server(
    make_client, long_audio, tmp_path
):
    path, texts = long_audio
    server = RedisServer(tmp_path / "redis").start()  # appendonly yes, appendfsync always
    worker = WorkerProc(server.url(), tmp_path / "w.log", "w", batch_size=2)
    try:
        await wait_loaded(worker)
        client = await make_client(
            store=server.url(), no_workers=True, chunk_seconds=2, batch_size=1
        )
        job_id = await submit(client, path)
        events = await watch_through_a_kill(client, job_id, server)
        check_history(events)  # contiguous, one `completed`
        result = events[-1]["result"]
        assert len(result["text"].split()) > 0.9 * len(" ".join(texts).split())
        async with aioredis.Redis.from_url(server.url(), decode_responses=True) as raw:
            slices = int(await raw.hget(f"sl:{{{job_id}}}", "n"))
            assert await raw.hlen(f"res:{{{job_id}}}") == slices  # each committed once
            done = [e for e in events if e["type"] == "progress"]
            assert done[-1]["chunks_done"] == slices
        await queue_drained(server.url())
        await client.close()
    finally:
        worker.stop()
        server.stop()
