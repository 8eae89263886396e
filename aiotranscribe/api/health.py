"""``/health`` (the seed clients' shape, answered at once, even while loading) and ``/ready``."""

from __future__ import annotations

from aiohttp import web

from aiotranscribe.keys import pools_key, service_key

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
    """200 only when every model is loaded and the server is not draining."""
    pools = request.app[pools_key]
    closing = request.app[service_key].draining
    states = {pool.name: pool.state for pool in pools.values()}
    ok = not closing and all(state == "ready" for state in states.values())
    return web.json_response(
        {"ready": ok, "draining": closing, "models": states}, status=200 if ok else 503
    )
