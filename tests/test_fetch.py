"""Audio by URL: ``audio_url`` fetched like an upload (cap, sniff, spool), under the SSRF rules,
with clear 4xx answers when it cannot be had. Real servers on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import eventually, form
from tests.origins import Canary, Origin


def fields(**values: str) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in values.items():
        data.add_field(name, value)
    return data


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = await Origin().start()
    yield server
    await server.close()


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    server = await Canary().start("127.0.0.1", "::1")
    yield server
    await server.close()


def serve_file(path: Path):
    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path)

    return handler


def spool_dirs(settings_dir: Path) -> list[str]:
    return [p.name for p in settings_dir.iterdir()] if settings_dir.exists() else []


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    body = await resp.json()
    code = body["error"]["code"] if "error" in body else body["code"]
    return resp.status, code


async def test_audio_url_gives_the_same_transcript_as_an_upload(make_client, origin, voices):
    url = origin.on("/speech/hello.wav", serve_file(voices["hello"]))
    client = await make_client(allow_private_urls=True)
    uploaded = await client.post("/transcribe", data=form(voices["hello"]))
    fetched = await client.post("/transcribe", data=fields(audio_url=url))
    assert uploaded.status == 200 and fetched.status == 200, await fetched.text()
    a, b = await uploaded.json(), await fetched.json()
    assert b["text"] == a["text"] == "hello world"
    assert b["segments"] == a["segments"]
    assert b["filename"] == "hello.wav"
    assert [h.method for h in origin.hits] == ["GET"]

    # The async route and the OpenAI route take it too.
    resp = await client.post("/transcribe/async", data=fields(audio_url=url))
    assert resp.status == 200
    resp = await client.post("/v1/audio/transcriptions", data=fields(audio_url=url, model="x"))
    assert resp.status == 400  # the form is checked before anything is fetched
    resp = await client.post("/v1/audio/transcriptions", data=fields(audio_url=url))
    assert resp.status == 200 and (await resp.json())["text"] == "hello world"
    assert len(origin.hits) == 3


async def test_ssrf_targets_are_refused_without_a_connection(make_client, canary):
    client = await make_client()  # allow_private_urls off: the default
    port4, port6 = canary.port("127.0.0.1"), canary.port("::1")
    refused = [
        f"http://127.0.0.1:{port4}/a.wav",
        "http://169.254.169.254/latest/meta-data/",
        f"http://[::1]:{port6}/a.wav",
        f"http://localhost:{port4}/a.wav",  # a name that resolves to loopback
        f"http://[::ffff:127.0.0.1]:{port4}/a.wav",  # IPv4-mapped IPv6
        f"http://2130706433:{port4}/a.wav",  # 127.0.0.1 as one number
        f"http://0.0.0.0:{port4}/a.wav",
        "http://10.0.0.1/a.wav",
        "file:///etc/passwd",
        f"gopher://127.0.0.1:{port4}/_GET%20/",
    ]
    for url in refused:
        resp = await client.post("/transcribe", data=fields(audio_url=url))
        assert await error_of(resp) == (400, "url_forbidden"), url
    resp = await client.post("/v1/audio/transcriptions", data=fields(audio_url=refused[0]))
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "audio_url"
    assert canary.connections == 0


async def test_a_redirect_to_loopback_is_refused(make_client, canary, voices):
    # The origin is exempted by address, so only the redirect's target is refused.
    origin = await Origin(host="127.0.0.2").start()
    try:
        target = f"http://127.0.0.1:{canary.port('127.0.0.1')}/a.wav"

        async def to_canary(_request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(target)

        async def to_speech(_request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound("/hello.wav")

        origin.on("/hello.wav", serve_file(voices["hello"]))
        bounce = origin.on("/bounce", to_canary)
        hop = origin.on("/hop", to_speech)
        client = await make_client(allowed_networks=("127.0.0.2/32",))
        resp = await client.post("/transcribe", data=fields(audio_url=bounce))
        assert await error_of(resp) == (400, "url_forbidden")
        assert canary.connections == 0
        # A redirect within what is allowed is followed.
        resp = await client.post("/transcribe", data=fields(audio_url=hop))
        assert resp.status == 200 and (await resp.json())["text"] == "hello world"
        assert [h.path for h in origin.hits] == ["/bounce", "/hop", "/hello.wav"]
    finally:
        await origin.close()


async def test_too_large_is_413_and_leaves_nothing(make_client, settings, origin, voices):
    wav = voices["hello"].read_bytes()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to judge by
        await response.prepare(request)
        await response.write(wav[:44])
        for _ in range(64):
            await response.write(b"\0" * 16384)
        return response

    async def declared(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=wav[:44] + b"\0" * 1_000_000, content_type="audio/wav")

    client = await make_client(allow_private_urls=True, max_upload_mb=0.25)
    for url in (origin.on("/endless.wav", endless), origin.on("/big.wav", declared)):
        resp = await client.post("/transcribe", data=fields(audio_url=url))
        assert await error_of(resp) == (413, "too_large")

    async def spool_empty() -> bool:
        return spool_dirs(settings.spool_dir) == []

    await eventually(spool_empty, timeout=10)


async def test_unreachable_urls_are_422(make_client, origin):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(10)
        return web.Response(text="late")

    client = await make_client(allow_private_urls=True, fetch_timeout_s=0.5)
    for url in (
        f"http://127.0.0.1:{closed_port}/a.wav",  # connection refused
        origin.url("/missing.wav"),  # 404
        origin.on("/slow.wav", slow),  # past fetch_timeout_s
    ):
        started = asyncio.get_running_loop().time()
        resp = await client.post("/transcribe", data=fields(audio_url=url))
        assert await error_of(resp) == (422, "url_unreachable"), url
        assert asyncio.get_running_loop().time() - started < 5


async def test_bad_audio_urls_are_400_or_415(make_client, origin, voices):
    async def text(_request: web.Request) -> web.StreamResponse:
        return web.Response(text="not audio at all, just some text " * 400)

    client = await make_client(allow_private_urls=True)
    cases = [
        ({"audio_url": origin.on("/page.wav", text)}, (415, "unsupported_media_type")),
        ({"audio_url": "s3://bucket/key.wav"}, (400, "url_unsupported")),
        ({"audio_url": "not a url"}, (400, "bad_request")),
        ({"audio_url": "/relative.wav"}, (400, "bad_request")),
    ]
    for values, expected in cases:
        resp = await client.post("/transcribe", data=fields(**values))
        assert await error_of(resp) == expected, values
    both = form(voices["hello"], audio_url=origin.url("/page.wav"))
    resp = await client.post("/transcribe", data=both)
    assert await error_of(resp) == (400, "bad_request")
