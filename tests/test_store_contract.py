"""The JobStore contract, written once and run against every store (memory, SQLite, Redis).

A new store joins by adding a fixture param; every rule here must hold for it too. The Redis
store runs against a real redis-server (the session's, its database emptied per test).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiotranscribe.jobs import CANCELLED, COMPLETED, FAILED, Job
from aiotranscribe.store import JobStore, MemoryStore, SqliteStore
from aiotranscribe.store.base import JobQuery
from aiotranscribe.store.redis import RedisStore

STORES = ["memory", "sqlite", "redis"]


def build(kind: str, tmp_path: Path, ttl_s: float = 3600.0, url: str = "") -> JobStore:
    if kind == "memory":
        return MemoryStore(ttl_s=ttl_s)
    if kind == "redis":
        return RedisStore(url, ttl_s=ttl_s)
    return SqliteStore(tmp_path / "data" / "jobs.sqlite3", ttl_s=ttl_s)


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    s = build(request.param, tmp_path, url=url)
    await s.open()
    yield s
    await s.close()


async def new_job(store: JobStore, job_id: str = "a" * 32, **fields) -> Job:
    job = Job(id=job_id, filename="x.wav", model="demo", kind="wav", **fields)
    events = await store.create(job, [("status", {"status": "pending", "stage": "queued"})])
    assert [e["seq"] for e in events] == [1]
    return job


async def test_create_get_and_list(store):
    await new_job(store, "1" * 32)
    await new_job(store, "2" * 32)
    job = await store.get("1" * 32)
    assert job is not None and job.filename == "x.wav" and job.last_seq == 1
    assert await store.get("nope") is None
    assert {j.id for j in await store.list_jobs()} == {"1" * 32, "2" * 32}
    assert len(await store.list_jobs(limit=1)) == 1
    assert await store.live_ids() == {"1" * 32, "2" * 32}
    with pytest.raises(Exception):  # noqa: B017 - each store raises its own duplicate error
        await new_job(store, "1" * 32)


async def test_records_are_copies(store):
    job = await new_job(store)
    job.status = "mangled"
    got = await store.get(job.id)
    assert got is not None
    got.stage = "mangled"
    again = await store.get(job.id)
    assert again is not None and again.status == "pending" and again.stage == "queued"


async def test_events_are_contiguous_under_concurrent_appends(store):
    job = await new_job(store)

    async def emit(i: int) -> list[int]:
        out = await store.append_events(job.id, [("progress", {"i": i}), ("progress", {"i": i})])
        return [e["seq"] for e in out]

    seqs = await asyncio.gather(*(emit(i) for i in range(50)))
    for pair in seqs:  # one call's events are adjacent
        assert pair[1] == pair[0] + 1
    events = await store.events_after(job.id, 0)
    assert [e["seq"] for e in events] == list(range(1, 102))
    assert all(e["job_id"] == job.id and e["ts"] for e in events)
    assert [e["seq"] for e in await store.events_after(job.id, 99)] == [100, 101]
    # A long history is read in pages.
    assert [e["seq"] for e in await store.events_after(job.id, 10, limit=3)] == [11, 12, 13]
    assert [e["seq"] for e in await store.events_after(job.id, 100, limit=3)] == [101]
    assert await store.events_after(job.id, 101, limit=3) == []
    record = await store.get(job.id)
    assert record is not None and record.last_seq == 101


async def test_changes_land_with_their_event(store):
    job = await new_job(store)
    seq = await store.append_event(
        job.id, "status", {"status": "processing"}, status="processing", stage="converting"
    )
    assert seq == 2
    got = await store.get(job.id)
    assert got is not None and (got.status, got.stage) == ("processing", "converting")
    with pytest.raises(AttributeError):
        await store.append_event(job.id, "status", {}, no_such_field=1)
    assert [e["seq"] for e in await store.events_after(job.id, 0)] == [1, 2]


async def test_exactly_one_terminal_event(store):
    job = await new_job(store)
    results = await asyncio.gather(
        store.finish(job.id, COMPLETED, {"result": {}}),
        store.finish(job.id, FAILED, {"error": {}}),
        store.finish(job.id, CANCELLED, {"reason": "x"}),
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert await store.append_events(job.id, [("progress", {})]) == []
    assert await store.set_status(job.id, stage="x") is None
    events = await store.events_after(job.id, 0)
    assert [e["type"] for e in events][-1] == winners[0]["type"]
    assert sum(e["type"] in (COMPLETED, FAILED, CANCELLED) for e in events) == 1
    got = await store.get(job.id)
    assert got is not None and got.terminal and got.finished_at is not None
    assert await store.live_ids() == set()


async def test_wait_events_wakes_on_append_and_times_out(store):
    job = await new_job(store)
    started = time.monotonic()
    assert await store.wait_events(job.id, 1, timeout=0.2) == []
    assert time.monotonic() - started >= 0.15
    waiter = asyncio.create_task(store.wait_events(job.id, 1, timeout=10))
    await asyncio.sleep(0.05)
    await store.append_event(job.id, "progress", {"progress": 0.5})
    events = await asyncio.wait_for(waiter, 5)
    assert [e["seq"] for e in events] == [2]
    # History already there: no wait at all.
    assert [e["seq"] for e in await store.wait_events(job.id, 0, timeout=10)] == [1, 2]


async def test_slices_lease_commit_and_fencing(store):
    job = await new_job(store)
    events = await store.add_slices(
        job.id,
        [(0, 100), (100, 100), (200, 50)],
        [("status", {"stage": "transcribing"})],
        duration_s=0.02,
    )
    assert [e["seq"] for e in events] == [2]
    keys = [(job.id, i) for i in range(3)]
    assert await store.lease_slices(keys, "w1", 60) == {k: 0 for k in keys}
    # A duplicate result of the same lease is refused after the first.
    assert await store.commit_slice(job.id, 0, 0, {"text": "a"}) is True
    assert await store.commit_slice(job.id, 0, 0, {"text": "dup"}) is False
    # The holder of slices 1 and 2 dies: they go back with epoch 1; its late result is refused.
    await store.requeue_slices([(job.id, 1), (job.id, 2)])
    assert await store.commit_slice(job.id, 1, 0, {"text": "late"}) is False
    assert await store.lease_slices([(job.id, 1), (job.id, 0)], "w2", 60) == {(job.id, 1): 1}
    assert await store.commit_slices([(job.id, 1, 1, {"text": "b"})]) == [True]
    records = await store.slices(job.id)
    assert [(r.idx, r.state, r.epoch) for r in records] == [
        (0, "done", 0),
        (1, "done", 1),
        (2, "queued", 1),
    ]
    assert [r.result for r in records] == [{"text": "a"}, {"text": "b"}, None]
    assert records[1].attempts == 2
    got = await store.get(job.id)
    assert got is not None and got.duration_s == 0.02


async def test_no_commit_after_the_job_ended(store):
    job = await new_job(store)
    await store.add_slices(job.id, [(0, 10)], [])
    await store.lease_slices([(job.id, 0)], "w", 60)
    await store.finish(job.id, CANCELLED, {"reason": "client"})
    assert await store.commit_slice(job.id, 0, 0, {"text": "x"}) is False
    assert await store.lease_slices([(job.id, 0)], "w", 60) == {}


async def test_recover_requeues_leases_with_a_new_epoch(store):
    a = await new_job(store, "a" * 32)
    b = await new_job(store, "b" * 32)
    await store.add_slices(a.id, [(0, 10), (10, 10)], [])
    await store.lease_slices([(a.id, 0), (a.id, 1)], "w", 60)
    await store.commit_slice(a.id, 0, 0, {"text": "kept"})
    await store.finish(b.id, COMPLETED, {"result": {}})
    jobs = await store.recover()
    assert [j.id for j in jobs] == [a.id]
    records = await store.slices(a.id)
    assert [(r.state, r.epoch) for r in records] == [("done", 0), ("queued", 1)]
    assert records[0].result == {"text": "kept"}


async def test_request_cancel_is_recorded(store):
    job = await new_job(store)
    got = await store.request_cancel(job.id, "by client")
    assert got is not None and got.cancel_requested and got.cancel_reason == "by client"
    assert await store.request_cancel("unknown", "x") is None


async def test_expire_deletes_old_finished_jobs_only(store):
    old = await new_job(store, "o" * 32)
    await new_job(store, "r" * 32)
    await store.add_slices(old.id, [(0, 1)], [])
    await store.finish(old.id, COMPLETED, {"result": {}})
    assert await store.expire(time.time()) == []
    assert await store.expire(time.time() + store.ttl_s + 1) == [old.id]
    assert await store.get(old.id) is None
    assert await store.events_after(old.id, 0) == []
    assert await store.slices(old.id) == []
    assert await store.get("r" * 32) is not None


async def test_close_wakes_waiters(store):
    job = await new_job(store)
    waiter = asyncio.create_task(store.wait_events(job.id, 1, timeout=30))
    await asyncio.sleep(0.05)
    await store.close()
    assert await asyncio.wait_for(waiter, 5) == []
    await store.open()  # the fixture closes it again


async def test_sqlite_survives_reopen(tmp_path):
    first = build("sqlite", tmp_path)
    await first.open()
    job = await new_job(first)
    await first.append_event(job.id, "progress", {"progress": 0.5}, progress=0.5)
    await first.close()
    second = build("sqlite", tmp_path)
    await second.open()
    try:
        got = await second.get(job.id)
        assert got is not None and got.progress == 0.5 and got.last_seq == 2
        assert await second.append_event(job.id, "progress", {}) == 3
        assert isinstance(second, SqliteStore) and await second.integrity() == "ok"
    finally:
        await second.close()


async def test_a_commit_is_visible_to_the_next_read_under_concurrent_reads(store):
    """Reads that overlap must not pin an old snapshot (a job just created must be found)."""
    await new_job(store, "0" * 32)
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            await store.events_after("0" * 32, 0)

    readers = [asyncio.create_task(reader()) for _ in range(20)]
    try:
        for i in range(1, 40):
            job_id = f"{i:032x}"
            await new_job(store, job_id)
            assert await store.get(job_id) is not None, i
    finally:
        stop.set()
        await asyncio.gather(*readers)


async def test_page_jobs_newest_first_filtered_and_by_tenant(store):
    # Two jobs share a millisecond: the id breaks the tie, so the order is total.
    specs = [
        ("1" * 32, "2026-01-01T00:00:00.000Z", "alpha", "demo"),
        ("2" * 32, "2026-01-01T00:00:01.000Z", "alpha", "other"),
        ("3" * 32, "2026-01-01T00:00:01.000Z", "alpha", "demo"),
        ("4" * 32, "2026-01-01T00:00:02.000Z", "bravo", "demo"),
        ("5" * 32, "2026-01-01T00:00:03.000Z", None, "demo"),
    ]
    for job_id, created, tenant, model in specs:
        await new_job(store, job_id, created_at=created, tenant=tenant)
        await store.set_status(job_id, model=model)
    await store.finish("1" * 32, COMPLETED, {"result": {}})

    async def ids(tenant, limit=10, **query) -> list[str]:
        return [j.id[0] for j in await store.page_jobs(JobQuery(tenant, limit, **query))]

    assert await ids("alpha") == ["3", "2", "1"]
    assert await ids("bravo") == ["4"]
    assert await ids(None) == ["5"]
    assert await ids("nobody") == []
    assert await ids("alpha", status="completed") == ["1"]
    assert await ids("alpha", status="pending") == ["3", "2"]
    assert await ids("alpha", model="demo") == ["3", "1"]
    assert await ids("alpha", since="2026-01-01T00:00:01.000Z") == ["3", "2"]
    assert await ids("alpha", limit=1) == ["3"]
    # Strictly older than the cursor, the tie included.
    assert await ids("alpha", before=("2026-01-01T00:00:01.000Z", "3" * 32)) == ["2", "1"]
    assert await ids("alpha", before=("2026-01-01T00:00:01.000Z", "2" * 32)) == ["1"]
    page = await store.page_jobs(JobQuery("alpha", 1))
    assert page[0].filename == "x.wav" and page[0].tenant == "alpha"


async def test_paging_returns_every_job_once_while_jobs_are_added(store):
    before_paging = set()
    for i in range(23):
        job = await new_job(store, f"{i:032x}", tenant="t")
        before_paging.add(job.id)
    seen: list[str] = []
    cursor = None
    added = 0
    while True:
        page = await store.page_jobs(JobQuery("t", 4, before=cursor))
        if not page:
            break
        seen += [j.id for j in page]
        cursor = (page[-1].created_at, page[-1].id)
        # Newer jobs arrive between pages (some in the same millisecond as the cursor).
        for _ in range(3):
            await new_job(store, f"{1000 + added:032x}", tenant="t")
            added += 1
    assert len(seen) == len(set(seen))
    assert before_paging <= set(seen)


async def test_delete_job_removes_record_events_and_slices(store):
    gone = await new_job(store, "d" * 32)
    kept = await new_job(store, "k" * 32)
    await store.add_slices(gone.id, [(0, 10), (10, 10)], [("status", {"stage": "x"})])
    await store.add_slices(kept.id, [(0, 10)], [])
    waiter = asyncio.create_task(store.wait_events(gone.id, 2, timeout=30))
    await asyncio.sleep(0.05)
    assert await store.delete_job(gone.id) is True
    # Its watchers wake up at once and find nothing more.
    assert await asyncio.wait_for(waiter, 5) == []
    assert await store.get(gone.id) is None
    assert await store.events_after(gone.id, 0) == []
    assert await store.slices(gone.id) == []
    assert gone.id not in {j.id for j in await store.page_jobs(JobQuery(None, 10))}
    assert await store.live_ids() == {kept.id}
    assert await store.delete_job(gone.id) is False
    # Writes for the deleted job are refused like those of an ended one.
    assert await store.append_events(gone.id, [("progress", {})]) == []
    assert await store.finish(gone.id, CANCELLED, {"reason": "x"}) is None
    assert len(await store.slices(kept.id)) == 1
    assert [e["seq"] for e in await store.events_after(kept.id, 0)] == [1]


async def test_webhook_state_outlives_the_job_end_and_holds_off_expiry(store):
    pending = {"state": "pending", "attempts": 0}
    hooked = await new_job(store, "w" * 32, callback_url="https://example.com/h", webhook=pending)
    plain = await new_job(store, "p" * 32)
    running = await new_job(store, "n" * 32, callback_url="https://x.example/h", webhook=pending)
    assert await store.pending_webhooks() == []  # none has ended yet
    for job in (hooked, plain):
        await store.finish(job.id, COMPLETED, {"result": {}})
    assert [j.id for j in await store.pending_webhooks()] == [hooked.id]
    assert running.id not in {j.id for j in await store.pending_webhooks()}

    # Kept past its TTL while the webhook is pending; the plain job goes.
    later = time.time() + store.ttl_s + 1
    assert await store.expire(later) == [plain.id]
    tried = {"state": "pending", "attempts": 1, "last_status": 503}
    got = await store.set_webhook(hooked.id, tried)  # the job has ended: still written
    assert got is not None and got.webhook == tried and got.status == COMPLETED
    assert (await store.get(hooked.id)).webhook == tried

    await store.set_webhook(hooked.id, {"state": "delivered", "attempts": 2})
    assert await store.pending_webhooks() == []
    assert await store.expire(later) == [hooked.id]
    assert await store.set_webhook(hooked.id, tried) is None  # gone
