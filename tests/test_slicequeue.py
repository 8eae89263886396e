"""The slice queue: round-robin over jobs, and never two prompts in one batch."""

from __future__ import annotations

import asyncio

from aiotranscribe.slicequeue import SliceQueue, SliceTask

EN = (("language", "en"),)
DE = (("language", "de"),)


def tasks(job: str, n: int, group: tuple[tuple[str, str], ...] = ()) -> list[SliceTask]:
    loop = asyncio.get_running_loop()
    return [SliceTask(job, i, "x.wav", 0, 1, loop.create_future(), group=group) for i in range(n)]


async def test_a_batch_mixes_jobs_round_robin():
    queue = SliceQueue()
    queue.put(tasks("a", 3))
    queue.put(tasks("b", 2))
    assert [t.key for t in queue.take(4)] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert [t.key for t in queue.take(4)] == [("a", 2)]
    assert len(queue) == 0


async def test_slices_of_different_prompts_never_share_a_batch():
    queue = SliceQueue()
    queue.put(tasks("en1", 2, EN))
    queue.put(tasks("de1", 2, DE))
    queue.put(tasks("en2", 1, EN))
    batches = []
    while len(queue):
        batch = queue.take(8)
        assert len({t.group for t in batch}) == 1
        batches.append([t.key for t in batch])
    # The first job's prompt goes first (all its like), then the other prompt's jobs.
    assert batches == [
        [("en1", 0), ("en2", 0), ("en1", 1)],
        [("de1", 0), ("de1", 1)],
    ]


async def test_a_job_of_another_prompt_keeps_its_place_in_line():
    queue = SliceQueue()
    queue.put(tasks("en1", 3, EN))
    queue.put(tasks("de1", 3, DE))
    assert [t.key for t in queue.take(1)] == [("en1", 0)]
    # en1 went to the back after giving a slice: de1 is served next.
    assert [t.job_id for t in queue.take(2)] == ["de1", "de1"]
    assert queue.position("en1") == 1
