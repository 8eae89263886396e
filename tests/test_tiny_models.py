"""The tiny NeMo models of every family build, load and transcribe offline.

These tests also pin down the NeMo behaviour the server relies on: how each family is
recognised from its class and config, what ``timestamps=True`` returns, how a Canary model
takes its prompt for in-memory audio (one per call, or one per item through a DataLoader),
how a hybrid switches decoders, and how the "bad" and "unsupported" models fail.

The models are cached in ``$AIOTRANSCRIBE_TINY_MODELS`` if set (e.g. ``.cache/tiny-models``),
else in a per-session temporary directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests import tiny_models

SR = tiny_models.SAMPLE_RATE
FRAME_S = 0.08  # one encoder frame: 10 ms hop x 8 subsampling


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and OpenMP threads on busy shared cores lose a
    lot (these tests took 2.5x as long on two cores while another suite ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("AIOTRANSCRIBE_TINY_MODELS")
    return Path(configured) if configured else tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_paths(tiny_dir: Path) -> dict[str, Path]:
    return tiny_models.build_all(tiny_dir)


@pytest.fixture(scope="session")
def load(tiny_paths: dict[str, Path]) -> Callable[[str], Any]:
    """Restore a family's model once per session (callers must leave it as they found it)."""
    from nemo.collections.asr.models import ASRModel

    cache: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in cache:
            model = ASRModel.restore_from(str(tiny_paths[family]), map_location="cpu")
            model.eval()
            cache[family] = model
        return cache[family]

    return get


@pytest.fixture(scope="module")
def noise() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        (0.1 * rng.standard_normal(3 * SR)).astype(np.float32),
        (0.1 * rng.standard_normal(2 * SR)).astype(np.float32),
    ]


def transcribe(model: Any, audio: Any, **kwargs: Any) -> list[Any]:
    kwargs = {"batch_size": 2, "verbose": False, "num_workers": 0, **kwargs}
    return list(model.transcribe(audio, **kwargs))


def texts(hyps: list[Any]) -> list[str]:
    return [h.text for h in hyps]


def assert_word_timestamps(hyp: Any, duration: float) -> None:
    """``timestamps=True`` gives ``hyp.timestamp['word']``: dicts, times in seconds."""
    assert set(hyp.timestamp) >= {"timestep", "char", "word", "segment"}
    words = hyp.timestamp["word"]
    assert words, "no word timestamps"
    assert [w["word"] for w in words] == hyp.text.split()
    for w in words:
        assert set(w) == {"word", "start_offset", "end_offset", "start", "end"}
        # Offsets count encoder frames; start/end are seconds (offset x 80 ms).
        assert w["start"] == pytest.approx(w["start_offset"] * FRAME_S)
        assert w["end"] == pytest.approx(w["end_offset"] * FRAME_S)
        assert 0 <= w["start"] <= w["end"] <= duration + FRAME_S
    assert [s["segment"] for s in hyp.timestamp["segment"]] == [hyp.text]


def test_build_is_cached_by_content(tiny_dir: Path, tiny_paths: dict[str, Path]) -> None:
    assert set(tiny_paths) == set(tiny_models.FAMILIES)
    for family, path in tiny_paths.items():
        assert path.parent == tiny_dir
        assert path.name == f"{family}-{tiny_models.cache_key(family)}.nemo"
        mtime = path.stat().st_mtime_ns
        assert tiny_models.build(family, tiny_dir) == path
        assert path.stat().st_mtime_ns == mtime, "a cached model was rebuilt"
    assert len({tiny_models.cache_key(f) for f in tiny_models.FAMILIES}) == len(
        tiny_models.FAMILIES
    )
    assert not list(tiny_dir.glob(".*.part")), "partial files left behind"
    with pytest.raises(ValueError, match="unknown family"):
        tiny_models.build("whisper", tiny_dir)


