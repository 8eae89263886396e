"""The janitor: removes job directories, sweeps leftovers, restarts after a crash, drains."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from aiotranscribe.janitor import Janitor, new_job_dir, remove_tree


def jid(name: str) -> str:
    """A job id (32 hex digits) standing for ``name``."""
    return name.encode().hex().ljust(32, "0")[:32]


def make_dirs(spool: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        path = new_job_dir(spool, jid(name))
        (path / "upload").write_bytes(b"x" * 10)
        out.append(path)
    return out


def lives(*names: str):
    async def live() -> set[str]:
        return {jid(n) for n in names}

    return live


async def test_startup_sweep_keeps_live_jobs(tmp_path):
    spool = tmp_path / "spool"
    crashed, live = make_dirs(spool, "crashed-job", "live-job")
    janitor = Janitor(spool, lives("live-job"), interval_s=3600)
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
            raise RuntimeError("a bug in the janitor")
        remove_tree(path)

    janitor = Janitor(spool, lives("a", "b"), interval_s=3600, remove=flaky_remove)
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
    assert janitor_calls.count(jid("a")) == 2  # retried after the restart, not dropped


async def test_close_drains_the_queue(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    janitor = Janitor(spool, lives(), interval_s=3600)
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

    async def on_sweep() -> None:
        sweeps.append(1)

    janitor = Janitor(spool, lives(), interval_s=0.05, on_sweep=on_sweep)
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


async def test_only_its_own_directories_are_touched(tmp_path):
    """A foreign file and directory survive start-up and sweeps (``serve`` started in /var
    with ``--spool-dir spool`` must not empty /var/spool), and are logged once."""
    spool = tmp_path / "spool"
    spool.mkdir()
    foreign_file = spool / "mail.lock"
    foreign_file.write_text("not ours")
    foreign_dir = spool / "cron"
    (foreign_dir / "crontabs").mkdir(parents=True)
    # Named like a job but without our marker: not ours either.
    lookalike = spool / jid("lookalike")
    lookalike.mkdir()
    (orphan,) = make_dirs(spool, "orphan")
    janitor = Janitor(spool, lives(), interval_s=0.05)
    with capture_logs() as logs:
        janitor.start()
        for _ in range(200):
            if not orphan.exists():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # a few more sweeps
        janitor.discard(foreign_dir)  # even when handed one, it stays
        await janitor.close()
    assert not orphan.exists()
    assert foreign_file.read_text() == "not ours"
    assert (foreign_dir / "crontabs").is_dir() and lookalike.is_dir()
    reported = [e["path"] for e in logs if e["event"] == "spool_entry_not_ours"]
    assert sorted(reported) == sorted({str(foreign_file), str(foreign_dir), str(lookalike)})
    foreign_file.unlink()
    remove_tree(foreign_dir)
    lookalike.rmdir()


async def test_an_unremovable_directory_stops_nothing(tmp_path):
    """EACCES on one stale job directory is logged; the next job's cleanup and retention
    still run."""
    spool = tmp_path / "spool"
    spool.mkdir()
    stuck, stale = make_dirs(spool, "stuck", "stale")
    sweeps = []

    def remove(path: Path) -> None:
        if path == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        remove_tree(path)

    async def on_sweep() -> None:
        sweeps.append(1)

    janitor = Janitor(spool, lives(), interval_s=3600, remove=remove, on_sweep=on_sweep)
    with capture_logs() as logs:
        janitor.start()
        (later,) = make_dirs(spool, "later")
        janitor.discard(later)
        for _ in range(300):
            if not stale.exists() and not later.exists() and sweeps:
                break
            await asyncio.sleep(0.01)
        await janitor.close()
    assert not stale.exists() and not later.exists() and stuck.exists()
    assert sweeps == [1] and janitor.restarts == 0
    assert [e["event"] for e in logs].count("spool_remove_failed") == 1
    remove_tree(stuck)
