"""Long-lived answers under hostile or slow peers (issue 17, items 5, 10 and 12).

A WebSocket peer that stops reading is cut off with 1008 and its connection goes away;
history goes out in pages; a finished result is rendered once per format, big ones off the
loop; an SSE stream that has nothing to say sends keep-alive comments.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any

import openai
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from openai.types.audio import TranscriptionTextDoneEvent

from aiotranscribe.api.streamlimits import StreamLimits, stream_limits_key
from aiotranscribe.app import create_app
from aiotranscribe.config import Settings
from aiotranscribe.formats import render
from aiotranscribe.jobs import Job
from aiotranscribe.keys import store_key, websockets_key
from aiotranscribe.rendered import cache_of
from aiotranscribe.store.memory import MemoryStore
from aiotranscribe.workers import Worker, make_worker
from tests.conftest import wait_ready
from tests.helpers import form

PAGE = 100


class CountingStore(MemoryStore):
    """A memory store that remembers how many events each read handed out."""

    def __init__(self) -> None:
        super().__init__(ttl_s=60.0)
        self.reads: list[int] = []

    async def events_after(
        self, job_id: str, seq: int, limit: int | None = None
    ) -> list[dict[str, Any]]:
        events = await super().events_after(job_id, seq, limit)
        self.reads.append(len(events))
        return events


async def start(aiohttp_client: Any, settings: Settings, limits: StreamLimits, **kw: Any) -> Any:
    store = kw.pop("store", None) or CountingStore()
    app = create_app(settings, store=store, **kw)
    app[stream_limits_key] = limits
    return await aiohttp_client(app)


async def add_job(client: TestClient, events: int, pad: int = 0) -> str:
    """A running job with ``events`` segment events (each ``pad`` bytes of text)."""
    store = client.app[store_key]
    job_id = os.urandom(16).hex()
    await store.create(Job(id=job_id, filename="x.wav", model="m", status="processing"), [])
    text = "w" * pad
    batch = [
        ("segment", {"segment": {"id": i, "start": i, "end": i + 1, "text": text, "words": []}})
        for i in range(events)
    ]
    for i in range(0, len(batch), 1000):
        await store.append_events(job_id, batch[i : i + 1000])
    return job_id


def big_result(hours: float = 4.0) -> dict[str, Any]:
    """A synthetic result: a word every 0.4 s, a segment every 10 s."""
    segments: list[dict[str, Any]] = []
    for s in range(int(hours * 3600 / 10)):
        words: list[dict[str, Any]] = [
            {"word": f"word{n}", "start": s * 10 + n * 0.4, "end": s * 10 + n * 0.4 + 0.3}
            for n in range(25)
        ]
        text = " ".join(w["word"] for w in words)
        segments.append(
            {"id": s, "start": s * 10.0, "end": s * 10 + 10.0, "text": text, "words": words}
        )
    text = " ".join(seg["text"] for seg in segments)
    return {"text": text, "segments": segments, "duration": hours * 3600, "language": "en"}


async def add_finished_job(client: TestClient, result: dict[str, Any]) -> str:
    store = client.app[store_key]
    job_id = os.urandom(16).hex()
    await store.create(Job(id=job_id, filename="x.wav", model="m", status="processing"), [])
    await store.finish(job_id, "completed", {"result": result}, result=result, progress=1.0)
    return job_id


# -- item 5: WebSocket slow consumers, pages, resume ------------------------------------------


async def raw_upgrade(client: TestClient, path: str) -> socket.socket:
    """A WebSocket handshake on a socket with a tiny receive buffer, then no more reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.host, client.port))
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {path} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, head.encode())
    got = b""
    while b"\r\n\r\n" not in got:
        got += await loop.sock_recv(sock, 1)  # one byte at a time: leave the frames unread
    assert got.startswith(b"HTTP/1.1 101"), got
    return sock


def server_connections(client: TestClient) -> int:
    return len(client.server.runner.server.connections)  # type: ignore[union-attr]


