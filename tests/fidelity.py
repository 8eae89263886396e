"""Does the server say what the model says? Held-out speech, many encodings, one table.

The reference is ``model.transcribe`` run directly on 16 kHz mono WAVs. The same utterances
then go through the server after re-encoding each one in every format below, and each
format's WER and word start times are compared with the reference.

Run it on its own (it starts a server subprocess with the shipped demo model):

    .venv/bin/python -m tests.fidelity [--utterances 60] [--seed 2024] [--write docs/fidelity.md]

``make fidelity`` writes docs/fidelity.md: the test's sample, then 300 other utterances.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import statistics
import sys
import tempfile
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import demo_speech  # noqa: E402

from tests import speech  # noqa: E402

# name -> (file suffix, ffmpeg output arguments)
FORMATS: dict[str, tuple[str, list[str]]] = {
    "wav s16 16k": (".wav", ["-c:a", "pcm_s16le"]),
    "wav u8": (".wav", ["-c:a", "pcm_u8"]),
    "wav s24": (".wav", ["-c:a", "pcm_s24le"]),
    "wav f32": (".wav", ["-c:a", "pcm_f32le"]),
    "wav 8 kHz": (".wav", ["-ar", "8000", "-c:a", "pcm_s16le"]),
    "wav 44.1 kHz": (".wav", ["-ar", "44100", "-c:a", "pcm_s16le"]),
    "wav 48 kHz": (".wav", ["-ar", "48000", "-c:a", "pcm_s16le"]),
    "stereo both": (".wav", ["-ac", "2", "-c:a", "pcm_s16le"]),
    "stereo left only": (".wav", ["-af", "pan=stereo|c0=c0|c1=0*c0", "-c:a", "pcm_s16le"]),
    "mp3": (".mp3", ["-ar", "44100", "-c:a", "libmp3lame", "-b:a", "128k"]),
    "flac": (".flac", ["-c:a", "flac"]),
    "ogg vorbis": (".ogg", ["-ar", "44100", "-c:a", "libvorbis", "-q:a", "5"]),
    "opus (ogg)": (".opus", ["-ar", "48000", "-c:a", "libopus", "-b:a", "48k"]),
    "opus (webm)": (".webm", ["-ar", "48000", "-c:a", "libopus", "-b:a", "48k"]),
    "m4a aac": (".m4a", ["-ar", "44100", "-c:a", "aac", "-b:a", "128k"]),
}

Post = Callable[[Path], Awaitable[dict[str, Any]]]


@dataclass
class Reference:
    wav: Path
    truth: str
    text: str
    starts: list[float]


def wer(truth: list[str], hyp: list[str]) -> tuple[int, int]:
    """(word edits, reference words) by Levenshtein distance over words."""
    prev = list(range(len(hyp) + 1))
    for i, t in enumerate(truth, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (t != h))
        prev = cur
    return prev[-1], len(truth)


def start_errors(ref: list[tuple[str, float]], got: list[tuple[str, float]]) -> list[float]:
    """|start difference| of words both sides agree on (aligned by the word sequence)."""
    matcher = difflib.SequenceMatcher(a=[w for w, _ in ref], b=[w for w, _ in got], autojunk=False)
    out = []
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            out.append(abs(ref[block.a + k][1] - got[block.b + k][1]))
    return out


def make_utterances(n: int, workdir: Path, seed: int = 2024) -> list[tuple[Path, str]]:
    out = []
    for i, utt in enumerate(demo_speech.heldout_utterances(n, seed=seed)):
        path = workdir / f"held{i:03d}.wav"
        demo_speech.synthesize(utt["text"], utt["voice"], utt["speed"], utt["pitch"], path)
        out.append((path, utt["text"]))
    return out


def load_model(model_path: str) -> Any:
    """The model as inference wants it: eval mode, no dither."""
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(model_path, map_location="cpu")
    model.eval()
    model.preprocessor.featurizer.dither = 0.0
    return model


def load_samples(path: Path) -> np.ndarray:
    """A 16 kHz mono 16-bit WAV as float32 samples, ready for ``model.transcribe``."""
    with wave.open(str(path), "rb") as w:
        raw = w.readframes(w.getnframes())
    samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    # NeMo pads clips under 1 s on both sides; pad on the right like the server does.
    if len(samples) <= 16000:
        samples = np.pad(samples, (0, 16001 - len(samples)))
    return samples


def offline_reference(model_path: str, utterances: list[tuple[Path, str]]) -> list[Reference]:
    """``model.transcribe`` directly, the way NeMo's own docs call it."""
    model = load_model(model_path)
    audio = [load_samples(path) for path, _ in utterances]
    hyps = model.transcribe(audio, batch_size=16, timestamps=True, verbose=False, num_workers=0)
    refs = []
    for (path, truth), hyp in zip(utterances, hyps, strict=True):
        starts = [float(w["start"]) for w in hyp.timestamp["word"]]
        refs.append(Reference(path, truth, hyp.text.strip(), starts))
    return refs


