"""Access control: API keys and tenants, CORS, the Origin rules for form posts and
WebSockets, and the allowed-hosts guard against DNS rebinding."""

from __future__ import annotations

import subprocess
import sys

import aiohttp
import openai
import pytest

from tests.helpers import form

KEY_A, KEY_A2, KEY_B = "alpha-key-1", "alpha-key-2", "bravo-key-1"


@pytest.fixture
async def keyed(make_client, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# tenant key\nalpha {KEY_A}\nalpha {KEY_A2}\n\nbravo {KEY_B}  # ops\n")
    return await make_client(api_keys_file=keys)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_are_required_where_configured(keyed, voices):
    resp = await keyed.post("/transcribe/async", data=form(voices["hello"]))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await resp.json())["code"] == "unauthorized"
    wrong = await keyed.get("/jobs/0/status", headers=bearer("nope"))
    assert wrong.status == 401 and "not valid" in (await wrong.json())["detail"]
    # Probes and the page stay open; /metrics needs a key by default.
    for path in ("/health", "/ready", "/"):
        assert (await keyed.get(path)).status == 200, path
    assert (await keyed.get("/metrics")).status == 401
    assert (await keyed.get("/metrics", headers={"X-API-Key": KEY_B})).status == 200
    # Each way of presenting the key works.
    ok = await keyed.post("/transcribe", data=form(voices["hello"]), headers=bearer(KEY_A))
    assert ok.status == 200 and (await ok.json())["text"] == "hello world"
    ok = await keyed.post("/transcribe", data=form(voices["hello"]), headers={"X-API-Key": KEY_A})
    assert ok.status == 200
    ok = await keyed.post(f"/transcribe?api_key={KEY_B}", data=form(voices["hello"]))
    assert ok.status == 200


async def test_metrics_can_be_left_open(make_client):
    client = await make_client(api_keys=("k",), metrics_access="open")
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/jobs/0/status")).status == 401


async def test_a_job_is_invisible_to_other_tenants(keyed, voices):
    resp = await keyed.post("/transcribe/async", data=form(voices["hello"]), headers=bearer(KEY_A))
    job_id = (await resp.json())["job_id"]
    assert len(job_id) == 32 and int(job_id, 16) >= 0  # 128 random bits, hex
    for path in (f"/jobs/{job_id}/status", f"/jobs/{job_id}/result"):
        other = await keyed.get(path, headers=bearer(KEY_B))
        assert other.status == 404 and (await other.json())["code"] == "job_not_found"
    cancel = await keyed.post(f"/jobs/{job_id}/cancel", headers=bearer(KEY_B))
    assert cancel.status == 404
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await keyed.ws_connect(f"/jobs/{job_id}/events", headers=bearer(KEY_B))
    assert refused.value.status == 404
    # The tenant's other key sees it, to the end.
    async with keyed.ws_connect(f"/jobs/{job_id}/events", headers=bearer(KEY_A2)) as ws:
        kinds = [msg.json()["type"] async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]
    assert kinds[-1] == "completed"
    mine = await keyed.get(f"/jobs/{job_id}/result", headers=bearer(KEY_A2))
    assert mine.status == 200 and (await mine.json())["text"] == "hello world"


async def test_websocket_key_as_a_subprotocol(keyed, voices):
    """Browsers cannot set headers on a WebSocket: the page offers ``key.<key>``."""
    resp = await keyed.post("/transcribe/async", data=form(voices["hello"]), headers=bearer(KEY_A))
    job_id = (await resp.json())["job_id"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await keyed.ws_connect(f"/jobs/{job_id}/events")
    assert refused.value.status == 401
    path = f"/jobs/{job_id}/events"
    async with keyed.ws_connect(path, protocols=("aiotranscribe", f"key.{KEY_A}")) as ws:
        assert ws.protocol == "aiotranscribe"
        kinds = [msg.json()["type"] async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]
    assert kinds[-1] == "completed"


async def test_openai_sdk_api_key(keyed, voices):
    base = str(keyed.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key=KEY_B, max_retries=0) as oai:
        with voices["hello"].open("rb") as audio:
            text = await oai.audio.transcriptions.create(model="demo", file=audio)
        assert text.text == "hello world"
    async with openai.AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0) as oai:
        with pytest.raises(openai.AuthenticationError, match="not valid"):
            with voices["hello"].open("rb") as audio:
                await oai.audio.transcriptions.create(model="demo", file=audio)


async def test_cors_is_off_by_default_and_allow_listed(make_client, voices):
    plain = await make_client()
    resp = await plain.get("/health", headers={"Origin": "https://app.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers

    client = await make_client(cors_origins=("https://app.example",))
    pre = await client.options(
        "/transcribe/async",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in pre.headers
    resp = await client.post(
        "/transcribe", data=form(voices["hello"]), headers={"Origin": "https://app.example"}
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert resp.headers["Vary"] == "Origin"
    other = await client.get("/health", headers={"Origin": "https://other.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_foreign_origins_cannot_post_or_open_event_sockets(client, voices):
    evil = {"Origin": "https://evil.example"}
    resp = await client.post("/transcribe/async", data=form(voices["hello"]), headers=evil)
    assert resp.status == 403 and (await resp.json())["code"] == "origin_not_allowed"
    same = {"Origin": str(client.make_url("/")).rstrip("/")}
    resp = await client.post("/transcribe/async", data=form(voices["hello"]), headers=same)
    assert resp.status == 200
    job_id = (await resp.json())["job_id"]
    for origin in (evil, {"Origin": "null"}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(f"/jobs/{job_id}/events", headers=origin)
        assert refused.value.status == 403
    async with client.ws_connect(f"/jobs/{job_id}/events", headers=same) as ws:
        kinds = [msg.json()["type"] async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]
    assert kinds[-1] == "completed"
    cancel = await client.post(f"/jobs/{job_id}/cancel", headers=evil)
    assert cancel.status == 403


async def test_unknown_host_names_are_refused(make_client):
    client = await make_client()  # bound to 127.0.0.1: loopback names only
    port = client.port
    rebinding = await client.get("/health", headers={"Host": f"attacker.example:{port}"})
    assert rebinding.status == 421
    assert (await rebinding.json())["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST."):
        assert (await client.get("/health", headers={"Host": host})).status == 200, host

    named = await make_client(allowed_hosts=("asr.example",))
    assert (await named.get("/health", headers={"Host": "asr.example:8000"})).status == 200
    assert (await named.get("/health", headers={"Host": f"127.0.0.1:{port}"})).status == 421
    anyhost = await make_client(allowed_hosts=("*",))
    assert (await anyhost.get("/health", headers={"Host": "whatever.example"})).status == 200


def test_a_bad_keys_file_is_a_usage_error(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alpha\n")
    done = subprocess.run(
        [sys.executable, "-m", "aiotranscribe", "serve", "--api-keys-file", str(keys)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "line 1" in done.stderr
