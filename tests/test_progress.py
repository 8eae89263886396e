"""Progress that moves, an ETA that counts each second once, and a queue position that is
kept current while a job waits: judged on event sequences, never on timing."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from aiotranscribe.admission import Admission
from aiotranscribe.app import create_app
from aiotranscribe.pipeline import Pipeline
from aiotranscribe.pool import InferencePool
from aiotranscribe.store import MemoryStore
from aiotranscribe.workers import Worker, make_worker
from tests import speech
from tests.conftest import wait_ready
from tests.test_hardening_streams import SlowWorker
from tests.test_jobs import pool_of, submit, wait_for, watch


@pytest.fixture(scope="module")
def upload_150s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = speech.long_speech(150.0, tmp_path_factory.mktemp("s150"))
    return path


async def test_a_150_s_upload_with_default_settings_reports_steady_progress(
    make_client, upload_150s
):
    client = await make_client()  # default chunk_seconds and batch_size
    job_id = await submit(client, upload_150s)
    events, _ = await watch(client, job_id)
    assert events[-1]["type"] == "completed"
    progress = [e for e in events if e["type"] == "progress"]
    values = [e["progress"] for e in progress]
    assert values == sorted(values) and values[-1] == 1.0
    # Its slices do not all land in one batch: the first batches of a new job are small.
    assert len(set(values)) >= 4, values
    done = [e["chunks_done"] for e in progress if e["chunks_total"]]
    assert done[:2] == [0, 1], done  # the first batch held one slice
    assert pool_of(client).stats.batches >= 4


async def test_a_lone_jobs_eta_counts_its_audio_once():
    store = MemoryStore()
    pool = InferencePool("m", lambda _device: unused_worker(), store, batch_size=8)
    pipeline = Pipeline(None, store, Admission(3600, 60, lambda _m: None), {})
    assert pipeline._eta(pool, "lone", 160.0) is None  # no speed measured yet
    pool.stats.audio_s, pool.stats.busy_s = 100.0, 10.0  # 10 audio seconds per second
    rate = pool.sample_rate
    pool.submit("lone", [(i, "x.wav", 0, 20 * rate) for i in range(8)])
    assert pipeline._eta(pool, "lone", 160.0) == 16.0
    # Another job of 40 s is served alongside: it adds its 40 s, no more.
    pool.submit("other", [(i, "x.wav", 0, 20 * rate) for i in range(2)])
    assert pipeline._eta(pool, "lone", 160.0) == 20.0
    # A job still converting waits behind both, each up to its own length.
    assert pipeline._eta(pool, "new", 30.0) == (30 + 30 + 30) / 10
    for task in pool.queue.remove_all():
        task.future.cancel()


def unused_worker() -> Worker:
    raise AssertionError("the pool is never started here")


async def test_queue_position_is_published_while_a_job_waits(
    aiohttp_client, settings, long_audio, voices
):
    def factory(spec: str) -> Worker:
        # Each batch a little late: the first job runs while the others queue behind it.
        return SlowWorker(make_worker("thread", spec, "cpu", 1), delay=0.1)

    app = create_app(settings.replace(chunk_seconds=5, batch_size=1), worker_factory=factory)
    client = await aiohttp_client(app)
    await wait_ready(client)
    pool = pool_of(client)
    first = await submit(client, long_audio[0])
    await wait_for(lambda: pool.stats.batches >= 1)
    second = await submit(client, voices["hello"])
    third = await submit(client, voices["digits"])
    (ev2, _), (ev3, _), (ev1, _) = await asyncio.gather(
        watch(client, second), watch(client, third), watch(client, first)
    )
    for events in (ev1, ev2, ev3):
        assert events[-1]["type"] == "completed"
    for events in (ev2, ev3):
        statuses = [e for e in events if e["type"] == "status"]
        stages = [e["stage"] for e in statuses]
        assert stages[:3] == ["queued", "converting", "transcribing"]
        # Converting: not in the model's line yet.
        assert statuses[1]["queue_position"] is None
        waiting = [e["queue_position"] for e in statuses[2:]]
        # A place in line while it waits, then null once it runs. The first is where it
        # was to join (another job may join first); once in line it only moves forward.
        assert waiting[-1] is None and all(isinstance(p, int) for p in waiting[:-1]), waiting
        assert max(waiting[:-1]) >= 2 and waiting[1:-1] == sorted(waiting[1:-1], reverse=True)
        assert all(a != b for a, b in itertools.pairwise(waiting)), waiting  # changes only
        # Nothing was transcribed before the job left the line.
        running = events.index(statuses[-1])
        assert all(
            e.get("chunks_done", 0) == 0 for e in events[:running] if e["type"] == "progress"
        )
    # The first job was already running: it was never given a place in line again.
    late = [e for e in ev1 if e["type"] == "status" and e["stage"] == "transcribing"]
    assert [e["queue_position"] for e in late] == [1, None]
