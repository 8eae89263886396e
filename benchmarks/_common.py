"""Helpers for the benchmark scripts: real server subprocess, real speech, /proc readings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import speech  # noqa: E402
from tests.ui_support import free_port, serve_command  # noqa: E402


def make_speech(seconds: float, workdir: Path, seed: int = 5) -> tuple[Path, list[str]]:
    return speech.long_speech(seconds, workdir, seed)


class Server:
    """``aiotranscribe serve`` in a subprocess (its own process group), stopped on exit.

    ``root``: where its spool and data directories live (a fresh temporary one by default);
    start another Server on the same root to restart on the same jobs."""

    def __init__(self, *extra: str, model: str = "demo", root: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root or Path(tempfile.mkdtemp(prefix="bench-"))
        self.spool = self.root / "spool"
        self.data = self.root / "data"
        self.args = serve_command(model, self.port, self.root, "--log-level", "warning", *extra)

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(120)

    def kill9(self) -> None:
        """``kill -9`` of the server's whole process group (its model worker included)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{self.url}/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await __import__("asyncio").sleep(0.2)
        raise TimeoutError("server did not become ready")


# Job states after which a job's events end.
TERMINAL = frozenset({"completed", "failed", "cancelled"})


async def submit(session: aiohttp.ClientSession, url: str, path: Path) -> str:
    """``POST /transcribe/async`` of ``path`` (streamed from disk); returns the job id."""
    form = aiohttp.FormData()
    with path.open("rb") as body:
        form.add_field("file", body, filename=path.name, content_type="application/octet-stream")
        async with session.post(f"{url}/transcribe/async", data=form) as resp:
            answer = await resp.json()
            if resp.status not in (200, 202):
                raise RuntimeError(f"submit refused: {resp.status} {answer}")
    return str(answer["job_id"])


class RedisServer:
    """A private ``redis-server`` on a free loopback port, its files in ``directory`` (AOF
    with ``appendfsync``, as a deployment that must not lose accepted jobs runs it);
    stopped on exit."""

    def __init__(self, directory: Path, appendfsync: str = "always") -> None:
        self.directory = directory
        self.appendfsync = appendfsync
        self.port = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def __enter__(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # another process may bind the free port before redis does
            self.port = free_port()
            flags = {"port": self.port, "bind": "127.0.0.1", "dir": self.directory}
            flags |= {"save": "", "appendonly": "yes", "appendfsync": self.appendfsync}
            flags |= {"logfile": "redis.log"}
            args = ["redis-server", *(a for k, v in flags.items() for a in (f"--{k}", str(v)))]
            self.proc = subprocess.Popen(args, start_new_session=True)
            deadline = time.monotonic() + 10
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self._pong():
                    return self
                time.sleep(0.05)
            self.__exit__()
        raise RuntimeError(f"redis-server did not start; see {self.directory / 'redis.log'}")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


os.environ.setdefault("PYTHONUNBUFFERED", "1")
