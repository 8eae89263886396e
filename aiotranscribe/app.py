"""``create_app(settings)``: wiring only. Every resource with a lifetime is a cleanup context.

Start-up order: job store (opened) -> janitor (sweeps crash leftovers) -> model pools (load in
the background) -> recovery (jobs the store says had not ended are resumed) -> webhooks
(deliveries the store says are pending are scheduled again).

Shutdown (``shutdown_sequence``, the app's ``on_shutdown``), in this order:
1. stop admitting: ``/ready`` answers 503, new submissions 503 + Retry-After;
2. drain: running jobs go on for up to ``shutdown_timeout_s``;
3. stop: jobs still running are left in the store as they are (the next start resumes
   them), waiting requests get 503 + Retry-After, WebSockets close with 1012;
then teardown runs in reverse: webhook attempts under way get a moment to finish, the pools
let their batch in flight finish and commit and stop their workers, the janitor drains, the
store closes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from aiotranscribe.admission import Admission
from aiotranscribe.api import events, health, joblist, openai_compat, openapi, transcribe
from aiotranscribe.api.access import Access
from aiotranscribe.api.errors import error_middleware
from aiotranscribe.api.pages import add_static_routes
from aiotranscribe.api.streamlimits import StreamLimits, stream_limits_key
from aiotranscribe.blobstore import BlobStore
from aiotranscribe.claimcheck import Tickets
from aiotranscribe.config import ModelSettings, Settings, model_table
from aiotranscribe.janitor import Janitor
from aiotranscribe.keys import (
    janitor_key,
    metrics_key,
    pools_key,
    service_key,
    settings_key,
    store_key,
    webhooks_key,
    websockets_key,
)
from aiotranscribe.metrics import Metrics
from aiotranscribe.pool import InferencePool
from aiotranscribe.remote import RemoteHub
from aiotranscribe.rendered import RenderCache, render_cache_key
from aiotranscribe.service import TranscriptionService
from aiotranscribe.shared_admission import SharedAdmission
from aiotranscribe.store import JobStore, open_store
from aiotranscribe.supervise import stop_tasks
from aiotranscribe.webhooks import Webhooks
from aiotranscribe.workers import Worker, make_worker

# Uploads are streamed by our own reader with its own cap; this only bounds other bodies.
CLIENT_MAX_SIZE = 1024 * 1024
# How long shutdown lets WebSocket handlers close on their own (with 1012).
SOCKET_DRAIN_S = 2.0
# How long the pools wait for their batch in flight to finish and commit at shutdown.
BATCH_DRAIN_S = 30.0


WorkerFactory = Callable[[str], Worker]


def build_pools(
    settings: Settings,
    store: JobStore,
    metrics: Metrics | None = None,
    worker_factory: WorkerFactory | None = None,
    remote: RemoteHub | None = None,
) -> dict[str, InferencePool]:
    """One pool per served model (``config.model_table``: raises ``ModelsError``); with
    ``remote``, their lanes send batches to remote workers instead of running the model."""
    pools: dict[str, InferencePool] = {}
    for name, configured in model_table(settings).items():
        model = configured.resolved(settings)

        def factory(device: str, model: ModelSettings = model) -> Worker:
            if remote is not None:
                return remote.worker(model.name)
            if worker_factory is not None:
                return worker_factory(model.source)
            return make_worker(
                settings.executor,
                model.source,
                device,
                settings.torch_threads,
                model.engine_config(),
            )

        pools[name] = InferencePool(
            name,
            factory,
            store,
            devices=model.worker_devices(),
            batch_size=model.batch_size or settings.batch_size,
            max_batch_audio_s=model.max_batch_audio_s,
            max_batch_wait_ms=settings.max_batch_wait_ms,
            on_batch=metrics.batch_observer(name) if metrics is not None else None,
        )
    return pools


def create_app(
    settings: Settings,
    store: JobStore | None = None,
    worker_factory: WorkerFactory | None = None,
) -> web.Application:
    """The app for ``settings``. ``store`` replaces the one ``settings.store`` names;
    ``worker_factory`` (model spec -> worker handle) replaces the executor's, for embedding
    the server with a worker of one's own."""
    metrics = Metrics()
    # Metrics first, to count the answer the client gets; OpenAI's error shape inside.
    # Access after errors, so its refusals carry a request id and are counted.
    access = Access.from_settings(settings)
    middlewares = [
        metrics.middleware,
        error_middleware,
        access.middleware(),
        openai_compat.openai_error_middleware,
    ]
    app = web.Application(middlewares=middlewares, client_max_size=CLIENT_MAX_SIZE)
    if store is None:
        store = open_store(
            settings.store,
            settings.data_dir,
            ttl_s=settings.job_ttl_s,
            synchronous=settings.sqlite_synchronous,
            owner_ttl_s=settings.owner_ttl_s,
        )
    app[settings_key] = settings
    app[render_cache_key] = RenderCache()
    app[stream_limits_key] = StreamLimits(
        send_timeout_s=settings.ws_send_timeout_s, sse_keepalive_s=settings.sse_keepalive_s
    )
    app[metrics_key] = metrics
    app[store_key] = store
    # --no-workers: the models run in `aiotranscribe worker` processes, fed through Redis.
    # Slice entries name their audio (claim check): a shared-dir name or an S3 object.
    blobs = (
        BlobStore(settings.blob_store, settings.s3_endpoint_url) if settings.blob_store else None
    )
    tickets = Tickets(settings.shared_dir, blobs.url if blobs is not None else None)
    remote = RemoteHub(settings.store, store.replica, tickets) if settings.no_workers else None
    pools = build_pools(settings, store, metrics, worker_factory, remote)
    app[pools_key] = pools
    app[websockets_key] = weakref.WeakSet()

    def speed_of(model: str) -> float | None:
        return pools[model].throughput

    limit_s, estimate_s = settings.max_queued_audio_s, settings.admission_estimate_s
    # Replicas feeding remote workers share one queue, so one limit (Redis holds the shares).
    shared = SharedAdmission(limit_s, estimate_s, speed_of, remote, pools) if remote else None
    admission = shared or Admission(limit_s, estimate_s, speed_of)
    service_holder: list[TranscriptionService] = []

    async def live_ids() -> set[str]:
        return await service_holder[0].live_ids()

    async def retention() -> None:
        await service_holder[0].expire()

    app[janitor_key] = Janitor(
        settings.spool_dir,
        live_ids,
        interval_s=settings.janitor_interval_s,
        on_sweep=retention,
        shared=settings.shared_dir,
    )
    service = TranscriptionService(settings, store, pools, app[janitor_key], admission)
    service_holder.append(service)
    app[service_key] = service
    metrics.watch(pools, service, admission, app[websockets_key])
    if shared is not None:
        metrics.watch_shared(shared)
    webhooks = Webhooks(settings, store, on_attempt=metrics.webhook_attempt)
    service.on_finish.append(webhooks.job_ended)
    if blobs is not None:
        service.pipeline.publish = blobs.publish
        service.on_discard.append(blobs.forget)
    app[webhooks_key] = webhooks

    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(janitor_ctx)
    if blobs is not None:
        app.cleanup_ctx.append(blobs.ctx)
    if remote is not None:  # open before the lanes start, closed after they stop
        app.cleanup_ctx.append(remote.ctx)
    if shared is not None:
        app.cleanup_ctx.append(shared.ctx)
    app.cleanup_ctx.append(pools_ctx)
    app.cleanup_ctx.append(recovery_ctx)
    app.cleanup_ctx.append(webhooks_ctx)
    app.on_shutdown.append(shutdown_sequence)
    app.add_routes(health.routes)
    app.add_routes(transcribe.routes)
    app.add_routes(joblist.routes)
    app.add_routes(events.routes)
    app.add_routes(openai_compat.routes)
    app.add_routes(openapi.routes)
    app.router.add_get("/metrics", metrics.handle)
    add_static_routes(app, settings.static_dir)
    return app


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[store_key]
    await store.open()
    yield
    await store.close()


