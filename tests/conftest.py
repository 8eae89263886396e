"""Shared fixtures: the shipped demo model, test speech, and an app per test on real sockets.

After every test the spool must be empty and no child process may remain.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from aiotranscribe.app import create_app
from aiotranscribe.config import Settings
from aiotranscribe.engine.nemo_engine import DEMO_MODEL
from aiotranscribe.keys import pools_key
from tests import speech
from tests.redisserver import RedisServer

MODEL = os.environ.get("AIOTRANSCRIBE_TEST_MODEL", str(DEMO_MODEL))
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

ClientFactory = Callable[..., Awaitable[TestClient]]


# Servers kept for the whole session on purpose (their pids); every other child is a leftover.
SESSION_CHILDREN: set[int] = set()


def child_processes() -> list[str]:
    """Live children of this process (the multiprocessing resource tracker and the session's
    own servers excepted)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in SESSION_CHILDREN:
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Fields after the ")" that ends the command name: state, ppid, ...
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if ppid == me and state != "Z" and "resource_tracker" not in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()[:120]}")
    return found


@pytest.fixture(scope="session")
def voices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Known utterances in the demo model's vocabulary, as 16 kHz mono WAVs."""
    base = tmp_path_factory.mktemp("speech")
    texts = {
        "hello": "hello world",
        "digits": "one two three four five",
        "command": "please call tomorrow",
    }
    return {name: speech.say(text, base / f"{name}.wav") for name, text in texts.items()}


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory, voices: dict[str, Path]) -> dict[str, Path]:
    """The "hello world" utterance in several containers."""
    base = tmp_path_factory.mktemp("media")
    src = voices["hello"]
    return {
        "wav": src,
        "mp3": speech.encode(src, base / "hello.mp3", "-c:a", "libmp3lame", "-b:a", "64k"),
        "flac": speech.encode(src, base / "hello.flac"),
    }


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    yield
    spool = tmp_path / "spool"
    left = sorted(p.name for p in spool.iterdir()) if spool.exists() else []
    assert left == [], f"spool not empty after the test: {left}"
    assert child_processes() == [], "child processes left running"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (a session child the leftover check expects)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    assert server.proc is not None
    pid = server.proc.pid
    SESSION_CHILDREN.add(pid)
    yield server
    server.stop()
    SESSION_CHILDREN.discard(pid)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's database 0, emptied for this test."""
    url = redis_server.url(0)
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        models=(MODEL,),
        executor="thread",
        device="cpu",
        torch_threads=1,
        spool_dir=tmp_path / "spool",
        data_dir=tmp_path / "data",
        janitor_interval_s=3600,
        shutdown_timeout_s=5,
    )


async def wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    pools = client.app[pools_key]
    async with asyncio.timeout(timeout):
        while any(p.state == "loading" for p in pools.values()):
            await asyncio.sleep(0.05)


@pytest.fixture
async def make_client(aiohttp_client: Any, settings: Settings) -> AsyncIterator[ClientFactory]:
    async def make(ready: bool = True, **overrides: Any) -> TestClient:
        client: TestClient = await aiohttp_client(create_app(settings.replace(**overrides)))
        if ready:
            await wait_ready(client)
        return client

    yield make


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient:
    return await make_client()


@pytest.fixture(scope="session")
def long_audio(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """About two minutes of known phrases separated by pauses, and their texts in order."""
    return speech.long_speech(120.0, tmp_path_factory.mktemp("long"))
