"""Render a finished result as json, text, srt, vtt or verbose_json (OpenAI's shape).

Subtitle cues come from segments; a segment that is too long to read as one cue (a model
without punctuation gives one per slice) is cut at pauses between its words, then by length.
"""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
CONTENT_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
}
CUE_MAX_S = 6.0
CUE_MAX_CHARS = 84
CUE_PAUSE_S = 0.5


def _stamp(seconds: float, sep: str) -> str:
    ms = max(round(seconds * 1000), 0)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def cues(result: dict[str, Any]) -> list[tuple[float, float, str]]:
    """Readable ``(start, end, text)`` cues, in order, none overlapping the next."""
    out: list[tuple[float, float, str]] = []
    for seg in result.get("segments", []):
        words = seg.get("words") or []
        if not words or (
            seg["end"] - seg["start"] <= CUE_MAX_S and len(seg["text"]) <= CUE_MAX_CHARS
        ):
            out.append((seg["start"], seg["end"], seg["text"]))
            continue
        group: list[dict[str, Any]] = []
        for word in words:
            if group and (
                word["start"] - group[-1]["end"] >= CUE_PAUSE_S
                or word["end"] - group[0]["start"] > CUE_MAX_S
                or len(" ".join(w["word"] for w in group)) + len(word["word"]) + 1 > CUE_MAX_CHARS
            ):
                out.append(
                    (group[0]["start"], group[-1]["end"], " ".join(w["word"] for w in group))
                )
                group = []
            group.append(word)
        if group:
            out.append((group[0]["start"], group[-1]["end"], " ".join(w["word"] for w in group)))
    fixed = []
    for i, (start, end, text) in enumerate(out):
        if i + 1 < len(out):
            end = min(end, out[i + 1][0])
        fixed.append((start, max(end, start + 0.001), text))
    return fixed


def to_srt(result: dict[str, Any]) -> str:
    blocks = [
        f"{i}\n{_stamp(a, ',')} --> {_stamp(b, ',')}\n{text}\n"
        for i, (a, b, text) in enumerate(cues(result), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(result: dict[str, Any]) -> str:
    blocks = [f"{_stamp(a, '.')} --> {_stamp(b, '.')}\n{text}\n" for a, b, text in cues(result)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_verbose_json(
    result: dict[str, Any], *, words: bool = True, segments: bool = True
) -> dict[str, Any]:
    """OpenAI's ``verbose_json`` transcription shape."""
    out: dict[str, Any] = {
        "task": "transcribe",
        "language": result.get("language") or "english",
        "duration": result.get("duration", 0.0),
        "text": result["text"],
    }
    if segments:
        out["segments"] = [
            {
                "id": i,
                "seek": 0,
                "start": seg["start"],
                "end": seg["end"],
                "text": seg["text"],
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for i, seg in enumerate(result.get("segments", []))
        ]
    if words:
        out["words"] = [
            {"word": w["word"], "start": w["start"], "end": w["end"]}
            | ({"confidence": w["confidence"]} if "confidence" in w else {})
            for seg in result.get("segments", [])
            for w in seg.get("words", [])
        ]
    return out


def render(result: dict[str, Any], fmt: str) -> str | dict[str, Any]:
    if fmt == "json":
        return result
    if fmt == "verbose_json":
        return to_verbose_json(result)
    if fmt == "text":
        return result["text"] + "\n"
    if fmt == "srt":
        return to_srt(result)
    if fmt == "vtt":
        return to_vtt(result)
    raise ValueError(fmt)


def render_bytes(result: dict[str, Any], fmt: str) -> bytes:
    """The body of a ``fmt`` answer, encoded (JSON as ``web.json_response`` writes it)."""
    body = render(result, fmt)
    return (json.dumps(body) if isinstance(body, dict) else body).encode()
