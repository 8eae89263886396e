"""``/health`` (the seed clients' shape, answered at once, even while loading) and ``/ready``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from aiotranscribe.keys import pools_key, service_key
from aiotranscribe.shared_admission import SharedAdmission

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.StreamResponse:
    pools = request.app[pools_key]
    service = request.app[service_key]
    default = next(iter(pools.values()))
    loaded = default.state == "ready"
    return web.json_response(
        {
            "status": "healthy" if loaded else "model_not_loaded",
            "model_loaded": loaded,
            "model_name": default.name,
            "models": [
                {
                    "name": pool.name,
                    "state": pool.state,
                    "error": pool.public_error,
                    "device": pool.info.get("device"),
                    "capabilities": service.capabilities(pool.name),
                    "queued_slices": pool.queued,
                    "workers": [
                        {"worker": lane.index, "device": lane.device, "state": lane.state}
                        for lane in pool.lanes
                    ],
                }
                for pool in pools.values()
            ],
        }
    )


@routes.get("/ready")
async def ready(request: web.Request) -> web.StreamResponse:
    """200 only when every model is loaded and the server is not draining; with remote
    workers, also only while the shared queue takes new uploads of every model."""
    pools = request.app[pools_key]
    service = request.app[service_key]
    closing = service.draining
    states = {pool.name: pool.state for pool in pools.values()}
    ok = not closing and all(state == "ready" for state in states.values())
    body: dict[str, Any] = {"ready": ok, "draining": closing, "models": states}
    if isinstance(service.admission, SharedAdmission):
        queue = await shared_queue(service.admission)
        body["queue_full"] = any(q["full"] for q in queue.values())
        body["queue"] = queue
        body["ready"] = ok = ok and not body["queue_full"]
    return web.json_response(body, status=200 if ok else 503)


async def shared_queue(admission: SharedAdmission) -> dict[str, dict[str, Any]]:
    """Each model's shared queue, read now: ``full`` when a new upload would be refused."""
    await admission.refresh()
    return {
        model: {
            "full": admission.full(model),
            "admitted_audio_s": round(state.total_s, 3),
            "limit_s": admission.limit_s,
            "lag": state.lag,
            "pending": state.pending,
            "workers": len(state.workers),
        }
        for model, state in admission.queues.items()
    }
