"""The janitor: removes job directories, sweeps leftovers, restarts after a crash, drains."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from aiotranscribe.janitor import Janitor, remove_tree


def make_dirs(spool: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        (spool / name).mkdir(parents=True)
        (spool / name / "upload").write_bytes(b"x" * 10)
        out.append(spool / name)
    return out


async def test_startup_sweep_keeps_live_jobs(tmp_path):
    spool = tmp_path / "spool"
    crashed, live = make_dirs(spool, "crashed-job", "live-job")
    janitor = Janitor(spool, lambda: {"live-job"}, interval_s=3600)
    janitor.start()
    for _ in range(100):
        if not crashed.exists():
            break
        await asyncio.sleep(0.01)
    assert not crashed.exists() and live.exists()
    await janitor.close()
    remove_tree(live)


async def test_restarts_after_a_crash_and_loses_nothing(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    janitor_calls = []

    def flaky_remove(path: Path) -> None:
        janitor_calls.append(path.name)
        if len(janitor_calls) == 1:
            raise OSError("disk hiccup")
        remove_tree(path)

    janitor = Janitor(spool, lambda: {"a", "b"}, interval_s=3600, remove=flaky_remove)
    with capture_logs() as logs:
        janitor.start()
        a, b = make_dirs(spool, "a", "b")
        janitor.discard(a)
        janitor.discard(b)
        for _ in range(300):
            if not a.exists() and not b.exists():
                break
            await asyncio.sleep(0.01)
        await janitor.close()
    assert not a.exists() and not b.exists()
    assert janitor.restarts == 1
    assert any(e["event"] == "janitor_crashed" for e in logs)
    assert janitor_calls.count("a") == 2  # retried after the restart, not dropped


async def test_close_drains_the_queue(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    janitor = Janitor(spool, lambda: set(), interval_s=3600)
    janitor.start()
    await asyncio.sleep(0)  # let the startup sweep run first
    dirs = make_dirs(spool, *(f"job{i}" for i in range(20)))
    for d in dirs:
        janitor.discard(d)
    await janitor.close()
    assert janitor.pending == 0
    assert list(spool.iterdir()) == []


async def test_periodic_sweep_and_eviction_hook(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    sweeps = []
    janitor = Janitor(spool, lambda: set(), interval_s=0.05, on_sweep=lambda: sweeps.append(1))
    janitor.start()
    await asyncio.sleep(0.02)
    (orphan,) = make_dirs(spool, "orphan")
    for _ in range(100):
        if not orphan.exists():
            break
        await asyncio.sleep(0.02)
    await janitor.close()
    assert not orphan.exists()
    assert len(sweeps) >= 2
