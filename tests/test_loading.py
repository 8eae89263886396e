"""Model loading in the background, load failures, and the process executor end to end."""

from __future__ import annotations

import os
import signal
import statistics
import time

from aiotranscribe.keys import pools_key
from tests.conftest import MODEL, child_processes, wait_ready
from tests.helpers import form


async def test_process_executor_end_to_end(make_client, media):
    client = await make_client(ready=False, executor="process")
    # The worker is still importing NeMo: /health answers at once, transcription is 503.
    latencies = []
    for _ in range(5):
        t0 = time.perf_counter()
        resp = await client.get("/health")
        latencies.append(time.perf_counter() - t0)
        body = await resp.json()
    assert body["status"] == "model_not_loaded" and body["model_loaded"] is False
    # Not a speed target (benchmarks/health_latency.py measures that): loading must not
    # block the loop for the seconds NeMo's import takes.
    assert statistics.median(latencies) < 2.0
    assert (await client.get("/ready")).status == 503
    resp = await client.post("/transcribe", data=form(media["wav"]))
    assert resp.status == 503
    assert "loading" in (await resp.json())["detail"]
    assert resp.headers["Retry-After"]

    await wait_ready(client)
    pool = next(iter(client.app[pools_key].values()))
    assert pool.state == "ready", pool.error
    worker_pid = pool.worker.pid
    assert any(line.startswith(f"{worker_pid}:") for line in child_processes())
    resp = await client.post("/transcribe", data=form(media["mp3"]))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["text"] == "hello world"
    # A worker that dies is replaced, and the slices it had are served by the new one.
    os.kill(worker_pid, signal.SIGKILL)
    resp = await client.post("/transcribe", data=form(media["wav"]))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["text"] == "hello world"
    assert pool.stats.worker_restarts == 1
    assert pool.worker.pid != worker_pid
    await client.close()
    assert child_processes() == []


async def test_unloadable_hub_model_is_503_with_reason(make_client, media):
    client = await make_client(models=("nvidia/parakeet-tdt-0.6b-v2",))
    health = await (await client.get("/health")).json()
    assert health["status"] == "model_not_loaded"
    assert health["models"][0]["state"] == "failed"
    resp = await client.post("/transcribe", data=form(media["wav"]))
    assert resp.status == 503
    detail = (await resp.json())["detail"]
    assert "failed to load" in detail and "hub" in detail and "Traceback" not in detail
    # The reason in plain words; the exception (class, hub URL) only in the server log.
    assert "Error" not in detail and "http" not in detail
    assert "Error" not in health["models"][0]["error"]


async def test_missing_nemo_file_is_503_without_its_path(make_client, media, tmp_path):
    secret = tmp_path / "secret-models" / "nope.nemo"
    client = await make_client(models=(str(secret),))
    resp = await client.post("/transcribe", data=form(media["wav"]))
    assert resp.status == 503
    body = await resp.text()
    assert "not found" in body
    health = await (await client.get("/health")).text()
    assert "secret-models" not in body and "secret-models" not in health


def test_server_process_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from aiotranscribe.app import create_app\n"
        "from aiotranscribe.config import Settings\n"
        "create_app(Settings())\n"
        "print('torch' in sys.modules, 'nemo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


async def test_a_failed_default_model_does_not_block_a_healthy_one(make_client, media, tmp_path):
    client = await make_client(models=(str(tmp_path / "nope.nemo"), MODEL))
    resp = await client.post("/transcribe", data=form(media["wav"], model="demo"))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["text"] == "hello world"
    # Without a model named, the request is charged to the default, which cannot serve it.
    resp = await client.post("/transcribe", data=form(media["wav"]))
    assert resp.status == 503 and "not found" in (await resp.json())["detail"]
