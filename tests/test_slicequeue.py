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


def sized(job: str, seconds: list[float], rate: int = 100) -> list[SliceTask]:
    """Slices of the given lengths (``rate`` frames per second)."""
    loop = asyncio.get_running_loop()
    return [
        SliceTask(job, i, "x.wav", 0, int(s * rate), loop.create_future())
        for i, s in enumerate(seconds)
    ]


async def test_a_new_job_gives_one_slice_then_two_then_four():
    queue = SliceQueue()
    queue.put(sized("long", [20] * 8))
    sizes = []
    while len(queue):
        sizes.append(len(queue.take(8, ramp=True)))
    assert sizes == [1, 2, 4, 1]


async def test_the_ramp_leaves_room_to_other_jobs():
    queue = SliceQueue()
    queue.put(sized("old", [20] * 10))
    assert len(queue.take(8, ramp=True)) == 1  # "old" started alone
    queue.put(sized("new", [20] * 10))
    batch = queue.take(8, ramp=True)
    # "old" (taken 1 so far) may give 2, the newcomer 1.
    assert sorted(t.job_id for t in batch) == ["new", "old", "old"]


async def test_slices_of_like_length_share_a_batch():
    queue = SliceQueue()
    queue.put(sized("long", [20, 20, 20]))
    queue.put(sized("clip1", [2]))
    queue.put(sized("clip2", [3]))
    queue.put(sized("long2", [19, 20]))
    first = queue.take(8, min_fill=0.5)
    # The clips would be padded to 20 s: they wait for a batch of their own size.
    assert {t.job_id for t in first} == {"long", "long2"}
    second = queue.take(8, min_fill=0.5)
    assert {t.job_id for t in second} == {"clip1", "clip2"}
    assert len(queue) == 0


async def test_the_first_in_line_is_served_even_when_short():
    queue = SliceQueue()
    queue.put(sized("clip", [2]))
    queue.put(sized("long", [20, 20]))
    assert [t.key for t in queue.take(8, min_fill=0.5)] == [("clip", 0)]


async def test_a_job_gives_its_slices_in_order():
    queue = SliceQueue()
    queue.put(sized("a", [20, 5, 20]))
    queue.put(sized("b", [5]))
    batch = queue.take(8, min_fill=0.5)
    # a's 5-s slice is second in its line: it cannot go before it, nor a's third slice.
    assert [t.key for t in batch] == [("a", 0)]


async def test_a_batch_is_bounded_by_padded_audio():
    queue = SliceQueue()
    queue.put(sized("a", [10, 10, 10]))
    queue.put(sized("b", [4, 4]))
    # 25 s padded: two 10-s slices fit (20), a third would make 30.
    assert [t.key for t in queue.take(8, max_frames=2500)] == [("a", 0), ("a", 1)]
    # A slice longer than the bound still runs, alone.
    queue.put(sized("c", [40]))
    queue.remove_job("a")
    queue.remove_job("b")
    assert [t.key for t in queue.take(8, max_frames=2500)] == [("c", 0)]


async def test_wait_position_until_the_first_slice_goes():
    queue = SliceQueue()
    queue.put(sized("a", [20] * 3))
    queue.put(sized("b", [20] * 3))
    assert (queue.wait_position("a"), queue.wait_position("b")) == (1, 2)
    turn = queue.turned()
    queue.take(1)
    assert turn.done()
    # a gave a slice: it is running, no longer waiting; b is next.
    assert (queue.wait_position("a"), queue.wait_position("b")) == (None, 1)
    assert queue.position("a") == 2
    assert queue.expected_position("c") == 3


async def test_competing_audio_counts_other_jobs_not_the_jobs_own():
    queue = SliceQueue()
    queue.put(sized("lone", [20] * 8, rate=1))
    assert queue.competing_frames("lone") == 0
    queue.put(sized("short", [20, 20], rate=1))
    queue.put(sized("longer", [20] * 20, rate=1))
    # Round-robin: "short" gives all 40 s before "lone" ends, "longer" about 160 s.
    assert queue.competing_frames("lone") == 40 + 160
    assert queue.competing_frames("joining", own_frames=30) == 30 + 30 + 30
