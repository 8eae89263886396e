"""Keep a background loop running: an unexpected error is logged and the loop starts again
after a growing pause; cancellation (shutdown) ends it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

BACKOFF_S = (0.1, 0.5, 2.0, 10.0)


async def run_supervised(
    loop: Callable[[], Awaitable[None]], event: str, restarted: Callable[[], None]
) -> None:
    """Run ``loop()`` until cancelled; after each error log ``event`` with its traceback,
    call ``restarted()`` and start it again (0.1 s, 0.5 s, 2 s, then every 10 s)."""
    failures = 0
    while True:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            failures += 1
            restarted()
            log.exception(event, restart_in_s=delay)
            await asyncio.sleep(delay)
