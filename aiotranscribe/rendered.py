"""Finished results rendered once per job and format, kept as bytes in a bounded LRU.

A finished job never changes, so ``(job id, format)`` names its rendering for as long as
the job exists. Handlers look the job up before asking here (an expired job is a 404), so an
entry can outlive its job only until the LRU pushes it out. Serialising a 4-hour result
takes tens of milliseconds (benchmarks/render.py); a big one is built on a thread so the
loop keeps answering meanwhile, and concurrent requests for it share one build.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

MAX_BYTES = 64 * 1024 * 1024
# Words plus segments above which a render goes to a thread: below it a render takes about
# a millisecond, less than the hop to a thread and back.
OFFLOAD_ITEMS = 2000

Key = tuple[str, str]


def weight(result: dict[str, Any] | None) -> int:
    """How much rendering ``result`` costs, in words plus segments."""
    if not result:
        return 0
    segments = result.get("segments") or []
    return len(segments) + sum(len(seg.get("words") or ()) for seg in segments)


async def build(fn: Callable[[], bytes], items: int, offload_items: int = OFFLOAD_ITEMS) -> bytes:
    """``fn()``, on a thread when ``items`` says it is big."""
    if items > offload_items:
        return await asyncio.to_thread(fn)
    return fn()


@dataclass
class CacheStats:
    renders: int = 0
    hits: int = 0
    """Requests answered from the cache or from a build already under way."""
    offloaded: int = 0
    """Renders that ran on a thread."""
    evictions: int = 0


class RenderCache:
    def __init__(self, max_bytes: int = MAX_BYTES, offload_items: int = OFFLOAD_ITEMS) -> None:
        self.max_bytes = max_bytes
        self.offload_items = offload_items
        self.stats = CacheStats()
        self._entries: OrderedDict[Key, bytes] = OrderedDict()
        self._size = 0
        self._building: dict[Key, asyncio.Task[bytes]] = {}

    async def get(self, job_id: str, fmt: str, fn: Callable[[], bytes], items: int) -> bytes:
        """The bytes ``fn()`` renders for this job and format, built at most once."""
        key = (job_id, fmt)
        body = self._entries.get(key)
        if body is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return body
        task = self._building.get(key)
        if task is None:
            # The build belongs to the cache, not to the request that started it: a client
            # that leaves does not cancel it under the others waiting for it.
            task = asyncio.ensure_future(self._build(key, fn, items))
            task.add_done_callback(_retrieve)
            self._building[key] = task
        else:
            self.stats.hits += 1
        return await asyncio.shield(task)

    async def _build(self, key: Key, fn: Callable[[], bytes], items: int) -> bytes:
        try:
            body = await build(fn, items, self.offload_items)
        finally:
            del self._building[key]
        self.stats.renders += 1
        self.stats.offloaded += items > self.offload_items
        self._store(key, body)
        return body

    def _store(self, key: Key, body: bytes) -> None:
        if len(body) > self.max_bytes // 4:
            return  # one huge entry would push out everything else
        self._entries[key] = body
        self._size += len(body)
        while self._size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._size -= len(old)
            self.stats.evictions += 1

    def drop(self, job_id: str) -> None:
        """Forget a job's renderings (it was deleted)."""
        for key in [k for k in self._entries if k[0] == job_id]:
            self._size -= len(self._entries.pop(key))


def _retrieve(task: asyncio.Task[bytes]) -> None:
    # Mark a failed build's exception as seen when every requester has gone away.
    if not task.cancelled():
        task.exception()


render_cache_key = web.AppKey("render_cache", RenderCache)
"""``create_app`` puts one there; replace it before the app starts to use one's own (a
benchmark's, with no room)."""


def cache_of(app: web.Application) -> RenderCache:
    return app[render_cache_key]
