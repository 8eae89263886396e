"""``GET /metrics``: Prometheus text that parses, and counters that move with the work done."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from aiotranscribe.keys import pools_key
from tests.helpers import form
from tests.test_jobs import submit, wait_for


async def scrape(client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample, keyed by its name and labels."""
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_counters_move_after_a_transcription(client, voices):
    model = next(iter(client.app[pools_key]))
    before = await scrape(client)
    assert value(before, "aiotranscribe_model_ready", model=model) == 1.0
    assert value(before, "aiotranscribe_jobs_total", model=model, status="completed") == 0

    path = voices["hello"]
    resp = await client.post("/transcribe", data=form(path))
    assert resp.status == 200 and (await resp.json())["text"] == "hello world"
    after = await scrape(client)

    ok = {"route": "/transcribe", "method": "POST", "status": "200"}
    assert value(after, "aiotranscribe_http_requests_total", **ok) == 1
    assert value(after, "aiotranscribe_jobs_total", model=model, status="completed") == 1
    size = path.stat().st_size
    assert value(after, "aiotranscribe_upload_bytes_sum", model=model) == size
    audio = value(after, "aiotranscribe_audio_seconds_total", model=model)
    assert 1.0 < audio < 5.0
    assert value(after, "aiotranscribe_inference_audio_seconds_total", model=model) >= audio
    for stage in ("convert", "queue", "inference", "total"):
        labels = {"model": model, "stage": stage}
        assert value(after, "aiotranscribe_job_stage_seconds_count", **labels) == 1
        assert value(after, "aiotranscribe_job_stage_seconds_sum", **labels) > 0
    assert value(after, "aiotranscribe_job_real_time_factor_count", model=model) == 1
    assert value(after, "aiotranscribe_batch_size_count", model=model) >= 1
    assert value(after, "aiotranscribe_batch_size_sum", model=model) >= 1
    assert value(after, "aiotranscribe_slices_total", model=model) >= 1
    assert value(after, "aiotranscribe_queue_depth", model=model) == 0
    assert value(after, "aiotranscribe_worker_restarts_total", model=model) == 0
    # The scrape before this one was counted too, under its route pattern.
    scraped = {"route": "/metrics", "method": "GET", "status": "200"}
    assert value(after, "aiotranscribe_http_requests_total", **scraped) == 1


async def test_rejected_uploads_are_counted(make_client, voices):
    client = await make_client(max_queued_audio_s=0)
    model = next(iter(client.app[pools_key]))
    resp = await client.post("/transcribe", data=form(voices["hello"]))
    assert resp.status == 503
    resp = await client.post("/transcribe", data=form(data=b"not audio at all" * 64))
    assert resp.status in (415, 503)
    resp = await client.get("/jobs/0123456789abcdef0123456789abcdef/status")
    assert resp.status == 404

    samples = await scrape(client)
    assert value(samples, "aiotranscribe_rejected_submissions_total", model=model) == 2
    busy = {"route": "/transcribe", "method": "POST", "status": "503"}
    assert value(samples, "aiotranscribe_http_requests_total", **busy) == 2
    # Route patterns, not raw paths: one series however many job ids are asked for.
    unknown = {"route": "/jobs/{job_id}/status", "method": "GET", "status": "404"}
    assert value(samples, "aiotranscribe_http_requests_total", **unknown) == 1
    assert value(samples, "aiotranscribe_jobs_total", model=model, status="completed") == 0

    # A second app in the same process has its own registry.
    other = await make_client()
    assert value(await scrape(other), "aiotranscribe_rejected_submissions_total", model=model) == 0


async def test_live_gauges_websockets_and_queue(make_client, long_audio):
    client = await make_client(chunk_seconds=20, batch_size=1)
    model = next(iter(client.app[pools_key]))
    job_id = await submit(client, long_audio[0])
    async with client.ws_connect(f"/jobs/{job_id}/events") as ws:
        await ws.receive_json()
        await wait_for(lambda: pool_queued(client) > 0)
        samples = await scrape(client)
        assert value(samples, "aiotranscribe_websocket_connections") == 1
        assert value(samples, "aiotranscribe_queue_depth", model=model) > 0
        assert value(samples, "aiotranscribe_jobs_active", status="processing") == 1
        await client.post(f"/jobs/{job_id}/cancel")
    samples = await scrape(client)
    assert value(samples, "aiotranscribe_jobs_total", model=model, status="cancelled") == 1
    assert value(samples, "aiotranscribe_jobs_active", status="processing") == 0
    upgraded = {"route": "/jobs/{job_id}/events", "method": "GET", "status": "101"}
    assert value(samples, "aiotranscribe_http_requests_total", **upgraded) == 1


def pool_queued(client) -> int:
    return next(iter(client.app[pools_key].values())).queued
