"""OpenAI's audio API: ``POST /v1/audio/transcriptions``, ``/v1/audio/translations`` and
``GET /v1/models``.

Requests go through the same upload and job machinery as ``/transcribe``; only the form's
extra fields, the answer's shape and the error shape (``{"error": {message, type, param,
code}}``) are OpenAI's. ``whisper-1``, which clients hard-code, names the default model.
With ``stream=true`` the answer is server-sent events: ``transcript.text.delta`` as each
segment is final (in file order), then ``transcript.text.done``. A client that goes away
cancels its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from aiotranscribe.api.errors import ApiError, Handler, to_api_error
from aiotranscribe.api.streamlimits import limits_of
from aiotranscribe.api.transcribe import (
    CLIENT_CLOSED,
    parse_bool,
    receive_submission,
    until_gone,
    wait_for_job,
)
from aiotranscribe.formats import CONTENT_TYPES, FORMATS, render_bytes, to_verbose_json
from aiotranscribe.jobs import CANCELLED, COMPLETED, FAILED, TERMINAL, Job
from aiotranscribe.keys import pools_key, service_key
from aiotranscribe.rendered import build, weight
from aiotranscribe.service import ServerRestarting
from aiotranscribe.uploads import Upload

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

PREFIX = "/v1/"
DEFAULT_ALIAS = "whisper-1"
GRANULARITIES = ("word", "segment")
GRANULARITY_FIELDS = ("timestamp_granularities[]", "timestamp_granularities")
STARTED = int(time.time())
# Error codes that are about the uploaded file, for OpenAI's ``param``.
FILE_CODES = frozenset(
    {
        "missing_file",
        "empty_file",
        "too_large",
        "unsupported_media_type",
        "undecodable",
        "no_audio_stream",
        "truncated",
        "audio_too_long",
    }
)


class ParamError(ApiError):
    """A bad form field, named in the error's ``param``."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(400, "invalid_value", detail, param=param)


@dataclass(frozen=True)
class Options:
    response_format: str = "json"
    granularities: tuple[str, ...] = ()
    stream: bool = False


def parse_options(upload: Upload) -> Options:
    """Validate OpenAI's fields; ``prompt`` is accepted and unused, as is ``temperature``."""
    fields = upload.fields
    fmt = fields.get("response_format") or "json"
    if fmt not in FORMATS:
        raise ParamError("response_format", f"response_format must be one of {', '.join(FORMATS)}")
    raw = [v for name in GRANULARITY_FIELDS for v in upload.multi.get(name, [])]
    # Repeated fields as the SDK sends them; a comma-separated list is taken as well.
    granularities = tuple(dict.fromkeys(g.strip() for v in raw for g in v.split(",") if g.strip()))
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise ParamError(
            "timestamp_granularities",
            f"timestamp_granularities[] takes word and/or segment, not {unknown[0]!r}",
        )
    if granularities and fmt != "verbose_json":
        raise ParamError(
            "timestamp_granularities",
            "timestamp_granularities[] is only supported with response_format verbose_json",
        )
    try:
        stream = parse_bool("stream", fields.get("stream"), default=False)
    except ApiError as exc:
        raise ParamError("stream", exc.detail) from None
    if temperature := fields.get("temperature"):
        try:
            valid = 0.0 <= float(temperature) <= 1.0
        except ValueError:
            valid = False
        if not valid:
            raise ParamError("temperature", "temperature must be a number from 0 to 1")
    return Options(fmt, granularities, stream)


@routes.post("/v1/audio/transcriptions")
async def create_transcription(request: web.Request) -> web.StreamResponse:
    return await create(request, translate=False)


@routes.post("/v1/audio/translations")
async def create_translation(request: web.Request) -> web.StreamResponse:
    """OpenAI's translation: speech in any language the model takes, text in English (or our
    extension ``target_language``). A model that cannot translate answers 400
    ``unsupported_task``."""
    return await create(request, translate=True)


async def create(request: web.Request, translate: bool) -> web.StreamResponse:
    service = request.app[service_key]
    options = Options()

    def check(upload: Upload) -> None:
        nonlocal options
        options = parse_options(upload)
        if upload.fields.get("model") == DEFAULT_ALIAS and DEFAULT_ALIAS not in service.pools:
            upload.fields["model"] = ""  # the service resolves an empty name to the default
        if translate:
            upload.fields["task"] = "translate"
            upload.fields.setdefault("target_language", "en")

    job_id, submission, _ = await receive_submission(request, check)
    await service.accept(job_id, submission)
    if options.stream:
        return await stream_transcript(request, job_id)
    job = await wait_for_job(request, job_id)
    if job is None:
        return web.Response(status=CLIENT_CLOSED)  # nobody is there to read it
    return await answer(job, options)


def usage(result: dict[str, Any]) -> dict[str, Any]:
    return {"type": "duration", "seconds": result.get("duration", 0.0)}


