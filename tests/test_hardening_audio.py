"""Faults and hostile audio around ffmpeg (issue 17, items 3, 9, 11 and 13).

Truncated WAVs, a full spool, hung and spinning decoders, decoder memory and CPU limits.
Real ffmpeg throughout; small shell scripts stand in for a decoder only where a real one
cannot be made to hang or spin on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import struct
import subprocess
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiotranscribe.pipeline import MAX_CONVERSIONS
from tests.helpers import eventually, form, jobs_of

BYTES_PER_S = 32000  # 16 kHz mono 16-bit


def pcm_of(path: Path) -> bytes:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        return wav.readframes(wav.getnframes())


def riff_wav(pcm: bytes, data_size: int, *, rf64_size: int | None = None) -> bytes:
    """A 16 kHz mono WAV holding ``pcm`` whose ``data`` chunk declares ``data_size`` bytes,
    with a LIST chunk before it (so a reader must walk the chunks); with ``rf64_size`` an
    RF64 file whose ds64 chunk declares that many data bytes."""
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, BYTES_PER_S, 2, 16)
    info = b"INFOISFT" + struct.pack("<I", 6) + b"test\0\0"
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"LIST" + struct.pack("<I", len(info)) + info
    if rf64_size is None:
        body = b"WAVE" + chunks + b"data" + struct.pack("<I", data_size) + pcm
        return b"RIFF" + struct.pack("<I", len(body)) + body
    ds64 = struct.pack("<QQQI", 0xFFFFFFFF, rf64_size, rf64_size // 2, 0)
    body = b"WAVE" + b"ds64" + struct.pack("<I", len(ds64)) + ds64 + chunks
    body += b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm
    return b"RF64" + struct.pack("<I", 0xFFFFFFFF) + body


# -- item 3: a WAV that declares more than it holds ----------------------------------------


@pytest.mark.parametrize("rf64", [False, True], ids=["riff", "rf64"])
async def test_truncated_wav_is_422(client, voices, rf64):
    one_second = pcm_of(voices["digits"])[:BYTES_PER_S]
    declared = 30 * BYTES_PER_S
    data = riff_wav(one_second, 0, rf64_size=declared) if rf64 else riff_wav(one_second, declared)
    resp = await client.post("/transcribe", data=form(data=data, filename="cut.wav"))
    body = await resp.json()
    assert resp.status == 422, body
    assert body["code"] == "truncated" and "cut short" in body["detail"]
    assert "30.0 s" in body["detail"]


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF], ids=["zero", "ffffffff"])
async def test_wav_with_streaming_data_size_is_transcribed(client, voices, size):
    """Recorders that cannot seek back write 0 or 0xFFFFFFFF: unknown, not truncated."""
    data = riff_wav(pcm_of(voices["digits"]), size)
    resp = await client.post("/transcribe", data=form(data=data, filename="live.wav"))
    assert resp.status == 200, await resp.text()
    assert "one two three" in (await resp.json())["text"]


async def test_complete_wav_with_trailing_chunk_is_transcribed(client, voices):
    pcm = pcm_of(voices["digits"])
    data = riff_wav(pcm, len(pcm)) + b"LIST" + struct.pack("<I", 4) + b"INFO"
    resp = await client.post("/transcribe", data=form(data=data, filename="ok.wav"))
    assert resp.status == 200, await resp.text()


# -- item 9: disk full ----------------------------------------------------------------------


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """The spool on a 2 MiB tmpfs (tests run as root; skipped where mounting is refused)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(spool)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", str(spool)], check=True)


async def spool_settles_empty(spool: Path) -> None:
    async def empty() -> bool:
        return not any(spool.iterdir())

    await eventually(empty, timeout=10)


async def still_serving(client, voices) -> None:
    assert (await client.get("/health")).status == 200
    ok = await client.post("/transcribe", data=form(voices["hello"]))
    assert ok.status == 200, await ok.text()
    assert "hello world" in (await ok.json())["text"]


async def test_upload_larger_than_the_free_disk_is_507(small_spool, make_client, voices):
    client = await make_client()
    pcm = bytes(3 * 1024 * 1024)
    resp = await client.post("/transcribe", data=form(data=riff_wav(pcm, len(pcm))))
    body = await resp.json()
    assert resp.status == 507, body
    assert body["code"] == "insufficient_storage"
    assert str(small_spool) not in body["detail"]
    await spool_settles_empty(small_spool)
    await still_serving(client, voices)
    await spool_settles_empty(small_spool)


async def test_a_spool_already_full_is_507_and_leaves_no_directory(
    small_spool, make_client, voices
):
    """Full before the request: even the job directory's marker cannot be written."""
    client = await make_client()
    # Fill the tmpfs to the last byte with a file that is not in a job directory (so the
    # janitor leaves it alone and the spool check below ignores it).
    with contextlib.suppress(OSError), (small_spool / "filler").open("wb") as out:
        while True:
            out.write(bytes(64 * 1024))
            out.flush()
    resp = await client.post("/transcribe", data=form(voices["hello"]))
    body = await resp.json()
    assert resp.status == 507, body
    assert body["code"] == "insufficient_storage"
    assert sorted(p.name for p in small_spool.iterdir()) == ["filler"]
    (small_spool / "filler").unlink()
    await still_serving(client, voices)
    await spool_settles_empty(small_spool)


@pytest.fixture
def tone_mp3(tmp_path: Path) -> Path:
    """120 s of tone: a 240 KB mp3 whose 16 kHz WAV (3.8 MB) cannot fit in 2 MiB."""
    mp3 = tmp_path / "tone.mp3"
    tone = ["-f", "lavfi", "-i", "sine=duration=120", "-ac", "1", "-c:a", "libmp3lame"]
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", *tone, "-b:a", "16k", "-y", str(mp3)], check=True
    )
    return mp3


