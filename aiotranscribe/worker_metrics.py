"""``aiotranscribe worker --metrics-port``: the worker's own counters, for Prometheus.

A worker has no HTTP API of its own, so with ``--metrics-port`` it serves ``GET /metrics``
on a small aiohttp server: what it computed, skipped, reclaimed and dead-lettered, labelled
with its model and consumer name (the name in the stream's pending list and in the API
replicas' ``aiotranscribe_remote_worker_info``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

PREFIX = "aiotranscribe_worker"


@dataclass
class WorkerCounters:
    batches: int = 0  # model calls that returned results
    slices: int = 0  # slices in those calls
    skipped: int = 0  # slices acknowledged without computing them (their replica is gone...)
    reclaimed: int = 0  # slices taken over from a worker that died or hung
    dead_lettered: int = 0  # slices moved to the dead-letter stream
    busy_s: float = 0.0  # time in model calls


class CountersCollector(Collector):
    def __init__(self, counters: WorkerCounters, model: str, worker: str) -> None:
        self.counters, self.labels = counters, [model, worker]

    def collect(self) -> Iterator[Metric]:
        c = self.counters
        for name, doc, value in (
            ("batches", "Model calls that returned results", c.batches),
            ("slices", "Slices computed", c.slices),
            ("skipped_slices", "Slices acknowledged without computing them", c.skipped),
            ("reclaimed_slices", "Slices taken over from a worker that died or hung", c.reclaimed),
            ("dead_lettered_slices", "Slices moved to the dead-letter stream", c.dead_lettered),
            ("busy_seconds", "Time spent in model calls", c.busy_s),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["model", "worker"])
            family.add_metric(self.labels, value)
            yield family


@contextlib.asynccontextmanager
async def metrics_server(
    counters: WorkerCounters, model: str, worker: str, host: str, port: int | None
) -> AsyncIterator[None]:
    """Serve ``GET /metrics`` on ``host:port`` while inside (nothing when ``port`` is None)."""
    if port is None:
        yield
        return
    registry = CollectorRegistry()
    registry.register(CountersCollector(counters, model, worker))

    async def handle(_request: web.Request) -> web.StreamResponse:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("worker_metrics_listening", host=host, port=port)
        yield
    finally:
        await runner.cleanup()