async def test_a_peer_that_stops_reading_is_cut_off(aiohttp_client, settings):
    limits = StreamLimits(send_timeout_s=0.5, close_timeout_s=0.5, page_events=PAGE)
    client = await start(aiohttp_client, settings, limits)
    # ~12 MB of history: more than the kernel's socket buffers (4 MiB send, 4 KiB receive).
    job_id = await add_job(client, 3000, pad=4000)
    sock = await raw_upgrade(client, f"/jobs/{job_id}/events")
    try:
        sockets = client.app[websockets_key]
        # Filling the buffers takes a moment; then one send timeout and one close timeout.
        async with asyncio.timeout(15):
            while len(sockets) or server_connections(client):
                await asyncio.sleep(0.05)
        # The job is not pinned: it ends and expires like any other.
        store = client.app[store_key]
        await store.finish(job_id, "cancelled", {"reason": "test"})
        assert job_id in await store.expire(2**40)
        assert await store.get(job_id) is None
    finally:
        sock.close()
    # The server still answers.
    assert (await client.get("/health")).status == 200


async def read_frames(sock: socket.socket) -> tuple[int | None, list[dict[str, Any]]]:
    """Read server frames (unmasked) up to a close frame: its code, and the events before."""
    loop = asyncio.get_running_loop()
    buf, events = bytearray(), []
    while chunk := await loop.sock_recv(sock, 65536):
        buf += chunk
        while len(buf) >= 10 or (len(buf) >= 2 and buf[1] & 0x7F < 126):
            size, start = buf[1] & 0x7F, 2
            if size == 126:
                size, start = int.from_bytes(buf[2:4]), 4
            elif size == 127:
                size, start = int.from_bytes(buf[2:10]), 10
            if len(buf) < start + size:
                break
            opcode, payload = buf[0] & 0x0F, bytes(buf[start : start + size])
            del buf[: start + size]
            if opcode == 0x1:
                events.append(json.loads(payload))
            elif opcode == 0x8:
                return int.from_bytes(payload[:2]), events
    return None, events


async def test_a_slow_peer_gets_1008_and_resumes_with_after(aiohttp_client, settings):
    limits = StreamLimits(send_timeout_s=0.5, close_timeout_s=10, page_events=PAGE)
    client = await start(aiohttp_client, settings, limits)
    job_id = await add_job(client, 3000, pad=4000)
    sock = await raw_upgrade(client, f"/jobs/{job_id}/events")
    try:
        # The peer stops reading until the server gives up on it and starts closing...
        async with asyncio.timeout(15):
            while not any(ws.closed for ws in client.app[websockets_key]):
                await asyncio.sleep(0.05)
        # ...then reads again: what was already sent, then the close frame.
        code, events = await read_frames(sock)
    finally:
        sock.close()
    assert code == 1008
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert 0 < len(events) < 3000
    last = events[-1]["seq"]
    store = client.app[store_key]
    async with client.ws_connect(f"/jobs/{job_id}/events?after={last}") as ws:
        await store.finish(job_id, "cancelled", {"reason": "done"})
        rest = [json.loads(m.data)["seq"] async for m in ws]
        assert ws.close_code == 1000
    assert rest == list(range(last + 1, 3000 + 1 + 1))


async def test_history_goes_out_in_pages_and_resume_gets_exactly_the_rest(aiohttp_client, settings):
    limits = StreamLimits(page_events=PAGE)
    client = await start(aiohttp_client, settings, limits)
    store: CountingStore = client.app[store_key]  # type: ignore[assignment]
    job_id = await add_job(client, 1234)
    store.reads.clear()
    async with client.ws_connect(f"/jobs/{job_id}/events?after=321") as ws:
        first = await ws.receive_json(timeout=10)
        assert first["seq"] == 322
        # Live events after the history, then the end.
        await store.append_events(job_id, [("status", {"status": "processing"})] * 3)
        await store.finish(job_id, "cancelled", {"reason": "done"})
        seqs = [first["seq"]]
        async for msg in ws:
            assert msg.type == WSMsgType.TEXT
            seqs.append(json.loads(msg.data)["seq"])
        assert ws.close_code == 1000
    assert seqs == list(range(322, 1234 + 3 + 1 + 1))
    assert store.reads and max(store.reads) <= PAGE


# -- item 10: rendering once per job and format, off the loop ---------------------------------


