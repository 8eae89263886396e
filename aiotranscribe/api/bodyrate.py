"""A minimum rate for request bodies: a client that trickles its upload is answered 408.

The body must keep up with ``min_rate`` bytes per second, counted from the moment the
handler starts reading, after ``grace_s`` of slack: at time ``t`` at least
``min_rate * (t - grace_s)`` bytes must have arrived. The reader is awaited until the moment
the body would fall behind, so a stalled client is cut off exactly on time, without polling.
Headers have their own deadline (the server's keep-alive timeout, see ``cli``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from aiotranscribe.api.errors import ApiError

T = TypeVar("T")


def too_slow(min_rate: float) -> ApiError:
    return ApiError(
        408,
        "request_timeout",
        f"the upload was slower than this server's minimum of {min_rate / 1024:g} KiB/s",
    )


async def within_body_rate(
    request: web.Request, reading: Awaitable[T], min_rate: float, grace_s: float
) -> T:
    """Await ``reading`` (which consumes ``request``'s body); 408 once the body falls behind
    ``min_rate`` bytes/s. ``min_rate`` <= 0 disables the check. The reader is cancelled (and
    awaited, so its own cleanup runs) before the 408 is raised."""
    task = asyncio.ensure_future(reading)
    if min_rate <= 0:
        return await task
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        while not request.content.is_eof():
            received = request.content.total_bytes
            # The moment the bytes received so far stop being enough.
            behind_at = start + grace_s + received / min_rate
            done, _ = await asyncio.wait({task}, timeout=max(0.0, behind_at - loop.time()))
            if done:
                return task.result()
            if request.content.total_bytes == received and not request.content.is_eof():
                raise too_slow(min_rate)
        return await task  # the whole body is in: what is left is ours (fsync, rename)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
