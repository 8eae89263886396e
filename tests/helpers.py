"""Small request helpers shared by the tests."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from aiotranscribe.jobs import Job
from aiotranscribe.keys import store_key


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


async def jobs_of(client: TestClient) -> list[Job]:
    """Every job the app's store holds, newest first."""
    return await client.app[store_key].list_jobs()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    """Wait until the async ``check`` is true."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def events_of(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return await client.app[store_key].events_after(job_id, 0)
