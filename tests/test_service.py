"""The service's guarantees that need no model: exactly one terminal state, whatever the
timing of a cancel."""

from __future__ import annotations

from pathlib import Path

from aiotranscribe.admission import Admission
from aiotranscribe.janitor import Janitor
from aiotranscribe.jobs import Job
from aiotranscribe.service import TranscriptionService
from aiotranscribe.store import MemoryStore


async def test_a_job_cancelled_before_its_task_first_runs_still_ends(settings, tmp_path: Path):
    store = MemoryStore()
    await store.open()

    async def live() -> set[str]:
        return set()

    janitor = Janitor(tmp_path / "spool", live)
    service = TranscriptionService(
        settings, store, {}, janitor, Admission(3600, 60, lambda _model: None)
    )
    job = Job(id="c" * 32, filename="x.wav", model="demo", kind="wav")
    await store.create(job, [("status", {"status": "pending", "stage": "queued"})])
    # The memory store never suspends, so the job task is created but has not run a step
    # when the cancel reaches it.
    assert await service.recover() == [job.id]
    final = await service.cancel(job.id, "changed my mind")
    assert final.status == "cancelled"
    events = await store.events_after(job.id, 0)
    assert [e["type"] for e in events] == ["status", "status", "cancelled"]
    assert events[-1]["reason"] == "changed my mind"
    assert service.admission.used("demo") == 0 and not service.active
    await store.close()


async def test_a_poisonous_slice_fails_only_its_own_job(tmp_path: Path, voices):
    """A batch that errors is retried slice by slice: the good job gets its text, the bad
    one its own error, and neither sees the other's."""
    import asyncio
    import wave

    import pytest

    from aiotranscribe.pool import InferencePool
    from aiotranscribe.workers import ThreadWorker, WorkerError
    from tests.conftest import MODEL

    store = MemoryStore()
    await store.open()
    good, bad = "a" * 32, "b" * 32
    with wave.open(str(voices["hello"])) as w:
        frames = w.getnframes()
    for job_id in (good, bad):
        await store.create(Job(id=job_id, filename="x.wav", model="demo"), [])
        await store.add_slices(job_id, [(0, frames)], [])
    pool = InferencePool("demo", lambda _device: ThreadWorker(MODEL, "cpu", 1), store, batch_size=8)
    pool.start()
    try:
        async with asyncio.timeout(120):
            while pool.state != "ready":
                await asyncio.sleep(0.05)
        # Queued together, before the batcher runs: one batch of two.
        (ok,) = pool.submit(good, [(0, str(voices["hello"]), 0, frames)])
        (poisoned,) = pool.submit(bad, [(0, str(tmp_path / "gone.wav"), 0, frames)])
        assert (await ok)["text"] == "hello world"
        with pytest.raises(WorkerError) as failure:
            await poisoned
        assert "gone.wav" in failure.value.message
        assert pool.stats.split_batches == 1
        records = await store.slices(good)
        assert records[0].state == "done" and records[0].result["text"] == "hello world"
    finally:
        await pool.close()
        await store.close()
