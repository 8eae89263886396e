"""Helpers for the browser tests: a real server subprocess, Debian's Chromium, test audio."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests import speech

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Lets the test start playback with audio.play() outside a click handler.
    "--autoplay-policy=no-user-gesture-required",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(model: str, port: int, root: Path, *extra: str) -> list[str]:
    """``aiotranscribe serve`` on loopback ``port``, its spool and job store under ``root``
    (start it again on the same root to restart it on the same jobs), JSON logs."""
    return [
        sys.executable,
        "-m",
        "aiotranscribe",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--spool-dir",
        str(root / "spool"),
        "--data-dir",
        str(root / "data"),
        "--log-format",
        "json",
        *extra,
    ]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    spool: Path
    log_path: Path
    log_file: IO[bytes]

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def log_tail(self, n: int = 40) -> str:
        self.log_file.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM (drain, then stop: what still runs is kept for the next start), then wait
        for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log_file.close()


def start_server(
    model: str, workdir: Path, *extra: str, timeout: float = 240.0, port: int | None = None
) -> Server:
    """Run ``python -m aiotranscribe serve`` and wait until /health says the model is loaded.

    Its spool and job store live in ``workdir``: start it again there (on the same ``port``)
    to restart it on the same jobs."""
    port = port or free_port()
    spool = workdir / "spool"
    log_path = workdir / f"server-{port}-{time.monotonic_ns()}.log"
    log_file = log_path.open("wb")
    cmd = serve_command(model, port, workdir, "--executor", "thread", *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, spool, log_path, log_file)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=2).read())
            if health["model_loaded"]:
                return server
            if health["models"][0]["state"] == "failed":
                server.stop()
                raise RuntimeError(f"model failed to load: {health['models'][0]['error']}")
        except (OSError, ValueError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{tail}")
        time.sleep(0.25)


def utterances(texts: list[str], out: Path, gap_s: float = 1.5) -> Path:
    """Speak each text, with silence between, into one 16 kHz WAV."""
    work = out.parent / f"{out.stem}-parts"
    work.mkdir(exist_ok=True)
    gap = speech.silence(work / "gap.wav", gap_s)
    parts: list[Path] = [gap]
    for i, text in enumerate(texts):
        parts += [speech.say(text, work / f"{i}.wav"), gap]
    return speech.concat(parts, out)


def long_audio(out: Path, minutes: float) -> Path:
    """Minutes of known speech (a block of utterances repeated), for a job that takes a while."""
    block = utterances(
        ["hello world", "one two three four five", "please call tomorrow", "stop go left right"],
        out.parent / "block.wav",
        gap_s=1.0,
    )
    repeats = max(1, round(minutes * 60 / speech.duration(block)))
    return speech.concat([block] * repeats, out)
