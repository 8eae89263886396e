"""Probe and convert uploads with a hardened ffmpeg, as asyncio subprocesses.

Every call forces the demuxer from our own sniff (``-f``), whitelists only local protocols
before ``-i`` (an HLS playlist cannot fetch URLs or read other files), reads no stdin, caps
the output length, and runs under a wall-clock limit after which its whole process group
is killed, and under address-space and CPU-time rlimits (a decoder bomb cannot take the
host's memory or a core for long). Output is 16 kHz mono 16-bit PCM WAV, written by ffmpeg
straight to disk, so memory stays flat whatever the length.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import resource
import signal
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from aiotranscribe.sniff import DEMUXERS, wav_data_chunk

log = structlog.get_logger(__name__)

SAMPLE_RATE = 16000
# ffprobe never reads stdin (and has no -nostdin); stdin is /dev/null for both anyway.
HARDENING = ["-hide_banner", "-protocol_whitelist", "file,pipe"]
STDERR_KEEP = 4096
# A container that declares more audio than decodes was cut short (a truncated upload).
TRUNCATION_TOLERANCE = 0.9
# Wall-clock seconds a conversion may take per second of declared audio, on top of the
# floor. Measured here (2 shared cores, ffmpeg 5.1): the slowest allowed input, 48 kHz
# stereo Opus in WebM, decodes to 16 kHz mono at 460x real time (mp3 1370x, aac 1590x,
# flac 1170x, ogg/opus 860x); 0.05 allows 20x real time, over 20 times slower than that.
DECODE_S_PER_AUDIO_S = 0.05
PROBE_TIMEOUT_S = 30.0
# What ffmpeg prints when the spool's filesystem is full.
NO_SPACE_MESSAGES = ("No space left on device", "Disk quota exceeded")
# What ffmpeg (or its loader) prints when RLIMIT_AS refuses it memory.
NO_MEMORY_MESSAGES = ("Cannot allocate memory", "failed to map segment", "std::bad_alloc")


class AudioError(Exception):
    """Audio we will not or cannot transcribe; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Resource limits of one ffmpeg/ffprobe process."""

    memory_mb: float = 0.0
    """RLIMIT_AS in MiB; 0: none."""
    cpu_s: float | None = None
    """RLIMIT_CPU in seconds; None: the process's wall-clock limit, rounded up."""


def conversion_limit(declared_s: float | None, floor_s: float, ceiling_s: float) -> float:
    """Wall-clock limit of a conversion: the floor plus time for the declared length, at
    most the ceiling; the floor alone when the length is unknown."""
    return min(ceiling_s, floor_s + DECODE_S_PER_AUDIO_S * (declared_s or 0.0))


def out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def insufficient_storage() -> AudioError:
    return AudioError(
        507,
        "insufficient_storage",
        "the server ran out of disk space while converting the audio; try again later",
    )


