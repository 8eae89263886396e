"""What a store costs per write: memory, SQLite (synchronous FULL and NORMAL) and Redis (AOF
``appendfsync always`` and ``everysec``, a redis-server started here on loopback).

For each: the median and p99 latency of one event append and of one batch commit (8 slices
of one job), one at a time; then events per second with 32 writers at once (what many jobs'
progress and segment events look like). Run: ``.venv/bin/python benchmarks/store_latency.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiotranscribe.jobs import Job
from aiotranscribe.store import JobStore, MemoryStore, SqliteStore
from aiotranscribe.store.redis import RedisStore
from tests.redisserver import RedisServer

BATCH = 8
WRITERS = 32


@asynccontextmanager
async def opened(kind: str, base: Path) -> AsyncIterator[JobStore]:
    server: RedisServer | None = None
    store: JobStore
    if kind == "memory":
        store = MemoryStore()
    elif kind.startswith("sqlite"):
        store = SqliteStore(base / f"{kind}.sqlite3", synchronous=kind.split("-")[1])
    else:
        server = RedisServer(base / kind, appendfsync=kind.split("-")[1]).start()
        store = RedisStore(server.url())
    await store.open()
    try:
        yield store
    finally:
        await store.close()
        if server is not None:
            server.stop()


async def timed(n: int, op: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        await op(i)  # type: ignore[misc]
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(ms: list[float]) -> str:
    ms = sorted(ms)
    return f"{statistics.median(ms):.3f} / {ms[int(len(ms) * 0.99) - 1]:.3f}"


async def measure(kind: str, base: Path, n: int) -> dict[str, str]:
    async with opened(kind, base) as store:
        job = Job(id="b" * 32, filename="x.wav", model="demo")
        await store.create(job, [("status", {"status": "pending"})])
        slices = [(i * 100, 100) for i in range(n * BATCH)]
        await store.add_slices(job.id, slices, [])
        append = await timed(
            n, lambda i: store.append_events(job.id, [("progress", {"i": i})], progress=0.5)
        )

        async def commit(i: int) -> None:
            keys = [(job.id, i * BATCH + k) for k in range(BATCH)]
            epochs = await store.lease_slices(keys, "bench", 60)
            await store.commit_slices([(j, x, epochs[(j, x)], {"text": "w"}) for j, x in keys])

        commits = await timed(n, commit)

        async def writer(w: int) -> None:
            for i in range(n // 4):
                await store.append_events(job.id, [("progress", {"w": w, "i": i})])

        started = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
        rate = WRITERS * (n // 4) / (time.perf_counter() - started)
        seqs = [e["seq"] for e in await store.events_after(job.id, 0)]
        assert seqs == list(range(1, len(seqs) + 1))
    return {
        "append": summary(append),
        "commit": summary(commits),
        "events_s": f"{rate:,.0f}",
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=400, help="operations per measurement")
    args = parser.parse_args()
    kinds = ["memory", "sqlite-full", "sqlite-normal", "redis-always", "redis-everysec"]
    print(
        f"| store | append ms (median / p99) | commit of {BATCH} ms | events/s, {WRITERS} writers |"
    )
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            row = await measure(kind, Path(tmp), args.n)
            print(f"| {kind} | {row['append']} | {row['commit']} | {row['events_s']} |")


if __name__ == "__main__":
    asyncio.run(main())
