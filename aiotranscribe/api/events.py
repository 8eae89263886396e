"""``GET /jobs/{id}/events``: a WebSocket of one job's events.

The subscriber gets the job's history (or what follows ``?after=SEQ``), then live events; the
server closes with 1000 after the terminal event. Each connection reads from its own bounded
queue; a consumer that falls that far behind is closed (1008) instead of buffered.
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

HEARTBEAT_S = 20.0
MAX_CLIENT_MESSAGE = 4096  # clients have nothing to say beyond pings
SLOW_CONSUMER = WSCloseCode.POLICY_VIOLATION

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


@routes.get("/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    job = get_job(request)  # 404 before the upgrade
    try:
        after = int(request.query.get("after", "0"))
    except ValueError:
        raise ApiError(400, "bad_request", "after must be an integer event seq") from None
    # No permessage-deflate: events are small, and aiohttp compresses big frames in an
    # executor, where they could interleave with heartbeat pings.
    ws = web.WebSocketResponse(
        heartbeat=HEARTBEAT_S, max_msg_size=MAX_CLIENT_MESSAGE, compress=False
    )
    await ws.prepare(request)
    sockets = request.app[websockets_key]
    sockets.add(ws)
    # Subscribe before reading history, so no event falls between the two.
    sub = job.subscribe()
    reader = None
    try:
        last = after
        for event in list(job.events):
            if event["seq"] > last:
                await ws.send_json(event)
                last = event["seq"]
        terminal = job.terminal and last >= job.events[-1]["seq"]
        # Read (and ignore) client frames so pings, pongs and close frames are handled.
        reader = asyncio.create_task(_drain(ws))
        while not terminal and not ws.closed:
            getter = asyncio.ensure_future(sub.queue.get())
            await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the client went away (or shutdown closed the socket)
                getter.cancel()
                break
            event = getter.result()
            if sub.overflowed:
                await _close(ws, reader, SLOW_CONSUMER, b"consumer too slow")
                break
            if event["seq"] <= last:
                continue
            await ws.send_json(event)
            last = event["seq"]
            terminal = event["type"] in TERMINAL
        # A job ended by shutdown closes with "going away", so clients know to retry.
        closing = request.app[service_key].closing
        await _close(
            ws,
            reader,
            WSCloseCode.GOING_AWAY if closing else WSCloseCode.OK,
            b"server shutdown" if closing else b"job finished",
        )
    except Exception:
        # After the upgrade an HTTP error answer would corrupt the stream: close instead.
        log.exception("events_socket_failed", job_id=job.id)
        await _close(ws, reader, WSCloseCode.INTERNAL_ERROR, b"internal error")
    finally:
        job.unsubscribe(sub)
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
