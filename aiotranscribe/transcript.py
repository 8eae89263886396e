"""Turn per-slice model output into segments in file time, and segments into a result."""

from __future__ import annotations

from typing import Any

# A segment ends at sentence punctuation, at a pause this long, or once it is this long, so
# that models without punctuation still give readable segments.
SEGMENT_PAUSE_S = 0.8
SEGMENT_MAX_S = 12.0
SENTENCE_END = (".", "?", "!", "。", "？", "！")


def slice_segments(
    result: dict[str, Any], offset_s: float, length_s: float
) -> list[dict[str, Any]]:
    """Segments of one slice, times moved from slice time to file time."""
    words = [
        {
            **w,  # word, and confidence where the model gives it
            "start": round(w["start"] + offset_s, 3),
            "end": round(w["end"] + offset_s, 3),
        }
        for w in result.get("words", [])
    ]
    text = result.get("text", "").strip()
    if not words:
        if not text:
            return []
        return [
            {
                "start": round(offset_s, 3),
                "end": round(offset_s + length_s, 3),
                "text": text,
                "words": [],
            }
        ]
    groups: list[list[dict[str, Any]]] = [[]]
    for word in words:
        current = groups[-1]
        if current and (
            word["start"] - current[-1]["end"] >= SEGMENT_PAUSE_S
            or word["end"] - current[0]["start"] > SEGMENT_MAX_S
            or current[-1]["word"].endswith(SENTENCE_END)
        ):
            groups.append([])
        groups[-1].append(word)
    return [
        {
            "start": group[0]["start"],
            "end": max(group[-1]["end"], group[0]["start"]),
            "text": " ".join(w["word"] for w in group),
            "words": group,
        }
        for group in groups
    ]


def build_result(
    segments: list[dict[str, Any]],
    *,
    filename: str,
    model: str,
    language: str | None,
    duration: float,
    include_words: bool,
    finished_at: str,
) -> dict[str, Any]:
    """The seed clients' ``TranscriptionResponse`` (plus ``duration`` and segment ``id``s)."""
    out = []
    for i, seg in enumerate(segments):
        item = {"id": i, "start": seg["start"], "end": seg["end"], "text": seg["text"]}
        if include_words:
            item["words"] = seg["words"]
        out.append(item)
    return {
        "text": " ".join(seg["text"] for seg in segments),
        "segments": out,
        "filename": filename,
        "timestamp": finished_at,
        "model": model,
        "language": language,
        "duration": round(duration, 3),
    }