def _limited(args: list[str], timeout: float, limits: Limits) -> list[str]:
    """``args`` run by a shell that sets the rlimits and then execs them (same pid, same
    process group). A preexec_fn would run Python in a fork of a threaded server."""

    def capped(value: int, which: int) -> int:
        hard = resource.getrlimit(which)[1]  # we may lower a hard limit, never raise it
        return value if hard == resource.RLIM_INFINITY else min(value, hard)

    # Soft = hard: the kernel sends SIGKILL at the limit (ffmpeg would catch a SIGXCPU
    # and carry on writing).
    cpu = math.ceil(limits.cpu_s if limits.cpu_s is not None else timeout)
    setup = f"ulimit -t {capped(max(cpu, 1), resource.RLIMIT_CPU)}"
    if limits.memory_mb > 0:
        kib = int(limits.memory_mb * 1024)
        setup += f" && ulimit -v {capped(kib * 1024, resource.RLIMIT_AS) // 1024}"
    return ["/bin/sh", "-c", setup + ' && exec "$@"', "sh", *args]


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _run(
    args: list[str],
    timeout: float,
    limits: Limits,
    on_stdout_line: Callable[[str], None] | None = None,
) -> tuple[int, str, str]:
    """Run a command in its own process group, under ``limits``; returns (exit code, stdout,
    stderr tail)."""
    proc = await asyncio.create_subprocess_exec(
        *_limited(args, timeout, limits),
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


def _reason(stderr: str, src: Path, dst: Path | None = None) -> str:
    """ffmpeg's last error line, without our spool paths in it."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else "unknown decoder error"
    for path, name in ((src, "input"), (dst, "output")):
        if path is not None:
            last = last.replace(str(path), name).replace(path.name, name)
    return last.replace(str(src.parent), "spool")[:300]


def _failure(
    code: int, stderr: str, timeout: float, limits: Limits, src: Path, dst: Path | None = None
) -> AudioError | None:
    """The error a finished ffmpeg/ffprobe run stands for, beyond bad input: a full disk,
    or a limit that stopped it (SIGKILL we did not send comes from RLIMIT_CPU, or from the
    kernel's OOM killer). None when nothing of the kind happened."""
    if any(m in stderr for m in NO_SPACE_MESSAGES):
        return insufficient_storage()
    if code == 0:
        return None
    if code in (-signal.SIGKILL, -signal.SIGXCPU):
        cpu = math.ceil(limits.cpu_s if limits.cpu_s is not None else timeout)
        log.warning("decoder_killed", limit="cpu", cpu_s=cpu, stderr=stderr[-500:])
        return AudioError(
            422,
            "too_complex",
            f"decoding the file was stopped by this server's limits: it needed more than "
            f"{cpu} s of CPU time, or more memory than allowed",
        )
    if any(m in stderr for m in NO_MEMORY_MESSAGES):
        # Also what a limit too small for ffmpeg to even load gives: the log says which.
        log.warning("decoder_out_of_memory", memory_mb=limits.memory_mb, stderr=stderr[-500:])
        limit = f" ({limits.memory_mb:g} MiB)" if limits.memory_mb else ""
        return AudioError(
            422,
            "too_complex",
            f"decoding the file needs more memory than this server allows{limit}",
        )
    return None


def _wav_truncation(path: Path) -> str | None:
    """Why a WAV is cut short (its ``data`` chunk declares clearly more than the file
    holds), or None."""
    with path.open("rb") as f:
        found = wav_data_chunk(f)
        size = os.fstat(f.fileno()).st_size
    if found is None:
        return None
    start, declared, byte_rate = found
    held = max(size - start, 0)
    if held >= declared * TRUNCATION_TOLERANCE - byte_rate * 0.5:
        return None
    if byte_rate:
        return (
            f"the file is cut short: it declares {declared / byte_rate:.1f} s of audio "
            f"but holds only {held / byte_rate:.1f} s"
        )
    return f"the file is cut short: it declares {declared} bytes of audio but holds {held}"


async def probe_duration(
    path: Path,
    kind: str,
    *,
    ffprobe: str = "ffprobe",
    timeout: float = PROBE_TIMEOUT_S,
    limits: Limits = Limits(),
) -> float | None:
    """The duration the container declares, in seconds, or None when it declares none.
    Raises AudioError for a WAV whose header declares more audio than the file holds."""
    if kind == "wav" and (why := await asyncio.to_thread(_wav_truncation, path)):
        raise AudioError(422, "truncated", why)
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
        limits,
    )
    if failure := _failure(code, err, timeout, limits, path):
        raise failure
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
    limits: Limits = Limits(),
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
        limits,
        progress_line,
    )
    if failure := _failure(code, err, timeout, limits, src, dst):
        raise failure
    if code != 0:
        if "matches no streams" in err:
            raise AudioError(422, "no_audio_stream", "the file holds no audio stream")
        reason = _reason(err, src, dst)
        raise AudioError(422, "undecodable", f"could not decode the audio: {reason}")
    try:
        frames = await asyncio.to_thread(wav_frames, dst)
    except OSError as exc:  # its message names the spool path: not for the client
        if out_of_space(exc):
            raise insufficient_storage() from None
        raise AudioError(422, "undecodable", "decoder produced no readable audio") from None
    except (wave.Error, EOFError) as exc:
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