@pytest.mark.parametrize(
    ("family", "cls", "model_type", "loss_name", "has_aux_ctc"),
    [
        ("ctc", "EncDecCTCModelBPE", None, None, False),
        ("rnnt", "EncDecRNNTBPEModel", None, "default", False),
        ("tdt", "EncDecRNNTBPEModel", "tdt", "tdt", False),
        ("hybrid", "EncDecHybridRNNTCTCBPEModel", "tdt", "tdt", True),
    ],
)
def test_ctc_and_transducers_transcribe_with_word_timestamps(
    load: Callable[[str], Any],
    noise: list[np.ndarray],
    family: str,
    cls: str,
    model_type: str | None,
    loss_name: str | None,
    has_aux_ctc: bool,
) -> None:
    model = load(family)
    cfg = model.cfg
    assert type(model).__name__ == cls
    assert cfg.decoding.get("model_type") == model_type
    assert (cfg.get("loss") or {}).get("loss_name") == loss_name
    assert ("aux_ctc" in cfg) is has_aux_ctc
    if model_type == "tdt":
        assert list(cfg.model_defaults.tdt_durations) == tiny_models.TDT_DURATIONS
        assert cfg.joint.num_extra_outputs == len(tiny_models.TDT_DURATIONS)
    assert cfg.sample_rate == SR
    assert cfg.tokenizer.type == "bpe"
    assert model.tokenizer.vocab_size == tiny_models.VOCAB_SIZE
    assert model.encoder.subsampling_factor == 8
    assert cfg.preprocessor.dither == 0.0

    hyps = transcribe(model, noise, timestamps=True)
    assert len(hyps) == 2
    for hyp, audio in zip(hyps, noise, strict=True):
        assert type(hyp).__name__ == "Hypothesis"
        assert hyp.text.strip()
        assert_word_timestamps(hyp, len(audio) / SR)

    # Without timestamps=True, hyp.timestamp stays an empty list.
    plain = transcribe(model, noise)
    assert texts(plain) == texts(hyps)
    assert all(h.timestamp == [] for h in plain)


def test_hybrid_switches_to_ctc_and_back(
    load: Callable[[str], Any], noise: list[np.ndarray]
) -> None:
    model = load("hybrid")
    assert model.cur_decoder == "rnnt"
    tdt = texts(transcribe(model, noise))
    try:
        model.change_decoding_strategy(decoder_type="ctc", verbose=False)
        assert model.cur_decoder == "ctc"
        hyps = transcribe(model, noise, timestamps=True)
        assert texts(hyps) != tdt
        for hyp, audio in zip(hyps, noise, strict=True):
            assert_word_timestamps(hyp, len(audio) / SR)
        # CTC timestamps are numpy scalars, not Python numbers (json.dumps refuses them).
        word = hyps[0].timestamp["word"][0]
        assert isinstance(word["start"], np.floating)
        assert isinstance(word["start_offset"], np.integer)
    finally:
        model.change_decoding_strategy(decoder_type="rnnt", verbose=False)
    assert model.cur_decoder == "rnnt"
    assert texts(transcribe(model, noise)) == tdt


def test_timestamps_true_is_sticky(tiny_paths: dict[str, Path], noise: list[np.ndarray]) -> None:
    """timestamps=True sets cfg.decoding.compute_timestamps for good; timestamps=False does
    not undo it on CTC/RNN-T models (NeMo reads ``timestamps or ...``, so False acts as None).
    The timestamps then come back whenever return_hypotheses=True."""
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(str(tiny_paths["ctc"]), map_location="cpu")  # a private copy
    model.eval()
    assert transcribe(model, noise, return_hypotheses=True)[0].timestamp == []
    transcribe(model, noise, timestamps=True)
    assert model.cfg.decoding.compute_timestamps is True
    assert transcribe(model, noise)[0].timestamp == []
    for flag in (None, False):
        hyp = transcribe(model, noise, timestamps=flag, return_hypotheses=True)[0]
        assert hyp.timestamp["word"], flag
    assert model.cfg.decoding.compute_timestamps is True


