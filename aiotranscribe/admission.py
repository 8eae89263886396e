"""Admission: how much audio each model has been promised, at every stage of every job.

A job holds its share from the moment its upload starts until it ends: while uploading or
converting (length unknown) it holds ``provisional_s``; once probed, its length; while it is
transcribed, the audio still to do. A request is refused (503 + Retry-After) before its body
is read when its model's total would pass ``limit_s``, so N concurrent uploads cannot all
slip under a limit meant for one. Held in this process: a restart re-admits the jobs it
recovers without checking the limit (they were accepted already). API replicas that share
remote workers share the limit too: ``shared_admission.SharedAdmission``.
"""

from __future__ import annotations

from collections.abc import Callable


class QueueFull(Exception):
    """Admitting the job would pass the limit; ``retry_after`` is a wait in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the transcription queue is full")
        self.retry_after = retry_after


class Admission:
    def __init__(
        self,
        limit_s: float,
        provisional_s: float,
        speed_of: Callable[[str], float | None],
    ) -> None:
        self.limit_s = limit_s
        self.provisional_s = provisional_s
        self._speed_of = speed_of
        self._held: dict[str, tuple[str, float]] = {}
        self.rejected: dict[str, int] = {}

    def used(self, model: str) -> float:
        """What this process's jobs hold for ``model``."""
        return sum(s for m, s in self._held.values() if m == model)

    def total(self, model: str) -> float:
        """What counts against the limit: here, this process's share (``SharedAdmission``
        adds the other replicas')."""
        return self.used(model)

    def retry_after(self, model: str) -> int:
        """Whole seconds after which the model has likely worked off the excess."""
        speed = self._speed_of(model) or 10.0
        excess = max(self.total(model) + self.provisional_s - self.limit_s, 1.0)
        return max(1, min(300, int(excess / speed) + 1))

    def fits(self, model: str, seconds: float) -> bool:
        return self.total(model) + seconds <= self.limit_s

    async def admit(self, job_id: str, model: str) -> None:
        """Hold the provisional share for a new job, or raise QueueFull. Here the check is
        ``reserve``'s; ``SharedAdmission`` makes it against every replica's shares."""
        self.reserve(job_id, model)

    async def readmit(self, job_id: str, model: str) -> None:
        """Charge the job to ``model`` instead (``move``), or raise QueueFull."""
        self.move(job_id, model)

    def reserve(self, job_id: str, model: str, seconds: float | None = None) -> None:
        """Hold ``seconds`` (default: provisional) for a new job, or raise QueueFull."""
        seconds = self.provisional_s if seconds is None else seconds
        if not self.fits(model, seconds):
            self.rejected[model] = self.rejected.get(model, 0) + 1
            raise QueueFull(self.retry_after(model))
        self._held[job_id] = (model, seconds)

    def hold(self, job_id: str, model: str, seconds: float) -> None:
        """Hold without checking: a job accepted before a restart."""
        self._held[job_id] = (model, seconds)

    def move(self, job_id: str, model: str) -> None:
        """The request named another model than the one it was admitted against."""
        current = self._held.get(job_id)
        if current is None or current[0] == model:
            return
        del self._held[job_id]
        try:
            self.reserve(job_id, model, current[1])
        except QueueFull:
            self._held[job_id] = current
            raise

    def update(self, job_id: str, seconds: float) -> None:
        """The job's share is now ``seconds`` (its length, or what is left to do)."""
        if job_id in self._held:
            self._held[job_id] = (self._held[job_id][0], max(seconds, 0.0))

    def release(self, job_id: str) -> None:
        self._held.pop(job_id, None)
