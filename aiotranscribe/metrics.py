"""Prometheus metrics: one registry per app, served at ``GET /metrics``.

Request and job numbers are recorded as they happen (a middleware, the service's
``on_finish`` hook, each pool's ``on_batch`` callback). Everything the pools, the job store
and the WebSocket set already count is read when Prometheus scrapes, never copied.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from aiotranscribe.admission import Admission
from aiotranscribe.jobs import COMPLETED, PENDING, PROCESSING, Job
from aiotranscribe.pool import InferencePool
from aiotranscribe.service import TranscriptionService
from aiotranscribe.shared_admission import SharedAdmission

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PREFIX = "aiotranscribe"
# Client closed the connection before an answer (nginx's convention).
CLIENT_CLOSED = 499
STAGES = {
    "convert_s": "convert",
    "queue_s": "queue",
    "inference_s": "inference",
    "total_s": "total",
}
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BYTES_BUCKETS = tuple(float(2**p) for p in range(14, 32, 2))  # 16 KiB .. 1 GiB
RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def route_label(request: web.Request) -> str:
    """The route's pattern (``/jobs/{job_id}/status``), never the raw path: bounded labels."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Read before each scrape: numbers only another process (Redis) has.
        self.before_scrape: list[Callable[[], Awaitable[None]]] = []
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route pattern, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time to answer an HTTP request (WebSockets and streams: their whole life)",
            ["route"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.upload_bytes = Histogram(
            f"{PREFIX}_upload_bytes",
            "Size of each accepted upload",
            ["model"],
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter(
            f"{PREFIX}_audio_seconds",
            "Seconds of audio in completed jobs",
            ["model"],
            registry=r,
        )
        self.jobs = Counter(
            f"{PREFIX}_jobs", "Jobs ended, by final status", ["model", "status"], registry=r
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_job_stage_seconds",
            "Time completed jobs spent per stage: convert, queue (until the first slice is "
            "back), inference (queueing included), total",
            ["model", "stage"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.real_time_factor = Histogram(
            f"{PREFIX}_job_real_time_factor",
            "Wall time over audio time of completed jobs (below 1: faster than real time)",
            ["model"],
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Slices per inference call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            f"{PREFIX}_batch_duration_seconds",
            "Time of one inference call",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )

        self.webhook_attempts = Counter(
            f"{PREFIX}_webhook_attempts",
            "Webhook delivery attempts, by outcome: delivered (2xx), retry (network error, "
            "timeout, 5xx or 429: tried again later), failed (given up)",
            ["outcome"],
            registry=r,
        )

    # -- wiring ------------------------------------------------------------------------------

    def webhook_attempt(self, outcome: str) -> None:
        """A ``Webhooks(on_attempt=...)`` callback."""
        self.webhook_attempts.labels(outcome).inc()

    def batch_observer(self, model: str) -> Callable[[int, float, float], None]:
        """An ``InferencePool(on_batch=...)`` callback for ``model``."""
        size = self.batch_size.labels(model)
        seconds = self.batch_seconds.labels(model)

        def observe(count: int, busy_s: float, _audio_s: float) -> None:
            size.observe(count)
            seconds.observe(busy_s)

        return observe

    def watch(
        self,
        pools: dict[str, InferencePool],
        service: TranscriptionService,
        admission: Admission,
        websockets: weakref.WeakSet[web.WebSocketResponse],
    ) -> None:
        """Read the pools, service, admission and sockets at scrape time; hear about every
        job's end."""
        self.registry.register(StateCollector(pools, service, admission, websockets))
        service.on_finish.append(self.observe_job)

    def watch_shared(self, admission: SharedAdmission) -> None:
        """Name this replica, and read the shared queue (Redis) afresh at each scrape."""
        self.registry.register(SharedQueueCollector(admission))
        self.before_scrape.append(admission.refresh)

    def observe_job(self, job: Job, timings: dict[str, float]) -> None:
        self.jobs.labels(job.model, job.status).inc()
        if job.status != COMPLETED or "total_s" not in timings:
            return
        self.upload_bytes.labels(job.model).observe(job.upload_bytes)
        audio_s = timings.get("audio_s", 0.0)
        self.audio_seconds.labels(job.model).inc(audio_s)
        for key, stage in STAGES.items():
            if key in timings:
                self.stage_seconds.labels(job.model, stage).observe(timings[key])
        if audio_s > 0:
            self.real_time_factor.labels(job.model).observe(timings["total_s"] / audio_s)

    # -- HTTP --------------------------------------------------------------------------------

    @property
    def middleware(self) -> Middleware:
        """Counts every answer; goes first, so it sees the status the client gets."""

        @web.middleware
        async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:  # redirects and the like, re-raised by errors
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = CLIENT_CLOSED
                raise
            finally:
                route = route_label(request)
                self.requests.labels(route, request.method, str(status)).inc()
                self.request_seconds.labels(route).observe(time.perf_counter() - started)

        return metrics_middleware

    async def handle(self, _request: web.Request) -> web.StreamResponse:
        """``GET /metrics``: the text exposition format."""
        for refresh in self.before_scrape:
            await refresh()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class StateCollector(Collector):
    """Numbers that already exist elsewhere, read when Prometheus scrapes."""

    def __init__(
        self,
        pools: dict[str, InferencePool],
        service: TranscriptionService,
        admission: Admission,
        websockets: weakref.WeakSet[web.WebSocketResponse],
    ) -> None:
        self.pools, self.service, self.websockets = pools, service, websockets
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["model"])

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        ready = gauge("model_ready", "1 when the model is loaded and serving", ["model"])
        depth = gauge("queue_depth", "Slices waiting for the model", ["model"])
        waited = counter("queue_wait_seconds", "Time slices waited in the queue, summed")
        slices = counter("slices", "Slices transcribed")
        batches = counter("batches", "Inference calls")
        busy = counter("inference_busy_seconds", "Time the worker spent in inference calls")
        audio = counter("inference_audio_seconds", "Audio seconds run through the model")
        restarts = counter("worker_restarts", "Worker processes restarted after a crash")
        rejected = counter("rejected_submissions", "Submissions refused (503): queue full")
        admitted = gauge(
            "admitted_audio_seconds",
            "Audio seconds held by admitted jobs not yet ended (uploading to transcribing)",
            ["model"],
        )
        restarts_b = counter("batcher_restarts", "Batcher loops restarted after an error")
        split = counter("split_batches", "Failed batches retried slice by slice")
        for name, pool in self.pools.items():
            stats = pool.stats
            ready.add_metric([name], 1.0 if pool.state == "ready" else 0.0)
            depth.add_metric([name], pool.queued)
            waited.add_metric([name], stats.queue_wait_s)
            slices.add_metric([name], stats.slices_done)
            batches.add_metric([name], stats.batches)
            busy.add_metric([name], stats.busy_s)
            audio.add_metric([name], stats.audio_s)
            restarts.add_metric([name], stats.worker_restarts)
            rejected.add_metric([name], self.admission.rejected.get(name, 0))
            admitted.add_metric([name], self.admission.used(name))
            restarts_b.add_metric([name], stats.batcher_restarts)
            split.add_metric([name], stats.split_batches)
        yield from (ready, depth, waited, slices, batches, busy, audio, restarts, rejected)
        yield from (admitted, restarts_b, split)

        up = gauge("worker_ready", "1 when this worker of the model serves", ["model", "worker"])
        pids = gauge(
            "worker_pid", "Process id of the worker (0: none, or a thread)", ["model", "worker"]
        )
        lane_batches = CounterMetricFamily(
            f"{PREFIX}_worker_batches",
            "Inference calls per worker",
            labels=["model", "worker"],
        )
        for name, pool in self.pools.items():
            for lane in pool.lanes:
                labels = [name, str(lane.index)]
                up.add_metric(labels, 1.0 if lane.state == "ready" else 0.0)
                pids.add_metric(labels, float(lane.pid or 0))
                lane_batches.add_metric(labels, lane.batches)
        yield from (up, pids, lane_batches)

        active = gauge("jobs_active", "Jobs not yet ended, by status", ["status"])
        counts = {PENDING: 0, PROCESSING: 0}
        for status in self.service.active.values():
            if status in counts:
                counts[status] += 1
        for status, count in counts.items():
            active.add_metric([status], count)
        yield active

        sockets = gauge("websocket_connections", "Open job-event WebSockets", [])
        sockets.add_metric([], len(self.websockets))
        yield sockets


class SharedQueueCollector(Collector):
    """This replica's name, and each model's shared queue as ``SharedAdmission`` last read
    it (``Metrics.handle`` refreshes it first)."""

    def __init__(self, admission: SharedAdmission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("model",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))

        info = gauge(
            "replica_info", "This API replica's name (its store and stream id)", ("replica",)
        )
        info.add_metric([self.admission.replica], 1.0)
        reachable = gauge("shared_queue_reachable", "1 when Redis answered the last read", ())
        reachable.add_metric([], 1.0 if self.admission.reachable else 0.0)
        total = gauge(
            "shared_admitted_audio_seconds",
            "Audio seconds held by the jobs of every live replica (what the limit counts)",
        )
        limit = gauge("shared_admission_limit_seconds", "The limit on the shared total")
        lag = gauge("stream_lag", "Work stream entries not yet read by any worker (NaN: unknown)")
        pending = gauge("stream_pending", "Work stream entries read, not yet acknowledged")
        read = gauge("stream_entries_read", "Work stream entries read by the group, ever")
        workers = gauge("remote_workers", "Workers of the model that announced themselves lately")
        worker = gauge("remote_worker_info", "A live worker, by consumer name", ("model", "worker"))
        for model, state in self.admission.queues.items():
            total.add_metric([model], state.total_s)
            limit.add_metric([model], self.admission.limit_s)
            workers.add_metric([model], len(state.workers))
            for name in state.workers:
                worker.add_metric([model, name], 1.0)
            if state.pending is None:  # no stream yet (no worker has started)
                continue
            lag.add_metric([model], math.nan if state.lag is None else state.lag)
            pending.add_metric([model], state.pending)
            read.add_metric([model], state.entries_read or 0)
        yield from (info, reachable, total, limit, lag, pending, read, workers, worker)
