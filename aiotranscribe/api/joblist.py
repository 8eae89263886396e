"""``GET /jobs``: the caller's jobs, newest first, a page at a time; ``DELETE /jobs/{id}``.

A page holds at most ``limit`` jobs, each a summary with links (no result bodies), and a
``next_cursor`` when older jobs remain. The cursor is the last job's position (created_at,
id), opaque to clients: the next page holds only jobs strictly older than it, so paging
returns every job once even while new ones arrive (they are newer than any cursor).

Deleting a job that has not ended cancels it first and waits for it to end (the server's
own cancel, which answers once the job has stopped), then deletes it: the answer comes when
the job and its data are gone, so a 404 follows at once, never a half-deleted job.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from aiotranscribe.api.access import TENANT
from aiotranscribe.api.errors import ApiError
from aiotranscribe.api.transcribe import get_job
from aiotranscribe.jobs import CANCELLED, COMPLETED, FAILED, PENDING, PROCESSING, Job
from aiotranscribe.keys import service_key
from aiotranscribe.rendered import cache_of
from aiotranscribe.store.base import JobPosition, JobQuery, position_of

routes = web.RouteTableDef()

DEFAULT_LIMIT = 50
# A page is built in memory and sent as one JSON body: keep it to a few hundred small
# records, however large the store.
MAX_LIMIT = 200
# Longest model name accepted as a filter; names are short, this only bounds a silly query.
MAX_MODEL_CHARS = 200
MAX_CURSOR_CHARS = 256
FILTERS = ("status", "model", "since")
STATUSES = (PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED)


def bad_request(detail: str) -> ApiError:
    return ApiError(400, "bad_request", detail)


def encode_cursor(position: JobPosition) -> str:
    raw = json.dumps(list(position), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> JobPosition:
    """The position a cursor from ``encode_cursor`` holds; 400 for anything else."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        if not isinstance(created_at, str) or not isinstance(job_id, str):
            raise ValueError("not two strings")
    except (ValueError, TypeError, binascii.Error):
        raise bad_request("cursor is not one this server gave (copy next_cursor as is)") from None
    return created_at, job_id


def parse_since(value: str) -> str:
    """An ISO 8601 time (UTC if no offset is given) or Unix seconds, in ``created_at``'s
    format (UTC, milliseconds, ``Z``), so the two compare as strings."""
    try:
        when = _instant(value)
    except (OverflowError, OSError, ValueError):  # not a time, NaN, or past year 9999
        raise bad_request(
            f"since must be an ISO 8601 time (2026-01-31T12:00:00Z) or Unix seconds, "
            f"not {value[:40]!r}"
        ) from None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _instant(value: str) -> datetime:
    try:
        seconds = float(value)
    except ValueError:
        when = datetime.fromisoformat(value)
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    return datetime.fromtimestamp(seconds, UTC)


def parse_limit(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}, not {value[:20]!r}")
    return limit


def parse_filters(query: Any) -> dict[str, str]:
    """The query's filters, checked; empty ones are left out (the same as absent)."""
    filters = {name: query[name] for name in FILTERS if query.get(name)}
    status = filters.get("status")
    if status is not None and status not in STATUSES:
        raise bad_request(f"status must be one of {', '.join(STATUSES)}, not {status[:40]!r}")
    if len(filters.get("model", "")) > MAX_MODEL_CHARS:
        raise bad_request(f"model must be at most {MAX_MODEL_CHARS} characters")
    return filters


def summary(job: Job) -> dict[str, Any]:
    """What the list says about a job: its state, not its result."""
    base = f"/jobs/{job.id}"
    return {
        "job_id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": round(job.progress, 4),
        "filename": job.filename,
        "model": job.model,
        "language": job.language,
        "created_at": job.created_at,
        "completed_at": job.completed_at,
        "duration_s": job.duration_s,
        "error": job.error,
        "links": {
            "status": f"{base}/status",
            "result": f"{base}/result",
            "events": f"{base}/events",
        },
    }


@routes.get("/jobs")
async def list_jobs(request: web.Request) -> web.StreamResponse:
    filters = parse_filters(request.query)
    limit = parse_limit(request.query.get("limit"))
    cursor = request.query.get("cursor")
    before = decode_cursor(cursor) if cursor else None
    since = parse_since(filters["since"]) if "since" in filters else None
    # One more than asked says whether another page exists.
    query = JobQuery(
        request.get(TENANT),
        limit + 1,
        status=filters.get("status"),
        model=filters.get("model"),
        since=since,
        before=before,
    )
    jobs = await request.app[service_key].store.page_jobs(query)
    page, more = jobs[:limit], len(jobs) > limit
    next_cursor = encode_cursor(position_of(page[-1])) if more else None
    next_link = None
    if next_cursor is not None:
        next_link = "/jobs?" + urlencode({**filters, "limit": limit, "cursor": next_cursor})
    return web.json_response(
        {"jobs": [summary(j) for j in page], "next_cursor": next_cursor, "next": next_link}
    )


@routes.delete("/jobs/{job_id}")
async def delete_job(request: web.Request) -> web.StreamResponse:
    job = await get_job(request)  # 404 for unknown, expired, or another tenant's
    service = request.app[service_key]
    if not job.terminal:
        # JobGone (deleted meanwhile) is a 404 by the error middleware.
        job = await service.cancel(job.id, "deleted by client")
        if not job.terminal:  # cannot happen while the store works: cancel ends the job
            raise ApiError(409, "not_stopped", "the job could not be stopped; try again")
    if not await service.store.delete_job(job.id):
        raise ApiError(404, "job_not_found", "no job with that id (unknown, or expired)")
    # What an ended job left: its directory and blob (normally gone already), renderings.
    service.discard(job.id)
    cache_of(request.app).drop(job.id)
    return web.json_response(
        {"job_id": job.id, "status": job.status, "deleted": True, "message": "job deleted"}
    )
