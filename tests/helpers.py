"""Small request helpers shared by the tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import aiohttp


def form(
    path: Path | None = None,
    *,
    data: bytes | None = None,
    filename: str | None = None,
    content_type: str = "audio/mpeg",
    **fields: str,
) -> aiohttp.FormData:
    """A multipart form like the seed clients send: a ``file`` part and optional fields."""
    body = data if data is not None else path.read_bytes()  # type: ignore[union-attr]
    out = aiohttp.FormData()
    out.add_field(
        "file",
        io.BytesIO(body),
        filename=filename or (path.name if path else "upload.bin"),
        content_type=content_type,
    )
    for name, value in fields.items():
        out.add_field(name, value)
    return out


def words_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for seg in result["segments"] for w in seg.get("words", [])]
