"""Mixed prompts in one batch: grouped calls (what the server does) against one call with a
prompt per item through a DataLoader (NeMo allows that, not for plain in-memory audio).

Tiny Canary from tests/tiny_models.py, 8 slices of 10 s, half en and half de; medians of
repeated runs, ratio first. A tiny model is dominated by per-call overhead, which favours
the single call: read the ratio as an upper bound of what grouping costs.

    .venv/bin/python benchmarks/prompts.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import tiny_models

RUNS = 7
SLOTS = {"pnc": "yes", "task": "transcribe"}


def main() -> None:
    from nemo.collections.asr.models import ASRModel

    torch.set_num_threads(1)
    path = tiny_models.build("canary", Path(".cache/tiny-models"))
    model = ASRModel.restore_from(str(path), map_location="cpu")
    model.eval()
    model.preprocessor.featurizer.dither = 0.0
    rng = np.random.default_rng(0)
    audio = [(rng.standard_normal(10 * 16000) * 0.2).astype(np.float32) for _ in range(8)]
    langs = ["en", "de"] * 4

    def grouped() -> None:
        for lang in ("en", "de"):
            part = [a for a, x in zip(audio, langs, strict=True) if x == lang]
            model.transcribe(
                part,
                batch_size=len(part),
                verbose=False,
                source_lang=lang,
                target_lang=lang,
                **SLOTS,
            )

    def ids(lang: str) -> torch.Tensor:
        turn = {"role": "user", "slots": {"source_lang": lang, "target_lang": lang, **SLOTS}}
        return model.prompt.encode_dialog([turn])["context_ids"]

    def collate(batch: list[tuple[np.ndarray, torch.Tensor]]) -> tuple[Any, ...]:
        lens = torch.tensor([len(a) for a, _ in batch])
        signal = torch.zeros(len(batch), int(lens.max()))
        for i, (a, _) in enumerate(batch):
            signal[i, : len(a)] = torch.from_numpy(a)
        prompts = torch.stack([p for _, p in batch])
        return signal, lens, None, None, prompts, torch.tensor([len(p) for p in prompts])

    def per_item() -> None:
        items = [(a, ids(x)) for a, x in zip(audio, langs, strict=True)]
        model.transcribe(DataLoader(items, batch_size=8, collate_fn=collate), verbose=False)

    def timed(fn: Any) -> float:
        fn()  # warm-up
        runs = []
        for _ in range(RUNS):
            started = time.perf_counter()
            with torch.inference_mode():
                fn()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)

    one, two = timed(per_item), timed(grouped)
    print(
        f"grouped/per-item {two / one:.3f}  (grouped: 2 calls of 4, {two * 1000:.1f} ms; "
        f"per-item prompts: 1 call of 8, {one * 1000:.1f} ms; median of {RUNS})"
    )


if __name__ == "__main__":
    main()