def slug(name: str) -> str:
    """A format's name as a file-name part."""
    return "".join(c if c.isalnum() else "_" for c in name)


def encode_all(refs: list[Reference], workdir: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for name, (suffix, args) in FORMATS.items():
        out[name] = [
            speech.encode(r.wav, workdir / f"{r.wav.stem}.{slug(name)}{suffix}", *args)
            for r in refs
        ]
    return out


def word_starts(result: dict[str, Any]) -> list[tuple[str, float]]:
    return [(w["word"], w["start"]) for s in result["segments"] for w in s.get("words", [])]


async def measure(
    refs: list[Reference], files: dict[str, list[Path]], post: Post
) -> list[dict[str, Any]]:
    """One row per format: WER against the truth, next to the offline WER, and timing error."""
    offline_edits = sum(wer(r.truth.split(), r.text.split())[0] for r in refs)
    words = sum(len(r.truth.split()) for r in refs)
    rows = []
    for name, paths in files.items():
        results = await asyncio.gather(*(post(p) for p in paths))
        edits, errors = 0, []
        for ref, result in zip(refs, results, strict=True):
            edits += wer(ref.truth.split(), result["text"].split())[0]
            ref_words = list(zip(ref.text.split(), ref.starts, strict=False))
            errors += start_errors(ref_words, word_starts(result))
        rows.append(
            {
                "format": name,
                "wer": 100.0 * edits / words,
                "offline_wer": 100.0 * offline_edits / words,
                "median_start_error_ms": 1000.0 * statistics.median(errors) if errors else 0.0,
                "words": words,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| format | WER % (server) | WER % (offline) | Δ points | median word-start error (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['wer']:.2f} | {r['offline_wer']:.2f} | "
            f"{r['wer'] - r['offline_wer']:+.2f} | {r['median_start_error_ms']:.1f} |"
        )
    return "\n".join(lines)


async def _run_cli(args: argparse.Namespace) -> str:
    import aiohttp

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import Server

    work = Path(tempfile.mkdtemp(prefix="fidelity-"))
    # By default the same utterances the test uses: the first ones of the 90-utterance
    # held-out list. Another --seed draws another sample of held-out speech.
    utterances = make_utterances(max(args.utterances, 90), work, args.seed)[: args.utterances]
    refs = offline_reference(args.model, utterances)
    files = encode_all(refs, work)
    with Server("--executor", "process", "--torch-threads", "1", model=args.model) as server:
        async with aiohttp.ClientSession() as session:
            await server.wait_ready(session)

            async def post(path: Path) -> dict[str, Any]:
                form = aiohttp.FormData()
                form.add_field("file", path.read_bytes(), filename=path.name)
                async with session.post(f"{server.url}/transcribe", data=form) as resp:
                    assert resp.status == 200, await resp.text()
                    body: dict[str, Any] = await resp.json()
                    return body

            rows = await measure(refs, files, post)
    words = rows[0]["words"]
    return (
        f"{len(refs)} held-out utterances ({words} words) in voices never seen in training, "
        f"model `{Path(args.model).name}`, sample seed {args.seed}.\n\n" + table(rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--utterances", type=int, default=60)
    parser.add_argument("--model", default=str(ROOT / "aiotranscribe" / "models" / "demo.nemo"))
    parser.add_argument("--seed", type=int, default=2024, help="held-out sample (test: 2024)")
    parser.add_argument("--write", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--append", type=Path, default=None, help="also add the table to the end of this file"
    )
    args = parser.parse_args()
    report = asyncio.run(_run_cli(args))
    print(report)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("# Fidelity: server versus model.transcribe\n\n" + report)
    if args.append:
        with args.append.open("a") as out:
            out.write("\n" + report)


if __name__ == "__main__":
    main()
