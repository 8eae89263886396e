"""Synthetic speech for the 41-word demo ASR model (espeak-ng + sox, stdlib only).

This module is shared by ``tools/train_demo_model.py`` (which generates the training
data) and by the test suite (which regenerates held-out audio on the fly).  It imports
nothing heavier than the standard library; audio comes from the ``espeak-ng`` and
``sox`` command-line tools (Debian packages ``espeak-ng`` and ``sox``).

Determinism: for a given espeak-ng/sox build, the same arguments give byte-identical
WAVs (sox runs with ``-D``, no dither; the optional noise uses a seeded RNG).

Held-out guarantee: every word sequence is put into one of two disjoint classes by a
stable hash (:func:`is_heldout_text`).  Training only ever uses "train" sequences and
:func:`heldout_utterances` only ever returns "held-out" sequences, so held-out text is
never in training whatever ``n`` and ``seed`` are.  Held-out utterances also use odd
speeds and pitches (training uses even ones) and, by default, voices from
:data:`HELDOUT_VOICES`, none of which is used in training.

Public API::

    VOCAB, TRAIN_VOICES, HELDOUT_VOICES, SAMPLE_RATE
    synthesize(text, voice, speed, pitch, out_wav, *, gain_db=-3.0, noise_db=None,
               pad=(0.0, 0.0), seed=0) -> str
    heldout_utterances(n, seed=0, voices=HELDOUT_VOICES, min_words=1, max_words=8)
        -> list[dict]          # {"text", "voice", "speed", "pitch"}
    training_utterances(n, seed=0, voices=TRAIN_VOICES, min_words=1, max_words=8)
        -> list[dict]          # same keys
    multi_phrase_utterances(n, seed=0, voices=TRAIN_VOICES, *, heldout=False,
        min_phrases=2, max_phrases=4, min_words=1, max_words=4, gap=(0.15, 2.5))
        -> list[dict]          # {"text", "phrases", "gaps", "voice", "speed", "pitch"}
    synthesize_phrases(phrases, gaps, voice, speed, pitch, out_wav, *, gain_db=-3.0,
                       noise_db=None, pad=(0.0, 0.0), seed=0) -> str
    pause_joined_clip(utterances, out_wav, *, max_seconds=20.0, gap=(0.4, 2.0),
                      gain_db=-3.0, seed=0) -> dict   # {"text", "utterances", ...}
    is_heldout_text(text) -> bool
    missing_voices(voices) -> list[str]

Multi-phrase utterances teach the model that a silence between words is a word
boundary: each phrase is spoken separately (same voice, speed and pitch) and the
phrases are joined with silences; the transcript is all words joined by single spaces.
"""

from __future__ import annotations

import array
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import wave
import zlib
from collections.abc import Iterable, Sequence

__all__ = [
    "HELDOUT_VOICES",
    "SAMPLE_RATE",
    "TRAIN_VOICES",
    "VOCAB",
    "heldout_utterances",
    "is_heldout_text",
    "missing_voices",
    "multi_phrase_utterances",
    "pause_joined_clip",
    "synthesize",
    "synthesize_phrases",
    "training_utterances",
]

SAMPLE_RATE = 16000

#: The 41 words the demo model knows (lower case, no punctuation).
VOCAB: list[str] = (
    "zero one two three four five six seven eight nine ten "
    "hello world yes no stop go left right up down on off "
    "start pause play next back open close red green blue "
    "please thank you call send time today tomorrow"
).split()

_TRAIN_BASES = ["en-us", "en-gb", "en-gb-x-rp", "en-029"]
_TRAIN_VARIANTS = [
    "",
    "+m1",
    "+m2",
    "+m3",
    "+m4",
    "+m7",
    "+f1",
    "+f2",
    "+f3",
    "+Andy",
    "+Annie",
    "+klatt",
    "+Alex",
    "+linda",
]

#: espeak-ng voices used for training (4 accents x 14 variants = 56 voices).
TRAIN_VOICES: list[str] = [b + v for b in _TRAIN_BASES for v in _TRAIN_VARIANTS]

#: espeak-ng voices never used in training (other accents and/or variants).
HELDOUT_VOICES: list[str] = [
    "en-gb-scotland+f4",
    "en-us-nyc+m5",
    "en-gb-x-gbclan+m6",
    "en-us+f5",
    "en-gb-x-gbcwmd",
    "en-us+Mike",
    "en-gb+belinda",
]

