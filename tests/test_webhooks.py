"""Webhooks: signed deliveries to real receivers on loopback, retried on 5xx and network
errors only, recorded in the job's status and /metrics, delivered once across a restart;
callback URLs the SSRF rules refuse are 400 with no connection made."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import eventually, form
from tests.origins import Canary, Hit, Origin
from tests.test_fetch import error_of
from tests.test_jobs import submit
from tests.test_metrics import scrape, value

KEY = b"sixteen byte key, and then some"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
# Small back-off so retries take milliseconds.
FAST = {
    "allow_private_urls": True,
    "webhook_secret": SECRET,
    "webhook_retry_base_s": 0.05,
    "webhook_retry_max_delay_s": 0.2,
}


def verified(hit: Hit) -> dict[str, Any]:
    """The payload, once its Standard Webhooks signature checks out (written here, apart
    from the server's code)."""
    msg_id, timestamp = hit.headers["webhook-id"], hit.headers["webhook-timestamp"]
    assert abs(time.time() - int(timestamp)) < 300
    signed = f"{msg_id}.{timestamp}.".encode() + hit.body
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    offered = [s.split(",", 1) for s in hit.headers["webhook-signature"].split()]
    assert any(v == "v1" and hmac.compare_digest(sig, expected) for v, sig in offered)
    assert hit.headers["Content-Type"] == "application/json"
    return json.loads(hit.body)


@pytest.fixture
async def receiver() -> AsyncIterator[Origin]:
    server = await Origin().start()
    yield server
    await server.close()


async def webhook_state(client, job_id: str) -> dict[str, Any]:
    resp = await client.get(f"/jobs/{job_id}/status")
    assert resp.status == 200
    return (await resp.json())["webhook"]


async def settled(client, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The webhook state once it is no longer pending."""
    state: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal state
        state = await webhook_state(client, job_id)
        return state["state"] != "pending"

    await eventually(done, timeout)
    return state


async def test_a_completed_job_is_delivered_signed(make_client, receiver, voices):
    url = receiver.answers("/hook")
    client = await make_client(**FAST)
    job_id = await submit(client, voices["hello"], callback_url=url)
    state = await settled(client, job_id)
    assert state["state"] == "delivered" and state["attempts"] == 1
    assert state["last_status"] == 200 and state["delivered_at"]

    (hit,) = receiver.hits_on("/hook")
    assert hit.method == "POST" and hit.headers["webhook-id"] == f"msg_{job_id}"
    body = verified(hit)
    result = await (await client.get(f"/jobs/{job_id}/result")).json()
    assert body["type"] == "job.completed" and body["job_id"] == job_id
    assert body["status"] == "completed" and body["result"] == result
    assert body["result_url"] == str(client.make_url(f"/jobs/{job_id}/result"))
    assert body["error"] is None

    # The OpenAI route takes it as an extension; a job that fails is delivered too.
    resp = await client.post(
        "/v1/audio/transcriptions", data=form(voices["hello"], callback_url=url)
    )
    assert resp.status == 200
    wav = voices["hello"].read_bytes()
    job_id = await submit(client, None, data=wav[: len(wav) // 2], callback_url=url)
    assert (await settled(client, job_id))["state"] == "delivered"
    kinds = [verified(h)["status"] for h in receiver.hits_on("/hook")]
    assert kinds == ["completed", "completed", "failed"]
    failed = verified(receiver.hits_on("/hook")[-1])
    assert failed["error"]["code"] == "truncated" and failed["result"] is None

    samples = await scrape(client)
    assert value(samples, "aiotranscribe_webhook_attempts_total", outcome="delivered") == 3


async def test_5xx_is_retried_until_one_success(make_client, receiver, voices):
    url = receiver.answers("/hook", 503, 503)
    client = await make_client(**FAST)
    job_id = await submit(client, voices["hello"], callback_url=url)
    state = await settled(client, job_id)
    assert state["state"] == "delivered" and state["attempts"] == 3
    hits = receiver.hits_on("/hook")
    assert len(hits) == 3 and len({h.headers["webhook-id"] for h in hits}) == 1
    assert len({h.body for h in hits}) == 1  # the same payload, freshly signed each time
    for hit in hits:
        verified(hit)
    samples = await scrape(client)
    assert value(samples, "aiotranscribe_webhook_attempts_total", outcome="retry") == 2
    assert value(samples, "aiotranscribe_webhook_attempts_total", outcome="delivered") == 1
    await asyncio.sleep(0.5)
    assert len(receiver.hits_on("/hook")) == 3  # nothing after the success


async def test_4xx_is_not_retried_and_the_window_is_bounded(make_client, receiver, voices):
    gone = receiver.answers("/gone", 410)
    down = receiver.answers("/down", *[503] * 1000)
    client = await make_client(**FAST, webhook_retry_for_s=0.5)
    first = await submit(client, voices["hello"], callback_url=gone)
    state = await settled(client, first)
    assert state == {**state, "state": "failed", "attempts": 1, "last_status": 410}
    second = await submit(client, voices["hello"], callback_url=down)
    state = await settled(client, second)
    assert state["state"] == "failed" and state["attempts"] >= 2
    assert "gave up" in state["last_error"] and state["next_attempt_at"] is None
    await asyncio.sleep(0.4)
    assert len(receiver.hits_on("/gone")) == 1
    assert len(receiver.hits_on("/down")) == state["attempts"]


async def test_a_big_result_is_sent_as_a_link(make_client, receiver, voices):
    url = receiver.answers("/hook")
    client = await make_client(**FAST, webhook_inline_max_kib=0.01)
    job_id = await submit(client, voices["hello"], callback_url=url)
    await settled(client, job_id)
    body = verified(receiver.hits_on("/hook")[0])
    assert body["result"] is None
    link = body["result_url"]
    async with client.session.get(link) as resp:  # an absolute URL, not the test client's
        assert (await resp.json())["text"] == "hello world"


async def test_a_restart_between_attempts_delivers_once(make_client, receiver, voices):
    failing = [True]

    async def hook(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=503 if failing[0] else 204)

    url = receiver.on("/hook", hook)
    slow = {**FAST, "webhook_retry_base_s": 0.5, "webhook_retry_max_delay_s": 1}
    client = await make_client(**slow)
    job_id = await submit(client, voices["hello"], callback_url=url)

    async def tried() -> bool:
        return (await webhook_state(client, job_id))["attempts"] >= 1

    await eventually(tried)
    await client.close()  # the server stops with the delivery pending in its SQLite store
    attempts_before = len(receiver.hits_on("/hook"))
    failing[0] = False

    again = await make_client(**FAST)  # the same data directory
    state = await settled(again, job_id)
    assert state["state"] == "delivered" and state["last_status"] == 204
    hits = receiver.hits_on("/hook")
    assert len(hits) == attempts_before + 1
    assert verified(hits[-1])["job_id"] == job_id
    await again.close()

    third = await make_client(**FAST)
    await asyncio.sleep(0.5)
    assert len(receiver.hits_on("/hook")) == attempts_before + 1  # delivered once, for good
    assert (await webhook_state(third, job_id))["state"] == "delivered"


async def test_forbidden_callback_urls_are_400_without_a_connection(make_client, voices):
    canary = await Canary().start("127.0.0.1", "::1")
    try:
        client = await make_client(webhook_secret=SECRET)  # allow_private_urls off
        port4, port6 = canary.port("127.0.0.1"), canary.port("::1")
        cases = {
            f"http://127.0.0.1:{port4}/hook": "url_forbidden",
            "http://169.254.169.254/latest/meta-data/": "url_forbidden",
            f"http://[::1]:{port6}/hook": "url_forbidden",
            f"http://localhost:{port4}/hook": "url_forbidden",
            "file:///etc/passwd": "url_forbidden",
            f"gopher://127.0.0.1:{port4}/_POST": "url_forbidden",
            "no url here": "bad_request",
        }
        for url, code in cases.items():
            resp = await client.post(
                "/transcribe/async", data=form(voices["hello"], callback_url=url)
            )
            assert await error_of(resp) == (400, code), url
        assert canary.connections == 0
    finally:
        await canary.close()


async def test_a_job_without_a_callback_has_no_webhook(client, voices):
    job_id = await submit(client, voices["hello"])
    await eventually(lambda: _terminal(client, job_id))
    assert await webhook_state(client, job_id) is None


async def _terminal(client, job_id: str) -> bool:
    info = await (await client.get(f"/jobs/{job_id}/status")).json()
    return info["status"] in ("completed", "failed", "cancelled")