async def answer(job: Job, options: Options) -> web.Response:
    """The finished job in the asked shape. Each job is answered once here, so nothing is
    cached; a big result is still rendered off the loop."""
    if job.status != COMPLETED or job.result is None:
        raise job_error(job)
    result, fmt = job.result, options.response_format
    headers = {"X-Job-ID": job.id}
    if fmt == "json":
        return web.json_response({"text": result["text"], "usage": usage(result)}, headers=headers)
    if fmt == "verbose_json":
        wanted = options.granularities or ("segment",)  # OpenAI's default

        def verbose() -> bytes:
            body = to_verbose_json(result, words="word" in wanted, segments="segment" in wanted)
            return json.dumps({**body, "usage": usage(result)}).encode()

        body = await build(verbose, weight(result))
        return web.Response(
            body=body, content_type="application/json", charset="utf-8", headers=headers
        )
    text = await build(lambda: render_bytes(result, fmt), weight(result))
    return web.Response(
        body=text, content_type=CONTENT_TYPES[fmt], charset="utf-8", headers=headers
    )


def job_error(job: Job) -> ApiError:
    if job.status == FAILED:
        return ApiError(job.error_status, job.error_code or "failed", job.error or "failed")
    reason = job.cancel_reason
    return ApiError(409, "cancelled", f"the job was cancelled ({reason or 'no reason given'})")


# -- streaming --------------------------------------------------------------------------------


async def stream_transcript(request: web.Request, job_id: str) -> web.StreamResponse:
    """Server-sent events of the job's text; the job is cancelled if the client leaves.

    While the job has nothing to say (converting, queued, a long slice) a ``: keep-alive``
    comment goes out every ``sse_keepalive_s``, so a proxy's idle timeout does not cut the
    stream; SSE parsers (the OpenAI SDK's included) skip comments."""
    service = request.app[service_key]
    keepalive_s = limits_of(request.app).sse_keepalive_s
    loop = asyncio.get_running_loop()
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Job-ID": job_id,
        }
    )
    finished = False
    try:
        await response.prepare(request)
        # The headers count as the first thing sent.
        quiet_since = loop.time()

        def wait_s() -> float:
            return max(quiet_since + keepalive_s - loop.time(), 0.0)

        said = False
        async with contextlib.aclosing(follow(request, job_id, wait_s)) as events:
            async for event in events:
                kind = event["type"]
                if kind == "segment":
                    text = event["segment"]["text"]
                    delta = f" {text}" if said else text  # deltas add up to the final text
                    said = True
                    await send(response, {"type": "transcript.text.delta", "delta": delta})
                elif kind == COMPLETED:
                    done = {"type": "transcript.text.done", "text": event["result"]["text"]}
                    await send(response, done)
                elif kind in (FAILED, CANCELLED):
                    api = job_error(await service.get(job_id))
                    body = error_body(api.status, api.code, api.detail, param_of(api))
                    await send(response, {"type": "error", **body})
                elif loop.time() - quiet_since >= keepalive_s:
                    await response.write(KEEPALIVE)  # status, progress or QUIET: nothing said
                else:
                    continue
                quiet_since = loop.time()
                finished = kind in TERMINAL
        if not finished and service.stopping.is_set():
            body = error_body(503, "server_restarting", "the server is restarting", None)
            await send(response, {"type": "error", **body})
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away mid-write
    finally:
        if not finished and not service.stopping.is_set():
            await asyncio.shield(service.cancel(job_id, "client disconnected"))
    return response


KEEPALIVE = b": keep-alive\n\n"
QUIET = {"type": "quiet"}  # what ``follow`` yields when the wait for events timed out


async def send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())


async def follow(
    request: web.Request, job_id: str, wait_s: Callable[[], float]
) -> AsyncGenerator[dict[str, Any]]:
    """The job's events in order, history first, up to its terminal one; ``QUIET`` when
    ``wait_s()`` seconds pass without one. Ends early when the client goes away or the
    server stops."""
    service = request.app[service_key]
    last = 0
    while True:
        try:
            present, events = await until_gone(
                request, service.next_events(job_id, last, timeout=wait_s())
            )
        except ServerRestarting:
            return
        if not present:
            return
        if not events:
            yield QUIET
        for event in events or []:
            last = event["seq"]
            yield event
            if event["type"] in TERMINAL:
                return


# -- models -----------------------------------------------------------------------------------


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.StreamResponse:
    data = [
        {
            "id": name,
            "object": "model",
            "created": STARTED,
            "owned_by": "aiotranscribe",
            "state": pool.state,
            "capabilities": request.app[service_key].capabilities(name),
        }
        for name, pool in request.app[pools_key].items()
    ]
    return web.json_response({"object": "list", "data": data})


# -- errors -----------------------------------------------------------------------------------


def param_of(api: ApiError) -> str | None:
    if api.param is not None:
        return api.param
    if api.code in FILE_CODES:
        return "file"
    return "model" if api.code == "unknown_model" else None


def error_body(status: int, code: str, message: str, param: str | None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(api: ApiError) -> web.Response:
    body = error_body(api.status, api.code, api.detail, param_of(api))
    return web.json_response(body, status=api.status, headers=api.headers)


@web.middleware
async def openai_error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors under ``/v1/`` in OpenAI's shape; runs inside the general error middleware."""
    if not request.path.startswith(PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        kept = ("Allow", "Retry-After")
        headers = {name: exc.headers[name] for name in kept if name in exc.headers}
        code = exc.reason.lower().replace(" ", "_")
        return error_response(ApiError(exc.status, code, text or exc.reason, headers))
    except ConnectionResetError:
        raise  # the client left: the general middleware counts it, nobody reads an answer
    except Exception as exc:
        api = to_api_error(exc)
        if api is None:
            log.exception("unhandled_error", path=request.path)
            api = ApiError(500, "internal_error", "internal server error")
        return error_response(api)
