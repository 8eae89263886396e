"""Hostile clients against a real ``aiotranscribe serve``: bodies past the cap, slow headers
and bodies (slowloris), uploads aborted midway, internal details in answers.

One server process serves the module (small limits: 1 MiB uploads, a 3 s header deadline,
a 16 KiB/s body minimum after 2 s). After every test it must still be healthy, transcribe a
normal file, hold nothing in its spool and run no child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import MODEL
from tests.helpers import form
from tests.ui_support import Server, start_server

HEADER_TIMEOUT_S = 3.0
GRACE_S = 2.0
BOUNDARY = "hostileboundary"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hostile")
    srv = start_server(
        MODEL,
        root,
        "--device",
        "cpu",
        "--torch-threads",
        "1",
        "--max-upload-mb",
        "1",
        "--header-timeout-s",
        str(HEADER_TIMEOUT_S),
        "--upload-min-rate-kib-s",
        "16",
        "--upload-grace-s",
        str(GRACE_S),
    )
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def no_leftovers() -> None:
    """The module's server is this process's child for the whole module: ``assert_unharmed``
    checks its spool and its children instead."""


def children_of(pid: int) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[1] == str(pid) and fields[0] != "Z":
                found.append(stat.parent.name)
    return found


async def assert_unharmed(server: Server, wav: Path) -> None:
    """Healthy, still transcribes, nothing in the spool, no child process."""
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/health") as resp:
            assert resp.status == 200
        async with session.post(server.url + "/transcribe", data=form(wav)) as resp:
            assert resp.status == 200, await resp.text()
            assert "hello" in (await resp.json())["text"]
    async with asyncio.timeout(10):
        while any(server.spool.iterdir()) or children_of(server.proc.pid):
            await asyncio.sleep(0.1)


def head(path: str = "/transcribe/async", length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{framing}\r\n\r\n"
    ).encode()


def file_part_start() -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + b"RIFF\x00\x00\x00\x00WAVEfmt "


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(server.url.rsplit(":", 1)[1])
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        while block := await reader.read(65536):
            data.extend(block)
    return bytes(data)


async def test_connection_closes_right_after_413(server, voices):
    """A chunked body that goes on past the cap: the 413 comes, then the connection ends at
    once (aiohttp used to read and discard the rest for its 10 s lingering time)."""
    reader, writer = await connect(server)
    writer.write(head() + chunk(file_part_start()))
    block = chunk(bytes(64 * 1024))
    sent_after = 0
    answered_at: list[float] = []

    async def pump() -> float:
        nonlocal sent_after
        try:
            while True:
                writer.write(block)
                await writer.drain()
                if answered_at:
                    sent_after += len(block)
        except ConnectionError:
            return time.monotonic()

    pumping = asyncio.create_task(pump())
    status_line = await asyncio.wait_for(reader.readline(), 30)
    answered_at.append(time.monotonic())
    assert b" 413 " in status_line, status_line
    cut_at = await asyncio.wait_for(pumping, 30)
    writer.close()
    assert cut_at - answered_at[0] < 2.0, f"still reading {cut_at - answered_at[0]:.1f} s later"
    assert sent_after < 64 * 1024 * 1024, f"{sent_after} bytes taken after the 413"
    await assert_unharmed(server, voices["hello"])


async def test_aborted_upload_is_a_client_close_not_a_server_error(server, voices):
    before = await metrics_of(server)
    _reader, writer = await connect(server)
    writer.write(head(length=500_000) + file_part_start() + bytes(5000))
    await writer.drain()
    await asyncio.sleep(0.5)
    writer.transport.abort()  # the web page's cancel does this mid-upload
    after = before
    async with asyncio.timeout(10):
        while after.get("499", 0) == before.get("499", 0):
            await asyncio.sleep(0.1)
            after = await metrics_of(server)
    assert after.get("500", 0) == before.get("500", 0)
    log = server.log_tail(400)
    assert "client_closed" in log
    assert "unhandled_error" not in log and "Traceback" not in log
    access = [line for line in log.splitlines() if "aiohttp.access" in line and "async" in line]
    assert any('" 499 ' in json.loads(line)["event"] for line in access), access[-3:]
    await assert_unharmed(server, voices["hello"])


async def metrics_of(server: Server) -> dict[str, float]:
    """``aiotranscribe_http_requests_total`` of POST /transcribe/async, by status."""
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/metrics") as resp:
            text = await resp.text()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("aiotranscribe_http_requests_total") and "/transcribe/async" in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = float(line.rsplit(" ", 1)[1])
    return counts


async def test_a_trickled_body_gets_408_and_frees_its_spool(server, voices):
    reader, writer = await connect(server)
    writer.write(head(length=500_000) + file_part_start())
    started = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"\x00")
                await writer.drain()
                await asyncio.sleep(0.5)

    trickling = asyncio.create_task(trickle())
    answer = await asyncio.wait_for(closed_by_server(reader), 30)
    took = time.monotonic() - started
    trickling.cancel()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"request_timeout" in answer
    assert took < GRACE_S + 3, f"cut off after {took:.1f} s"
    await assert_unharmed(server, voices["hello"])


async def test_slowloris_does_not_starve_the_server(server, voices):
    """200 slow connections (half trickle their headers, half their bodies): /health stays
    fast and every one of them is closed within its deadline."""
    conns = []
    for i in range(200):
        reader, writer = await connect(server)
        if i % 2:
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        else:
            writer.write(head(length=500_000) + file_part_start())
        conns.append((reader, writer))
    opened = time.monotonic()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        with contextlib.suppress(ConnectionError):
            while not reader.at_eof():
                writer.write(b"X")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(65536), 1.0)
        writer.close()
        return time.monotonic() - opened

    trickles = [asyncio.create_task(trickle(r, w)) for r, w in conns]
    latencies = []
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            t0 = time.perf_counter()
            async with session.get(server.url + "/health") as resp:
                assert resp.status == 200
                await resp.read()
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.03)
    closed_after = await asyncio.wait_for(asyncio.gather(*trickles), 30)
    p50 = statistics.median(latencies)
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"slowloris: /health p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    # Starved would mean waiting for a slow peer's deadline (seconds). The bounds are loose
    # because this client runs 200 trickling tasks on the same shared cores; the benchmark
    # (make bench) is where latency targets are judged.
    assert p50 < 0.05, f"/health p50 {p50 * 1000:.1f} ms under slowloris"
    assert max(latencies) < 2.0, f"/health waited {max(latencies):.1f} s under slowloris"
    assert max(closed_after) < max(HEADER_TIMEOUT_S, GRACE_S) + 3, max(closed_after)
    await assert_unharmed(server, voices["hello"])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_soak_mixed_traffic(server, voices, media):
    """300 mixed requests, 8 at a time: good files (sync, async + WebSocket, OpenAI), bad
    files, cancels, uploads past the cap, aborted uploads, unknown jobs. No 5xx, an empty
    spool, and the server's RSS grows less than 10 % (measured after a warm-up round)."""
    wav = voices["hello"].read_bytes()
    junk = bytes(range(256)) * 400
    mp3 = media["mp3"].read_bytes()

    async def good_sync(s: aiohttp.ClientSession) -> int:
        async with s.post(server.url + "/transcribe", data=form(data=wav, filename="a.wav")) as r:
            return r.status

    async def good_async_followed(s: aiohttp.ClientSession) -> int:
        async with s.post(
            server.url + "/transcribe/async", data=form(data=wav, filename="a.wav")
        ) as r:
            job_id = (await r.json())["job_id"]
        async with s.ws_connect(f"{server.url}/jobs/{job_id}/events") as ws:
            last = [m.json()["type"] async for m in ws if m.type == aiohttp.WSMsgType.TEXT][-1]
        assert last == "completed", last
        return r.status

    async def cancelled(s: aiohttp.ClientSession) -> int:
        async with s.post(
            server.url + "/transcribe/async", data=form(data=mp3, filename="a.mp3")
        ) as r:
            job_id = (await r.json())["job_id"]
        async with s.post(f"{server.url}/jobs/{job_id}/cancel") as c:
            return c.status

    async def openai_route(s: aiohttp.ClientSession) -> int:
        data = form(data=wav, filename="a.wav", model="demo")
        async with s.post(server.url + "/v1/audio/transcriptions", data=data) as r:
            return r.status

    async def bad_file(s: aiohttp.ClientSession) -> int:
        async with s.post(server.url + "/transcribe", data=form(data=junk, filename="x.mp3")) as r:
            return r.status

    async def truncated(s: aiohttp.ClientSession) -> int:
        data = form(data=mp3[: len(mp3) // 3], filename="t.mp3")
        async with s.post(server.url + "/transcribe", data=data) as r:
            return r.status

    async def over_cap(s: aiohttp.ClientSession) -> int:
        data = form(data=bytes(2 * 1024 * 1024), filename="big.wav")
        try:
            async with s.post(server.url + "/transcribe/async", data=data) as r:
                return r.status
        except aiohttp.ClientError:
            return 413  # cut off while still sending: the connection ends right after the 413

    async def aborted(_s: aiohttp.ClientSession) -> int:
        _reader, writer = await connect(server)
        writer.write(head(length=400_000) + file_part_start() + bytes(20_000))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()
        return 499

    async def unknown_job(s: aiohttp.ClientSession) -> int:
        async with s.get(f"{server.url}/jobs/{'0' * 32}/result") as r:
            return r.status

    kinds = [
        good_sync,
        good_async_followed,
        cancelled,
        openai_route,
        bad_file,
        truncated,
        over_cap,
        aborted,
        unknown_job,
        good_sync,
    ]

    async def run(count: int) -> list[tuple[str, int]]:
        gate = asyncio.Semaphore(8)
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> tuple[str, int]:
                kind = kinds[i % len(kinds)]
                async with gate:
                    return kind.__name__, await kind(session)

            return await asyncio.gather(*(one(i) for i in range(count)))

    await run(30)  # warm-up: first-use allocations are not growth
    await asyncio.sleep(1)
    before = rss_kib(server.proc.pid)
    outcomes = await run(300)
    await asyncio.sleep(1)
    after = rss_kib(server.proc.pid)
    errors = [(name, status) for name, status in outcomes if status >= 500]
    assert errors == []
    assert {status for name, status in outcomes if name == "bad_file"} == {415}
    assert {status for name, status in outcomes if name == "truncated"} == {422}
    assert {status for name, status in outcomes if name == "unknown_job"} == {404}
    growth = (after - before) / before
    print(f"soak: RSS {before / 1024:.0f} MiB -> {after / 1024:.0f} MiB ({growth:+.1%})")
    assert growth < 0.10, f"RSS grew {growth:.1%}"
    await assert_unharmed(server, voices["hello"])