# Held-out (odd) and training (even) prosody grids.
HELDOUT_SPEEDS = list(range(131, 200, 2))  # words per minute
HELDOUT_PITCHES = list(range(21, 80, 2))  # espeak-ng pitch 0-99
TRAIN_SPEEDS = list(range(120, 221, 2))
TRAIN_PITCHES = list(range(20, 81, 2))

_HELDOUT_MODULUS = 10  # ~1 in 10 word sequences is reserved for evaluation


def is_heldout_text(text: str) -> bool:
    """True if the word sequence ``text`` is reserved for evaluation (stable hash)."""
    key = " ".join(text.lower().split()).encode("utf-8")
    return zlib.crc32(key) % _HELDOUT_MODULUS == 0


def _random_texts(
    rng: random.Random, n: int, heldout: bool, min_words: int, max_words: int
) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(min_words, max_words)
        text = " ".join(rng.choice(VOCAB) for _ in range(k))
        if is_heldout_text(text) == heldout:
            out.append(text)
    return out


def _utterances(
    n: int, seed: int, voices: Sequence[str], heldout: bool, min_words: int, max_words: int
) -> list[dict]:
    rng = random.Random(f"{'heldout' if heldout else 'train'}-{seed}")
    texts = _random_texts(rng, n, heldout, min_words, max_words)
    speeds = HELDOUT_SPEEDS if heldout else TRAIN_SPEEDS
    pitches = HELDOUT_PITCHES if heldout else TRAIN_PITCHES
    return [
        {
            "text": t,
            "voice": voices[i % len(voices)] if heldout else rng.choice(voices),
            "speed": rng.choice(speeds),
            "pitch": rng.choice(pitches),
        }
        for i, t in enumerate(texts)
    ]


def heldout_utterances(
    n: int,
    seed: int = 0,
    voices: Sequence[str] = HELDOUT_VOICES,
    min_words: int = 1,
    max_words: int = 8,
) -> list[dict]:
    """``n`` deterministic evaluation utterances ``{text, voice, speed, pitch}``.

    Texts are word sequences that training never uses (see :func:`is_heldout_text`);
    speeds are odd values in 131-199, pitches odd values in 21-79; voices cycle
    through ``voices`` (default :data:`HELDOUT_VOICES`, never used in training).
    """
    return _utterances(n, seed, list(voices), True, min_words, max_words)


def training_utterances(
    n: int,
    seed: int = 0,
    voices: Sequence[str] = TRAIN_VOICES,
    min_words: int = 1,
    max_words: int = 8,
) -> list[dict]:
    """``n`` deterministic training utterances (never held-out texts; even speeds 120-220
    and pitches 20-80; random voices from ``voices``)."""
    return _utterances(n, seed, list(voices), False, min_words, max_words)


def multi_phrase_utterances(
    n: int,
    seed: int = 0,
    voices: Sequence[str] = TRAIN_VOICES,
    *,
    heldout: bool = False,
    min_phrases: int = 2,
    max_phrases: int = 4,
    min_words: int = 1,
    max_words: int = 4,
    gap: tuple[float, float] = (0.15, 2.5),
) -> list[dict]:
    """``n`` deterministic multi-phrase utterances, for :func:`synthesize_phrases`.

    Each is ``{text, phrases, gaps, voice, speed, pitch}``: ``min_phrases``-``max_phrases``
    phrases of ``min_words``-``max_words`` vocabulary words, to be spoken separately with
    one voice/speed/pitch and joined by ``gaps`` seconds of silence (log-uniform in
    ``gap``, so short pauses are as common as long ones); ``text`` is all the words
    joined by single spaces.

    ``heldout=False`` (training): neither ``text`` nor any phrase is a held-out word
    sequence; even speeds/pitches; random voices.  ``heldout=True`` (evaluation):
    ``text`` is a held-out sequence, so it never occurs in training; odd
    speeds/pitches; voices cycle through ``voices`` (pass :data:`HELDOUT_VOICES`).
    """
    voices = list(voices)
    rng = random.Random(f"multi-{'heldout' if heldout else 'train'}-{seed}")
    speeds = HELDOUT_SPEEDS if heldout else TRAIN_SPEEDS
    pitches = HELDOUT_PITCHES if heldout else TRAIN_PITCHES
    lo, hi = math.log(gap[0]), math.log(gap[1])
    out: list[dict] = []
    while len(out) < n:
        k = rng.randint(min_phrases, max_phrases)
        phrases = [
            " ".join(rng.choice(VOCAB) for _ in range(rng.randint(min_words, max_words)))
            for _ in range(k)
        ]
        text = " ".join(phrases)
        if heldout != is_heldout_text(text):
            continue
        if not heldout and any(is_heldout_text(ph) for ph in phrases):
            continue
        i = len(out)
        out.append(
            {
                "text": text,
                "phrases": phrases,
                "gaps": [round(math.exp(rng.uniform(lo, hi)), 3) for _ in range(k - 1)],
                "voice": voices[i % len(voices)] if heldout else rng.choice(voices),
                "speed": rng.choice(speeds),
                "pitch": rng.choice(pitches),
            }
        )
    return out


