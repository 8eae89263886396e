"""Audio for workers on other machines (issue 14, item 3): slice entries name their audio
inside ``--shared-dir`` or in S3 (moto's server on loopback), never carry it; a janitor on the
shared dir leaves uploads alone; workers skip the slices of jobs that have ended. Real worker
subprocesses on a real redis-server; servers are apps in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis

from aiotranscribe.blobstore import PART_BYTES, BlobError, BlobStore, data_offset
from aiotranscribe.claimcheck import AudioUnavailable, Claims, write_wav
from aiotranscribe.cli import main
from aiotranscribe.janitor import MARKER, move_job_dir, new_job_dir
from aiotranscribe.jobs import CANCELLED
from aiotranscribe.keys import janitor_key
from aiotranscribe.remote import queue_key
from aiotranscribe.store.redis import connect, ended_jobs
from tests import test_remote_workers, test_s3
from tests.test_remote_workers import (
    WorkerProc,
    check_history,
    queue_drained,
    submit,
    wait_loaded,
    watch,
)
from tests.test_s3 import put_objects

# Fixtures of those modules, used here too.
workers = test_remote_workers.workers
s3_endpoint = test_s3.s3_endpoint

# The bytes of one 16 kHz mono int16 frame, and ffmpeg's -bitexact WAV header.
FRAME_BYTES, HEADER_BYTES = 2, 44


@contextlib.asynccontextmanager
async def stopped(worker: WorkerProc) -> AsyncIterator[None]:
    """The worker holds still (SIGSTOP) meanwhile: what is sent waits in the stream."""
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)


async def queued_entries(redis_url: str) -> list[dict[str, str]]:
    """The slice entries in the work stream, once there are some."""
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as raw:
        async with asyncio.timeout(60):
            while not (found := await raw.xrange(queue_key("demo"))):
                await asyncio.sleep(0.05)
    return [fields for _, fields in found]


async def emptied(directory: Path) -> None:
    """Wait until ``directory`` holds nothing (the janitor removes off the event loop)."""
    async with asyncio.timeout(10):
        while any(directory.iterdir()):
            await asyncio.sleep(0.05)


async def test_a_worker_reads_the_shared_dir_by_a_name_relative_to_it(
    make_client, redis_url, workers, voices, tmp_path
):
    shared, mount = tmp_path / "shared", tmp_path / "worker-mount"
    shared.mkdir()
    mount.symlink_to(shared)  # the same volume, mounted elsewhere on the worker's host
    worker = workers("w1", extra=["--shared-dir", str(mount)])
    await wait_loaded(worker)
    client = await make_client(store=redis_url, no_workers=True, shared_dir=shared)
    async with stopped(worker):
        job_id = await submit(client, voices["digits"])
        (entry,) = await queued_entries(redis_url)
    # A name inside the shared dir, the job's id, no path on the server's host, no audio.
    assert entry["blob"] == f"shared:{job_id}/audio.wav"
    assert entry["job"] == job_id and "path" not in entry
    assert sum(len(k) + len(v) for k, v in entry.items()) < 1024
    events = await watch(client, job_id)
    check_history(events)
    assert events[-1]["result"]["text"] == "one two three four five"
    assert worker.batches()[-1]["slices"] == 1
    await queue_drained(redis_url)
    await emptied(shared)  # the job's directory went with the job


async def s3_objects(endpoint: str) -> dict[str, int]:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=endpoint) as client:
        listed = await client.list_objects_v2(Bucket="audio")
    return {o["Key"]: o["Size"] for o in listed.get("Contents", [])}


async def test_a_worker_fetches_just_its_slices_bytes_from_s3(
    make_client, redis_url, workers, s3_endpoint, long_audio, tmp_path, monkeypatch
):
    path, texts = long_audio
    await put_objects(s3_endpoint, {})  # the bucket
    scratch_root = tmp_path / "worker-tmp"  # where the worker writes fetched slices
    scratch_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch_root))
    # No shared dir on the server; the worker's has nothing of the job: only S3 can serve.
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    worker = workers("w1", extra=["--shared-dir", str(empty), "--s3-endpoint-url", s3_endpoint])
    await wait_loaded(worker)
    client = await make_client(
        store=redis_url,
        no_workers=True,
        blob_store="s3://audio/jobs",
        s3_endpoint_url=s3_endpoint,
        chunk_seconds=5,
    )
    async with stopped(worker):
        job_id = await submit(client, path)
        entries = await queued_entries(redis_url)
        objects = await s3_objects(s3_endpoint)
    key = f"jobs/{job_id}/audio.wav"
    assert list(objects) == [key]  # put once, before any slice was sent
    for entry in entries:
        assert entry["blob"] == f"s3://audio/{key}" and entry["job"] == job_id
        assert int(entry["offset"]) == HEADER_BYTES and "path" not in entry
    events = await watch(client, job_id)
    check_history(events)
    assert len(events[-1]["result"]["text"].split()) > 0.9 * len(" ".join(texts).split())
    batches = worker.batches()
    assert not any(b["redelivered"] for b in batches)
    # Each slice's bytes once, and nothing else: the object's size less its header.
    assert sum(b["fetched_bytes"] for b in batches) == objects[key] - HEADER_BYTES
    assert sum(b["slices"] for b in batches) > 1
    async with asyncio.timeout(10):  # the object goes with the job's audio
        while await s3_objects(s3_endpoint):
            await asyncio.sleep(0.1)
    resp = await client.delete(f"/jobs/{job_id}")
    assert resp.status == 200
    assert await s3_objects(s3_endpoint) == {}
    (scratch,) = scratch_root.glob("aiotranscribe-worker-*")
    assert list(scratch.iterdir()) == []  # fetched slices do not pile up
    await queue_drained(redis_url)


async def slow_form(path: Path, seconds: float) -> aiohttp.FormData:
    """A multipart upload of ``path`` that trickles in over ``seconds``."""
    body = path.read_bytes()
    step = max(len(body) // 20, 1)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), step):
            yield body[start : start + step]
            await asyncio.sleep(seconds / 20)

    data = aiohttp.FormData()
    data.add_field("file", chunks(), filename="slow.wav", content_type="audio/wav")
    return data


async def test_a_janitor_on_the_shared_dir_leaves_an_upload_under_way_alone(
    make_client, redis_url, workers, voices, tmp_path
):
    """Replica B sweeps the shared dir every 50 ms while replica A receives an upload: A's
    job directory appears there only once the job is in the store, so B never takes it."""
    shared = tmp_path / "shared"
    worker = workers("w1", extra=["--shared-dir", str(shared)])
    await wait_loaded(worker)
    flags: dict[str, Any] = {"store": redis_url, "no_workers": True, "shared_dir": shared}
    one = await make_client(**flags)
    two = await make_client(spool_dir=tmp_path / "spool-2", janitor_interval_s=0.05, **flags)
    # An orphan of a crashed upload in the shared dir: B's janitor does sweep there.
    sweeper = two.app[janitor_key]
    before = sweeper.removed
    orphan = new_job_dir(shared, "0" * 32)
    # Counted once the removal (in a thread) has returned, which can be after it is gone.
    async with asyncio.timeout(10):
        while orphan.exists() or sweeper.removed == before:
            await asyncio.sleep(0.05)
    removed = sweeper.removed
    resp = await one.post("/transcribe", data=await slow_form(voices["digits"], 2.0))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["text"] == "one two three four five"
    assert sweeper.removed == removed  # nothing of A's job was swept by B
    await emptied(shared)
    assert list((tmp_path / "spool-2").iterdir()) == []
    await queue_drained(redis_url)


async def test_slices_of_a_job_cancelled_while_they_wait_are_not_computed(
    make_client, redis_url, workers, long_audio
):
    path, _ = long_audio
    worker = workers("w1", batch_size=8)
    await wait_loaded(worker)
    client = await make_client(
        store=redis_url, no_workers=True, batch_size=4, workers=2, chunk_seconds=2
    )
    async with stopped(worker):
        job_id = await submit(client, path)
        waiting = await queued_entries(redis_url)
        resp = await client.post(f"/jobs/{job_id}/cancel")
        assert resp.status == 200, await resp.text()
        status = await (await client.get(f"/jobs/{job_id}/status")).json()
        assert status["status"] == CANCELLED
    await queue_drained(redis_url)
    async with asyncio.timeout(10):
        while sum(b["skipped"] for b in worker.batches()) < len(waiting):
            await asyncio.sleep(0.05)
    batches = worker.batches()
    assert sum(b["slices"] for b in batches) == 0, batches  # none computed
    assert sum(b["skipped"] for b in batches) >= len(waiting) > 0
    events = await watch(client, job_id)
    assert [e["type"] for e in events].count(CANCELLED) == 1
    assert not any(e["type"] == "segment" for e in events)


async def test_ended_jobs_reads_the_status_of_each(redis_url, make_client, voices):
    client = await make_client(store=redis_url)
    done = await submit(client, voices["hello"])
    await watch(client, done)
    running = "f" * 32  # a record whose status is not terminal
    gone = "e" * 32  # no record at all (deleted, expired)
    async with contextlib.aclosing(connect(redis_url)) as redis:
        await redis.hset(f"job:{{{running}}}", "status", '"processing"')
        assert await ended_jobs(redis, [done, running, gone]) == {done, gone}
        assert await ended_jobs(redis, []) == set()
        await redis.delete(f"job:{{{running}}}")


def test_moving_a_job_dir_into_the_shared_dir_redoes_a_cut_off_copy(tmp_path):
    spool, shared = tmp_path / "spool", tmp_path / "shared"
    shared.mkdir()
    job_id = "a" * 32
    src = new_job_dir(spool, job_id)
    (src / "upload").write_bytes(b"x" * 1000)
    # A copy cut off by a crash: the target exists, with part of the upload.
    dst = shared / job_id
    dst.mkdir()
    (dst / "upload.part").write_bytes(b"x" * 10)
    move_job_dir(src, dst)
    assert not src.exists()
    assert (dst / "upload").read_bytes() == b"x" * 1000
    assert sorted(p.name for p in dst.iterdir()) == sorted([MARKER, "upload"])
    move_job_dir(src, dst)  # moved already (a resume): nothing to do
    # The plain case: one rename.
    other = new_job_dir(spool, "b" * 32)
    move_job_dir(other, shared / other.name)
    assert (shared / other.name / MARKER).is_file() and not other.exists()


@pytest.mark.parametrize(
    "blob", ["shared:../etc/passwd", "shared:/etc/passwd", "shared:", "ftp://x/y"]
)
async def test_a_worker_refuses_names_that_leave_the_shared_dir(blob, tmp_path):
    claims = Claims(tmp_path, tmp_path)
    with pytest.raises(AudioUnavailable):
        await claims.resolve("1-0", {"blob": blob, "start": "0", "frames": "16"})
    assert await claims.resolve(
        "1-0", {"blob": "shared:a/audio.wav", "start": "3", "frames": "9"}
    ) == (
        str(tmp_path / "a" / "audio.wav"),
        3,
        9,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shared-dir", "shared"], "--shared-dir needs --store redis://"),
        (["--store", "redis://127.0.0.1:1/0", "--blob-store", "s3://b/p"], "needs --no-workers"),
        (
            ["--store", "redis://127.0.0.1:1/0", "--no-workers", "--blob-store", "https://b/p"],
            "--blob-store: expected s3://bucket/prefix",
        ),
    ],
)
def test_claim_check_flags_are_checked_at_start(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


async def test_a_big_wav_goes_up_in_parts_and_a_slice_reads_back_by_range(s3_endpoint, tmp_path):
    await put_objects(s3_endpoint, {})
    frames = PART_BYTES // FRAME_BYTES + 123_456  # two parts, the last a short one
    pcm = (np.arange(frames) % 30011).astype("<i2").tobytes()
    wav = tmp_path / "audio.wav"
    write_wav(wav, pcm)
    blobs = BlobStore("s3://audio/jobs/", s3_endpoint)
    await blobs.s3.open()
    try:
        job_id = "c" * 32
        await blobs.publish(job_id, wav)
        assert await s3_objects(s3_endpoint) == {f"jobs/{job_id}/audio.wav": wav.stat().st_size}
        await blobs.publish(job_id, wav)  # a resumed job: there already
        start, count = frames - 1000, 1000  # the end of the second part
        got = await blobs.s3.read_frames(blobs.url(job_id), data_offset(wav), start, count)
        assert got == pcm[start * FRAME_BYTES :]
        with pytest.raises(BlobError):  # past the end
            await blobs.s3.read_frames(blobs.url(job_id), data_offset(wav), frames, 10)
        await blobs.delete(job_id)
        assert await s3_objects(s3_endpoint) == {}
        await blobs.delete(job_id)  # gone already: no error
    finally:
        await blobs.s3.close()