async def test_conversion_that_fills_the_disk_is_507(small_spool, make_client, voices, tone_mp3):
    client = await make_client()
    resp = await client.post("/transcribe", data=form(tone_mp3))
    body = await resp.json()
    assert resp.status == 507, body
    assert body["code"] == "insufficient_storage"
    assert str(small_spool) not in body["detail"] and "audio.wav" not in body["detail"]
    await spool_settles_empty(small_spool)
    await still_serving(client, voices)
    await spool_settles_empty(small_spool)


# -- item 11: a hung decoder is bounded and does not hold up other conversions ---------------


def script(path: Path, text: str) -> Path:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


async def test_hung_decoders_are_killed_at_their_bound_while_others_convert(
    make_client, voices, tmp_path
):
    pids = tmp_path / "hung.pids"
    # Hangs (with a child, so the whole group must go) on uploads that contain HANGME.
    fake = script(
        tmp_path / "hanging-ffmpeg",
        'for arg; do [ "$prev" = "-i" ] && src=$arg; prev=$arg; done\n'
        f'if grep -q HANGME "$src"; then echo $$ >> {pids}; sleep 600; exit 1; fi\n'
        'exec ffmpeg "$@"\n',
    )
    floor = 10.0
    client = await make_client(ffmpeg=str(fake), convert_min_timeout_s=floor)
    hung = voices["hello"].read_bytes() + b"HANGME"
    started = time.monotonic()
    ids = []
    for _ in range(MAX_CONVERSIONS):  # every conversion slot taken by a hung decoder
        resp = await client.post("/transcribe/async", data=form(data=hung, filename="h.wav"))
        ids.append((await resp.json())["job_id"])

    async def all_hung() -> bool:
        return pids.exists() and len(pids.read_text().split()) == MAX_CONVERSIONS

    await eventually(all_hung, timeout=10)
    async with asyncio.timeout(floor - 1):  # before the hung ones reach their bound
        ok = await client.post("/transcribe", data=form(voices["digits"]))
        assert ok.status == 200, await ok.text()
        assert "one two three" in (await ok.json())["text"]
    groups = [int(p) for p in pids.read_text().split()]
    assert all(group_alive(g) for g in groups), "the hung decoders should still be running"

    async def hung_failed() -> bool:
        jobs = {j.id: j for j in await jobs_of(client)}
        return all(jobs[i].status == "failed" for i in ids)

    await eventually(hung_failed, timeout=floor + 10)
    elapsed = time.monotonic() - started
    assert floor * 0.9 <= elapsed <= floor + 8, elapsed
    jobs = {j.id: j for j in await jobs_of(client)}
    assert {jobs[i].error_code for i in ids} == {"conversion_timeout"}
    assert not any(group_alive(g) for g in groups), "a hung decoder's process group survived"


# -- item 13: decoders run under memory and CPU limits -------------------------------------


def limit_of(limits: str, name: str) -> str:
    line = next(ln for ln in limits.splitlines() if ln.startswith(name))
    return line[len(name) :].split()[0]  # the soft limit


@pytest.mark.parametrize(
    ("overrides", "mem_mb", "cpu"),
    [({}, 2048, None), ({"ffmpeg_max_memory_mb": 1000, "ffmpeg_max_cpu_s": 7}, 1000, 7)],
    ids=["defaults", "configured"],
)
async def test_decoders_run_under_memory_and_cpu_limits(
    make_client, voices, tmp_path, overrides, mem_mb, cpu
):
    tools = {
        tool: script(
            tmp_path / f"limits-{tool}",
            f'cat /proc/$$/limits > {tmp_path}/{tool}.limits\nexec {tool} "$@"\n',
        )
        for tool in ("ffmpeg", "ffprobe")
    }
    client = await make_client(
        ffmpeg=str(tools["ffmpeg"]), ffprobe=str(tools["ffprobe"]), **overrides
    )
    resp = await client.post("/transcribe", data=form(voices["hello"]))
    assert resp.status == 200, await resp.text()
    for tool in ("ffmpeg", "ffprobe"):
        limits = (tmp_path / f"{tool}.limits").read_text()
        assert limit_of(limits, "Max address space") == str(mem_mb * 1024 * 1024), limits
        cpu_s = int(limit_of(limits, "Max cpu time"))
        if cpu is not None:
            assert cpu_s == cpu
        else:  # the wall-clock limit, rounded up: the floor plus a little for ffmpeg
            assert cpu_s == 30 if tool == "ffprobe" else 60 <= cpu_s <= 62, limits


async def test_memory_limit_too_small_for_the_decoder_is_422(make_client, voices):
    client = await make_client(ffmpeg_max_memory_mb=64)
    resp = await client.post("/transcribe", data=form(voices["hello"]))
    body = await resp.json()
    assert resp.status == 422, body
    assert body["code"] == "too_complex" and "memory" in body["detail"]


async def test_cpu_limit_kills_a_spinning_decoder(make_client, voices, tmp_path):
    spinner = script(tmp_path / "spinning-ffmpeg", "while :; do :; done\n")
    client = await make_client(ffmpeg=str(spinner), ffmpeg_max_cpu_s=1)
    started = time.monotonic()
    async with asyncio.timeout(20):  # far below the 60 s wall-clock floor
        resp = await client.post("/transcribe", data=form(voices["hello"]))
    body = await resp.json()
    assert resp.status == 422, body
    assert body["code"] == "too_complex" and "CPU" in body["detail"]
    assert time.monotonic() - started < 15
