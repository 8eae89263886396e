"""``GET /jobs/{id}/events``: a WebSocket of one job's events, read from the store.

The watcher gets the job's history (or what follows ``?after=SEQ``), then live events as
the store commits them; the server closes with 1000 after the terminal event. When the
server stops before the job ends it closes with 1012 ("service restart"): the job is kept,
and a client that reconnects with ``?after=<last seq>`` after the restart misses nothing and
sees nothing twice.

Each socket pulls from the store at its own pace, one page (``page_events``) at a time, so a
slow reader costs at most a page plus the transport's buffer: there is no queue to overflow,
hence no writer task. A peer that takes no frame for ``send_timeout_s`` is closed with 1008
and resumes with ``?after=``; if the close handshake cannot finish within ``close_timeout_s``
(a peer that reads nothing never sees the close frame) the connection is aborted, because a
closed transport with unsent data would otherwise stay open for as long as the peer likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from aiotranscribe.api.access import WS_PROTOCOL
from aiotranscribe.api.errors import ApiError
from aiotranscribe.api.streamlimits import limits_of
from aiotranscribe.api.transcribe import get_job
from aiotranscribe.jobs import COMPLETED, TERMINAL
from aiotranscribe.keys import service_key, websockets_key
from aiotranscribe.rendered import RenderCache, cache_of, weight
from aiotranscribe.service import ServerRestarting

HEARTBEAT_S = 20.0
MAX_CLIENT_MESSAGE = 4096  # clients have nothing to say beyond pings
SLOW_CONSUMER = WSCloseCode.POLICY_VIOLATION
RESTARTING = WSCloseCode.SERVICE_RESTART  # 1012
# How long one store wait lasts before the job is looked up again.
WAIT_S = 15.0

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


class SlowConsumer(Exception):
    """The peer took no frame within the send timeout."""


@routes.get("/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    job = await get_job(request)  # 404 before the upgrade
    try:
        after = int(request.query.get("after", "0"))
    except ValueError:
        after = -1
    if after < 0:
        raise ApiError(400, "bad_request", "after must be an event seq: an integer, 0 or more")
    service = request.app[service_key]
    limits = limits_of(request.app)
    cache = cache_of(request.app)
    # No permessage-deflate: events are small, and aiohttp compresses big frames in an
    # executor, where they could interleave with heartbeat pings.
    # ``protocols``: a browser that offers its API key as the subprotocol ``key.<key>`` also
    # offers this one, and the handshake must pick one of its offers.
    ws = web.WebSocketResponse(
        heartbeat=HEARTBEAT_S,
        max_msg_size=MAX_CLIENT_MESSAGE,
        compress=False,
        protocols=(WS_PROTOCOL,),
    )
    await ws.prepare(request)
    sockets = request.app[websockets_key]
    sockets.add(ws)
    # Read (and ignore) client frames so pings, pongs and close frames are handled.
    reader = asyncio.create_task(_drain(ws))
    code, message = WSCloseCode.OK, b"job finished"
    try:
        last = after
        while True:
            if service.stopping.is_set():
                code, message = RESTARTING, b"server restarting; resume with ?after="
                break
            # History and any backlog come straight from the store, a page at a time; only
            # a watcher that has caught up waits for new events.
            events = await service.store.events_after(job.id, last, limits.page_events)
            if not events and job.terminal and last >= job.last_seq:
                break  # resumed after the end of a job that had ended: nothing will come
            if not events:
                getter = asyncio.ensure_future(service.next_events(job.id, last, WAIT_S))
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the client went away
                    getter.cancel()
                    return ws
                try:
                    # What piled up during the wait is bounded too; the rest is read next.
                    events = getter.result()[: limits.page_events]
                except ServerRestarting:
                    code, message = RESTARTING, b"server restarting; resume with ?after="
                    break
                if not events and await service.store.get(job.id) is None:
                    code, message = WSCloseCode.GOING_AWAY, b"job expired"
                    break
            if reader.done():  # the client went away while we read
                return ws
            try:
                for event in events:
                    await _send(ws, event, limits.send_timeout_s, cache)
                    last = event["seq"]
            except SlowConsumer:
                log.info("events_slow_consumer", job_id=job.id, last_seq=last)
                code, message = SLOW_CONSUMER, b"consumer too slow; resume with ?after="
                break
            # None: the wait timed out on a quiet job (it still exists); wait again.
            if events and events[-1]["type"] in TERMINAL:
                break
        await _close(request, ws, reader, code, message, limits.close_timeout_s)
    except ConnectionResetError:
        raise  # the peer went away: nothing to log or send
    except Exception:
        # After the upgrade an HTTP error answer would corrupt the stream: close instead.
        log.exception("events_socket_failed", job_id=job.id)
        await _close(
            request,
            ws,
            reader,
            WSCloseCode.INTERNAL_ERROR,
            b"internal error",
            limits.close_timeout_s,
        )
    finally:
        sockets.discard(ws)
        await _stop(reader)
    return ws


async def _send(
    ws: web.WebSocketResponse, event: dict[str, Any], timeout: float, cache: RenderCache
) -> None:
    """Send one event; SlowConsumer when the peer takes nothing for ``timeout`` seconds.

    aiohttp writes the frame at once and waits for the socket to drain only when its
    buffer is full, so the timeout measures exactly the peer's reading."""
    if event["type"] == COMPLETED:
        # The one big event (the whole result): serialised once per job, off the loop when big.
        result = event.get("result")
        text = (
            await cache.get(
                event["job_id"], "event:completed", lambda: _dumps(event), weight(result)
            )
        ).decode()
    else:
        text = json.dumps(event)
    try:
        async with asyncio.timeout(timeout):
            await ws.send_str(text)
    except TimeoutError:
        raise SlowConsumer() from None


def _dumps(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


async def _stop(reader: asyncio.Task[None] | None) -> None:
    if reader is not None and not reader.done():
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader


async def _close(
    request: web.Request,
    ws: web.WebSocketResponse,
    reader: asyncio.Task[None] | None,
    code: int,
    message: bytes,
    timeout: float,
) -> None:
    """Close with ``code`` and wait (up to ``timeout``) for the client's answer, then make
    sure the connection is gone.

    The reader stops first: a close racing a pending receive makes aiohttp drop the
    connection without waiting for it. After a slow consumer the close frame is queued
    without waiting for the socket to drain: the peer sees it once it reads what it was sent
    (and aiohttp's drain fails at once after a cancelled one). A peer that reads nothing
    cannot answer, and a transport closed with unsent data stays open until the peer reads
    it: past the timeout the connection is aborted."""
    transport = request.transport  # aiohttp forgets it when it closes the connection itself
    await _stop(reader)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            if not ws.closed:
                await ws.close(code=code, message=message, drain=code != SLOW_CONSUMER)
    if transport is not None and transport.get_write_buffer_size() > 0:
        transport.abort()


async def _drain(ws: web.WebSocketResponse) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.ERROR:
            break
