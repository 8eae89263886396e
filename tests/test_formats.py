"""Result formats: SRT and VTT checked with a strict parser, verbose_json and text."""

from __future__ import annotations

import re

import pytest

from aiotranscribe.formats import cues, render, to_srt, to_vtt
from tests.test_jobs import submit, watch

SRT_TIME = r"(\d{2}):([0-5]\d):([0-5]\d),(\d{3})"
VTT_TIME = r"(\d{2}):([0-5]\d):([0-5]\d)\.(\d{3})"


def _seconds(match: tuple[str, ...]) -> float:
    h, m, s, ms = (int(x) for x in match)
    return h * 3600 + m * 60 + s + ms / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Strict SRT: numbered blocks from 1, 'HH:MM:SS,mmm --> HH:MM:SS,mmm', non-empty text."""
    out = []
    blocks = text.strip("\n").split("\n\n")
    for number, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        assert lines[0] == str(number), f"bad cue number in {block!r}"
        m = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert m, f"bad timing line {lines[1]!r}"
        start, end = _seconds(m.groups()[:4]), _seconds(m.groups()[4:])
        body = "\n".join(lines[2:])
        assert body.strip(), "empty cue"
        out.append((start, end, body))
    return out


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    assert text.startswith("WEBVTT\n\n")
    out = []
    for block in text[len("WEBVTT\n\n") :].strip("\n").split("\n\n"):
        lines = block.split("\n")
        m = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0])
        assert m, f"bad timing line {lines[0]!r}"
        assert "\n".join(lines[1:]).strip()
        out.append((_seconds(m.groups()[:4]), _seconds(m.groups()[4:]), "\n".join(lines[1:])))
    return out


def check_cues(parsed: list[tuple[float, float, str]], duration: float) -> None:
    assert parsed
    previous_end = 0.0
    for start, end, _ in parsed:
        assert 0.0 <= start < end <= duration + 0.001
        assert start >= previous_end - 0.001, "cues overlap or go backwards"
        previous_end = end


def make_result(words: list[tuple[str, float, float]], duration: float) -> dict:
    return {
        "text": " ".join(w for w, _, _ in words),
        "segments": [
            {
                "start": words[0][1],
                "end": words[-1][2],
                "text": " ".join(w for w, _, _ in words),
                "words": [{"word": w, "start": a, "end": b} for w, a, b in words],
            }
        ],
        "duration": duration,
    }


def test_long_unpunctuated_segment_is_cut_into_readable_cues():
    words = [(f"w{i}", i * 0.5, i * 0.5 + 0.4) for i in range(40)]  # 20 s, no pauses
    words += [("after", 25.0, 25.4), ("pause", 25.5, 25.9)]
    result = make_result(words, 30.0)
    parsed = parse_srt(to_srt(result))
    check_cues(parsed, 30.0)
    assert all(end - start <= 6.0 + 1e-6 for start, end, _ in parsed)
    assert parsed[-1][2] == "after pause"  # the 4.6 s pause starts a new cue
    assert [w for _, _, t in parsed for w in t.split()] == [w for w, _, _ in words]
    assert [c[:2] for c in parse_vtt(to_vtt(result))] == [c[:2] for c in parsed]


def test_hours_and_milliseconds_format():
    result = make_result([("late", 3723.456, 3724.0)], 3725.0)
    assert "01:02:03,456 --> 01:02:04,000" in to_srt(result)
    assert "01:02:03.456 --> 01:02:04.000" in to_vtt(result)
    assert cues(result) == [(3723.456, 3724.0, "late")]


def test_verbose_json_and_text_shapes():
    result = make_result([("hello", 0.1, 0.5), ("world", 0.6, 1.0)], 1.2)
    result["language"] = None
    verbose = render(result, "verbose_json")
    assert verbose["text"] == "hello world" and verbose["duration"] == 1.2
    assert verbose["segments"][0]["id"] == 0 and verbose["segments"][0]["text"] == "hello world"
    assert verbose["words"] == [
        {"word": "hello", "start": 0.1, "end": 0.5},
        {"word": "world", "start": 0.6, "end": 1.0},
    ]
    assert render(result, "text") == "hello world\n"
    with pytest.raises(ValueError):
        render(result, "docx")


async def test_server_srt_and_vtt_parse_and_fit_the_audio(make_client, long_audio):
    path, texts = long_audio
    client = await make_client(chunk_seconds=20)
    job_id = await submit(client, path)
    events, _ = await watch(client, job_id)
    duration = events[-1]["result"]["duration"]
    srt = await client.get(f"/jobs/{job_id}/result?format=srt")
    assert srt.status == 200 and srt.content_type == "application/x-subrip"
    parsed = parse_srt(await srt.text())
    check_cues(parsed, duration)
    assert " ".join(text for _, _, text in parsed) == " ".join(texts)
    vtt = await client.get(f"/jobs/{job_id}/result?format=vtt")
    assert vtt.content_type == "text/vtt"
    check_cues(parse_vtt(await vtt.text()), duration)
    text = await (await client.get(f"/jobs/{job_id}/result?format=text")).text()
    assert text.strip() == " ".join(texts)
    verbose = await (await client.get(f"/jobs/{job_id}/result?format=verbose_json")).json()
    assert {"text", "language", "duration", "segments", "words"} <= set(verbose)
    bad = await client.get(f"/jobs/{job_id}/result?format=docx")
    assert bad.status == 400
