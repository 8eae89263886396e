"""Where jobs, their event logs and their slices live: one interface, several stores.

``memory`` keeps everything in this process (lost on exit); ``sqlite`` (the default) keeps it
in a SQLite file that survives crashes and restarts; ``redis://host:port/db`` keeps it in Redis
(it survives what that Redis's persistence survives). All pass the same contract tests.
"""

from __future__ import annotations

from pathlib import Path

from aiotranscribe.store.base import EventSpec, JobStore, SliceRecord, StoreClosed
from aiotranscribe.store.memory import MemoryStore
from aiotranscribe.store.sqlite import SqliteStore

__all__ = ["EventSpec", "JobStore", "MemoryStore", "SliceRecord", "SqliteStore", "StoreClosed"]

DB_NAME = "jobs.sqlite3"


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_store(kind: str) -> None:
    """Raise ValueError unless ``kind`` names a store: ``sqlite``, ``memory`` or a Redis URL."""
    if kind in ("sqlite", "memory"):
        return
    if kind.startswith(REDIS_SCHEMES):
        from aiotranscribe.store.redis import check_url

        check_url(kind)
        return
    raise ValueError(f"unknown store {kind!r}: use sqlite, memory or redis://host:port/db")


def open_store(
    kind: str,
    data_dir: Path,
    *,
    ttl_s: float,
    synchronous: str = "full",
    owner_ttl_s: float = 15.0,
) -> JobStore:
    """The store ``--store`` names (not yet opened: call ``await store.open()``)."""
    check_store(kind)
    if kind == "memory":
        return MemoryStore(ttl_s=ttl_s)
    if kind == "sqlite":
        return SqliteStore(data_dir / DB_NAME, ttl_s=ttl_s, synchronous=synchronous)
    from aiotranscribe.store.redis import RedisStore  # imported only where it is used

    return RedisStore(kind, ttl_s=ttl_s, owner_ttl_s=owner_ttl_s)