def synthesize(
    text: str,
    voice: str,
    speed: int,
    pitch: int,
    out_wav: str | os.PathLike,
    *,
    gain_db: float = -3.0,
    noise_db: float | None = None,
    pad: tuple[float, float] = (0.0, 0.0),
    seed: int = 0,
) -> str:
    """Speak ``text`` with espeak-ng and write a 16 kHz mono 16-bit WAV to ``out_wav``.

    ``voice`` is an espeak-ng voice, optionally with a ``+variant`` (note: espeak-ng
    silently ignores unknown variants; see :func:`missing_voices`). ``speed`` is in
    words per minute, ``pitch`` 0-99.  The audio is peak-normalised to ``gain_db``
    dBFS, padded with ``pad = (start_s, end_s)`` seconds of silence, and, if
    ``noise_db`` is given, white Gaussian noise with RMS ``noise_db`` dBFS is added
    using ``random.Random(seed)``.  Returns ``str(out_wav)``.
    """
    out_wav = str(out_wav)
    espeak = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    sox = [
        "sox",
        "-D",
        "-q",
        "-t",
        "wav",
        "-",
        "-r",
        str(SAMPLE_RATE),
        "-c",
        "1",
        "-b",
        "16",
        "-e",
        "signed-integer",
        out_wav,
        "gain",
        "-n",
        f"{gain_db:.2f}",
    ]
    if pad[0] > 0 or pad[1] > 0:
        sox += ["pad", f"{pad[0]:.3f}", f"{pad[1]:.3f}"]
    speech = subprocess.run(espeak, check=True, capture_output=True).stdout
    subprocess.run(sox, input=speech, check=True, capture_output=True)
    if noise_db is not None:
        _add_noise(out_wav, noise_db, seed)
    return out_wav


def _read_samples(path: str) -> array.array:
    with wave.open(path, "rb") as w:
        samples = array.array("h", w.readframes(w.getnframes()))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _write_samples(path: str, samples: array.array) -> None:
    if sys.byteorder == "big":
        samples = array.array("h", samples)
        samples.byteswap()
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(samples.tobytes())


def _speak_samples(text: str, voice: str, speed: int, pitch: int, gain_db: float, tmp_dir: str):
    fd, tmp = tempfile.mkstemp(suffix=".wav", dir=tmp_dir)
    os.close(fd)
    try:
        synthesize(text, voice, speed, pitch, tmp, gain_db=gain_db)
        return _read_samples(tmp)
    finally:
        os.unlink(tmp)


def _silence(seconds: float) -> array.array:
    return array.array("h", bytes(2 * round(seconds * SAMPLE_RATE)))


