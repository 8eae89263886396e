"""The seed clients' JSON shapes, exactly (CLIENT_CONTRACT.md), with a real model and ffmpeg."""

from __future__ import annotations

from datetime import datetime

from tests.helpers import form, words_of


def is_iso(value: str) -> bool:
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


async def test_health_shape(client):
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert {"status", "model_loaded", "model_name"} <= body.keys()
    assert body["status"] == "healthy" and body["model_loaded"] is True
    assert isinstance(body["model_name"], str) and body["model_name"]
    assert (await client.get("/ready")).status == 200


async def test_transcribe_response_shape_and_text(client, media):
    resp = await client.post("/transcribe", data=form(media["wav"], filename="hello.wav"))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    for key, kind in {
        "text": str,
        "segments": list,
        "filename": str,
        "timestamp": str,
        "model": str,
    }.items():
        assert isinstance(body[key], kind), key
    assert "language" in body and body["language"] is None
    assert body["filename"] == "hello.wav"
    assert is_iso(body["timestamp"])
    assert body["text"] == "hello world"
    assert body["segments"], "segments must not be empty"
    for seg in body["segments"]:
        assert isinstance(seg["start"], float) and isinstance(seg["end"], float)
        assert seg["text"].strip(), "segment text must not be empty"
        assert seg["start"] <= seg["end"]
        for word in seg["words"]:
            # The seed's WordTimestamp fields; extra fields (confidence) are ignored by clients.
            assert {"word", "start", "end"} <= set(word) <= {"word", "start", "end", "confidence"}
            assert isinstance(word["start"], float) and isinstance(word["end"], float)
    assert [w["word"] for w in words_of(body)] == ["hello", "world"]
    starts = [w["start"] for w in words_of(body)]
    assert starts == sorted(starts) and starts[-1] <= body["duration"]


async def test_mp3_and_flac_decode_the_same(client, media):
    for kind in ("mp3", "flac"):
        resp = await client.post("/transcribe", data=form(media[kind]))
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["text"] == "hello world", kind


async def test_model_field_and_seed_aliases(client, media):
    resp = await client.post(
        "/transcribe",
        data=form(media["wav"], model="parakeet", language="en", include_timestamps="false"),
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    served = (await (await client.get("/health")).json())["model_name"]
    assert body["model"] == served  # says which model actually ran
    assert body["language"] == "en"
    assert all("words" not in seg for seg in body["segments"])
    resp = await client.post("/transcribe", data=form(media["wav"], model="whisper-large"))
    assert resp.status == 400
    body = await resp.json()
    assert "unknown model" in body["detail"] and body["code"] == "unknown_model"


async def test_async_routes_contract(client, media):
    resp = await client.post("/transcribe/async", data=form(media["wav"], filename="a.wav"))
    assert resp.status in (200, 202)
    sub = await resp.json()
    assert set(sub) >= {"job_id", "status", "message"} and sub["status"] == "pending"
    job_id = sub["job_id"]
    for _ in range(600):
        info = await (await client.get(f"/jobs/{job_id}/status")).json()
        if info["status"] in ("completed", "failed", "cancelled"):
            break
        import asyncio

        await asyncio.sleep(0.05)
    assert info["status"] == "completed"
    assert {"job_id", "status", "filename", "created_at", "completed_at", "error", "result"} <= set(
        info
    )
    assert info["filename"] == "a.wav" and info["error"] is None
    assert is_iso(info["created_at"]) and is_iso(info["completed_at"])
    result = await (await client.get(f"/jobs/{job_id}/result")).json()
    assert result == info["result"] and result["text"] == "hello world"
    cancel = await client.post(f"/jobs/{job_id}/cancel")
    assert cancel.status == 200
    assert (await cancel.json())["status"] == "completed"
    missing = await client.get("/jobs/nope/status")
    assert missing.status == 404 and "detail" in await missing.json()
