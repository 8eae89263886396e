#!/usr/bin/env python
"""Which candidate model keeps its words when the encoding changes? A quick offline check.

For held-out utterances (unseen voices), each format of ``tests/fidelity.py`` is encoded
with ffmpeg, decoded back the way the server decodes uploads (16 kHz mono 16-bit), and
transcribed with ``model.transcribe``. Per format it prints the WER, its difference from
the 16-bit original and how many words changed against the original's transcript.

About a minute per model for 300 utterances, against ~15 min for the same sample through
the server (``python -m tests.fidelity --utterances 300``), so it is the one to compare
training runs with; the server check is the one that counts.

    .venv/bin/python tools/format_stability.py /tmp/demo7.nemo /tmp/demo8.nemo
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import speech  # noqa: E402
from tests.fidelity import (  # noqa: E402
    FORMATS,
    load_model,
    load_samples,
    make_utterances,
    slug,
    wer,
)


def decoded_copies(src: Path, workdir: Path, formats: list[str]) -> dict[str, Path]:
    """``src`` in each format, decoded back to 16 kHz mono 16-bit WAV like an upload."""
    out = {}
    for name in formats:
        suffix, args = FORMATS[name]
        middle = speech.encode(src, workdir / f"{src.stem}.{slug(name)}{suffix}", *args)
        out[name] = speech.encode(
            middle, workdir / f"{src.stem}.{slug(name)}.dec.wav", "-ac", "1", "-ar", "16000",
            "-c:a", "pcm_s16le", "-bitexact",
        )  # fmt: skip
        middle.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help=".nemo files")
    parser.add_argument("--utterances", type=int, default=300)
    parser.add_argument("--seed", type=int, default=99, help="held-out sample")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated")
    args = parser.parse_args()
    formats = args.formats.split(",")
    if formats[0] != "wav s16 16k":
        formats.insert(0, "wav s16 16k")  # the baseline every row is compared with

    with tempfile.TemporaryDirectory(prefix="stability-") as tmp:
        work = Path(tmp)
        utterances = make_utterances(args.utterances, work, args.seed)
        files = [decoded_copies(path, work, formats) for path, _ in utterances]
        truth = [text.split() for _, text in utterances]
        words = sum(map(len, truth))
        print(f"{len(utterances)} held-out utterances, {words} words, seed {args.seed}")
        for model_path in args.models:
            model = load_model(model_path)
            base: list[list[str]] = []
            base_edits = 0
            for name in formats:
                audio = [load_samples(f[name]) for f in files]
                hyps = model.transcribe(audio, batch_size=16, verbose=False, num_workers=0)
                got = [h.text.split() for h in hyps]
                edits = sum(wer(t, g)[0] for t, g in zip(truth, got, strict=True))
                if not base:
                    base, base_edits = got, edits
                changed = sum(wer(b, g)[0] for b, g in zip(base, got, strict=True))
                print(
                    f"{Path(model_path).name:14s} {name:18s} WER {100 * edits / words:5.2f} % "
                    f"Δ {100 * (edits - base_edits) / words:+5.2f}  "
                    f"words changed vs 16-bit: {changed}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
