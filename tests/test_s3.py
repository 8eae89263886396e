"""``audio_url=s3://bucket/key`` against a real S3-compatible server (moto's, on loopback)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import form
from tests.ui_support import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server in a child process (stopped after the test), and credentials."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def put_objects(endpoint: str, objects: dict[str, bytes]) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=endpoint) as client:
        for attempt in range(100):  # the server is still starting
            try:
                await client.create_bucket(Bucket="audio")
                break
            except Exception:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.1)
        for key, body in objects.items():
            await client.put_object(Bucket="audio", Key=key, Body=body)


def audio_url(value: str) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("audio_url", value)
    return data


async def test_an_s3_object_transcribes_like_an_upload(make_client, s3_endpoint, voices, tmp_path):
    wav = voices["hello"].read_bytes()
    await put_objects(s3_endpoint, {"calls/hello.wav": wav, "big.wav": wav * 40})
    client = await make_client(s3_endpoint_url=s3_endpoint, max_upload_mb=len(wav) * 2 / 2**20)
    uploaded = await (await client.post("/transcribe", data=form(voices["hello"]))).json()

    resp = await client.post("/transcribe", data=audio_url("s3://audio/calls/hello.wav"))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["text"] == uploaded["text"] == "hello world"
    assert body["filename"] == "hello.wav"

    resp = await client.post("/transcribe", data=audio_url("s3://audio/missing.wav"))
    assert resp.status == 422 and (await resp.json())["code"] == "url_unreachable"
    resp = await client.post("/transcribe", data=audio_url("s3://audio/big.wav"))
    assert resp.status == 413 and (await resp.json())["code"] == "too_large"
    resp = await client.post("/transcribe", data=audio_url("s3://audio"))
    assert resp.status == 400 and (await resp.json())["code"] == "bad_request"
    # (no_leftovers checks that the refused ones left nothing in the spool)


async def test_without_credentials_s3_is_refused(make_client, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = await make_client()
    resp = await client.post("/transcribe", data=audio_url("s3://audio/calls/hello.wav"))
    body = await resp.json()
    assert resp.status == 400 and body["code"] == "url_unsupported"
    assert "credentials" in body["detail"]
