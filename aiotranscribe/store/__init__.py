"""Where jobs, their event logs and their slices live: one interface, several stores.

``memory`` keeps everything in this process (lost on exit); ``sqlite`` (the default) keeps it
in a SQLite file that survives crashes and restarts. Both pass the same contract tests.
"""

from __future__ import annotations

from pathlib import Path

from aiotranscribe.store.base import EventSpec, JobStore, SliceRecord, StoreClosed
from aiotranscribe.store.memory import MemoryStore
from aiotranscribe.store.sqlite import SqliteStore

__all__ = ["EventSpec", "JobStore", "MemoryStore", "SliceRecord", "SqliteStore", "StoreClosed"]

DB_NAME = "jobs.sqlite3"


def open_store(kind: str, data_dir: Path, *, ttl_s: float, synchronous: str = "full") -> JobStore:
    """The store ``--store`` names (not yet opened: call ``await store.open()``)."""
    if kind == "memory":
        return MemoryStore(ttl_s=ttl_s)
    if kind == "sqlite":
        return SqliteStore(data_dir / DB_NAME, ttl_s=ttl_s, synchronous=synchronous)
    raise ValueError(f"unknown store {kind!r}: use sqlite or memory")
