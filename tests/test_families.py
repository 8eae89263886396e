"""Every NeMo model family through the server: the server says exactly what NeMo says offline.

Tiny models of each family are built from config (``tests.tiny_models``; random weights,
cached by recipe hash), served with the thread executor, and compared with ``transcribe``
called directly with the same options.
"""

from __future__ import annotations

import io
import os
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import FormData

from aiotranscribe.keys import pools_key
from tests import tiny_models
from tests.conftest import ROOT

CACHE = Path(os.environ.get("AIOTRANSCRIBE_TINY_MODELS", ROOT / ".cache" / "tiny-models"))
RATE = 16000


@pytest.fixture(scope="session")
def tiny() -> Any:
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny_models.build(family, CACHE)
        return built[family]

    return get


@pytest.fixture(scope="session")
def noise_wav(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Seeded noise with a loud middle: random-weight models emit tokens for it."""
    base = tmp_path_factory.mktemp("noise")

    def make(seconds: float, seed: int = 3) -> Path:
        path = base / f"noise-{seconds}-{seed}.wav"
        if not path.exists():
            rng = np.random.default_rng(seed)
            samples = rng.standard_normal(int(seconds * RATE)) * 0.2
            samples = (np.clip(samples, -1, 1) * 32767).astype("<i2")
            with wave.open(str(path), "wb") as out:
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(RATE)
                out.writeframes(samples.tobytes())
        return path

    return make


@pytest.fixture(scope="module")
def offline() -> Any:
    """``offline(path, wav, **kwargs)``: NeMo's own answer, loaded and called as a user would
    (eval mode, no dither), one model instance per file."""
    from nemo.collections.asr.models import ASRModel

    loaded: dict[Path, Any] = {}

    def run(model_path: Path, wav: Path, decoder: str | None = None, **kwargs: Any) -> Any:
        import torch

        if model_path not in loaded:
            loaded[model_path] = ASRModel.restore_from(str(model_path), map_location="cpu")
        model = loaded[model_path]
        if decoder is not None:
            model.change_decoding_strategy(decoder_type=decoder, verbose=False)
        model.eval()
        model.preprocessor.featurizer.dither = 0.0
        with wave.open(str(wav), "rb") as f:
            audio = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768
        with torch.inference_mode():
            hyps = model.transcribe([audio], batch_size=1, verbose=False, num_workers=0, **kwargs)
        if isinstance(hyps, tuple):
            hyps = hyps[0]
        return hyps[0]

    return run


def offline_words(hyp: Any, duration: float) -> list[dict[str, Any]]:
    """NeMo's word times, clamped to the audio as the server does (the last frame of an 8x
    subsampled encoder can end up to 80 ms past the end)."""
    items = (getattr(hyp, "timestamp", None) or {}).get("word") or []
    words = []
    for w in items:
        if not str(w.get("word", "")).strip():
            continue
        start = min(float(w["start"]), duration)
        end = min(max(float(w["end"]), start), duration)
        words.append({"word": w["word"], "start": round(start, 3), "end": round(end, 3)})
    return words


def server_words(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The words and their times (confidence, which offline decoding does not keep, aside)."""
    return [
        {k: w[k] for k in ("word", "start", "end")}
        for seg in result["segments"]
        for w in seg.get("words", [])
    ]


async def transcribe(client: Any, wav: Path, **fields: str) -> Any:
    form = FormData()
    form.add_field(
        "file", io.BytesIO(wav.read_bytes()), filename=wav.name, content_type="audio/wav"
    )
    for name, value in fields.items():
        form.add_field(name, value)
    return await client.post("/transcribe", data=form)


async def served(make_client: Any, tmp_path: Path, models_toml: str) -> Any:
    path = tmp_path / "models.toml"
    path.write_text(models_toml)
    return await make_client(models=(), models_file=path)


