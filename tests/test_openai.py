"""The OpenAI-compatible route, driven by the official ``openai`` SDK against a live app."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from aiotranscribe.keys import pools_key, service_key
from tests import speech
from tests.helpers import events_of, eventually, form, jobs_of


def sdk(client, **options) -> openai.AsyncOpenAI:
    """The SDK pointed at the test server (same loop: the async client)."""
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", **options)


def served(client) -> str:
    return next(iter(client.app[pools_key]))


@pytest.fixture(scope="session")
def three_sentences(tmp_path_factory, voices) -> Path:
    """Three utterances a second apart: three segments."""
    base = tmp_path_factory.mktemp("three")
    pause = speech.silence(base / "pause.wav", 1.0)
    parts = [voices["hello"], pause, voices["digits"], pause, voices["command"]]
    return speech.concat(parts, base / "three.wav")


async def test_json_text_srt_vtt(client, voices):
    async with sdk(client) as oai:
        for model in ("whisper-1", served(client)):
            out = await oai.audio.transcriptions.create(file=voices["hello"], model=model)
            assert out.text == "hello world"
            assert out.usage is not None and out.usage.seconds > 0

        text = await oai.audio.transcriptions.create(
            file=voices["hello"], model="whisper-1", response_format="text"
        )
        assert text == "hello world\n"

        srt = await oai.audio.transcriptions.create(
            file=voices["hello"], model="whisper-1", response_format="srt"
        )
        assert srt.startswith("1\n00:00:0") and " --> " in srt and "hello world" in srt

        vtt = await oai.audio.transcriptions.create(
            file=voices["hello"], model="whisper-1", response_format="vtt", language="en"
        )
        assert vtt.startswith("WEBVTT\n\n00:00:0") and "hello world" in vtt


async def test_verbose_json_granularities(client, voices):
    path = voices["hello"]
    async with sdk(client) as oai:
        both = await oai.audio.transcriptions.create(
            file=path,
            model="whisper-1",
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            prompt="ignored",
            temperature=0.0,
        )
        assert both.text == "hello world" and both.language
        assert 0 < both.duration == pytest.approx(speech.duration(path), abs=0.05)
        assert [w.word for w in both.words] == ["hello", "world"]
        starts = [w.start for w in both.words]
        assert starts == sorted(starts)
        assert all(0 <= w.start <= w.end <= both.duration for w in both.words)
        assert [s.text for s in both.segments] == ["hello world"]
        assert both.segments[0].id == 0
        assert both.segments[0].start <= both.words[0].start
        assert both.segments[0].end >= both.words[-1].end

        words = await oai.audio.transcriptions.create(
            file=path,
            model="whisper-1",
            response_format="verbose_json",
            timestamp_granularities=["word"],
        )
        assert [w.word for w in words.words] == ["hello", "world"] and words.segments is None

        default = await oai.audio.transcriptions.create(
            file=path, model="whisper-1", response_format="verbose_json"
        )
        assert default.words is None and [s.text for s in default.segments] == ["hello world"]


async def test_stream_sends_a_delta_per_segment(make_client, three_sentences):
    # Short slices: each utterance is its own slice, so deltas come as slices finish.
    client = await make_client(chunk_seconds=3)
    async with sdk(client) as oai:
        stream = await oai.audio.transcriptions.create(
            file=three_sentences, model="whisper-1", stream=True
        )
        events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds == ["transcript.text.delta"] * 3 + ["transcript.text.done"]
    deltas = [e.delta for e in events[:-1]]
    assert deltas == ["hello world", " one two three four five", " please call tomorrow"]
    assert events[-1].text == "".join(deltas)


async def test_errors_in_openais_shape(make_client, voices):
    client = await make_client()
    async with sdk(client, max_retries=0) as oai:
        with pytest.raises(openai.BadRequestError) as bad:
            await oai.audio.transcriptions.create(
                file=voices["hello"], model="whisper-1", timestamp_granularities=["word"]
            )
        assert bad.value.status_code == 400
        assert bad.value.param == "timestamp_granularities"
        assert bad.value.type == "invalid_request_error" and bad.value.code

        with pytest.raises(openai.BadRequestError) as bad:
            await oai.audio.transcriptions.create(file=voices["hello"], model="gpt-9")
        assert bad.value.param == "model" and "gpt-9" in bad.value.message

        with pytest.raises(openai.APIStatusError) as not_audio:
            await oai.audio.transcriptions.create(
                file=("notes.mp3", b"this is not audio" * 100), model="whisper-1"
            )
        assert not_audio.value.status_code == 415 and not_audio.value.param == "file"

    # The raw shape, for a bad field, an unknown /v1 route and a wrong method.
    resp = await client.post(
        "/v1/audio/transcriptions", data=form(voices["hello"], response_format="mp4")
    )
    body = await resp.json()
    assert resp.status == 400
    assert body == {
        "error": {
            "message": body["error"]["message"],
            "type": "invalid_request_error",
            "param": "response_format",
            "code": "invalid_value",
        }
    }
    resp = await client.get("/v1/nothing")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.get("/v1/audio/transcriptions")
    assert resp.status == 405 and "POST" in resp.headers["Allow"]
    assert (await resp.json())["error"]["type"] == "invalid_request_error"

    # A full queue: 503, Retry-After, OpenAI's server_error.
    busy = await make_client(max_queued_audio_s=0)
    resp = await busy.post("/v1/audio/transcriptions", data=form(voices["hello"]))
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["type"] == "server_error"


async def test_models_list(client):
    async with sdk(client) as oai:
        models = await oai.models.list()
    assert [m.id for m in models.data] == [served(client)]
    assert models.data[0].object == "model"


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_cancels_the_job(make_client, long_audio, stream):
    client = await make_client(chunk_seconds=20, batch_size=1)
    fields = {"stream": "true"} if stream else {}

    async def post() -> None:
        async with client.post(
            "/v1/audio/transcriptions", data=form(long_audio[0], **fields)
        ) as resp:
            await resp.read()

    request = asyncio.create_task(post())

    async def processing() -> bool:
        return any(job.status == "processing" for job in await jobs_of(client))

    await eventually(processing)
    request.cancel()  # closes the connection mid-request
    with pytest.raises(asyncio.CancelledError):
        await request
    (job,) = await jobs_of(client)
    job = await asyncio.wait_for(client.app[service_key].wait_done(job.id), 10)
    assert job.status == "cancelled"
    assert job.cancel_reason == "client disconnected"
    assert (await events_of(client, job.id))[-1]["reason"] == "client disconnected"