async def test_a_result_is_rendered_once_per_format(aiohttp_client, settings):
    client = await start(aiohttp_client, settings, StreamLimits())
    result = big_result(hours=0.05)
    job_id = await add_finished_job(client, result)
    cache = cache_of(client.app)
    for fmt in ("srt", "json", "srt", "json", "text"):
        resp = await client.get(f"/jobs/{job_id}/result?format={fmt}")
        assert resp.status == 200
        expected = render(result, fmt)
        if isinstance(expected, dict):
            assert await resp.json() == expected
        else:
            assert await resp.text() == expected
    assert cache.stats.renders == 3 and cache.stats.hits == 2
    for _ in range(2):
        status = await (await client.get(f"/jobs/{job_id}/status")).json()
        assert status["result"] == result and status["status"] == "completed"
    assert cache.stats.renders == 4 and cache.stats.hits == 3
    # Two watchers of the finished job: the completed event is serialised once.
    for _ in range(2):
        async with client.ws_connect(f"/jobs/{job_id}/events") as ws:
            msgs = [json.loads(m.data) async for m in ws]
        assert msgs[-1]["type"] == "completed" and msgs[-1]["result"] == result
    assert cache.stats.renders == 5 and cache.stats.hits == 4
    assert cache.stats.offloaded == 0  # small results stay on the loop: a thread costs more


async def test_a_big_result_renders_off_the_loop(aiohttp_client, settings):
    client = await start(aiohttp_client, settings, StreamLimits())
    result = big_result(hours=1.0)
    job_id = await add_finished_job(client, result)
    cache = cache_of(client.app)
    responses = await asyncio.gather(
        *(client.get(f"/jobs/{job_id}/result?format=vtt") for _ in range(3)),
        client.get("/health"),
    )
    assert [r.status for r in responses] == [200] * 4
    assert await responses[0].text() == render(result, "vtt")
    # Three requests at once: one render, on a thread; the others waited for it.
    assert cache.stats.renders == 1 and cache.stats.offloaded == 1


# -- item 12: SSE keep-alive -------------------------------------------------------------------


class SlowWorker:
    """The real model, answering each batch ``delay`` seconds late (a long job, shortened)."""

    def __init__(self, inner: Worker, delay: float) -> None:
        self.inner, self.delay = inner, delay

    @property
    def pid(self) -> int | None:
        return self.inner.pid

    async def load(self) -> dict[str, Any]:
        return await self.inner.load()

    async def transcribe(
        self, slices: list[tuple[str, int, int]], options: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        await asyncio.sleep(self.delay)
        return await self.inner.transcribe(slices, options)

    async def stop(self, timeout: float = 5.0) -> None:
        await self.inner.stop(timeout)


async def test_a_quiet_sse_stream_sends_keep_alives(aiohttp_client, settings, voices):
    def factory(spec: str) -> Worker:
        return SlowWorker(make_worker("thread", spec, "cpu", 1), delay=1.0)

    limits = StreamLimits(sse_keepalive_s=0.1)
    client = await start(aiohttp_client, settings, limits, worker_factory=factory)
    await wait_ready(client)
    data = form(voices["hello"], model="whisper-1", stream="true")
    async with client.post("/v1/audio/transcriptions", data=data) as resp:
        assert resp.status == 200
        body = (await resp.read()).decode()
    blocks = body.split("\n\n")
    assert blocks[-1] == ""
    first_data = next(i for i, b in enumerate(blocks) if b.startswith("data: "))
    # The second of quiet before the first delta is filled with comments.
    assert blocks[:first_data] and all(b == ": keep-alive" for b in blocks[:first_data])
    assert [json.loads(b[6:])["type"] for b in blocks[first_data:-1] if b.startswith("data: ")] == [
        "transcript.text.delta",
        "transcript.text.done",
    ]
    # The OpenAI SDK's parser skips the comments.
    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x")
    async with oai:
        stream = await oai.audio.transcriptions.create(
            file=voices["hello"], model="whisper-1", stream=True
        )
        events = [event async for event in stream]
    assert [e.type for e in events] == ["transcript.text.delta", "transcript.text.done"]
    done = events[-1]
    assert isinstance(done, TranscriptionTextDoneEvent) and done.text == "hello world"