CANARY2_SLOTS = {
    "decodercontext": "",
    "emotion": "<|emo:undefined|>",
    "itn": "no",
    "timestamp": "no",
    "diarize": "no",
}


def prompt(family: str, lang: str, target: str | None = None) -> dict[str, str]:
    """transcribe() keywords for a Canary prompt (the legacy Canary-1B form)."""
    target = target or lang
    slots = {"source_lang": lang, "target_lang": target, "pnc": "yes"}
    if family == "canary":
        slots["task"] = "asr" if lang == target else "ast"
    else:  # canary2 has no task slot but five more, all required without prompt_defaults
        slots.update(CANARY2_SLOTS)
    return slots


@pytest.mark.parametrize("family", ["canary", "canary2"])
def test_canary_config_and_tokenizer(load: Callable[[str], Any], family: str) -> None:
    model = load(family)
    assert type(model).__name__ == "EncDecMultiTaskModel"
    assert model.cfg.prompt_format == family
    assert model.cfg.get("prompt_defaults") is None
    assert model.cfg.tokenizer.type == "agg"
    assert type(model.tokenizer).__name__ == "CanaryTokenizer"
    # The languages: the aggregate tokenizer's sub-tokenizers but spl_tokens, which also
    # holds a <|xx|> token per language.
    assert model.tokenizer.langs == ["spl_tokens", "en", "de"]
    assert [lang for lang in model.tokenizer.langs if lang != "spl_tokens"] == ["en", "de"]
    assert {"<|en|>", "<|de|>"} <= set(model.tokenizer.special_tokens)
    assert ("<|startofcontext|>" in model.tokenizer.special_tokens) is (family == "canary2")


@pytest.mark.parametrize("family", ["canary", "canary2"])
def test_canary_prompt_for_in_memory_audio(
    load: Callable[[str], Any], noise: list[np.ndarray], family: str
) -> None:
    from nemo.collections.asr.models.aed_multitask_models import MultiTaskTranscriptionConfig

    model = load(family)

    # Without prompt_defaults and without a prompt, in-memory audio cannot be transcribed.
    with pytest.raises(AssertionError, match="received value=None"):
        transcribe(model, noise)

    en = texts(transcribe(model, noise, **prompt(family, "en")))
    de = texts(transcribe(model, noise, **prompt(family, "de")))
    assert all(t.strip() for t in en + de)
    assert en != de, "the language in the prompt must change the output"
    en_de = texts(transcribe(model, noise, **prompt(family, "en", "de")))
    assert en_de not in (en, de), "translation must differ from transcription"

    # The same prompt, as role/slots or through override_config.
    assert texts(transcribe(model, noise, role="user", slots=prompt(family, "de"))) == de
    config = MultiTaskTranscriptionConfig(
        batch_size=2, verbose=False, num_workers=0, prompt=prompt(family, "de")
    )
    assert texts(model.transcribe(noise, override_config=config)) == de

    # A language the tokenizer lacks.
    with pytest.raises(KeyError, match="fr"):
        transcribe(model, noise, **prompt(family, "fr"))


