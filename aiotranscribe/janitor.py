"""A supervised task that removes job spool directories.

Jobs hand their directory to ``discard`` when they end; the janitor removes it off the event
loop. It also sweeps the spool at start-up and every ``interval_s`` for directories no live
job owns (left by a crash or a kill). If its loop raises, the supervisor logs it and starts
it again after a back-off. On shutdown, ``close`` drains everything queued before returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

BACKOFF_S = (0.1, 0.5, 2.0, 10.0)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=False)


class Janitor:
    def __init__(
        self,
        spool: Path,
        live_ids: Callable[[], set[str]],
        *,
        interval_s: float = 300.0,
        remove: Callable[[Path], None] = remove_tree,
        on_sweep: Callable[[], object] | None = None,
    ) -> None:
        self.spool = spool
        self._live_ids = live_ids
        self.interval_s = interval_s
        self._remove = remove
        self._on_sweep = on_sweep
        self._queue: asyncio.Queue[Path] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0
        self.removed = 0

    def start(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._supervise(), name="janitor")

    def discard(self, path: Path) -> None:
        """Queue a job directory for removal (never blocks)."""
        self._queue.put_nowait(path)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def _remove_one(self, path: Path) -> None:
        if path.exists():
            await asyncio.to_thread(self._remove, path)
            self.removed += 1

    async def sweep(self) -> None:
        """Remove spool directories that no live job owns."""
        live = self._live_ids()
        entries = await asyncio.to_thread(lambda: list(self.spool.iterdir()))
        for entry in entries:
            if entry.name not in live:
                log.info("janitor_sweep", path=str(entry))
                if entry.is_dir():
                    await self._remove_one(entry)
                else:
                    await asyncio.to_thread(entry.unlink, True)
        if self._on_sweep is not None:
            self._on_sweep()

    async def _loop(self) -> None:
        await self.sweep()
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self.interval_s
        while True:
            try:
                async with asyncio.timeout(max(next_sweep - loop.time(), 0)):
                    path = await self._queue.get()
            except TimeoutError:
                await self.sweep()
                next_sweep = loop.time() + self.interval_s
                continue
            try:
                await self._remove_one(path)
            except BaseException:
                self._queue.put_nowait(path)  # not lost: retried after the restart
                raise

    async def _supervise(self) -> None:
        failures = 0
        while True:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                self.restarts += 1
                log.exception("janitor_crashed", restart_in_s=delay)
                await asyncio.sleep(delay)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the loop, then remove everything still queued (best effort, bounded)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            async with asyncio.timeout(timeout):
                while not self._queue.empty():
                    path = self._queue.get_nowait()
                    try:
                        await self._remove_one(path)
                    except Exception:
                        log.exception("janitor_drain_failed", path=str(path))
        except TimeoutError:
            log.error("janitor_drain_timeout", left=self._queue.qsize())
