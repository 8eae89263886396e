"""The slices waiting for one model: one FIFO per job, served round-robin, so a short job is
not stuck behind a long one and a batch can mix slices of several jobs, as long as they are
decoded the same way (same ``group``: language, task, punctuation).

How a batch is formed (``take``), each choice measured in ``benchmarks/batching.py``:
- The slice first in line is always in it (nothing starves), with more slices of its group
  from a window of candidates in round-robin order.
- Similar lengths: the candidates closest in length to the first come first, and a slice
  shorter than ``min_fill`` of the longest in the batch waits for a batch of its own size
  (padding is computed like audio; the pool picks ``min_fill`` by device).
- Bounded by count and by padded audio (slices x the longest one: what memory scales with).
- Ramp: a job that just joined the line gives at most 1 slice to a batch, then 2, 4...
  (``ramp``), so a long job reports progress from its first seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

# Candidates looked at per batch, in batches: enough to find like-sized slices among many
# jobs, small enough that the round-robin order still decides who goes first.
CANDIDATE_WINDOW = 4


@dataclass
class SliceTask:
    job_id: str
    idx: int
    path: str
    start_frame: int
    num_frames: int
    future: asyncio.Future[dict[str, Any] | None]
    """Resolves with the committed result (None: committed by someone else), or fails."""
    queued_at: float = field(default_factory=time.monotonic)
    crashes: int = 0
    """Batches this slice was in when the worker died."""
    epoch: int = 0
    """The lease epoch its result must be committed with."""
    computed: bool = False
    """Its result is waiting to be committed."""
    group: tuple[tuple[str, Any], ...] = ()
    """How it is decoded (the job's prompt options, sorted items): one model call decodes
    under one prompt, so slices of different groups never share a batch."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.idx)


@dataclass
class _Line:
    """One job's waiting slices."""

    tasks: deque[SliceTask] = field(default_factory=deque)
    frames: int = 0
    taken: int = 0
    """Slices handed out since the job joined the line (the ramp grows with it)."""

    @property
    def group(self) -> tuple[tuple[str, Any], ...]:
        return self.tasks[0].group

    def allowance(self, ramp: bool) -> int:
        return self.taken + 1 if ramp else len(self.tasks)


class SliceQueue:
    def __init__(self) -> None:
        self._lines: OrderedDict[str, _Line] = OrderedDict()
        self._count = 0
        self._frames = 0
        self.changed = asyncio.Event()
        """Set when slices are added (the batchers wait on it)."""
        self._turn: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return self._count

    @property
    def frames(self) -> int:
        """Frames of audio waiting, all jobs together."""
        return self._frames

    def oldest(self) -> float | None:
        """When the longest-waiting slice was queued (``time.monotonic``), if any waits."""
        return min((line.tasks[0].queued_at for line in self._lines.values()), default=None)

    def _add(self, task: SliceTask, front: bool) -> None:
        line = self._lines.setdefault(task.job_id, _Line())
        if front:
            line.tasks.appendleft(task)
        else:
            line.tasks.append(task)
        line.frames += task.num_frames
        self._count += 1
        self._frames += task.num_frames

    def put(self, tasks: list[SliceTask]) -> None:
        for task in tasks:
            self._add(task, front=False)
        self.changed.set()

    def put_front(self, tasks: list[SliceTask]) -> None:
        """Back to the head of the line (slices of a batch that has to be redone)."""
        for task in reversed(tasks):
            self._add(task, front=True)
            self._lines.move_to_end(task.job_id, last=False)
        self.changed.set()
        self._moved()

    def take(
        self,
        limit: int,
        *,
        max_frames: int | None = None,
        min_fill: float = 0.0,
        ramp: bool = False,
        by_length: bool = True,
    ) -> list[SliceTask]:
        """A batch of up to ``limit`` slices of the group the first job in line wants (see
        the module's docstring); jobs of other groups keep their place at the head of the
        line, jobs that gave a slice go to its back. ``max_frames`` bounds the padded size
        (slices x the longest) unless the first slice alone passes it; ``by_length`` False
        takes candidates in round-robin order only."""
        if not self._lines:
            return []
        group = next(iter(self._lines.values())).group
        lines = [(job_id, line) for job_id, line in self._lines.items() if line.group == group]
        # Candidates in round-robin order: (job, depth) pairs, each job's next slices.
        candidates: list[tuple[str, int]] = []
        depth = 0
        while len(candidates) < limit * CANDIDATE_WINDOW:
            before = len(candidates)
            for job_id, line in lines:
                if depth < min(len(line.tasks), line.allowance(ramp), limit):
                    candidates.append((job_id, depth))
            if len(candidates) == before:
                break
            depth += 1

        def frames(c: tuple[str, int]) -> int:
            return self._lines[c[0]].tasks[c[1]].num_frames

        head = candidates[0]
        chosen = {head}
        longest = shortest = frames(head)
        rank = {c: n for n, c in enumerate(candidates)}
        if by_length:
            ordered = sorted(candidates[1:], key=lambda c: (abs(frames(c) - frames(head)), rank[c]))
        else:
            ordered = candidates[1:]
        added = True
        while added and len(chosen) < limit:
            added = False
            for c in ordered:
                if len(chosen) >= limit:
                    break
                # A job's slices leave in order: one only after its predecessor.
                if c in chosen or (c[1] > 0 and (c[0], c[1] - 1) not in chosen):
                    continue
                size = frames(c)
                top, low = max(longest, size), min(shortest, size)
                if low < min_fill * top:
                    continue
                if max_frames is not None and (len(chosen) + 1) * top > max_frames:
                    continue
                chosen.add(c)
                longest, shortest = top, low
                added = True
        batch: list[SliceTask] = []
        for job_id, _ in sorted(chosen, key=rank.__getitem__):
            line = self._lines[job_id]
            task = line.tasks.popleft()  # a job's chosen slices are a prefix of its line
            line.frames -= task.num_frames
            line.taken += 1
            batch.append(task)
        self._count -= len(batch)
        self._frames -= sum(t.num_frames for t in batch)
        # Round-robin: a job goes to the back of the line after giving slices.
        for job_id in dict.fromkeys(t.job_id for t in batch):
            if self._lines[job_id].tasks:
                self._lines.move_to_end(job_id)
            else:
                del self._lines[job_id]
        self._moved()
        return batch

    def remove_job(self, job_id: str) -> list[SliceTask]:
        """Every waiting slice of a job, taken out at once."""
        line = self._lines.pop(job_id, None)
        if line is None:
            return []
        self._count -= len(line.tasks)
        self._frames -= line.frames
        self._moved()
        return list(line.tasks)

    def remove_all(self) -> list[SliceTask]:
        tasks = [t for line in self._lines.values() for t in line.tasks]
        self._lines.clear()
        self._count = self._frames = 0
        self._moved()
        return tasks

    def position(self, job_id: str) -> int | None:
        """1 for the job served next, None when none of its slices wait."""
        for position, waiting in enumerate(self._lines, start=1):
            if waiting == job_id:
                return position
        return None

    def wait_position(self, job_id: str) -> int | None:
        """The job's place in line while none of its slices has gone to a worker yet;
        None once one has (or when none waits)."""
        line = self._lines.get(job_id)
        if line is None or line.taken:
            return None
        return self.position(job_id)

    def expected_position(self, job_id: str) -> int:
        """The job's place in line, or the one it gets when it joins now (the back)."""
        return self.position(job_id) or len(self._lines) + 1

    def competing_frames(self, job_id: str, own_frames: int | None = None) -> int:
        """Frames of other jobs likely served before this job's waiting slices are (or
        ``own_frames``, for a job about to join): served round-robin, each other job gives
        about as much as this one still has waiting."""
        line = self._lines.get(job_id)
        own = line.frames if line is not None else own_frames or 0
        return sum(min(o.frames, own) for j, o in self._lines.items() if j != job_id)

    def turned(self) -> asyncio.Future[None]:
        """Resolves the next time places in line change (a batch taken, a job removed)."""
        if self._turn is None or self._turn.done():
            self._turn = asyncio.get_running_loop().create_future()
        return self._turn

    def _moved(self) -> None:
        if self._turn is not None and not self._turn.done():
            self._turn.set_result(None)
        self._turn = None
