"""A compute-heavy NeMo ASR model of a real architecture, built from config, random weights.

The shipped demo model transcribes a minute of audio in a few milliseconds, so a benchmark
with it measures overhead. This one is a FastConformer (``ConformerEncoder``, 8x
``dw_striding`` subsampling, relative-position attention, 80 mel bands) with CTC or TDT
decoding and a 1024-piece SentencePiece BPE vocabulary, like NVIDIA's FastConformer and
parakeet checkpoints. Only speed is measured, so the weights are random (seeded). One
thing is set rather than random: the blank logit's bias, calibrated so the greedy decoder
emits about :data:`TOKENS_PER_FRAME` tokens per encoder frame (a trained model on speech
emits 3-4 tokens a second; random weights would emit one every frame, or none, and
decoding and word timestamps would cost what they never cost in use).

Sizes (:data:`SIZES`):

``bench``     d_model 384, 16 layers, ~60 M parameters: one minute of audio takes ~3 s
              on one CPU core, as a large model does on a GPU under load (``make bench``)
``parakeet``  parakeet-tdt-0.6b-v2's shape: 128 mel bands, d_model 1024, 24 layers, a
              two-layer 640-wide prediction network; ~0.6 B parameters (``gpu.sh``)
``tiny``      d_model 64, 2 layers: for smoke tests of the scripts on any CPU

Built on demand and cached as ``.cache/bench-model/<size>-<family>-<hash>.nemo`` (the hash
covers this file, the tiny models' config helpers it reuses, and the NeMo/torch versions).

    .venv/bin/python benchmarks/bench_model.py                 # build (or reuse), print RTF
    .venv/bin/python benchmarks/bench_model.py --size tiny --family tdt
    .venv/bin/python benchmarks/bench_model.py direct --batch-sizes 1,4,16 a.wav b.wav
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import tempfile
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import tiny_models  # noqa: E402

CACHE = ROOT / ".cache" / "bench-model"
SAMPLE_RATE = 16000
SEED = 4321
VOCAB_SIZE = 1024
# Encoder frames are 80 ms; speech is ~3.5 BPE tokens a second, i.e. ~0.3 per frame.
TOKENS_PER_FRAME = 0.3
FRAME_S = 0.08
FAMILIES = ("ctc", "tdt")


@dataclass(frozen=True)
class Size:
    features: int
    d_model: int
    layers: int
    heads: int
    pred_hidden: int
    pred_layers: int
    joint_hidden: int
    conv_channels: int


SIZES = {
    "tiny": Size(64, 64, 2, 4, 64, 1, 64, 32),
    "bench": Size(80, 384, 16, 8, 320, 1, 320, 256),
    "parakeet": Size(128, 1024, 24, 8, 640, 2, 640, 256),
}


# ---------------------------------------------------------------------------------------------
# Config: the tiny models' hand-written NeMo 3.0 configs, scaled to a FastConformer


def _encoder(size: Size) -> dict[str, Any]:
    return {
        **tiny_models._encoder(),
        "feat_in": size.features,
        "n_layers": size.layers,
        "d_model": size.d_model,
        "n_heads": size.heads,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": size.conv_channels,
        "ff_expansion_factor": 4,
        "conv_kernel_size": 9,
        "dropout": 0.0,
        "dropout_pre_encoder": 0.0,
        "dropout_att": 0.0,
    }


def config(size: Size, family: str, tokenizer_dir: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "sample_rate": SAMPLE_RATE,
        "log_prediction": False,
        "tokenizer": {"dir": tokenizer_dir, "type": "bpe"},
        "preprocessor": {**tiny_models._preprocessor(), "features": size.features},
        "spec_augment": None,
        "encoder": _encoder(size),
    }
    if family == "ctc":
        cfg["decoder"] = {**tiny_models._ctc_decoder(), "feat_in": size.d_model}
        cfg["decoding"] = {"strategy": "greedy_batch"}
        return cfg
    parts = tiny_models._rnnt_parts(tdt=True)
    parts["model_defaults"].update(
        enc_hidden=size.d_model, pred_hidden=size.pred_hidden, joint_hidden=size.joint_hidden
    )
    parts["decoder"]["prednet"].update(
        pred_hidden=size.pred_hidden, pred_rnn_layers=size.pred_layers
    )
    parts["joint"]["jointnet"]["joint_hidden"] = size.joint_hidden
    return {**cfg, **parts, "compute_eval_loss": False}


# ---------------------------------------------------------------------------------------------
# Tokenizer: 1024 BPE pieces need more text than a word list; pseudo-words from syllables


def _pseudo_corpus(lines: int = 20000) -> str:
    rng = random.Random(SEED)
    onsets = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
    codas = ["", "", "n", "r", "s", "t", "ng", "ck"]
    words = [
        "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
            for _ in range(rng.randint(1, 3))
        )
        for _ in range(5000)
    ]
    return "\n".join(" ".join(rng.choices(words, k=rng.randint(4, 14))) for _ in range(lines))


def _tokenizer(work: Path) -> str:
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    text = work / "corpus.txt"
    text.write_text(_pseudo_corpus(), encoding="utf-8")
    out = work / "tokenizer"
    create_spt_model(
        str(text),
        vocab_size=VOCAB_SIZE,
        sample_size=-1,
        do_lower_case=True,
        tokenizer_type="bpe",
        output_dir=str(out),
    )
    return str(out)


# ---------------------------------------------------------------------------------------------
# Audio: speech-like noise (bursts and pauses), for calibration and for hosts without espeak


def synthetic_speech(seconds: float, seed: int = 0) -> Any:
    """Float32 mono 16 kHz: shaped noise bursts of 0.4-3 s between 0.2-1 s pauses."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
    pos = 0
    while pos < len(out):
        burst = int(rng.uniform(0.4, 3.0) * SAMPLE_RATE)
        t = np.arange(burst) / SAMPLE_RATE
        tone = np.sin(2 * np.pi * rng.uniform(90, 250) * t) * (0.5 + 0.5 * np.sin(7 * t))
        chunk = (0.2 * tone + 0.05 * rng.standard_normal(burst)).astype(np.float32)
        out[pos : pos + burst] = chunk[: len(out) - pos]
        pos += burst + int(rng.uniform(0.2, 1.0) * SAMPLE_RATE)
    return out


