"""Codec and channel degradations for training data, so the demo model hears what uploads
sound like after the server decodes them: telephone bandwidth (8 kHz), 8-bit samples and
lossy codecs (Opus, MP3, AAC). Each is an ffmpeg round trip back to 16 kHz mono 16-bit WAV.

Deterministic: the same arguments give the same file.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

# name -> (intermediate file suffix, encoder arguments)
DEGRADATIONS: dict[str, tuple[str, list[str]]] = {
    "narrowband": (".wav", ["-ar", "8000", "-c:a", "pcm_s16le"]),
    "u8": (".wav", ["-c:a", "pcm_u8"]),
    "opus32": (".opus", ["-ar", "48000", "-c:a", "libopus", "-b:a", "32k"]),
    "opus48": (".opus", ["-ar", "48000", "-c:a", "libopus", "-b:a", "48k"]),
    "mp3_64": (".mp3", ["-c:a", "libmp3lame", "-b:a", "64k"]),
    "aac_96": (".m4a", ["-c:a", "aac", "-b:a", "96k"]),
}


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-bitexact", *args], check=True
    )


def degrade(src: str | os.PathLike[str], dst: str | os.PathLike[str], kind: str) -> str:
    """Write ``src`` through degradation ``kind`` to ``dst`` (16 kHz mono 16-bit WAV)."""
    suffix, args = DEGRADATIONS[kind]
    with tempfile.TemporaryDirectory(prefix="degrade-") as tmp:
        middle = Path(tmp) / f"middle{suffix}"
        _ffmpeg("-i", str(src), *args, str(middle))
        _ffmpeg(
            "-i",
            str(middle),
            "-ac",
            "1",
            "-ar",
            "16000",
            "-c:a",
            "pcm_s16le",
            "-map_metadata",
            "-1",
            str(dst),
        )
    return str(dst)
