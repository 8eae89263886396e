"""The slices waiting for one model: one FIFO per job, served round-robin, so a short job is
not stuck behind a long one and a batch can mix slices of several jobs, as long as they are
decoded the same way (same ``group``: language, task, punctuation)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any


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


class SliceQueue:
    def __init__(self) -> None:
        self._waiting: OrderedDict[str, deque[SliceTask]] = OrderedDict()
        self._count = 0
        self.changed = asyncio.Event()

    def __len__(self) -> int:
        return self._count

    def put(self, tasks: list[SliceTask]) -> None:
        for task in tasks:
            self._waiting.setdefault(task.job_id, deque()).append(task)
        self._count += len(tasks)
        self.changed.set()

    def put_front(self, tasks: list[SliceTask]) -> None:
        """Back to the head of the line (slices of a batch that has to be redone)."""
        for task in reversed(tasks):
            self._waiting.setdefault(task.job_id, deque()).appendleft(task)
            self._waiting.move_to_end(task.job_id, last=False)
        self._count += len(tasks)
        self.changed.set()

    def take(self, limit: int) -> list[SliceTask]:
        """Up to ``limit`` slices of the group the first job in line wants, round-robin over
        the jobs of that group; jobs of other groups keep their place at the head of the line."""
        batch: list[SliceTask] = []
        if not self._waiting:
            return batch
        group = next(iter(self._waiting.values()))[0].group
        while len(batch) < limit:
            taken = False
            for job_id in list(self._waiting):
                queue = self._waiting[job_id]
                if len(batch) >= limit or queue[0].group != group:
                    continue
                batch.append(queue.popleft())
                self._count -= 1
                taken = True
                # Round-robin: the job goes to the back of the line after giving one slice.
                if queue:
                    self._waiting.move_to_end(job_id)
                else:
                    del self._waiting[job_id]
            if not taken:
                break
        return batch

    def remove_job(self, job_id: str) -> list[SliceTask]:
        """Every waiting slice of a job, taken out at once."""
        queue = self._waiting.pop(job_id, None)
        if not queue:
            return []
        self._count -= len(queue)
        return list(queue)

    def remove_all(self) -> list[SliceTask]:
        tasks = [t for queue in self._waiting.values() for t in queue]
        self._waiting.clear()
        self._count = 0
        return tasks

    def position(self, job_id: str) -> int | None:
        """1 for the job served next, None when none of its slices wait."""
        for position, waiting in enumerate(self._waiting, start=1):
            if waiting == job_id:
                return position
        return None
