"""The web UI: ``GET /`` and the files under ``static/``."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web


def add_static_routes(app: web.Application, static_dir: Path) -> None:
    index = static_dir / "index.html"

    async def home(_request: web.Request) -> web.StreamResponse:
        if not index.is_file():
            raise web.HTTPNotFound(text="the web UI is not installed")
        return web.FileResponse(index)

    app.router.add_get("/", home)
    if static_dir.is_dir():
        app.router.add_static("/static/", static_dir, append_version=False)
