"""Plan where to slice long audio: at the quietest point near each length limit.

Only offsets are produced; no audio is copied. The WAV is read in one-second blocks to
measure energy per 20 ms frame, so memory is a few bytes per 20 ms whatever the length.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

FRAME_S = 0.02
# Energy is averaged over this many frames so a cut lands in a pause, not between two
# syllables of one word.
SMOOTH_FRAMES = 10


def frame_energies(path: Path) -> tuple[np.ndarray, int, int]:
    """RMS energy per 20 ms frame, the sample rate and the frame count of a 16-bit mono WAV."""
    with wave.open(str(path), "rb") as wav:
        rate = wav.getframerate()
        total = wav.getnframes()
        hop = int(rate * FRAME_S)
        block = hop * 50  # one second
        energies = []
        while raw := wav.readframes(block):
            samples = np.frombuffer(raw, dtype="<i2").astype(np.float32)
            usable = len(samples) - len(samples) % hop
            if usable:
                frames = samples[:usable].reshape(-1, hop)
                energies.append(np.sqrt(np.mean(frames * frames, axis=1)))
            if usable < len(samples):
                tail = samples[usable:]
                energies.append(np.array([np.sqrt(np.mean(tail * tail))], dtype=np.float32))
    if not energies:
        return np.zeros(0, dtype=np.float32), rate, total
    return np.concatenate(energies), rate, total


def plan_slices(
    path: Path, max_seconds: float, search_seconds: float | None = None
) -> list[tuple[int, int]]:
    """Cut the WAV into ``(start_frame, num_frames)`` slices of at most ``max_seconds``.

    Each cut falls at the quietest point of the ``search_seconds`` before the limit, so when
    a pause exists in that window no word is split. Slices cover the file without gaps.
    """
    energy, rate, total = frame_energies(path)
    hop = int(rate * FRAME_S)
    limit = max(int(max_seconds / FRAME_S), 1)
    window = max(int((search_seconds or max(2.0, max_seconds * 0.25)) / FRAME_S), 1)
    if len(energy) >= SMOOTH_FRAMES:
        kernel = np.ones(SMOOTH_FRAMES, dtype=np.float32) / SMOOTH_FRAMES
        smooth = np.convolve(energy, kernel, mode="same")
    else:
        smooth = energy
    cuts = [0]
    position = 0
    while len(energy) - position > limit:
        low = position + max(limit - window, 1)
        high = position + limit
        span = smooth[low:high]
        # Cut in the middle of the latest near-quietest run: slices stay long, and the cut
        # sits inside the pause rather than at the next word's onset.
        quiet = np.flatnonzero(span <= span.min() * 1.05 + 1.0)
        run_end = run_start = int(quiet[-1])
        while run_start - 1 in quiet:
            run_start -= 1
        position = low + (run_start + run_end + 1) // 2
        cuts.append(position)
    slices = []
    for i, frame in enumerate(cuts):
        start = frame * hop
        end = cuts[i + 1] * hop if i + 1 < len(cuts) else total
        if end > start:
            slices.append((start, end - start))
    return slices
