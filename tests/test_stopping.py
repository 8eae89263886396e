"""Background tasks stop at shutdown even when a cancel goes astray.

redis-py 8.2 can lose a cancel: the remote hub's reply reader, cancelled in a blocked XREAD,
went on waiting, and closing a ``--no-workers`` app waited for it for over an hour (a CI
run). The task here plays that reader: it swallows its first cancel and waits again.
"""

from __future__ import annotations

import asyncio
import time

from aiotranscribe.remote import RemoteHub
from aiotranscribe.supervise import STOP_GRACE_S, raise_if_cancelling, stop_tasks


async def misses_its_first_cancel() -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        pass  # lost, as redis-py lost the reply reader's
    await asyncio.sleep(3600)


async def test_stop_tasks_waits_a_bounded_time_for_a_task_that_missed_its_cancel():
    stubborn = asyncio.create_task(misses_its_first_cancel())
    obedient = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    started = time.monotonic()
    stuck = await stop_tasks([stubborn, obedient, None], grace_s=0.2)
    assert 0.2 <= time.monotonic() - started < 2
    assert stuck == {stubborn}
    assert obedient.cancelled()
    assert await stop_tasks(stuck, grace_s=0.2) == set()  # the second cancel lands
    assert stubborn.cancelled()


async def test_a_retry_loop_ends_when_its_cancel_surfaces_as_another_error():
    """Python 3.11's asyncio.timeout can turn a cancel into TimeoutError; a loop that retries
    on TimeoutError would run on for ever."""
    rounds = 0

    async def retrying() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    raise TimeoutError from None
            except TimeoutError:
                raise_if_cancelling()

    task = asyncio.create_task(retrying())
    await asyncio.sleep(0)
    assert await stop_tasks([task], grace_s=1.0) == set()
    assert task.cancelled() and rounds == 1


async def test_closing_the_remote_hub_does_not_wait_for_a_reader_that_missed_its_cancel(
    redis_url,
):
    hub = RemoteHub(redis_url, replica="r1")
    await hub.open()
    stubborn = asyncio.create_task(misses_its_first_cancel())
    hub._tasks.append(stubborn)  # beside the real reply reader
    await asyncio.sleep(0)
    started = time.monotonic()
    async with asyncio.timeout(30):  # (an await that swallows cancels can outlast it too)
        await hub.close()
    assert time.monotonic() - started < 3 * STOP_GRACE_S
    assert stubborn.done()
