"""One middleware: binds a request id for logging and turns every error into JSON.

Error bodies are ``{"detail": str, "code": str}`` (the seed clients print ``detail``).
Unexpected errors are logged with their traceback and answered 500 without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from aiotranscribe.admission import QueueFull
from aiotranscribe.audio import AudioError
from aiotranscribe.decoding import OptionError
from aiotranscribe.keys import settings_key
from aiotranscribe.metrics import CLIENT_CLOSED
from aiotranscribe.netguard import UrlError
from aiotranscribe.pool import ModelUnavailable
from aiotranscribe.service import JobGone, ServerRestarting, UnknownModel
from aiotranscribe.uploads import FORM_OVERHEAD_BYTES, UploadError

log = structlog.get_logger(__name__)

# After an early refusal: statuses whose body is not worth reading further, and how long the
# rest of another refused body may take to be read and dropped.
CUT_AT_ONCE = frozenset({408, 413})
LINGER_S = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}
        self.param = param
        """The request field at fault (OpenAI's error ``param``), where one is."""


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"detail": detail, "code": code}, status=status, headers=headers)


def to_api_error(exc: Exception) -> ApiError | None:
    """Our domain errors, as the HTTP answer they deserve; None for anything else."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (UploadError, AudioError)):
        return ApiError(exc.status, exc.code, exc.detail)
    if isinstance(exc, UrlError):
        return ApiError(exc.status, exc.code, exc.detail, param=exc.param)
    if isinstance(exc, OptionError):
        return ApiError(400, exc.code, exc.detail, param=exc.param)
    if isinstance(exc, UnknownModel):
        return ApiError(400, "unknown_model", exc.detail)
    if isinstance(exc, JobGone):
        return ApiError(404, "job_not_found", "no job with that id (unknown, or expired)")
    if isinstance(exc, ServerRestarting):
        return ApiError(503, "server_restarting", exc.detail, {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ModelUnavailable):
        return ApiError(503, "model_unavailable", exc.detail, {"Retry-After": "5"})
    if isinstance(exc, QueueFull):
        return ApiError(
            503,
            "queue_full",
            f"the server is busy; retry in {exc.retry_after} s",
            {"Retry-After": str(exc.retry_after)},
        )
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex[:16]
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        response = error_response(exc.status, exc.reason.lower().replace(" ", "_"), reason)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
    except ConnectionResetError:
        # The client went away mid-request (the web page's own cancel does this): its
        # business, not a server error. Nobody reads this answer; it is for the access log
        # and the metrics.
        log.info("client_closed", path=request.path)
        return web.Response(status=CLIENT_CLOSED)
    except Exception as exc:
        api = to_api_error(exc)
        if api is None:
            log.exception("unhandled_error", path=request.path)
            response = error_response(500, "internal_error", "internal server error")
        else:
            response = error_response(api.status, api.code, api.detail, api.headers)
    if response.prepared:
        return response
    response.headers["X-Request-ID"] = request_id
    if response.status >= 400 and request.body_exists and not request.content.is_eof():
        await answer_and_close(request, response)
    return response


async def answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send an error that came before the body was read, then close the connection.

    aiohttp would go on reading and discarding the rest of the body for its lingering time
    (10 s), at whatever speed the client sends: gigabytes on a fast link. A body over the
    cap (413) or too slow (408) is cut off at once. For other refusals (401, 403, 503...) a
    client that sends its whole body before reading (most SDKs) would see a reset instead of
    the answer, so up to what the upload cap allows is read and dropped first, for at most
    ``LINGER_S``."""
    response.force_close()  # "Connection: close"
    await response.prepare(request)
    await response.write_eof()
    budget = 0
    if response.status not in CUT_AT_ONCE:
        cap = request.app[settings_key].max_upload_bytes + FORM_OVERHEAD_BYTES
        budget = cap - request.content.total_bytes
    with contextlib.suppress(TimeoutError, ConnectionError, ValueError):
        async with asyncio.timeout(LINGER_S):
            while budget > 0 and (chunk := await request.content.readany()):
                budget -= len(chunk)
    request.protocol.force_close()
