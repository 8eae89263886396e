"""Probe and convert uploads with a hardened ffmpeg, as asyncio subprocesses.

Every call forces the demuxer from our own sniff (``-f``), whitelists only local protocols
before ``-i`` (an HLS playlist cannot fetch URLs or read other files), reads no stdin, caps
the output length, and runs under a wall-clock limit after which its whole process group
is killed. Output is 16 kHz mono 16-bit PCM WAV, written by ffmpeg straight to disk, so
memory stays flat whatever the length.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import wave
from collections.abc import Callable
from pathlib import Path

from aiotranscribe.sniff import DEMUXERS

SAMPLE_RATE = 16000
# ffprobe never reads stdin (and has no -nostdin); stdin is /dev/null for both anyway.
HARDENING = ["-hide_banner", "-protocol_whitelist", "file,pipe"]
STDERR_KEEP = 4096
# A container that declares more audio than decodes was cut short (a truncated upload).
TRUNCATION_TOLERANCE = 0.9


class AudioError(Exception):
    """Audio we will not or cannot transcribe; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _run(
    args: list[str], timeout: float, on_stdout_line: Callable[[str], None] | None = None
) -> tuple[int, str, str]:
    """Run a command in its own process group; returns (exit code, stdout, stderr tail)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    out: list[str] = []
    err = bytearray()

    async def read_stdout() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if on_stdout_line is not None:
                on_stdout_line(line)
            elif len(out) < 1000:
                out.append(line)

    async def read_stderr() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            err.extend(chunk)
            del err[:-STDERR_KEEP]

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(read_stdout(), read_stderr())
            code = await proc.wait()
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise AudioError(
            422, "conversion_timeout", f"decoding took longer than {timeout:.0f} s; gave up"
        ) from None
    except BaseException:  # cancelled (job cancelled, shutdown): leave nothing running
        _kill_group(proc)
        await asyncio.shield(proc.wait())
        raise
    return code, "\n".join(out), err.decode("utf-8", "replace")


def _reason(stderr: str, path: Path) -> str:
    """ffmpeg's last error line, without our spool path in it."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else "unknown decoder error"
    return last.replace(str(path), "input").replace(path.name, "input")[:300]


async def probe_duration(
    path: Path, kind: str, *, ffprobe: str = "ffprobe", timeout: float = 30.0
) -> float | None:
    """The duration the container declares, in seconds, or None when it declares none."""
    code, out, err = await _run(
        [
            ffprobe,
            *HARDENING,
            "-v",
            "error",
            "-f",
            DEMUXERS[kind],
            "-show_entries",
            "format=duration",
            "-of",
            "default=noprint_wrappers=1:nokey=1",
            "-i",
            str(path),
        ],
        timeout,
    )
    if code != 0:
        raise AudioError(422, "undecodable", f"could not read the audio: {_reason(err, path)}")
    try:
        value = float(out.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None
    return value if value > 0 else None


def wav_frames(path: Path) -> int:
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes()


async def convert(
    src: Path,
    kind: str,
    dst: Path,
    *,
    max_seconds: float,
    timeout: float,
    ffmpeg: str = "ffmpeg",
    declared_s: float | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> float:
    """Decode ``src`` to 16 kHz mono PCM WAV at ``dst``; returns the decoded seconds.

    ``on_progress`` gets the seconds decoded so far, from ffmpeg's ``-progress`` output.
    """

    def progress_line(line: str) -> None:
        key, _, value = line.partition("=")
        if key == "out_time_us" and on_progress is not None and value.strip().isdigit():
            on_progress(int(value) / 1e6)

    code, _, err = await _run(
        [
            ffmpeg,
            "-nostdin",
            *HARDENING,
            "-loglevel",
            "error",
            "-f",
            DEMUXERS[kind],
            "-i",
            str(src),
            "-map",
            "0:a:0",
            "-vn",
            "-sn",
            "-dn",
            "-t",
            f"{max_seconds:.3f}",
            "-ac",
            "1",
            "-ar",
            str(SAMPLE_RATE),
            "-c:a",
            "pcm_s16le",
            "-map_metadata",
            "-1",
            "-bitexact",
            "-f",
            "wav",
            "-progress",
            "pipe:1",
            "-stats_period",
            "0.25",
            "-y",
            str(dst),
        ],
        timeout,
        progress_line,
    )
    if code != 0:
        if "matches no streams" in err:
            raise AudioError(422, "no_audio_stream", "the file holds no audio stream")
        raise AudioError(422, "undecodable", f"could not decode the audio: {_reason(err, src)}")
    try:
        frames = await asyncio.to_thread(wav_frames, dst)
    except (wave.Error, EOFError, OSError) as exc:
        raise AudioError(422, "undecodable", f"decoder produced no audio: {exc}") from None
    seconds = frames / SAMPLE_RATE
    if frames == 0:
        raise AudioError(422, "undecodable", "no audio could be decoded from the file")
    if declared_s and seconds < min(declared_s, max_seconds) * TRUNCATION_TOLERANCE - 0.5:
        raise AudioError(
            422,
            "truncated",
            f"the file is cut short: it declares {declared_s:.1f} s of audio "
            f"but only {seconds:.1f} s could be decoded",
        )
    return seconds
