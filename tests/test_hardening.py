"""Bad input: clear errors with the right status, and nothing left behind (400/413/415/422)."""

from __future__ import annotations

import random
import stat
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import form, jobs_of

HLS_PLAYLIST = (
    b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
)


@pytest.fixture
def logged_ffmpeg(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """ffmpeg and ffprobe wrappers that log each start, then run the real binaries."""
    log = tmp_path / "ffmpeg-starts.log"
    paths = {}
    for tool in ("ffmpeg", "ffprobe"):
        wrapper = tmp_path / f"logged-{tool}"
        wrapper.write_text(f'#!/bin/sh\necho {tool} "$@" >> {log}\nexec {tool} "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
        paths[tool] = str(wrapper)
    return log, paths


async def test_hls_playlist_named_mp3_is_refused_before_ffmpeg(make_client, logged_ffmpeg, media):
    log, tools = logged_ffmpeg
    client = await make_client(ffmpeg=tools["ffmpeg"], ffprobe=tools["ffprobe"])
    resp = await client.post("/transcribe", data=form(data=HLS_PLAYLIST, filename="x.mp3"))
    assert resp.status == 415
    body = await resp.json()
    assert body["code"] == "unsupported_media_type" and "not audio" in body["detail"]
    assert not log.exists(), "ffmpeg must not run on a refused upload"
    # The wrappers do log real conversions, so the check above can fail.
    ok = await client.post("/transcribe", data=form(media["mp3"]))
    assert ok.status == 200
    assert "-protocol_whitelist file,pipe" in log.read_text()
    assert "-f mp3" in log.read_text()


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (random.Random(7).randbytes(200_000), 415, "unsupported_media_type"),
        (b"", 400, "empty_file"),
        (b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(100), 415, "unsupported_media_type"),
        (b"fLaC" + random.Random(3).randbytes(5000), 422, "undecodable"),
    ],
    ids=["random-bytes", "empty", "avi-riff", "flac-magic-then-junk"],
)
async def test_not_audio(client, payload, status, code):
    resp = await client.post("/transcribe", data=form(data=payload, filename="clip.wav"))
    assert resp.status == status
    body = await resp.json()
    assert body["code"] == code and body["detail"]


async def test_truncated_mp3_is_422(client, tmp_path, voices):
    from tests import speech

    long_mp3 = speech.encode(
        speech.concat([voices["digits"], voices["command"], voices["hello"]], tmp_path / "l.wav"),
        tmp_path / "long.mp3",
        "-c:a",
        "libmp3lame",
        "-b:a",
        "64k",
    )
    data = long_mp3.read_bytes()
    resp = await client.post(
        "/transcribe", data=form(data=data[: len(data) // 3], filename="t.mp3")
    )
    assert resp.status == 422
    body = await resp.json()
    assert body["code"] == "truncated" and "cut short" in body["detail"]
    # Asking for that job's result later is a stable 409 with the job's code, not a replay
    # of the 422 the request got.
    job_id = resp.headers.get("X-Job-ID") or (await jobs_of(client))[0].id
    later = await client.get(f"/jobs/{job_id}/result")
    assert later.status == 409
    body = await later.json()
    assert body["code"] == "truncated" and "cut short" in body["detail"]


async def test_content_length_over_cap_is_refused_before_reading(make_client):
    client = await make_client(max_upload_mb=1)
    resp = await client.post("/transcribe", data=form(data=b"\0" * (3 * 1024 * 1024)))
    assert resp.status == 413
    assert "1 MiB" in (await resp.json())["detail"]


async def test_chunked_upload_over_cap_is_cut_off(make_client, settings):
    client = await make_client(max_upload_mb=1)
    sent = 0

    async def endless_wav():
        nonlocal sent
        yield b"RIFF\xff\xff\xff\xffWAVEfmt " + bytes(8192)
        for _ in range(64):  # 16 MiB if nobody stops us
            sent += 256 * 1024
            yield bytes(256 * 1024)

    with aiohttp.MultipartWriter("form-data") as mp:
        part = mp.append(endless_wav())
        part.set_content_disposition("form-data", name="file", filename="big.wav")
    try:
        resp = await client.post("/transcribe", data=mp)
        assert resp.status == 413
        assert (await resp.json())["code"] == "too_large"
    except aiohttp.ClientError:
        pass  # the server may close the connection while we are still sending
    assert sent < 8 * 1024 * 1024, "the server kept reading past the cap"


async def test_conversion_timeout_kills_ffmpeg(make_client, media):
    client = await make_client(convert_timeout_s=0.001)
    resp = await client.post("/transcribe", data=form(media["flac"]))
    assert resp.status == 422
    assert (await resp.json())["code"] == "conversion_timeout"


async def test_audio_longer_than_cap_is_413(make_client, media):
    client = await make_client(max_audio_seconds=0.5)
    resp = await client.post("/transcribe", data=form(media["mp3"]))
    assert resp.status == 413
    assert (await resp.json())["code"] == "audio_too_long"


async def test_missing_file_part_and_bad_fields(client, media):
    no_file = aiohttp.FormData(default_to_multipart=True)
    no_file.add_field("model", "demo")
    resp = await client.post("/transcribe", data=no_file)
    assert resp.status == 400 and (await resp.json())["code"] == "missing_file"
    resp = await client.post("/transcribe", data=form(media["wav"], include_timestamps="maybe"))
    assert resp.status == 400
    resp = await client.post("/transcribe", data=b"x", headers={"Content-Type": "text/plain"})
    assert resp.status == 400


async def test_too_many_form_fields(client, media):
    data = form(media["wav"], **{f"f{i}": "x" for i in range(40)})
    resp = await client.post("/transcribe", data=data)
    assert resp.status == 400
    assert "form fields" in (await resp.json())["detail"]


@pytest.mark.parametrize("parts, part_kib", [(40, 1), (1, 30 * 1024)])
async def test_unnamed_parts_cannot_bypass_the_upload_cap(make_client, voices, parts, part_kib):
    """A chunked body: a small WAV, then parts without a name (40 small ones, or one of
    30 MiB), with a 1 MiB cap. They were skipped without counting (answered 200); now every
    part counts as a field: too many is a 400, a big one is a 400 at 4 KiB."""
    client = await make_client(max_upload_mb=1)
    boundary = "hardeningboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        'filename="hello.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    ).encode() + voices["hello"].read_bytes()
    unnamed = f"\r\n--{boundary}\r\nContent-Disposition: form-data\r\n\r\n".encode()
    sent = 0

    async def body():
        nonlocal sent
        yield head
        for _ in range(parts):
            yield unnamed
            for _ in range(max(part_kib // 256, 1)):
                chunk = bytes(min(part_kib, 256) * 1024)
                sent += len(chunk)
                yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    try:
        resp = await client.post("/transcribe", data=body(), headers=headers)
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["code"] in ("field_too_large", "bad_request")
    except aiohttp.ClientError:
        pass  # the server may close the connection while we are still sending
    assert await jobs_of(client) == []