@pytest.mark.parametrize("family", ["canary", "canary2"])
def test_canary_per_item_prompts_through_a_dataloader(
    load: Callable[[str], Any], noise: list[np.ndarray], family: str
) -> None:
    """Batches of (audio, audio_len, _, _, prompt_ids, prompt_len) carry a prompt per item."""
    model = load(family)

    def ids(lang: str) -> torch.Tensor:
        turn = {"role": "user", "slots": prompt(family, lang)}
        return model.prompt.encode_dialog([turn])["context_ids"]

    items = [(noise[0], ids("en")), (noise[1], ids("de"))]
    assert len(items[0][1]) == len(items[1][1])  # fixed-length prompts: no padding needed

    def collate(batch: list[tuple[np.ndarray, torch.Tensor]]) -> tuple[Any, ...]:
        lens = torch.tensor([len(a) for a, _ in batch])
        audio = torch.zeros(len(batch), int(lens.max()))
        for i, (a, _) in enumerate(batch):
            audio[i, : len(a)] = torch.from_numpy(a)
        prompts = torch.stack([p for _, p in batch])
        return audio, lens, None, None, prompts, torch.tensor([len(p) for p in prompts])

    loader = DataLoader(items, batch_size=2, collate_fn=collate)
    mixed = texts(model.transcribe(loader, verbose=False))
    assert mixed[0] == texts(transcribe(model, noise, **prompt(family, "en")))[0]
    assert mixed[1] == texts(transcribe(model, noise, **prompt(family, "de")))[1]
    assert mixed[0] != mixed[1]


@pytest.mark.parametrize("family", ["canary", "canary2"])
def test_canary_timestamps(
    load: Callable[[str], Any], noise: list[np.ndarray], family: str
) -> None:
    """In-memory audio: timestamps=True sets the prompt's timestamp slot (canary2) and parses
    <|frame|> tokens out of the text into hyp.timestamp; this tiny model emits none."""
    model = load(family)
    slots = {k: v for k, v in prompt(family, "en").items() if k != "timestamp"}
    hyps = transcribe(model, noise, timestamps=True, **slots)
    assert all(h.timestamp == {"word": [], "segment": [], "char": []} for h in hyps)
    plain = texts(transcribe(model, noise, **prompt(family, "en")))
    if family == "canary":
        # The canary format has no timestamp slot: same text.
        assert texts(hyps) == [t.strip() for t in plain]
    else:
        # canary2 puts <|timestamp|> in the prompt instead of <|notimestamp|>.
        assert texts(hyps) != plain


def test_canary_file_input_uses_legacy_defaults_and_refuses_timestamps(
    load: Callable[[str], Any], noise: list[np.ndarray], tmp_path: Path
) -> None:
    """File paths get en/en/asr/pnc defaults without any prompt (in-memory audio does not);
    for the canary format, any timestamps= argument, even False, raises."""
    import soundfile as sf

    model = load("canary")
    paths = []
    for i, audio in enumerate(noise):
        paths.append(str(tmp_path / f"{i}.wav"))
        sf.write(paths[-1], audio, SR)
    en = texts(transcribe(model, noise, **prompt("canary", "en")))
    assert texts(transcribe(model, paths)) == en
    for flag in (True, False):
        with pytest.raises(ValueError, match="Timestamp feature is not supported"):
            transcribe(model, paths, timestamps=flag, **prompt("canary", "en"))


def test_bad_model_loads_but_cannot_transcribe(
    load: Callable[[str], Any], noise: list[np.ndarray]
) -> None:
    model = load("bad")
    assert type(model).__name__ == "EncDecCTCModelBPE"
    assert model.cfg.preprocessor.features != model.cfg.encoder.feat_in
    with pytest.raises(ValueError, match="audio_signal should have shape"):
        transcribe(model, noise[:1], batch_size=1)


def test_unsupported_model_is_a_frame_vad(
    load: Callable[[str], Any], noise: list[np.ndarray]
) -> None:
    from nemo.collections.asr.models import ASRModel

    model = load("unsupported")
    assert type(model).__name__ == "EncDecFrameClassificationModel"
    assert isinstance(model, ASRModel)  # restore_from through ASRModel works
    assert "tokenizer" not in model.cfg and "decoding" not in model.cfg
    # Its transcribe(audio, batch_size, logprobs, override_config) takes none of the
    # ASR keywords, and returns a tensor of class scores per item, not text.
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        transcribe(model, noise, timestamps=True)
    out = model.transcribe(noise, batch_size=2)
    assert [type(o) for o in out] == [torch.Tensor, torch.Tensor]
