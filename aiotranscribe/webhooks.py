"""Webhooks: when a job that has a ``callback_url`` ends, POST what happened there.

The payload (JSON, the same bytes on every attempt)::

    {"type": "job.completed" | "job.failed" | "job.cancelled", "job_id", "status",
     "model", "filename", "created_at", "completed_at",
     "result_url",                       # GET it for the result (also in other formats)
     "result": {...} | null,             # inline when its JSON is at most
                                         # webhook_inline_max_kib (256 KiB), else null
     "error": {"code", "message"} | null, "reason": str | null}

Signed as the Standard Webhooks spec says: ``webhook-id`` (``msg_<job id>``, the same on
every attempt: a receiver drops repeats by it), ``webhook-timestamp`` (Unix seconds of the
attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``
with ``--webhook-secret``.

Delivery: a 2xx is delivered (recorded in the store at once, never sent again). A network
error, a timeout, a 5xx or a 429 is retried after a random wait between 0 and
``webhook_retry_base_s * 2**(attempt-1)`` (at most ``webhook_retry_max_delay_s``; a
``Retry-After`` is honoured up to that cap), until ``webhook_retry_for_s`` after the job's
end; then it is failed. Any other answer (3xx, 4xx) or a URL the SSRF rules refuse fails at
once. Redirects are not followed. Each attempt is logged (``webhook_attempt``) and counted in
``/metrics``; the state is the job's ``webhook`` object in ``GET /jobs/{id}/status``.

Durability: the state lives on the job's record in the store. A job ends with it
``pending``; at start-up every ended job still pending is scheduled again at its
``next_attempt_at``, so retries survive restarts. A crash between a receiver's 2xx and the
store write can repeat a delivery (with the same ``webhook-id``): at least once, and exactly
once whenever the server stops in order. One supervised task schedules the attempts; at
shutdown, attempts under way get ``DRAIN_S`` to finish, then are cancelled (and retried at
the next start).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import heapq
import hmac
import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from aiotranscribe import __version__
from aiotranscribe.config import Settings
from aiotranscribe.jobs import (
    CANCELLED,
    COMPLETED,
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    Job,
)
from aiotranscribe.netguard import (
    Unreachable,
    UrlError,
    UrlPolicy,
    check_syntax,
    describe,
    open_url,
    vet,
)
from aiotranscribe.store import JobStore, StoreClosed
from aiotranscribe.supervise import run_supervised

log = structlog.get_logger(__name__)

FIELD = "callback_url"
DELIVERED, RETRY, FAILED = "delivered", "retry", "failed"
"""Outcomes of one attempt (the metric's label)."""
# Attempts in flight at once: a slow receiver holds one slot for webhook_timeout_s at most.
CONCURRENCY = 16
# At shutdown, how long attempts under way may finish before they are cancelled.
DRAIN_S = 5.0
MAX_ERROR_CHARS = 300


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def unix(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def new_delivery(result_url: str) -> dict[str, Any]:
    """A job's webhook state at submission: pending until the job ends and is delivered."""
    return {
        "state": WEBHOOK_PENDING,
        "attempts": 0,
        "last_status": None,
        "last_error": None,
        "last_attempt_at": None,
        "next_attempt_at": None,
        "delivered_at": None,
        "result_url": result_url,
    }


async def check_callback(raw: str, settings: Settings) -> str:
    """``callback_url`` at submission: 400 ``bad_request`` when not an http(s) URL,
    ``url_forbidden`` when its host is (or resolves to) an address the rules refuse. A name
    that does not resolve now is accepted: delivery retries it. Every attempt checks again."""
    url = check_syntax(raw, FIELD)
    with contextlib.suppress(Unreachable):
        await vet(url, UrlPolicy.of(settings), FIELD)
    return str(url)


# -- payload and signature ----------------------------------------------------------------------


def signing_key(secret: str) -> bytes:
    """Standard Webhooks secrets are ``whsec_`` + base64 of the key; any other string is
    used as its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def payload(job: Job, inline_max_bytes: int) -> bytes:
    result = job.result if job.status == COMPLETED else None
    inline = result
    if result is not None and len(json.dumps(result).encode()) > inline_max_bytes:
        inline = None
    error = {"code": job.error_code, "message": job.error} if job.error_code else None
    body = {
        "type": f"job.{job.status}",
        "job_id": job.id,
        "status": job.status,
        "model": job.model,
        "filename": job.filename,
        "created_at": job.created_at,
        "completed_at": job.completed_at,
        "result_url": (job.webhook or {}).get("result_url"),
        "result": inline,
        "error": error,
        "reason": job.cancel_reason if job.status == CANCELLED else None,
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def headers_for(job_id: str, body: bytes, key: bytes | None, now: float) -> dict[str, str]:
    msg_id, timestamp = f"msg_{job_id}", int(now)
    out = {
        "Content-Type": "application/json",
        "User-Agent": f"aiotranscribe/{__version__} (webhook)",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if key is not None:
        out["webhook-signature"] = sign(key, msg_id, timestamp, body)
    return out


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is ignored)."""
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None


# -- delivery -------------------------------------------------------------------------------------


class Webhooks:
    """Schedules and sends every webhook of one app; ``job_ended`` is the service's hook."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        on_attempt: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._on_attempt = on_attempt
        self._rng = rng or random.Random()
        self._key = signing_key(settings.webhook_secret) if settings.webhook_secret else None
        self._policy = UrlPolicy.of(settings)
        self._due: list[tuple[float, str]] = []  # (Unix time, job id), a heap
        self._scheduled: set[str] = set()  # in the heap or being attempted: one at a time
        self._wake = asyncio.Event()
        self._attempts: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0

    # -- scheduling --------------------------------------------------------------------------

    def job_ended(self, job: Job, _timings: dict[str, float] | None = None) -> None:
        """The service's ``on_finish`` hook: a job with a pending webhook is due now."""
        if job.callback_url and job.webhook_pending:
            self.schedule(job.id, time.time())

    def schedule(self, job_id: str, at: float) -> None:
        if job_id in self._scheduled:
            return
        self._scheduled.add(job_id)
        heapq.heappush(self._due, (at, job_id))
        self._wake.set()

    @property
    def scheduled(self) -> int:
        return len(self._scheduled)

    async def resume(self) -> None:
        """Schedule every ended job whose webhook is still pending (start-up)."""
        jobs = await self.store.pending_webhooks()
        for job in jobs:
            state = job.webhook or {}
            self.schedule(job.id, unix(state.get("next_attempt_at")) or time.time())
        if jobs:
            log.info("webhooks_resumed", pending=len(jobs))

    # -- lifetime ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(
            run_supervised(self._resume_and_loop, "webhooks_crashed", self._restarted),
            name="webhooks",
        )

    async def close(self, drain_s: float = DRAIN_S) -> None:
        """Stop scheduling; attempts under way get ``drain_s`` to finish, then are cancelled
        (their webhooks stay pending in the store for the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._attempts:
            await asyncio.wait(list(self._attempts), timeout=drain_s)
        for task in list(self._attempts):
            task.cancel()
        if self._attempts:
            await asyncio.wait(list(self._attempts))

    async def _resume_and_loop(self) -> None:
        await self.resume()  # again after a restart: what is scheduled already is skipped
        await self._loop()

    def _restarted(self) -> None:
        self.restarts += 1

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            if not self._due:
                await self._wake.wait()
                continue
            at, job_id = self._due[0]
            wait = at - time.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            heapq.heappop(self._due)
            try:
                await self._slots.acquire()
            except BaseException:
                heapq.heappush(self._due, (at, job_id))
                raise
            task = asyncio.create_task(self._run(job_id), name=f"webhook:{job_id}")
            self._attempts.add(task)
            task.add_done_callback(self._attempts.discard)

    async def _run(self, job_id: str) -> None:
        retry_at: float | None = None
        try:
            retry_at = await self.attempt(job_id)
        except StoreClosed:
            pass  # stopping: the state in the store is as it was, the next start resumes it
        except Exception:
            log.exception("webhook_attempt_crashed", job_id=job_id)
        finally:
            self._slots.release()
            self._scheduled.discard(job_id)
        if retry_at is not None:
            self.schedule(job_id, retry_at)

    async def attempt(self, job_id: str) -> float | None:
        """One delivery attempt of the job's webhook, its outcome stored; when to try
        again (None: delivered, failed, or nothing to do)."""
        job = await self.store.get(job_id)
        if job is None or not job.terminal or not job.callback_url or not job.webhook_pending:
            return None
        state = dict(job.webhook or {})
        attempt = int(state.get("attempts", 0)) + 1
        body = payload(job, int(self.settings.webhook_inline_max_kib * 1024))
        started = time.time()
        status: int | None = None
        error: str | None = None
        wait_hint: float | None = None
        retryable = True
        try:
            async with (
                asyncio.timeout(self.settings.webhook_timeout_s),
                open_url(
                    "POST",
                    check_syntax(job.callback_url, FIELD),
                    self._policy,
                    param=FIELD,
                    data=body,
                    headers=headers_for(job.id, body, self._key, started),
                ) as response,
            ):
                status = response.status
                wait_hint = retry_after_s(response.headers.get("Retry-After"))
        except UrlError as exc:
            error, retryable = exc.detail, False
        except Unreachable as exc:
            error = str(exc)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            error = describe(exc)
        now = time.time()
        retry_at: float | None = None
        if status is not None and 200 <= status < 300:
            outcome = DELIVERED
            state.update(state=WEBHOOK_DELIVERED, delivered_at=iso(now), next_attempt_at=None)
        else:
            if status is not None:
                retryable = status >= 500 or status == 429
                error = f"the receiver answered {status}"
            deadline = (job.finished_at or started) + self.settings.webhook_retry_for_s
            if retryable:
                retry_at = now + self.backoff(attempt, wait_hint)
            if retry_at is not None and retry_at <= deadline:
                outcome = RETRY
                state.update(next_attempt_at=iso(retry_at))
            else:
                outcome, retry_at = FAILED, None
                if retryable:
                    error = f"{error}; gave up after {attempt} attempts"
                state.update(state=WEBHOOK_FAILED, next_attempt_at=None)
        state.update(
            attempts=attempt,
            last_status=status,
            last_error=error[:MAX_ERROR_CHARS] if error else None,
            last_attempt_at=iso(started),
        )
        stored = await self.store.set_webhook(job_id, state)
        log.info(
            "webhook_attempt",
            job_id=job_id,
            attempt=attempt,
            outcome=outcome,
            status=status,
            error=error,
            took_ms=round((now - started) * 1000, 1),
            retry_in_s=round(retry_at - now, 3) if retry_at is not None else None,
        )
        if self._on_attempt is not None:
            self._on_attempt(outcome)
        return retry_at if stored is not None else None  # a deleted job is not retried

    def backoff(self, attempt: int, hint: float | None = None) -> float:
        """Full jitter: random in [0, min(cap, base * 2**(attempt-1))]; a Retry-After
        hint is a floor, up to the cap."""
        cap = self.settings.webhook_retry_max_delay_s
        ceiling = min(cap, self.settings.webhook_retry_base_s * 2 ** (attempt - 1))
        wait = self._rng.uniform(0, ceiling)
        return max(wait, min(hint, cap)) if hint is not None else wait
