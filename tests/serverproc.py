"""A real ``aiotranscribe serve`` in its own process group, for crash and restart tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import MODEL
from tests.ui_support import free_port, serve_command


class Server:
    """One server on fixed directories; ``start`` again after a kill to restart on them."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.spool = root / "spool"
        self.data = root / "data"
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.root / f"server-{self.starts}.log"

    def log_text(self) -> str:
        return "".join(
            (self.root / f"server-{i}.log").read_text(errors="replace")
            for i in range(1, self.starts + 1)
        )

    async def start(self, timeout: float = 240.0) -> None:
        self.starts += 1
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            command = serve_command(
                MODEL, self.port, self.root, "--device", "cpu", "--torch-threads", "1", *self.args
            )
            self.proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill -9 takes the worker too
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise AssertionError(f"server exited at start:\n{self.log_text()[-3000:]}")
                try:
                    async with session.get(f"{self.url}/ready") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log_text()[-3000:]}")

    async def kill9(self) -> None:
        """``kill -9`` of the whole process group: the server and its model worker."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self, timeout: float = 120.0) -> float:
        """SIGTERM; returns the seconds until the server exited."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.proc.wait(), timeout)
        return time.monotonic() - started

    async def close(self) -> None:
        """Nothing of its process group may outlive the test (a worker orphaned by a
        crash included)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    async def json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, self.url + path, **kw) as resp:
                return resp.status, await resp.json(content_type=None)
