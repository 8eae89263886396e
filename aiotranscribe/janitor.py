"""A supervised task that removes job spool directories, and only those.

Jobs hand their directory to ``discard`` when they end; the janitor removes it off the event
loop. It also sweeps the spool at start-up and every ``interval_s`` for job directories no
live job owns (an upload cut off by a crash). It only ever removes directories the server
made: a job-id name holding the marker file ``new_job_dir`` writes first. Anything else in
the spool (a file, someone else's directory, another program's ``/var/spool`` entry) is left
alone and logged once. A directory it cannot remove is logged and skipped; it never stops
the sweep, later removals or retention. On shutdown, ``close`` drains what is queued.

With ``--shared-dir`` it sweeps that directory too, which every replica's janitor sweeps:
"no live job owns it" then relies on the store's live set being everyone's (Redis), and on
a job directory appearing there only once its job is in the store (``move_job_dir``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from aiotranscribe.supervise import run_supervised

log = structlog.get_logger(__name__)

MARKER = ".aiotranscribe-job"
JOB_ID = re.compile(r"[0-9a-f]{32}")
# Removals of one directory tried before it is left for the next sweep.
REMOVE_TRIES = 3


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=False)


def new_job_dir(spool: Path, job_id: str) -> Path:
    """Create a job's directory with the marker that makes it ours to remove later."""
    if not JOB_ID.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    path = spool / job_id
    path.mkdir(parents=True)
    try:
        (path / MARKER).write_text(job_id)
    except OSError:
        # Unmarked, the directory would never be swept: remove it now (e.g. a full disk).
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def move_job_dir(src: Path, dst: Path) -> None:
    """Move the job directory ``src`` to ``dst`` (the shared dir): one rename on the same
    filesystem; else each file copied (``.part``, fsync, rename), then ``src`` removed, so a
    copy cut off by a crash is redone whole. Nothing to do once ``src`` is gone."""
    if not src.is_dir():
        return
    if not dst.exists():
        try:
            os.rename(src, dst)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EEXIST, errno.ENOTEMPTY):
                raise
    dst.mkdir(exist_ok=True)
    (dst / MARKER).write_text(dst.name)
    for item in src.iterdir():
        if item.name == MARKER or not item.is_file():
            continue
        partial = dst / (item.name + ".part")
        shutil.copyfile(item, partial)
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, dst / item.name)
    shutil.rmtree(src)


def is_job_dir(path: Path) -> bool:
    return (
        JOB_ID.fullmatch(path.name) is not None
        and path.is_dir()
        and not path.is_symlink()
        and (path / MARKER).is_file()
    )


class Janitor:
    def __init__(
        self,
        spool: Path,
        live_ids: Callable[[], Awaitable[set[str]]],
        *,
        interval_s: float = 300.0,
        remove: Callable[[Path], None] = remove_tree,
        on_sweep: Callable[[], Awaitable[object]] | None = None,
        shared: Path | None = None,
    ) -> None:
        self.spool = spool
        self.roots = [spool] if shared is None else [spool, shared]
        self._live_ids = live_ids
        self.interval_s = interval_s
        self._remove = remove
        self._on_sweep = on_sweep
        self._queue: asyncio.Queue[tuple[Path, int]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._reported: set[str] = set()
        self.restarts = 0
        self.removed = 0
        self.failures = 0

    def start(self) -> None:
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(
            run_supervised(self._loop, "janitor_crashed", self._restarted), name="janitor"
        )

    def discard(self, path: Path) -> None:
        """Queue a job directory for removal (never blocks)."""
        self._queue.put_nowait((path, 0))

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _report_once(self, event: str, path: Path, **fields: object) -> None:
        if str(path) not in self._reported:
            self._reported.add(str(path))
            log.warning(event, path=str(path), **fields)

    async def _remove_one(self, path: Path) -> bool:
        """Remove one of our job directories; False (logged) when it cannot be removed."""
        if not await asyncio.to_thread(is_job_dir, path):
            if await asyncio.to_thread(path.exists):
                self._report_once("spool_entry_not_ours", path)
            return True
        try:
            await asyncio.to_thread(self._remove, path)
        except OSError as exc:
            self.failures += 1
            self._report_once("spool_remove_failed", path, error=str(exc))
            return False
        self.removed += 1
        return True

    async def sweep(self) -> None:
        """Remove our job directories that no live job owns; then run retention."""
        # List first, then ask who is live: a job reserved in between is in the live set,
        # and a directory listed in the shared dir belongs to a job already in the store.
        entries = await asyncio.to_thread(
            lambda: [entry for root in self.roots for entry in root.iterdir()]
        )
        live = await self._live_ids()
        for entry in entries:
            if entry.name in live:
                continue
            if not await asyncio.to_thread(is_job_dir, entry):
                self._report_once("spool_entry_not_ours", entry)
                continue
            log.info("janitor_sweep", path=str(entry))
            await self._remove_one(entry)
        if self._on_sweep is not None:
            try:
                await self._on_sweep()
            except Exception:
                log.exception("retention_failed")

    async def _loop(self) -> None:
        await self.sweep()
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self.interval_s
        while True:
            try:
                async with asyncio.timeout(max(next_sweep - loop.time(), 0)):
                    path, tries = await self._queue.get()
            except TimeoutError:
                await self.sweep()
                next_sweep = loop.time() + self.interval_s
                continue
            try:
                removed = await self._remove_one(path)
            except BaseException:
                self._queue.put_nowait((path, tries))  # not lost: retried after the restart
                raise
            if not removed and tries + 1 < REMOVE_TRIES:
                self._queue.put_nowait((path, tries + 1))

    def _restarted(self) -> None:
        self.restarts += 1

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the loop, then remove everything still queued (best effort, bounded)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            async with asyncio.timeout(timeout):
                while not self._queue.empty():
                    path, _ = self._queue.get_nowait()
                    try:
                        await self._remove_one(path)
                    except Exception:
                        log.exception("janitor_drain_failed", path=str(path))
        except TimeoutError:
            log.error("janitor_drain_timeout", left=self._queue.qsize())