def synthesize_phrases(
    phrases: Sequence[str],
    gaps: Sequence[float],
    voice: str,
    speed: int,
    pitch: int,
    out_wav: str | os.PathLike,
    *,
    gain_db: float = -3.0,
    noise_db: float | None = None,
    pad: tuple[float, float] = (0.0, 0.0),
    seed: int = 0,
) -> str:
    """Speak each phrase separately and join them with ``gaps`` seconds of silence.

    Like :func:`synthesize` (same voice/speed/pitch for every phrase, each phrase
    peak-normalised to ``gain_db``, ``pad`` silence at the ends, optional white noise
    over the whole clip, gaps included), with ``len(gaps) == len(phrases) - 1``.
    The transcript is ``" ".join(phrases)``.  Returns ``str(out_wav)``.
    """
    if len(gaps) != len(phrases) - 1:
        raise ValueError("need exactly one gap between consecutive phrases")
    out_wav = str(out_wav)
    tmp_dir = os.path.dirname(os.path.abspath(out_wav))
    samples = _silence(pad[0])
    for i, phrase in enumerate(phrases):
        if i:
            samples.extend(_silence(gaps[i - 1]))
        samples.extend(_speak_samples(phrase, voice, speed, pitch, gain_db, tmp_dir))
    samples.extend(_silence(pad[1]))
    _write_samples(out_wav, samples)
    if noise_db is not None:
        _add_noise(out_wav, noise_db, seed)
    return out_wav


def pause_joined_clip(
    utterances: Sequence[dict],
    out_wav: str | os.PathLike,
    *,
    max_seconds: float = 20.0,
    gap: tuple[float, float] = (0.4, 2.0),
    gain_db: float = -3.0,
    seed: int = 0,
) -> dict:
    """Join utterances (``{text, voice, speed, pitch}`` dicts, each spoken separately)
    with pauses drawn uniformly from ``gap`` (``random.Random(seed)``), keeping the
    longest prefix that fits in ``max_seconds`` (at least one utterance) -- the kind
    of piece the server sends the model.  Writes ``out_wav`` and returns ``{text,
    utterances (how many were used), duration, gaps}``.
    """
    out_wav = str(out_wav)
    tmp_dir = os.path.dirname(os.path.abspath(out_wav))
    rng = random.Random(seed)
    limit = round(max_seconds * SAMPLE_RATE)
    samples = array.array("h")
    texts: list[str] = []
    gaps: list[float] = []
    for u in utterances:
        speech = _speak_samples(u["text"], u["voice"], u["speed"], u["pitch"], gain_db, tmp_dir)
        pause = round(rng.uniform(*gap), 3) if texts else 0.0
        pause_samples = _silence(pause)
        if texts and len(samples) + len(pause_samples) + len(speech) > limit:
            break
        if texts:
            gaps.append(pause)
        samples.extend(pause_samples)
        samples.extend(speech)
        texts.append(u["text"])
    _write_samples(out_wav, samples)
    return {
        "text": " ".join(texts),
        "utterances": len(texts),
        "duration": round(len(samples) / SAMPLE_RATE, 4),
        "gaps": gaps,
    }


def _add_noise(path: str, noise_db: float, seed: int) -> None:
    with wave.open(path, "rb") as w:
        params = w.getparams()
        samples = array.array("h", w.readframes(w.getnframes()))
    if sys.byteorder == "big":
        samples.byteswap()
    rng = random.Random(seed)
    sigma = 32767.0 * 10.0 ** (noise_db / 20.0)
    gauss = rng.gauss
    samples = array.array(
        "h", (max(-32768, min(32767, round(s + gauss(0.0, sigma)))) for s in samples)
    )
    if sys.byteorder == "big":
        samples.byteswap()
    with wave.open(path, "wb") as w:
        w.setparams(params)
        w.writeframes(samples.tobytes())


def missing_voices(voices: Iterable[str]) -> list[str]:
    """Voices (``base[+variant]``) whose base language or variant espeak-ng lacks."""

    def listing(arg: str, col: int) -> set[str]:
        out = subprocess.run(
            ["espeak-ng", f"--voices={arg}"], check=True, capture_output=True, text=True
        ).stdout.splitlines()[1:]
        return {line.split()[col].split("/")[-1] for line in out if len(line.split()) > col}

    if shutil.which("espeak-ng") is None:
        return list(voices)
    bases = {b.lower() for b in listing("en", 1)}  # language column
    variants = listing("variant", 4)  # file column, e.g. "!v/belinda" (case-sensitive)
    missing = []
    for v in voices:
        base, _, variant = v.partition("+")
        if base.lower() not in bases or (variant and variant not in variants):
            missing.append(v)
    return missing


if __name__ == "__main__":  # quick self-check: python tools/demo_speech.py
    print(len(VOCAB), "words;", len(TRAIN_VOICES), "training voices")
    print("missing voices:", missing_voices(TRAIN_VOICES + HELDOUT_VOICES) or "none")
    for u in heldout_utterances(3, seed=0):
        print(u)
