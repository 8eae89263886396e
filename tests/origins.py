"""Real HTTP servers on loopback for outbound-request tests: an origin that serves audio or
receives webhooks and records every request, and a canary that only counts connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Hit:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Origin:
    """Answers each path with its handler (404 otherwise), recording every request."""

    host: str = "127.0.0.1"
    hits: list[Hit] = field(default_factory=list)
    handlers: dict[str, Handler] = field(default_factory=dict)
    server: TestServer | None = None

    async def start(self) -> Origin:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.server = TestServer(app, host=self.host)
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def on(self, path: str, handler: Handler) -> str:
        """Serve ``path`` with ``handler``; returns its URL."""
        self.handlers[path] = handler
        return self.url(path)

    def answers(self, path: str, *statuses: int) -> str:
        """``path`` answers these statuses in turn, then 200 for ever."""
        queue = list(statuses)

        async def answer(_request: web.Request) -> web.StreamResponse:
            return web.Response(status=queue.pop(0) if queue else 200, text="ok")

        return self.on(path, answer)

    def hits_on(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.hits.append(Hit(request.method, request.path, CIMultiDict(request.headers), body))
        handler = self.handlers.get(request.path)
        if handler is None:
            return web.Response(status=404, text="no such path")
        return await handler(request)


class Canary:
    """A listening socket that counts the connections made to it (there should be none)."""

    def __init__(self) -> None:
        self.connections = 0
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []

    async def start(self, *hosts: str) -> Canary:
        for host in hosts:
            try:
                server = await asyncio.start_server(self._accept, host, 0)
            except OSError:
                continue  # no IPv6 on this machine: the refusal is still checked
            self._servers.append(server)
            self.ports[host] = server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    def port(self, host: str) -> int:
        return self.ports.get(host, self.ports["127.0.0.1"])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
