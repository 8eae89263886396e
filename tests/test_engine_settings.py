"""GPU settings passed through to the engine, checked where they can be on a CPU host:
precision mapping, the worker's allocator environment, and NeMo's fast greedy decoding."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from aiotranscribe.engine.families import fast_greedy
from aiotranscribe.engine.nemo_engine import NemoEngine, autocast_dtype, precision_name
from aiotranscribe.engine.worker import CUDA_ALLOC_CONF, prepare_environment
from aiotranscribe.workers import ProcessWorker
from tests import tiny_models
from tests.conftest import MODEL
from tests.test_families import CACHE


def test_precision_autocasts_on_cuda_only():
    import torch

    for precision in ("fp32", "bf16", "fp16", None):
        assert autocast_dtype(precision, "cpu") is None
    assert autocast_dtype("fp32", "cuda:0") is None
    assert autocast_dtype("fp16", "cuda") is torch.float16
    assert autocast_dtype("bf16", "cuda:1", bf16_supported=True) is torch.bfloat16
    # Before Ampere there is no bf16: fp16 instead.
    assert autocast_dtype("bf16", "cuda", bf16_supported=False) is torch.float16
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == [
        "fp32",
        "bf16",
        "fp16",
    ]
    with pytest.raises(ValueError):
        autocast_dtype("int8", "cuda")


def test_the_allocator_setting_is_a_default_the_operator_can_override():
    env: dict[str, str] = {}
    prepare_environment(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF, "TOKENIZERS_PARALLELISM": "false"}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    prepare_environment(mine)
    assert mine["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    # torch >= 2.9's own name: never set both.
    generic = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    prepare_environment(generic)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in generic


async def test_a_worker_process_sets_it_for_itself_before_torch_loads(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    worker = ProcessWorker(MODEL, "cpu", 1, {"precision": "bf16"})
    try:
        info = await worker.load()
    finally:
        await worker.stop()
    assert info["cuda_alloc_conf"] == CUDA_ALLOC_CONF
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ  # the server's own is untouched
    assert info["precision"] == "fp32"  # asked bf16, but on a CPU


def test_fast_greedy_switches_transducer_decoding_to_label_looping():
    plain = OmegaConf.create({"strategy": "greedy", "greedy": {"max_symbols": 5}})
    assert fast_greedy(plain) is True
    assert plain.strategy == "greedy_batch"
    assert plain.greedy == {"max_symbols": 5, "loop_labels": True, "use_cuda_graph_decoder": True}
    off = {"loop_labels": False, "use_cuda_graph_decoder": False}
    frames = OmegaConf.create({"strategy": "greedy_batch", "greedy": off})
    assert fast_greedy(frames) is True
    assert frames.greedy.loop_labels and frames.greedy.use_cuda_graph_decoder
    beam = OmegaConf.create({"strategy": "beam", "beam": {"beam_size": 4}})
    assert fast_greedy(beam) is False and beam.strategy == "beam" and "greedy" not in beam


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("noise") / "noise.wav"
    rng = np.random.default_rng(3)
    samples = (np.clip(rng.standard_normal(4 * 16000) * 0.2, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(samples.tobytes())
    return path


@pytest.mark.parametrize("family", ["rnnt", "tdt", "hybrid", "ctc"])
def test_fast_decoding_is_used_by_transducers_and_changes_no_word(family, noise):
    path = str(tiny_models.build(family, CACHE))
    slices = [(str(noise), 0, 4 * 16000), (str(noise), 16000, 2 * 16000)]
    texts = {}
    for fast in (True, False):
        engine = NemoEngine(path, "cpu", 1, {"fast_decoding": fast})
        info = engine.load()
        assert info["fast_decoding"] is (fast and family != "ctc")
        if info["fast_decoding"]:
            greedy = engine.model.decoding.decoding
            assert type(greedy).__name__.startswith("GreedyBatched")
            assert greedy.decoding_computer is not None  # the label-looping computer
        texts[fast] = [r["text"] for r in engine.transcribe(slices)]
    assert texts[True] == texts[False]