async def janitor_ctx(app: web.Application) -> AsyncIterator[None]:
    janitor = app[janitor_key]
    janitor.start()
    yield
    await janitor.close(app[settings_key].shutdown_timeout_s)


async def pools_ctx(app: web.Application) -> AsyncIterator[None]:
    pools = app[pools_key]
    for pool in pools.values():
        pool.start()
    yield
    await asyncio.gather(*(pool.close(BATCH_DRAIN_S) for pool in pools.values()))


async def recovery_ctx(app: web.Application) -> AsyncIterator[None]:
    service = app[service_key]
    await service.recover()
    # Replicas sharing a store take over each other's jobs when one is gone.
    adopter = (
        asyncio.create_task(service.adopt_loop(), name="adopt") if service.store.shared else None
    )
    yield
    await stop_tasks([adopter])


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Deliveries still pending in the store resume; at teardown those under way get a
    moment to finish (the rest resume at the next start)."""
    webhooks = app[webhooks_key]
    webhooks.start()
    yield
    await webhooks.close()


async def shutdown_sequence(app: web.Application) -> None:
    """Stop admitting, drain, stop what is left (durably), close the sockets."""
    service = app[service_key]
    await service.drain(app[settings_key].shutdown_timeout_s)
    await service.stop()
    registry = app[websockets_key]
    # Each handler closes its socket with 1012 by itself; give them a moment.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SOCKET_DRAIN_S):
            while any(not ws.closed for ws in registry):
                await asyncio.sleep(0.02)
    sockets = [ws for ws in registry if not ws.closed]
    await asyncio.gather(
        *(ws.close(code=events.RESTARTING, message=b"server restarting") for ws in sockets),
        return_exceptions=True,
    )