def write_wav(path: Path, samples: Any) -> Path:
    import numpy as np

    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.tobytes())
    return path


def read_wav(path: Path) -> Any:
    import numpy as np

    with wave.open(str(path), "rb") as src:
        if (src.getnchannels(), src.getsampwidth(), src.getframerate()) != (1, 2, SAMPLE_RATE):
            raise ValueError(f"{path}: not 16 kHz mono 16-bit")
        raw = src.readframes(src.getnframes())
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


# ---------------------------------------------------------------------------------------------
# Building


def _blank_bias(model: Any, family: str) -> Any:
    """The output layer's bias entry of the blank (the last token logit in both families)."""
    if family == "ctc":
        return model.decoder.decoder_layers[0].bias, -1
    return model.joint.joint_net[-1].bias, model.joint.num_classes_with_blank - 1


def transcribe(model: Any, audio: list[Any], batch_size: int) -> list[Any]:
    """``model.transcribe`` as the server calls it (eval, no dither, word timestamps)."""
    import torch
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(logging.WARNING)  # else an info line per call
    model.eval()
    model.preprocessor.featurizer.dither = 0.0
    with torch.inference_mode():
        return list(
            model.transcribe(
                audio, batch_size=batch_size, timestamps=True, verbose=False, num_workers=0
            )
        )


def tokens(hyp: Any, family: str) -> int:
    """Tokens a hypothesis emitted (a CTC hypothesis holds every frame's log-probabilities:
    take each frame's best label and collapse repeats and blanks)."""
    if family != "ctc":
        return len(hyp.y_sequence)
    labels = hyp.y_sequence.argmax(-1).tolist()
    blank = VOCAB_SIZE
    return sum(1 for i, x in enumerate(labels) if x != blank and (i == 0 or labels[i - 1] != x))


def _tokens_per_frame(model: Any, family: str, clip: Any) -> float:
    hyp = transcribe(model, [clip], 1)[0]
    return tokens(hyp, family) / (len(clip) / SAMPLE_RATE / FRAME_S)


def calibrate(model: Any, family: str, target: float = TOKENS_PER_FRAME) -> float:
    """Bisect the blank logit's bias until greedy decoding of speech-like audio emits
    ``target`` tokens per encoder frame; returns the rate reached."""
    import torch

    bias, blank = _blank_bias(model, family)
    clip = synthetic_speech(20.0, seed=1)
    lo, hi = -30.0, 30.0
    base = bias[blank].item()
    rates: list[float] = []
    for _ in range(16):
        mid = (lo + hi) / 2
        with torch.no_grad():
            bias[blank] = base + mid
        rates.append(rate := _tokens_per_frame(model, family, clip))
        # Close enough; or the blank does not steer it (a random CTC head whose every
        # frame has the same best label emits one token, whatever the blank does).
        if abs(rate - target) < 0.03 or rates[-3:] == [rate] * 3:
            break
        lo, hi = (lo, mid) if rate < target else (mid, hi)
    return rates[-1]


def cache_key(size: str, family: str) -> str:
    from importlib.metadata import version

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(tiny_models.__file__).read_bytes())
    for dist in ("nemo_toolkit", "torch", "sentencepiece"):
        h.update(f"{dist}={version(dist)}".encode())
    h.update(f"{size}-{family}".encode())
    return h.hexdigest()[:16]


def make(size: str, family: str, work: Path, device: str = "cpu") -> Any:
    """A calibrated model of ``size`` and ``family`` on ``device``; its tokenizer lives in
    ``work``, which must outlast any ``save_to``."""
    import numpy as np
    import torch
    from nemo.collections.asr.models import EncDecCTCModelBPE, EncDecRNNTBPEModel
    from omegaconf import OmegaConf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    with tiny_models._quiet():
        tok = _tokenizer(work)
        random.seed(SEED)
        np.random.seed(SEED)
        torch.manual_seed(SEED)
        cfg = OmegaConf.create(config(SIZES[size], family, tok))
        cls = EncDecCTCModelBPE if family == "ctc" else EncDecRNNTBPEModel
        model = cls(cfg=cfg)
    model = model.to(torch.device(device)).eval()
    calibrate(model, family)
    return model


