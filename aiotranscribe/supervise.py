"""Keep a background loop running: an unexpected error is logged and the loop starts again
after a growing pause; cancellation (shutdown) ends it. And stop background tasks without
trusting them to end."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import structlog

log = structlog.get_logger(__name__)

BACKOFF_S = (0.1, 0.5, 2.0, 10.0)
# How long a cancelled task gets to end before shutdown goes on without it.
STOP_GRACE_S = 2.0


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
            raise_if_cancelling()
            delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            failures += 1
            restarted()
            log.exception(event, restart_in_s=delay)
            await asyncio.sleep(delay)


def raise_if_cancelling() -> None:
    """For a loop that retries on errors: end it if its task was cancelled meanwhile. A cancel
    can surface as another error (Python 3.11's ``asyncio.timeout`` expiring as the task is
    cancelled raises TimeoutError; redis-py can fail the command it cut short), and a loop
    that retried on it would outlive its cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop_tasks(
    tasks: Iterable[asyncio.Task[None] | None], grace_s: float = STOP_GRACE_S
) -> set[asyncio.Task[None]]:
    """Cancel ``tasks`` and wait at most ``grace_s`` for them to end; return (and log) those
    still running. Why a bound: redis-py 8.2 can lose a cancel. A reply reader cancelled in a
    blocked XREAD stayed "cancelling" on a future nothing resolved, and an unbounded await of
    it held a replica's shutdown (and a CI run) for over an hour. Closing the task's Redis
    client fails such a read: callers close it, then stop what is returned again."""
    live = [task for task in tasks if task is not None and not task.done()]
    for task in live:
        task.cancel()
    if not live:
        return set()
    done, pending = await asyncio.wait(live, timeout=grace_s)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.warning("task_failed_at_stop", task=task.get_name(), exc_info=task.exception())
    for task in pending:
        log.warning("task_did_not_stop", task=task.get_name(), grace_s=grace_s)
    return pending
