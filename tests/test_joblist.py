"""The job list (``GET /jobs``) and deleting jobs (``DELETE /jobs/{id}``), on the real app."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from aiotranscribe.keys import pools_key, settings_key, store_key
from tests.helpers import eventually, form

TERMINAL = {"completed", "failed", "cancelled"}
KEY_A, KEY_B = "alpha-key", "bravo-key"


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def submit(client, path, key: str | None = None) -> str:
    resp = await client.post("/transcribe/async", data=form(path), headers=bearer(key))
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["job_id"])


async def until_ended(client, job_id: str, key: str | None = None) -> dict[str, Any]:
    async def ended() -> bool:
        resp = await client.get(f"/jobs/{job_id}/status", headers=bearer(key))
        return (await resp.json())["status"] in TERMINAL

    await eventually(ended)
    return dict(await (await client.get(f"/jobs/{job_id}/status", headers=bearer(key))).json())


async def listing(client, query: str = "", key: str | None = None) -> dict[str, Any]:
    resp = await client.get(f"/jobs{query}", headers=bearer(key))
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


def ids(page: dict[str, Any]) -> list[str]:
    return [j["job_id"] for j in page["jobs"]]


async def test_newest_first_with_links_and_no_results(client, voices):
    submitted = [await submit(client, voices[name]) for name in ("hello", "digits", "command")]
    for job_id in submitted:
        await until_ended(client, job_id)
    page = await listing(client)
    assert ids(page) == submitted[::-1]
    assert page["next_cursor"] is None and page["next"] is None
    first = page["jobs"][0]
    assert first["status"] == "completed" and first["filename"] == "command.wav"
    assert "result" not in first and first["progress"] == 1.0
    assert first["links"] == {
        "status": f"/jobs/{first['job_id']}/status",
        "result": f"/jobs/{first['job_id']}/result",
        "events": f"/jobs/{first['job_id']}/events",
    }
    # The links work.
    result = await client.get(first["links"]["result"])
    assert (await result.json())["text"] == "please call tomorrow"


async def test_filters_status_model_since(client, voices, long_audio):
    done = await submit(client, voices["hello"])
    await until_ended(client, done)
    cancelled = await submit(client, long_audio[0])
    resp = await client.post(f"/jobs/{cancelled}/cancel")
    assert (await resp.json())["status"] == "cancelled"
    model = next(iter(client.app[pools_key]))

    assert ids(await listing(client, "?status=completed")) == [done]
    assert ids(await listing(client, "?status=cancelled")) == [cancelled]
    assert ids(await listing(client, "?status=pending")) == []
    assert ids(await listing(client, f"?model={model}")) == [cancelled, done]
    assert ids(await listing(client, "?model=no-such-model")) == []
    # Empty values are no filter at all.
    assert ids(await listing(client, "?status=&model=&since=")) == [cancelled, done]
    # since: ISO 8601 or Unix seconds; only jobs created then or later.
    created = (await listing(client))["jobs"][0]["created_at"]  # the cancelled job's
    assert ids(await listing(client, f"?since={created}")) == [cancelled]
    assert ids(await listing(client, f"?since={time.time() + 60:.0f}")) == []
    assert ids(await listing(client, "?since=2000-01-01T00:00:00")) == [cancelled, done]
    assert ids(await listing(client, "?since=946684800&status=completed")) == [done]


async def test_paging_returns_every_job_once_while_jobs_are_added(client, voices):
    existing = [await submit(client, voices["hello"]) for _ in range(7)]
    seen: list[str] = []
    added: list[str] = []
    url: str | None = "/jobs?limit=2"
    pages = 0
    while url is not None:
        resp = await client.get(url)
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        seen += ids(page)
        assert len(page["jobs"]) <= 2
        pages += 1
        url = page["next"]
        if url is not None:
            assert page["next_cursor"] in url and "limit=2" in url
            added.append(await submit(client, voices["digits"]))  # newer than any cursor
    assert pages == 4
    assert seen == existing[::-1]  # every job there when paging began, once, in order
    assert not set(seen) & set(added)
    # A new listing starts with the jobs added meanwhile.
    assert ids(await listing(client, f"?limit={len(added)}")) == added[::-1]
    # The filters travel in the next link.
    model = next(iter(client.app[pools_key]))
    first = await listing(client, f"?limit=1&model={model}")
    assert first["next"] is not None and f"model={model}" in first["next"]
    for job_id in existing + added:
        await until_ended(client, job_id)


@pytest.fixture
async def keyed(make_client):
    return await make_client(api_keys=(f"alpha={KEY_A}", f"bravo={KEY_B}"))


async def test_other_tenants_see_none_of_the_jobs(keyed, voices):
    job_id = await submit(keyed, voices["hello"], KEY_A)
    await until_ended(keyed, job_id, KEY_A)
    assert ids(await listing(keyed, key=KEY_A)) == [job_id]
    assert ids(await listing(keyed, key=KEY_B)) == []
    assert ids(await listing(keyed, "?status=completed", key=KEY_B)) == []
    assert (await keyed.get("/jobs")).status == 401
    # Another tenant can neither delete it nor learn that it exists.
    resp = await keyed.delete(f"/jobs/{job_id}", headers=bearer(KEY_B))
    assert resp.status == 404 and (await resp.json())["code"] == "job_not_found"
    assert (await keyed.get(f"/jobs/{job_id}/status", headers=bearer(KEY_A))).status == 200
    resp = await keyed.delete(f"/jobs/{job_id}", headers=bearer(KEY_A))
    assert resp.status == 200
    assert ids(await listing(keyed, key=KEY_A)) == []


async def test_delete_a_finished_job_removes_it_and_its_data(client, voices):
    job_id = await submit(client, voices["hello"])
    kept = await submit(client, voices["digits"])
    await until_ended(client, job_id)
    await until_ended(client, kept)
    # Rendered once, so the cache holds it.
    assert (await client.get(f"/jobs/{job_id}/result?format=srt")).status == 200
    resp = await client.delete(f"/jobs/{job_id}")
    assert resp.status == 200
    body = await resp.json()
    assert body["job_id"] == job_id and body["deleted"] is True and body["status"] == "completed"
    for path in ("status", "result", "result?format=srt"):
        gone = await client.get(f"/jobs/{job_id}/{path}")
        assert gone.status == 404, path
        assert (await gone.json())["code"] == "job_not_found"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"/jobs/{job_id}/events")
    assert refused.value.status == 404
    assert (await client.delete(f"/jobs/{job_id}")).status == 404
    assert (await client.post(f"/jobs/{job_id}/cancel")).status == 404
    assert ids(await listing(client)) == [kept]
    store = client.app[store_key]
    assert await store.get(job_id) is None
    assert await store.events_after(job_id, 0) == []
    assert await store.slices(job_id) == []
    spool = client.app[settings_key].spool_dir

    async def no_spool_dir() -> bool:
        return not (spool / job_id).exists()

    await eventually(no_spool_dir, timeout=10)
    # The other job is untouched.
    other = await client.get(f"/jobs/{kept}/result")
    assert (await other.json())["text"] == "one two three four five"


async def test_delete_a_running_job_cancels_it_then_deletes_it(make_client, long_audio):
    client = await make_client(chunk_seconds=5, batch_size=1)
    pool = next(iter(client.app[pools_key].values()))
    job_id = await submit(client, long_audio[0])

    async def running() -> bool:
        return pool.stats.batches >= 1

    await eventually(running)
    assert (await client.app[store_key].get(job_id)).status == "processing"
    async with client.ws_connect(f"/jobs/{job_id}/events") as ws:
        resp = await client.delete(f"/jobs/{job_id}")
        assert resp.status == 200
        assert (await resp.json())["status"] == "cancelled"
        # A watcher saw the job end (cancelled), then the socket closed.
        events = [msg.json() async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]
    assert events[-1]["type"] == "cancelled" and events[-1]["reason"] == "deleted by client"
    assert (await client.get(f"/jobs/{job_id}/status")).status == 404
    assert ids(await listing(client)) == []
    assert await client.app[store_key].get(job_id) is None
    assert pool.queued == 0


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("?status=done", "status"),
        ("?limit=0", "limit"),
        ("?limit=201", "limit"),
        ("?limit=ten", "limit"),
        ("?since=yesterday", "since"),
        ("?since=nan", "since"),
        ("?since=1e300", "since"),
        ("?cursor=not-a-cursor", "cursor"),
        ("?cursor=WyJ4Il0", "cursor"),  # base64 of ["x"]: not a position
        (f"?model={'m' * 201}", "model"),
    ],
)
async def test_bad_parameters_are_400(client, query, names):
    resp = await client.get(f"/jobs{query}")
    assert resp.status == 400, await resp.text()
    body = await resp.json()
    assert body["code"] == "bad_request" and body["detail"].startswith(names)
