"""Rendering a 4-hour result: event-loop time per request, rendered each time vs cached.

Before the render cache every ``/status``, ``/result?format=...`` and every WebSocket
watcher's ``completed`` event serialised the whole result on the loop. Now the first request
renders (on a thread when big) and later ones are served from the cache. Prints medians of
the on-loop time per request for each, their ratio, and the longest stall of the loop while a
cold render runs (on the loop before, on a thread now).

    .venv/bin/python benchmarks/render.py [--hours 4] [--repeat 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp.test_utils import TestServer

from aiotranscribe.app import create_app
from aiotranscribe.config import Settings
from aiotranscribe.engine.nemo_engine import DEMO_MODEL
from aiotranscribe.formats import render_bytes
from aiotranscribe.jobs import Job
from aiotranscribe.rendered import RenderCache, render_cache_key, weight
from aiotranscribe.store import open_store
from tests.test_hardening_streams import big_result


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``fn()``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def loop_stall(work: Callable[[], object]) -> float:
    """The longest the loop went without running a 1 ms ticker while ``work`` ran."""
    worst, stop = 0.0, False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    result = work()
    if asyncio.iscoroutine(result):
        await result
    stop = True
    await task
    return worst


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    result = big_result(args.hours)
    job = Job(id="bench", filename="x.wav", model="m", status="completed", result=result)
    event = {"type": "completed", "job_id": job.id, "seq": 9999, "ts": "now", "result": result}
    items = weight(result)
    renders: dict[str, Callable[[], bytes]] = {
        fmt: (lambda fmt=fmt: render_bytes(result, fmt))  # type: ignore[misc]
        for fmt in ("json", "verbose_json", "text", "srt", "vtt")
    }
    renders["status"] = lambda: json.dumps(job.info()).encode()
    renders["ws completed event"] = lambda: json.dumps(event).encode()
    size = len(renders["json"]())
    print(f"{args.hours:g} h synthetic result: {items} words+segments, {size / 1e6:.1f} MB as JSON")
    print(f"{'request':<20}{'before ms':>11}{'after ms':>11}{'ratio':>10}")
    cache = RenderCache()
    for name, fn in renders.items():
        before = timed(fn, args.repeat)
        await cache.get(job.id, name, fn, items)  # the first request renders
        hit_times = []
        for _ in range(args.repeat * 20):
            start = time.perf_counter()
            await cache.get(job.id, name, fn, items)
            hit_times.append(time.perf_counter() - start)
        after = statistics.median(hit_times)
        print(f"{name:<20}{before * 1e3:>11.2f}{after * 1e3:>11.4f}{before / after:>9.0f}x")
    print(f"cache: {cache.stats}")
    cold_on_loop = await loop_stall(renders["srt"])
    fresh = RenderCache()
    cold_thread = await loop_stall(lambda: fresh.get("cold", "srt", renders["srt"], items))
    print(
        f"longest loop stall during a cold SRT render: on the loop {cold_on_loop * 1e3:.1f} ms,"
        f" on a thread {cold_thread * 1e3:.1f} ms (offloaded={fresh.stats.offloaded})"
    )
    await end_to_end(args.hours, max(args.repeat // 3, 3))


async def end_to_end(hours: float, repeat: int) -> None:
    """``GET /jobs/{id}/result?format=srt`` and ``/status`` on a real app and socket: the
    whole request, store read included, with no cache room (before) and with the cache."""
    print(f"end to end, median of {repeat} requests (ms):")
    print(f"{'store':<8}{'request':<10}{'before':>9}{'after':>9}")
    result = big_result(hours)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(
            models=(str(DEMO_MODEL),),
            executor="thread",
            torch_threads=1,
            spool_dir=root / "spool",
            data_dir=root / "data",
        )
        for kind in ("memory", "sqlite"):
            row: dict[str, list[float]] = {"srt": [], "status": []}
            for cache in (RenderCache(max_bytes=0, offload_items=10**12), RenderCache()):
                store = open_store(kind, root / f"data-{kind}-{id(cache)}", ttl_s=3600)
                app = create_app(settings, store=store)
                app[render_cache_key] = cache
                async with TestServer(app) as server, aiohttp.ClientSession() as session:
                    job_id = "b" * 32
                    await store.create(Job(id=job_id, filename="x.wav", model="m"), [])
                    await store.finish(job_id, "completed", {"result": result}, result=result)
                    for name, path in (("srt", "result?format=srt"), ("status", "status")):
                        times = []
                        for _ in range(repeat):
                            start = time.perf_counter()
                            async with session.get(server.make_url(f"/jobs/{job_id}/{path}")) as r:
                                await r.read()
                            times.append(time.perf_counter() - start)
                        row[name].append(statistics.median(times))
            for name, (before, after) in row.items():
                print(f"{kind:<8}{name:<10}{before * 1e3:>9.1f}{after * 1e3:>9.1f}")


if __name__ == "__main__":
    asyncio.run(main())
