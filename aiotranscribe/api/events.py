"""``GET /jobs/{id}/events``: a WebSocket of one job's events, read from the store.

The watcher gets the job's history (or what follows ``?after=SEQ``), then live events as
the store commits them; the server closes with 1000 after the terminal event. When the
server stops before the job ends it closes with 1012 ("service restart"): the job is kept,
and a client that reconnects with ``?after=<last seq>`` after the restart misses nothing and
sees nothing twice. Each socket pulls from the store at its own pace, so a slow reader costs
no memory; one that stops reading for ``SEND_TIMEOUT_S`` is closed with 1008.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from aiotranscribe.api.errors import ApiError
from aiotranscribe.api.transcribe import get_job
from aiotranscribe.jobs import TERMINAL
from aiotranscribe.keys import service_key, websockets_key
from aiotranscribe.service import ServerRestarting

HEARTBEAT_S = 20.0
MAX_CLIENT_MESSAGE = 4096  # clients have nothing to say beyond pings
SLOW_CONSUMER = WSCloseCode.POLICY_VIOLATION
RESTARTING = WSCloseCode.SERVICE_RESTART  # 1012
# A peer that has not taken a frame for this long is cut off.
SEND_TIMEOUT_S = 30.0
# How long one store wait lasts before the job is looked up again.
WAIT_S = 15.0

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


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
    # No permessage-deflate: events are small, and aiohttp compresses big frames in an
    # executor, where they could interleave with heartbeat pings.
    ws = web.WebSocketResponse(
        heartbeat=HEARTBEAT_S, max_msg_size=MAX_CLIENT_MESSAGE, compress=False
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
            getter = asyncio.ensure_future(service.next_events(job.id, last, WAIT_S))
            await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the client went away
                getter.cancel()
                return ws
            try:
                events = getter.result()
            except ServerRestarting:
                code, message = RESTARTING, b"server restarting; resume with ?after="
                break
            if not events and await service.store.get(job.id) is None:
                code, message = WSCloseCode.GOING_AWAY, b"job expired"
                break
            ended = False
            for event in events:
                try:
                    async with asyncio.timeout(SEND_TIMEOUT_S):
                        await ws.send_json(event)
                except TimeoutError:
                    code, message = SLOW_CONSUMER, b"consumer too slow"
                    ended = True
                    break
                last = event["seq"]
                ended = event["type"] in TERMINAL
            if ended:
                break
        await _close(ws, reader, code, message)
    except ConnectionResetError:
        raise  # the peer went away: nothing to log or send
    except Exception:
        # After the upgrade an HTTP error answer would corrupt the stream: close instead.
        log.exception("events_socket_failed", job_id=job.id)
        await _close(ws, reader, WSCloseCode.INTERNAL_ERROR, b"internal error")
    finally:
        sockets.discard(ws)
        await _stop(reader)
    return ws


async def _stop(reader: asyncio.Task[None] | None) -> None:
    if reader is not None and not reader.done():
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader


async def _close(
    ws: web.WebSocketResponse, reader: asyncio.Task[None] | None, code: int, message: bytes
) -> None:
    """Close with ``code`` and wait for the client's answer. The reader stops first: a close
    racing a pending receive makes aiohttp drop the connection without waiting for it."""
    await _stop(reader)
    if not ws.closed:
        await ws.close(code=code, message=message)


async def _drain(ws: web.WebSocketResponse) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.ERROR:
            break
