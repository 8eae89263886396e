"""What word confidence costs: the demo model on 8 x 20 s of speech-like audio, decoded with
and without NeMo's confidence estimation (median of repeated runs, ratio first).

    .venv/bin/python benchmarks/confidence.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from aiotranscribe.engine.families import enable_confidence
from aiotranscribe.engine.nemo_engine import DEMO_MODEL

RUNS = 7


def timed(model, audio) -> float:
    runs = []
    for _ in range(RUNS):
        started = time.perf_counter()
        with torch.inference_mode():
            model.transcribe(audio, batch_size=len(audio), timestamps=True, verbose=False)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    from nemo.collections.asr.models import ASRModel

    torch.set_num_threads(1)
    model = ASRModel.restore_from(str(DEMO_MODEL), map_location="cpu")
    model.eval()
    model.preprocessor.featurizer.dither = 0.0
    rng = np.random.default_rng(0)
    audio = [(rng.standard_normal(20 * 16000) * 0.1).astype(np.float32) for _ in range(8)]
    plain = timed(model, audio)
    enable_confidence(model)
    model.eval()
    with_conf = timed(model, audio)
    print(
        f"confidence/plain {with_conf / plain:.3f}  (plain {plain * 1000:.1f} ms, "
        f"with confidence {with_conf * 1000:.1f} ms per 160 s batch, median of {RUNS})"
    )


if __name__ == "__main__":
    main()