def build(
    size: str = "bench", family: str = "ctc", out_dir: Path = CACHE, device: str = "cpu"
) -> Path:
    """Build (or reuse) the model, calibrating it on ``device``; returns its ``.nemo`` path.
    Written under a temporary name and renamed, so a concurrent reader never sees a
    partial file."""
    path = out_dir / f"{size}-{family}-{cache_key(size, family)}.nemo"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{path.name}.{os.getpid()}.part"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-model-") as work:
            model = make(size, family, Path(work), device)
            with tiny_models._quiet():
                model.save_to(str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load(path: Path, device: str = "cpu") -> Any:
    import torch
    from nemo.collections.asr.models import ASRModel

    with tiny_models._quiet():
        model = ASRModel.restore_from(str(path), map_location=torch.device(device))
    return model.eval()


def parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Measuring the model alone


def direct(
    model: Any, audio: list[Any], batch_sizes: list[int], reps: int, sync: Any = None
) -> dict[int, list[float]]:
    """Seconds to ``transcribe`` all of ``audio`` at each batch size, ``reps`` times each.
    With ``sync`` (``torch.cuda.synchronize`` on a GPU), called before each clock reading,
    each batch size first gets a warm-up call of its own (CUDA graphs, kernel choice);
    without, one short warm-up call serves all."""
    transcribe(model, audio[:2], 2)
    out: dict[int, list[float]] = {}
    for batch in batch_sizes:
        if sync is not None:
            transcribe(model, audio[:batch], batch)
        out[batch] = []
        for _ in range(reps):
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            transcribe(model, audio, batch)
            if sync is not None:
                sync()
            out[batch].append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command",
        nargs="?",
        choices=("build", "direct", "serve"),
        default="build",
        help="build: build or reuse, print RTF; direct: time transcribe of FILES at each batch "
        "size; serve: load FILES, then per stdin line (a batch size) time one transcribe of "
        "them all and print JSON (so a caller can interleave it with other measurements)",
    )
    parser.add_argument("files", nargs="*", type=Path, help="16 kHz mono WAVs (direct)")
    parser.add_argument("--size", choices=sorted(SIZES), default="bench")
    parser.add_argument("--family", choices=FAMILIES, default="ctc")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch-sizes", default="1,4,16", help="direct: comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="direct: timed runs per batch size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_intermixed_args()

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = build(args.size, args.family)
    built_s = time.perf_counter() - t0
    model = load(path)
    if args.command == "build":
        minute = synthetic_speech(60.0, seed=2)
        transcribe(model, [minute[: SAMPLE_RATE * 5]], 1)
        t0 = time.perf_counter()
        hyp = transcribe(model, [minute], 1)[0]
        seconds = time.perf_counter() - t0
        info = {
            "path": str(path),
            "parameters": parameters(model),
            "build_or_reuse_s": round(built_s, 1),
            "threads": args.threads,
            "minute_s": round(seconds, 3),
            "rtf": round(seconds / 60, 4),
            "tokens_per_frame": round(tokens(hyp, args.family) / (60 / FRAME_S), 3),
            "size": asdict(SIZES[args.size]),
        }
        if args.json:
            print(json.dumps(info))
        else:
            print(
                f"{path.name}: {info['parameters'] / 1e6:.1f} M parameters; one minute of "
                f"audio in {seconds:.2f} s on {args.threads} thread(s): RTF {info['rtf']:.3f} "
                f"(RTFx {60 / seconds:.0f}); {info['tokens_per_frame']} tokens per frame"
            )
        return
    audio = [read_wav(f) for f in args.files]
    if args.command == "serve":
        transcribe(model, audio[:2], 2)  # warm-up
        info = {"path": str(path), "parameters": parameters(model), "threads": args.threads}
        print(json.dumps({"ready": True, "model": info}), flush=True)
        for line in sys.stdin:
            batch = int(line)
            t0 = time.perf_counter()
            transcribe(model, audio, batch)
            print(json.dumps({"batch": batch, "seconds": time.perf_counter() - t0}), flush=True)
        return
    batches = [int(b) for b in args.batch_sizes.split(",")]
    times = direct(model, audio, batches, args.reps)
    total = sum(len(a) for a in audio) / SAMPLE_RATE
    result = {
        "model": {"path": str(path), "parameters": parameters(model), "threads": args.threads},
        "audio_s": total,
        "seconds": {str(b): t for b, t in times.items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        for b, t in times.items():
            best = sorted(t)[len(t) // 2]
            print(f"batch {b}: median {best:.2f} s for {total:.0f} s: {total / best:.1f} audio s/s")


if __name__ == "__main__":
    main()