@pytest.mark.parametrize("family", ["ctc", "rnnt", "tdt", "hybrid"])
async def test_transducers_and_ctc_equal_offline(
    make_client, tmp_path, tiny, offline, noise_wav, family
):
    path = tiny(family)
    wav = noise_wav(3.0)
    client = await served(make_client, tmp_path, f'[models.{family}]\nsource = "{path}"\n')
    resp = await transcribe(client, wav)
    assert resp.status == 200, await resp.text()
    result = await resp.json()
    hyp = offline(path, wav, timestamps=True)
    assert result["text"] == " ".join(str(hyp.text).split())
    assert server_words(result) == offline_words(hyp, 3.0)
    assert result["word_timestamps"] is True and result["task"] == "transcribe"
    words = [w for seg in result["segments"] for w in seg["words"]]
    assert words and all(0.0 <= w["confidence"] <= 1.0 for w in words)
    caps = client.app[pools_key][family].capabilities
    assert caps is not None
    expected = {"ctc": "ctc", "rnnt": "rnnt", "tdt": "tdt", "hybrid": "hybrid"}[family]
    assert caps["family"] == expected
    assert caps["word_timestamps"] is True and caps["tasks"] == ["transcribe"]
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["capabilities"]["family"] == expected
    health = await (await client.get("/health")).json()
    assert health["models"][0]["capabilities"]["class"] == caps["class"]


async def test_hybrid_ctc_decoder_equals_offline_ctc(
    make_client, tmp_path, tiny, offline, noise_wav
):
    path = tiny("hybrid")
    wav = noise_wav(3.0, seed=5)
    client = await served(
        make_client, tmp_path, f'[models.fast]\nsource = "{path}"\ndecoder = "ctc"\n'
    )
    resp = await transcribe(client, wav)
    assert resp.status == 200, await resp.text()
    result = await resp.json()
    hyp = offline(path, wav, decoder="ctc", timestamps=True)
    assert result["text"] == " ".join(str(hyp.text).split())
    assert server_words(result) == offline_words(hyp, 3.0)
    assert client.app[pools_key]["fast"].capabilities["decoder"] == "ctc"


CANARY_CASES = [
    ({"language": "en"}, {"source_lang": "en", "target_lang": "en", "task": "transcribe"}),
    ({"language": "de"}, {"source_lang": "de", "target_lang": "de", "task": "transcribe"}),
    (
        {"language": "en", "task": "translate", "target_language": "de"},
        {"source_lang": "en", "target_lang": "de", "task": "translate"},
    ),
]


async def test_canary_prompts_reach_the_model(make_client, tmp_path, tiny, offline, noise_wav):
    """Canary without prompt_defaults: en, de and en->de each equal NeMo offline with the same
    prompt, and en differs from de (the tiny model's prompt tokens are made loud enough)."""
    path = tiny("canary")
    wav = noise_wav(3.0)
    client = await served(make_client, tmp_path, f'[models.canary]\nsource = "{path}"\n')
    texts = {}
    for fields, prompt in CANARY_CASES:
        resp = await transcribe(client, wav, **fields)
        assert resp.status == 200, await resp.text()
        result = await resp.json()
        hyp = offline(path, wav, pnc="yes", **prompt)
        assert result["text"] == " ".join(str(hyp.text).split()), fields
        texts[tuple(fields.values())] = result["text"]
        assert result["task"] == prompt["task"]
    assert texts[("en",)] != texts[("de",)]
    # No language at all: the model's defaults (none in this checkpoint: ours, English).
    resp = await transcribe(client, wav)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["text"] == texts[("en",)]


async def test_canary_capabilities_and_no_invented_word_times(
    make_client, tmp_path, tiny, noise_wav
):
    path = tiny("canary")
    client = await served(make_client, tmp_path, f'[models.canary]\nsource = "{path}"\n')
    caps = client.app[pools_key]["canary"].capabilities
    assert caps["family"] == "aed" and caps["languages"] == ["de", "en"]
    assert caps["tasks"] == ["transcribe", "translate"] and caps["punctuation"] is True
    assert caps["word_timestamps"] is False and caps["max_slice_s"] == 40.0
    resp = await transcribe(client, noise_wav(3.0), language="de")
    result = await resp.json()
    assert result["word_timestamps"] is False
    assert server_words(result) == []
    assert result["text"], "the tiny Canary should say something for this noise"
    assert [(s["start"], s["end"]) for s in result["segments"]] == [(0.0, 3.0)]


