"""Pure pieces: the magic-byte sniffer and the silence-aware slice planner."""

from __future__ import annotations

import itertools
import random
import wave

import numpy as np
import pytest

from aiotranscribe.chunking import plan_slices
from aiotranscribe.sniff import sniff
from tests import speech


@pytest.mark.parametrize(
    ("codec_args", "suffix", "kind"),
    [
        (["-c:a", "pcm_s16le"], ".wav", "wav"),
        (["-c:a", "libmp3lame"], ".mp3", "mp3"),
        (["-c:a", "flac"], ".flac", "flac"),
        (["-c:a", "libopus"], ".opus", "ogg"),
        (["-c:a", "libvorbis"], ".ogg", "ogg"),
        (["-c:a", "aac"], ".m4a", "mp4"),
        (["-c:a", "aac", "-f", "adts"], ".aac", "aac"),
        (["-c:a", "libopus"], ".webm", "matroska"),
        (["-c:a", "libmp3lame", "-write_xing", "0", "-id3v2_version", "0"], ".mp3", "mp3"),
    ],
)
def test_sniff_real_encodings(voices, tmp_path, codec_args, suffix, kind):
    out = speech.encode(voices["hello"], tmp_path / f"x{suffix}", *codec_args)
    assert sniff(out.read_bytes()[:8192]) == kind


def test_sniff_refuses_non_audio():
    assert sniff(b"#EXTM3U\n#EXTINF:10,\nhttp://x/y.ts\n") is None
    assert sniff(b"<?xml version='1.0'?><smil/>" * 10) is None
    assert sniff(b"\x89PNG\r\n\x1a\n" + bytes(100)) is None
    assert sniff(b"") is None
    # Random data that happens to start like an MPEG frame is not two frames in a row.
    rng = random.Random(1)
    fakes = [b"\xff\xfb\x90\x00" + rng.randbytes(4000) for _ in range(50)]
    assert all(sniff(f) is None for f in fakes)


def voiced_span(path) -> tuple[float, float]:
    """First and last sample louder than -50 dBFS, in seconds (espeak pads its clips)."""
    with wave.open(str(path), "rb") as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > 100)
    return loud[0] / 16000, loud[-1] / 16000


def test_slices_are_cut_inside_pauses(voices, tmp_path):
    rng = random.Random(4)
    parts, speech_spans, t = [], [], 0.0
    for _ in range(30):
        utterance = voices[rng.choice(["hello", "digits", "command"])]
        gap = rng.choice([0.5, 0.8, 1.2])
        parts += [utterance, speech.silence(tmp_path / f"s{gap}.wav", gap)]
        first, last = voiced_span(utterance)
        speech_spans.append((t + first, t + last))
        t += speech.duration(utterance) + gap
    wav = speech.concat(parts, tmp_path / "joined.wav")
    slices = plan_slices(wav, max_seconds=10.0)
    assert slices[0][0] == 0
    assert sum(n for _, n in slices) == round(t * 16000)
    for (start, count), (next_start, _) in itertools.pairwise(slices):
        assert start + count == next_start  # no gap, no overlap
    assert all(count <= 10.0 * 16000 for _, count in slices)
    for start, _ in slices[1:]:
        cut = start / 16000
        assert not any(a <= cut <= b for a, b in speech_spans), f"cut at {cut:.2f} s is in speech"
