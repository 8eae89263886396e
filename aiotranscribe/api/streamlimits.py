"""Limits on long-lived answers (event WebSockets, SSE streams).

``create_app`` puts one built from the settings (``--ws-send-timeout-s``,
``--sse-keepalive-s``) under ``stream_limits_key``; the rest are fixed tunables a test may
change by putting its own there before the app starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class StreamLimits:
    send_timeout_s: float = 30.0
    """A WebSocket peer that has not taken a frame for this long is cut off (close 1008)."""
    close_timeout_s: float = 5.0
    """How long a closing handshake may take; after it the connection is dropped, so a peer
    that reads nothing cannot keep it (and its unsent buffer) open."""
    page_events: int = 500
    """Events read from the store and sent per step: a long job's history goes in pages."""
    sse_keepalive_s: float = 15.0
    """An SSE stream that has sent nothing for this long gets a ``: keep-alive`` comment, well
    inside the idle timeouts of proxies (nginx: 60 s)."""


stream_limits_key = web.AppKey("stream_limits", StreamLimits)


def limits_of(app: web.Application) -> StreamLimits:
    return app[stream_limits_key]
