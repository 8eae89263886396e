"""Decide an upload's container from its first bytes, against an allow-list.

The client's file name and content type are never trusted (the seed console client sends
``audio/mpeg`` for everything, and an ``x.mp3`` may be an HLS playlist that ffmpeg would
follow). The result picks ffmpeg's demuxer with ``-f``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

# Sniffed kind -> ffmpeg demuxer name.
DEMUXERS = {
    "wav": "wav",
    "mp3": "mp3",
    "aac": "aac",
    "flac": "flac",
    "ogg": "ogg",
    "mp4": "mov",
    "matroska": "matroska",
}

# Bytes needed to tell every allowed kind apart (two MPEG frame headers fit in this).
SNIFF_BYTES = 8192

# Chunks walked looking for a WAV's ``data`` chunk (fmt, LIST, bext... come first).
MAX_RIFF_CHUNKS = 64
# Data sizes that mean "unknown": written by recorders that stream and never seek back.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)

_MP3_BITRATES = {
    # (mpeg1?, layer) -> kbit/s by index 1..14
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mpeg_frame_length(head: bytes, pos: int) -> int | None:
    """Length of the MPEG audio frame whose header starts at ``pos``, or None if not one."""
    if pos + 4 > len(head) or head[pos] != 0xFF or head[pos + 1] & 0xE0 != 0xE0:
        return None
    version = (head[pos + 1] >> 3) & 3  # 3: MPEG1, 2: MPEG2, 0: MPEG2.5, 1: reserved
    layer = 4 - ((head[pos + 1] >> 1) & 3)  # 4 means "reserved"
    bitrate_index = head[pos + 2] >> 4
    rate_index = (head[pos + 2] >> 2) & 3
    if version == 1 or layer == 4 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    bitrate = _MP3_BITRATES[(mpeg1, layer)][bitrate_index - 1] * 1000
    rate = _MP3_RATES[version][rate_index]
    padding = (head[pos + 2] >> 1) & 1
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4
    factor = 144 if layer == 2 or mpeg1 else 72
    return factor * bitrate // rate + padding


def _adts_frame_length(head: bytes, pos: int) -> int | None:
    if pos + 7 > len(head) or head[pos] != 0xFF or head[pos + 1] & 0xF6 != 0xF0:
        return None
    length = ((head[pos + 3] & 0x03) << 11) | (head[pos + 4] << 3) | (head[pos + 5] >> 5)
    return length if length >= 7 else None


def _two_frames(head: bytes, measure: Callable[[bytes, int], int | None]) -> bool:
    """A frame header at the start, followed by another right where the first one ends.

    One header alone is two bytes of chance; two in a row rule out random data."""
    first = measure(head, 0)
    if first is None:
        return False
    if first + 4 > len(head):
        return True  # the head ends inside the first frame: one good header is all we can see
    return measure(head, first) is not None


def sniff(head: bytes) -> str | None:
    """The container kind of a file starting with ``head``, or None when it is not allowed."""
    if len(head) < 12:
        return None
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:3] == b"ID3" and len(head) >= 10:
        # An ID3v2 tag (syncsafe size) precedes MPEG audio, or sometimes FLAC/ADTS.
        size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
        body = 10 + size + (10 if head[5] & 0x10 else 0)
        if body + 12 <= len(head):
            rest = sniff(head[body:])
            return rest if rest in ("mp3", "aac", "flac") else None
        return "mp3"  # a large tag (cover art) hides the audio from our window; ffmpeg checks it
    if _two_frames(head, _adts_frame_length):
        return "aac"
    if _two_frames(head, _mpeg_frame_length):
        return "mp3"
    return None


def wav_data_chunk(f: BinaryIO) -> tuple[int, int, int] | None:
    """Where a RIFF/RF64 WAVE file's audio starts, how many bytes its ``data`` chunk
    declares, and its bytes per second (0 if no ``fmt`` chunk came first).

    None when the size is unknown (0 or all ones, or an RF64 file without ``ds64``) or no
    ``data`` chunk header is found. ffprobe clamps a WAV's duration to the file size, so
    only this header tells a cut-short WAV from a short one."""
    head = f.read(12)
    if len(head) < 12 or head[8:12] != b"WAVE":
        return None
    rf64 = head[:4] in (b"RF64", b"BW64")
    long_size, byte_rate, pos = 0, 0, 12
    for _ in range(MAX_RIFF_CHUNKS):
        f.seek(pos)
        header = f.read(8)
        if len(header) < 8:
            return None
        chunk, size = header[:4], int.from_bytes(header[4:], "little")
        if chunk == b"ds64" and size >= 16:
            long_size = int.from_bytes(f.read(16)[8:16], "little")  # after the RIFF size
        elif chunk == b"fmt " and size >= 16:
            byte_rate = int.from_bytes(f.read(16)[8:12], "little")
        elif chunk == b"data":
            if rf64 and size == 0xFFFFFFFF:
                size = long_size
            return None if size in _UNKNOWN_SIZES else (pos + 8, size, byte_rate)
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    return None