async def test_unsupported_language_and_task_are_400_with_the_list(
    make_client, tmp_path, tiny, noise_wav
):
    canary, ctc = tiny("canary"), tiny("ctc")
    client = await served(
        make_client,
        tmp_path,
        f'[models.canary]\nsource = "{canary}"\n\n'
        f'[models.ctc]\nsource = "{ctc}"\nlanguages = ["en"]\n',
    )
    wav = noise_wav(2.0)
    resp = await transcribe(client, wav, language="fr")
    body = await resp.json()
    assert resp.status == 400 and body["code"] == "unsupported_language"
    assert "de, en" in body["detail"]
    resp = await transcribe(client, wav, model="ctc", task="translate")
    body = await resp.json()
    assert resp.status == 400 and body["code"] == "unsupported_task"
    assert "transcribe" in body["detail"]
    resp = await transcribe(client, wav, model="ctc", language="de")
    assert resp.status == 400 and (await resp.json())["code"] == "unsupported_language"
    resp = await transcribe(client, wav, model="ctc", punctuation="false")
    assert resp.status == 400
    resp = await transcribe(client, wav, language="english")
    assert resp.status == 400 and (await resp.json())["code"] == "bad_request"

    # OpenAI's translations route: into English with a model that translates, else 400.
    def openai_form(model: str) -> FormData:
        form = FormData()
        form.add_field("file", wav.read_bytes(), filename="a.wav", content_type="audio/wav")
        form.add_field("model", model)
        form.add_field("language", "de")
        return form

    resp = await client.post("/v1/audio/translations", data=openai_form("canary"))
    assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/audio/translations", data=openai_form("ctc"))
    err = (await resp.json())["error"]
    assert resp.status == 400 and err["code"] in ("unsupported_task", "unsupported_language")
    assert err["param"] in ("task", "language")


async def test_a_hint_only_model_accepts_any_language(make_client, tmp_path, tiny, noise_wav):
    client = await served(make_client, tmp_path, f'[models.ctc]\nsource = "{tiny("ctc")}"\n')
    caps = client.app[pools_key]["ctc"].capabilities
    assert caps["languages"] is None and caps["language_hint_only"] is True
    resp = await transcribe(client, noise_wav(2.0), language="sw")
    assert resp.status == 200 and (await resp.json())["language"] == "sw"


async def test_canary_slices_are_at_most_40_s(make_client, tmp_path, tiny, noise_wav):
    """--chunk-seconds 60 (a GPU's default) is capped by Canary's 40 s."""
    (tmp_path / "models.toml").write_text(f'[models.canary]\nsource = "{tiny("canary")}"\n')
    client = await make_client(models=(), models_file=tmp_path / "models.toml", chunk_seconds=60)
    resp = await transcribe(client, noise_wav(100.0))
    assert resp.status == 200, await resp.text()
    segments = (await resp.json())["segments"]
    # No word times: one segment per slice, on the slice's bounds.
    assert len(segments) == 3 and segments[-1]["end"] == 100.0
    assert all(s["end"] - s["start"] <= 40.0 for s in segments)


@pytest.mark.parametrize(
    ("family", "reason"),
    [("bad", "could not transcribe a test clip"), ("unsupported", "not a model class")],
)
async def test_a_model_that_fails_its_load_check_is_failed(
    make_client, tmp_path, tiny, family, reason
):
    client = await served(make_client, tmp_path, f'[models.{family}]\nsource = "{tiny(family)}"\n')
    health = await (await client.get("/health")).json()
    assert health["status"] == "model_not_loaded"
    assert health["models"][0]["state"] == "failed"
    assert reason in health["models"][0]["error"]
    assert (await client.get("/ready")).status == 503


async def test_canary2_prompt_equals_offline(make_client, tmp_path, tiny, offline, noise_wav):
    """canary2 (canary-1b-flash's format) has more slots and no task slot; without prompt
    defaults every one must be filled, and translation is a target language of its own."""
    path = tiny("canary2")
    wav = noise_wav(3.0)
    client = await served(make_client, tmp_path, f'[models.flash]\nsource = "{path}"\n')
    caps = client.app[pools_key]["flash"].capabilities
    assert caps["prompt_format"] == "canary2" and caps["tasks"] == ["transcribe", "translate"]
    stamps = caps["word_timestamps"]
    slots = {"decodercontext": "", "emotion": "<|emo:undefined|>", "itn": "no", "diarize": "no"}
    texts = []
    for fields, langs in [
        ({"language": "de"}, ("de", "de")),
        ({"language": "en"}, ("en", "en")),
        ({"language": "en", "task": "translate", "target_language": "de"}, ("en", "de")),
    ]:
        resp = await transcribe(client, wav, **fields)
        assert resp.status == 200, await resp.text()
        result = await resp.json()
        hyp = offline(
            path,
            wav,
            source_lang=langs[0],
            target_lang=langs[1],
            pnc="yes",
            timestamp="yes" if stamps else "no",
            **slots,
        )
        assert result["text"] == " ".join(str(hyp.text).split()), fields
        texts.append(result["text"])
    assert texts[0] != texts[1]
