"""Test audio made with real tools: espeak-ng speaks, ffmpeg re-encodes."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path


def say(text: str, out: Path, voice: str = "en-us", speed: int = 150, pitch: int = 50) -> Path:
    """Speak ``text`` into a 16 kHz mono 16-bit WAV at ``out``."""
    raw = out.with_suffix(".espeak.wav")
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text],
        check=True,
    )
    ffmpeg("-i", str(raw), "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", str(out))
    raw.unlink()
    return out


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def encode(src: Path, out: Path, *codec_args: str) -> Path:
    ffmpeg("-i", str(src), *codec_args, str(out))
    return out


def silence(out: Path, seconds: float) -> Path:
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "anullsrc=r=16000:cl=mono",
        "-t",
        f"{seconds}",
        "-c:a",
        "pcm_s16le",
        str(out),
    )
    return out


def concat(parts: list[Path], out: Path) -> Path:
    """Join 16 kHz mono WAVs (same format) into one, frame for frame."""
    with wave.open(str(out), "wb") as dst:
        dst.setnchannels(1)
        dst.setsampwidth(2)
        dst.setframerate(16000)
        for part in parts:
            with wave.open(str(part), "rb") as src:
                dst.writeframes(src.readframes(src.getnframes()))
    return out


def duration(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


# Phrases in the demo model's vocabulary, for long test audio.
PHRASES = [
    "hello world",
    "one two three four five",
    "please call tomorrow",
    "open close",
    "stop go left right",
    "six seven eight nine ten",
    "thank you",
    "send time today",
]


def long_speech(seconds: float, workdir: Path, seed: int = 11) -> tuple[Path, list[str]]:
    """At least ``seconds`` of PHRASES in random order with 0.6-1.5 s pauses, and the texts."""
    import random

    rng = random.Random(seed)
    said = [say(t, workdir / f"phrase{i}.wav") for i, t in enumerate(PHRASES)]
    pauses = {p: silence(workdir / f"pause{p}.wav", p / 10) for p in range(6, 16)}
    parts, texts, total = [], [], 0.0
    while total < seconds:
        i = rng.randrange(len(said))
        pause = pauses[rng.randrange(6, 16)]
        parts += [said[i], pause]
        texts.append(PHRASES[i])
        total += duration(said[i]) + duration(pause)
    return concat(parts, workdir / f"speech-{int(seconds)}s.wav"), texts
