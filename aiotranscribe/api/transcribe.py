"""The seed clients' routes: sync and async transcription, job status, result, cancel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from aiohttp import web

from aiotranscribe import decoding, webhooks
from aiotranscribe.api.access import TENANT
from aiotranscribe.api.bodyrate import within_body_rate
from aiotranscribe.api.errors import CLIENT_CLOSED, ApiError, error_response
from aiotranscribe.config import Settings
from aiotranscribe.fetch import fetch_audio
from aiotranscribe.formats import CONTENT_TYPES, FORMATS, render_bytes
from aiotranscribe.jobs import CANCELLED, COMPLETED, FAILED, Job
from aiotranscribe.keys import service_key, settings_key
from aiotranscribe.rendered import cache_of, weight
from aiotranscribe.service import JobGone, Submission, new_job_id
from aiotranscribe.uploads import URL_FIELD, Upload, full_spool_is_507, receive_upload

routes = web.RouteTableDef()
T = TypeVar("T")

TRUE = {"true", "1", "yes", "on"}
# How often a handler waiting on a job checks whether its client is still there
# (aiohttp does not cancel handlers when a client disconnects).
DISCONNECT_POLL_S = 1.0
FALSE = {"false", "0", "no", "off"}


def parse_bool(name: str, value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise ApiError(400, "bad_request", f"{name} must be true or false, not {value!r}")


async def receive_submission(
    request: web.Request, check: Callable[[Upload], None] | None = None
) -> tuple[str, Submission, Upload]:
    """Admit, stream the upload to the spool, and validate the form; nothing left on error.

    Admission happens before a byte is read, against the model named in the query string
    (``?model=``) or else the default (or first healthy) model; once the form is read the
    job is charged to the model it names. ``check`` validates a route's own fields (and may
    normalise them) before the model is resolved; what it raises is cleaned up like any
    other error."""
    service = request.app[service_key]
    settings = request.app[settings_key]
    job_id = new_job_id()
    hinted = request.query.get("model")
    await service.admit(job_id, service.resolve_model(hinted) if hinted else None)
    structlog.contextvars.bind_contextvars(job_id=job_id)
    try:
        with full_spool_is_507():
            job_dir = await asyncio.to_thread(service.new_job_dir, job_id)
        upload = await within_body_rate(
            request,
            receive_upload(request, job_dir, settings.max_upload_bytes),
            settings.upload_min_rate_kib_s * 1024,
            settings.upload_grace_s,
        )
        if check is not None:
            check(upload)
        model = service.resolve_model(upload.fields.get("model"))
        await service.readmit(job_id, model)
        include = parse_bool(
            "include_timestamps", upload.fields.get("include_timestamps"), default=True
        )
        # The pool can take work now, so it has loaded once and knows what it can do.
        options = decoding.allowed(
            decoding.requested(upload.fields), model, service.pools[model].capabilities
        )
        callback_url, webhook = None, None
        if raw_callback := upload.fields.get(webhooks.FIELD):
            callback_url = await webhooks.check_callback(raw_callback, settings)
            webhook = webhooks.new_delivery(result_url(request, settings, job_id))
        if upload.path is None:  # an audio_url instead of a file part: fetched last
            await fetch_audio(upload.fields[URL_FIELD], job_dir, settings, upload)
    except BaseException:
        service.abandon(job_id)
        raise
    assert upload.path is not None and upload.kind is not None
    language = upload.fields.get("language") or None
    submission = Submission(
        upload_path=upload.path,
        kind=upload.kind,
        filename=upload.filename,
        size=upload.size,
        model=model,
        language=language,
        include_timestamps=include,
        tenant=request.get(TENANT),
        options=options,
        task=options.get("task", decoding.TRANSCRIBE),
        callback_url=callback_url,
        webhook=webhook,
    )
    return job_id, submission, upload


def result_url(request: web.Request, settings: Settings, job_id: str) -> str:
    """Where a webhook's receiver finds the result: under ``public_url``, or else the
    scheme and host this request came in by."""
    base = settings.public_url or str(request.url.origin())
    return f"{base.rstrip('/')}/jobs/{job_id}/result"


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def until_gone(request: web.Request, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
    """Await ``awaitable``; (False, None) (and it cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and client_gone(request):
                return False, None
        return True, task.result()
    finally:
        task.cancel()


async def get_job(request: web.Request) -> Job:
    """The job the path names; 404 when unknown, expired, or another tenant's."""
    try:
        job = await request.app[service_key].get(request.match_info["job_id"])
    except JobGone:
        job = None
    if job is None or job.tenant != request.get(TENANT):
        raise ApiError(404, "job_not_found", "no job with that id (unknown, or expired)")
    return job


async def wait_for_job(request: web.Request, job_id: str) -> Job | None:
    """The job's final record; None when the client left (the job is then cancelled)."""
    service = request.app[service_key]
    finished = False
    try:
        present, job = await until_gone(request, service.wait_done(job_id))
        finished = present
        return job
    finally:
        if not finished and not service.stopping.is_set():
            # The client left (or we were cancelled): stop the work nobody will read.
            await asyncio.shield(service.cancel(job_id, "client disconnected"))


def job_error_response(job: Job) -> web.Response:
    if job.status == FAILED:
        return error_response(job.error_status, job.error_code or "failed", job.error or "failed")
    return error_response(409, "cancelled", "the job was cancelled")


@routes.post("/transcribe")
async def transcribe(request: web.Request) -> web.StreamResponse:
    service = request.app[service_key]
    job_id, submission, _ = await receive_submission(request)
    await service.accept(job_id, submission)
    job = await wait_for_job(request, job_id)
    if job is None:
        return web.Response(status=CLIENT_CLOSED)  # nobody is there to read it
    if job.status != COMPLETED or job.result is None:
        return job_error_response(job)
    return web.json_response(job.result)


@routes.post("/transcribe/async")
async def transcribe_async(request: web.Request) -> web.StreamResponse:
    service = request.app[service_key]
    job_id, submission, _ = await receive_submission(request)
    job = await service.accept(job_id, submission)
    return web.json_response(
        {
            "job_id": job.id,
            "status": "pending",
            "message": "job accepted; follow /jobs/{id}/events or poll /jobs/{id}/status",
        }
    )


@routes.get("/jobs/{job_id}/status")
async def job_status(request: web.Request) -> web.StreamResponse:
    job = await get_job(request)
    if not job.terminal or job.webhook_pending:
        return web.json_response(job.info())
    # A finished job's record no longer changes (once its webhook is settled): its answer
    # (with the result) is built once.
    info = job.info()
    body = await cache_of(request.app).get(
        job.id, "status", lambda: json.dumps(info).encode(), weight(job.result)
    )
    return web.Response(body=body, content_type="application/json", charset="utf-8")


@routes.get("/jobs/{job_id}/result")
async def job_result(request: web.Request) -> web.StreamResponse:
    job = await get_job(request)
    fmt = request.query.get("format", "json")
    if fmt not in FORMATS:
        raise ApiError(400, "bad_request", f"format must be one of {', '.join(FORMATS)}")
    if job.status == FAILED:
        # A stable answer about a finished job: the status the failing request got (422,
        # 503...) belonged to that request, not to every later look at the job.
        detail = f"the job failed: {job.error or 'no reason given'}"
        return error_response(409, job.error_code or "failed", detail)
    if job.status == CANCELLED:
        return job_error_response(job)
    if job.status != COMPLETED or job.result is None:
        raise ApiError(409, "not_ready", f"the job is {job.status}; the result is not ready yet")
    result = job.result
    body = await cache_of(request.app).get(
        job.id, fmt, lambda: render_bytes(result, fmt), weight(result)
    )
    return web.Response(body=body, content_type=CONTENT_TYPES[fmt], charset="utf-8")


@routes.post("/jobs/{job_id}/cancel")
async def job_cancel(request: web.Request) -> web.StreamResponse:
    job = await get_job(request)
    if job.terminal:
        return web.json_response(
            {"message": f"the job is already {job.status}; nothing to cancel", "status": job.status}
        )
    try:
        job = await request.app[service_key].cancel(job.id)
    except JobGone:
        raise ApiError(404, "job_not_found", "no job with that id (unknown, or expired)") from None
    message = "job cancelled" if job.status == CANCELLED else f"the job is already {job.status}"
    return web.json_response({"message": message, "status": job.status})
