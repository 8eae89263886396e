"""``create_app(settings)``: wiring only. Every resource with a lifetime is a cleanup context.

Start-up order: janitor (sweeps crash leftovers) -> model pools (load in the background).
On shutdown (``on_shutdown``, before any teardown) running jobs are cancelled, each with its
``cancelled`` event, and WebSockets get that final status and 1001; then teardown runs in
reverse: workers stop, then the janitor drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

from aiotranscribe.api import events, health, openai_compat, openapi, transcribe
from aiotranscribe.api.errors import error_middleware
from aiotranscribe.api.pages import add_static_routes
from aiotranscribe.config import Settings
from aiotranscribe.engine.nemo_engine import model_display_name
from aiotranscribe.janitor import Janitor
from aiotranscribe.jobs import JobStore, MemoryJobStore
from aiotranscribe.keys import (
    janitor_key,
    metrics_key,
    pools_key,
    service_key,
    settings_key,
    store_key,
    websockets_key,
)
from aiotranscribe.metrics import Metrics
from aiotranscribe.pool import InferencePool
from aiotranscribe.service import TranscriptionService
from aiotranscribe.workers import Worker, make_worker

# Uploads are streamed by our own reader with its own cap; this only bounds other bodies.
CLIENT_MAX_SIZE = 1024 * 1024
# How long shutdown lets WebSocket handlers send their job's final event on their own.
SOCKET_DRAIN_S = 2.0


def build_pools(settings: Settings, metrics: Metrics | None = None) -> dict[str, InferencePool]:
    pools: dict[str, InferencePool] = {}
    for spec in settings.models:
        name = model_display_name(spec)

        def factory(spec: str = spec) -> Worker:
            return make_worker(settings.executor, spec, settings.device, settings.torch_threads)

        pools[name] = InferencePool(
            name,
            factory,
            batch_size=settings.batch_size,
            max_queued=settings.max_queued_slices,
            on_batch=metrics.batch_observer(name) if metrics is not None else None,
        )
    return pools


def create_app(settings: Settings, store: JobStore | None = None) -> web.Application:
    metrics = Metrics()
    # Metrics first, to count the answer the client gets; OpenAI's error shape inside.
    middlewares = [metrics.middleware, error_middleware, openai_compat.openai_error_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=CLIENT_MAX_SIZE)
    app[settings_key] = settings
    app[metrics_key] = metrics
    app[store_key] = store if store is not None else MemoryJobStore()
    app[pools_key] = build_pools(settings, metrics)
    app[websockets_key] = weakref.WeakSet()
    service_holder: list[TranscriptionService] = []

    def live_ids() -> set[str]:
        return service_holder[0].live_ids() if service_holder else set()

    app[janitor_key] = Janitor(
        settings.spool_dir,
        live_ids,
        interval_s=settings.janitor_interval_s,
        on_sweep=lambda: app[store_key].evict_expired(settings.job_ttl_s),
    )
    service = TranscriptionService(settings, app[store_key], app[pools_key], app[janitor_key])
    service_holder.append(service)
    app[service_key] = service
    metrics.watch(app[pools_key], app[store_key], app[websockets_key], service)

    app.cleanup_ctx.append(janitor_ctx)
    app.cleanup_ctx.append(pools_ctx)
    app.on_shutdown.append(close_websockets)
    app.add_routes(health.routes)
    app.add_routes(transcribe.routes)
    app.add_routes(events.routes)
    app.add_routes(openai_compat.routes)
    app.add_routes(openapi.routes)
    app.router.add_get("/metrics", metrics.handle)
    add_static_routes(app, settings.static_dir)
    return app


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
    await asyncio.gather(*(pool.close() for pool in pools.values()))


async def close_websockets(app: web.Application) -> None:
    """Cancel running jobs so watchers see their final status, then close sockets with 1001."""
    service = app[service_key]
    await service.close(app[settings_key].shutdown_timeout_s)
    registry = app[websockets_key]
    # Every job is terminal now: each handler sends its job's last event and closes with
    # 1001 by itself. Give them a moment, then close whatever is left.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SOCKET_DRAIN_S):
            while any(not ws.closed for ws in registry):
                await asyncio.sleep(0.02)
    sockets = [ws for ws in registry if not ws.closed]
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets),
        return_exceptions=True,
    )
