"""A real redis-server (Debian's) for tests: on a free loopback port, in its own directory,
with AOF ``appendfsync always``; stopped by whoever started it.

Started with PR_SET_PDEATHSIG, so it dies with the test process even when that is killed
with ``kill -9`` and no teardown runs.
"""

from __future__ import annotations

import asyncio
import ctypes
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

BINARY = "redis-server"
START_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not load it


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``start`` again after ``kill`` reuses port and directory
    (what a restart after a crash looks like)."""

    def __init__(self, directory: Path, appendfsync: str = "always", aof: bool = True) -> None:
        self.directory = directory
        self.appendfsync = appendfsync
        self.aof = aof
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        binary = shutil.which(BINARY)
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make system-deps`")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # another process may take a free port before we bind it
            port = self.port or free_port()
            proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.directory),
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if self.aof else "no",
                    "--appendfsync",
                    self.appendfsync,
                    "--logfile",
                    "redis.log",
                    "--daemonize",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            deadline = time.monotonic() + START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                if ping(port):
                    self.port, self.proc = port, proc
                    return self
                time.sleep(0.01)
            proc.kill()
            proc.wait()
        log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start: {log}")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM (redis-server flushes and exits), SIGKILL if it takes over 10 s."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


async def watch_through_a_kill(client: Any, job_id: str, server: RedisServer) -> list[dict]:
    """A job's events over a WebSocket of ``client``; after the 12th (mid-job) ``server`` is
    killed (SIGKILL) and started again 2 s later on its directory. Asserts it was mid-job."""
    events: list[dict] = []
    async with client.ws_connect(f"/jobs/{job_id}/events") as ws:
        async with asyncio.timeout(240):
            async for msg in ws:
                events.append(msg.json())
                if len(events) == 12:
                    server.kill()
                    await asyncio.sleep(2)
                    server.start()
    assert ws.close_code == 1000
    progress = [e for e in events[:12] if e["type"] == "progress"]
    assert 0 < progress[-1]["chunks_done"] < progress[-1]["chunks_total"]  # mid-job
    return events
