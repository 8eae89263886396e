"""One adapter per NeMo model family: how it is called, what it can do, what its output means.

Families (chosen from the loaded model's class, most specific first):

- ``hybrid``: ``EncDecHybridRNNTCTCModel`` (parakeet-tdt_ctc): a TDT/RNNT head and a CTC head;
  ``decoder`` picks which one decodes.
- ``tdt`` / ``rnnt``: ``EncDecRNNTModel`` (parakeet-tdt, parakeet-rnnt).
- ``ctc``: ``EncDecCTCModel`` (parakeet-ctc, the demo model).
- ``aed``: ``EncDecMultiTaskModel`` (canary): an attention encoder-decoder steered by a
  prompt (source and target language, task, punctuation).

Request options are plain values (``language``, ``task``, ``target_language``,
``punctuation``); the server has checked them against ``capabilities()`` already. The module
imports nothing of the server.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TRANSCRIBE, TRANSLATE = "transcribe", "translate"
SUPPORTED_CLASSES = (
    "EncDecCTCModel",
    "EncDecCTCModelBPE",
    "EncDecRNNTModel",
    "EncDecRNNTBPEModel",
    "EncDecHybridRNNTCTCModel",
    "EncDecHybridRNNTCTCBPEModel",
    "EncDecMultiTaskModel",
)
# Canary is trained on utterances of at most 40 s; the transducers and CTC take longer ones.
AED_MAX_SLICE_S = 40.0


class UnsupportedModel(ValueError):
    """The model is of a class this server cannot serve."""


def words_of(hyp: Any, duration: float) -> list[dict[str, Any]]:
    """The model's word times, clamped to the slice, with its word confidence where it gave
    one; none when the model gives no word times."""
    stamps = getattr(hyp, "timestamp", None) or {}
    items = [i for i in stamps.get("word", []) or [] if str(i.get("word", "")).strip()]
    confidence = word_confidence(hyp)
    if confidence is not None and len(confidence) != len(items):
        confidence = None  # not the same words: better none than misplaced
    words = []
    for n, item in enumerate(items):
        if "start" not in item:
            continue
        start = min(max(float(item["start"]), 0.0), duration)
        end = min(max(float(item.get("end", start)), start), duration)
        word = {"word": str(item["word"]).strip(), "start": round(start, 3), "end": round(end, 3)}
        if confidence is not None:
            word["confidence"] = round(min(max(confidence[n], 0.0), 1.0), 3)
        words.append(word)
    return words


def word_confidence(hyp: Any) -> list[float] | None:
    """Per-word confidence: NeMo's own (subword models), or for character models the minimum
    of each word's character confidences (NeMo 3.0 fails to aggregate those itself)."""
    words = getattr(hyp, "word_confidence", None)
    if words:
        return [float(c) for c in words]
    tokens = getattr(hyp, "token_confidence", None)
    text = str(getattr(hyp, "text", ""))
    if not tokens or len(tokens) != len(text):
        return None
    out: list[float] = []
    current: list[float] = []
    for char, conf in zip(text, tokens, strict=True):
        if char.isspace():
            if current:
                out.append(min(current))
            current = []
        else:
            current.append(float(conf))
    if current:
        out.append(min(current))
    return out


def fast_greedy(cfg: Any) -> bool:
    """Make a transducer's decoding config NeMo's fastest greedy decoder: batched greedy
    with label looping (one joint call per emitted label instead of per frame) and CUDA
    graphs (the decoding loop replayed as one graph on a GPU; NeMo skips them on CPU).
    Same hypotheses as plain greedy. Beam search is left as configured: returns False."""
    from omegaconf import open_dict

    with open_dict(cfg):
        if cfg.get("strategy", "greedy_batch") not in ("greedy", "greedy_batch"):
            return False
        cfg.strategy = "greedy_batch"
        if cfg.get("greedy") is None:
            cfg.greedy = {"max_symbols": 10}
        cfg.greedy.loop_labels = True
        cfg.greedy.use_cuda_graph_decoder = True
    return True


def enable_confidence(model: Any, decoder_type: str | None = None, fast: bool = False) -> bool:
    """Greedy decoding that keeps per-token (and, for subword models, per-word) confidence:
    NeMo's default method, a Tsallis entropy (alpha 1/3, exponentially normalised) of each
    frame's distribution, blank frames excluded, the minimum over a word's tokens.

    ``fast`` (transducer decoding only): NeMo's fast greedy decoder too (``fast_greedy``);
    returns whether it applied."""
    from omegaconf import open_dict

    cfg = model.cfg.aux_ctc.decoding if decoder_type == "ctc" else model.cfg.decoding
    cfg = cfg.copy()
    subword = hasattr(model, "tokenizer")
    with open_dict(cfg):
        cfg.confidence_cfg = {
            "preserve_frame_confidence": True,
            "preserve_token_confidence": True,
            "preserve_word_confidence": subword,
            "exclude_blank": True,
            "aggregation": "min",
        }
    fast = fast and fast_greedy(cfg)
    if decoder_type is None:
        model.change_decoding_strategy(cfg, verbose=False)
    else:
        model.change_decoding_strategy(cfg, decoder_type=decoder_type, verbose=False)
    return fast


def _is_tdt(cfg: Any) -> bool:
    decoding = cfg.get("decoding") or {}
    return decoding.get("model_type") == "tdt" or bool(
        (cfg.get("model_defaults") or {}).get("tdt_durations")
    )


class Family:
    """CTC: one call, word times from the decoder's timestamps."""

    name = "ctc"
    word_timestamps = True
    word_confidence = True
    max_slice_s: float | None = None
    fast_decoding = False
    """Whether NeMo's fast greedy transducer decoder is in use (``fast_greedy``)."""

    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        self.model = model
        self.config = config
        self.sample_rate = int(model.cfg.get("sample_rate", 16000))
        if type(self) is Family:
            enable_confidence(model)
        elif type(self) is Transducer:
            self.fast_decoding = enable_confidence(model, fast=bool(config.get("fast_decoding")))

    def languages(self) -> list[str] | None:
        """ISO 639-1 codes the model takes, or None when nobody says (``language`` is then
        only a hint)."""
        configured = self.config.get("languages")
        return list(configured) if configured else None

    def decoder(self) -> str | None:
        return None

    def capabilities(self) -> dict[str, Any]:
        languages = self.languages()
        return {
            "family": self.name,
            "class": type(self.model).__name__,
            "languages": languages,
            "language_hint_only": languages is None,
            "tasks": [TRANSCRIBE],
            "punctuation": False,
            "word_timestamps": self.word_timestamps,
            "word_confidence": self.word_confidence,
            "decoder": self.decoder(),
            "max_slice_s": self.config.get("max_slice_s") or self.max_slice_s,
            "sample_rate": self.sample_rate,
        }

    def transcribe(self, audio: list[np.ndarray], options: dict[str, Any]) -> list[Any]:
        hyps = self.model.transcribe(
            audio, batch_size=len(audio), timestamps=True, verbose=False, num_workers=0
        )
        return _best(hyps)

    def words(self, hyp: Any, duration: float) -> list[dict[str, Any]]:
        return words_of(hyp, duration) if self.word_timestamps else []


class Transducer(Family):
    """RNNT and TDT: called like CTC."""

    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.name = "tdt" if _is_tdt(model.cfg) else "rnnt"


class Hybrid(Transducer):
    """TDT/RNNT + CTC heads; ``decoder`` (``tdt``/``rnnt`` or ``ctc``) picks the one used."""

    name = "hybrid"

    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.head = "tdt" if _is_tdt(model.cfg) else "rnnt"
        self.name = "hybrid"
        wanted = config.get("decoder") or self.head
        if wanted not in ("ctc", "tdt", "rnnt"):
            raise ValueError(f"decoder {wanted!r}: choose tdt or ctc")
        fast = bool(config.get("fast_decoding")) and wanted != "ctc"
        self.fast_decoding = enable_confidence(model, "ctc" if wanted == "ctc" else "rnnt", fast)
        self._decoder = "ctc" if wanted == "ctc" else self.head

    def decoder(self) -> str | None:
        return self._decoder


class MultiTask(Family):
    """Canary: every call carries a prompt built from the request's options, the model's
    prompt defaults for what the request leaves out, and ours where the checkpoint has none."""

    name = "aed"
    max_slice_s = AED_MAX_SLICE_S
    word_confidence = False  # NeMo's confidence estimation covers CTC and transducers only

    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.prompt_format = str(model.prompt_format)
        slots: dict[str, Any] = {}
        for turn in model.prompt.get_default_dialog_slots():
            if turn["role"] == "user":
                slots = dict(turn["slots"])
        self.slots = slots
        langs = self.languages() or []
        first = "en" if "en" in langs or not langs else langs[0]
        ours = {
            "source_lang": first,
            "target_lang": None,  # follows source_lang: transcription
            "task": TRANSCRIBE,
            "pnc": "yes",
            "decodercontext": "",
            "emotion": "<|emo:undefined|>",
            "itn": "no",
            "timestamp": "no",
            "diarize": "no",
        }
        self.defaults = {k: (v if v is not None else ours.get(k)) for k, v in slots.items()}
        self.word_timestamps = model.timestamps_asr_model is not None or (
            "timestamp" in slots and "<|timestamp|>" in self._special_tokens()
        )

    def _special_tokens(self) -> set[str]:
        tokenizer = self.model.tokenizer
        special = getattr(tokenizer, "tokenizers_dict", {}).get("spl_tokens")
        if special is None:
            return set()
        vocab = getattr(special, "vocab", None) or []
        return {str(t) for t in vocab}

    def languages(self) -> list[str] | None:
        configured = self.config.get("languages")
        if configured:
            return list(configured)
        langs = [
            str(lang)
            for lang in getattr(self.model.tokenizer, "langs", []) or []
            if lang != "spl_tokens"
        ]
        # A language is usable only where the prompt has its token.
        special = self._special_tokens()
        usable = [lang for lang in langs if not special or f"<|{lang}|>" in special]
        return sorted(usable) or None

    def capabilities(self) -> dict[str, Any]:
        caps = super().capabilities()
        caps["tasks"] = [TRANSCRIBE, TRANSLATE]
        caps["punctuation"] = "pnc" in self.slots
        caps["prompt_format"] = self.prompt_format
        return caps

    def prompt(self, options: dict[str, Any]) -> dict[str, Any]:
        """The prompt slots for ``options``, as plain values (NeMo maps them to tokens)."""
        slots = dict(self.defaults)
        source = options.get("language") or slots.get("source_lang")
        slots["source_lang"] = source
        task = options.get("task") or TRANSCRIBE
        target = options.get("target_language")
        if target is None:
            target = "en" if task == TRANSLATE else source
            if task != TRANSLATE and "language" not in options and self.defaults.get("target_lang"):
                target = self.defaults["target_lang"]
        slots["target_lang"] = target
        if "task" in slots:
            slots["task"] = task
        if "pnc" in slots and options.get("punctuation") is not None:
            slots["pnc"] = "yes" if options["punctuation"] else "no"
        if "timestamp" in slots:
            slots["timestamp"] = "yes" if self.word_timestamps else "no"
        return slots

    def transcribe(self, audio: list[np.ndarray], options: dict[str, Any]) -> list[Any]:
        slots = self.prompt(options)
        # One prompt per call: NeMo repeats it over the batch for in-memory audio (the pool
        # never mixes prompts in one batch).
        hyps = self.model.transcribe(
            audio,
            batch_size=len(audio),
            verbose=False,
            num_workers=0,
            return_hypotheses=True,
            timestamps=True if self.word_timestamps else None,
            # NeMo's "legacy" keywords: slot values as plain values, for the user turn.
            **slots,
        )
        return _best(hyps)


def _best(hyps: Any) -> list[Any]:
    if isinstance(hyps, tuple):  # some models return (best, all)
        hyps = hyps[0]
    return list(hyps)


def adapter_for(model: Any, config: dict[str, Any]) -> Family:
    """The adapter for a loaded model; ``UnsupportedModel`` names the classes served."""
    from nemo.collections.asr.models import (
        EncDecCTCModel,
        EncDecHybridRNNTCTCModel,
        EncDecMultiTaskModel,
        EncDecRNNTModel,
    )

    # Most specific first: the hybrid is an RNNT model too.
    if isinstance(model, EncDecHybridRNNTCTCModel):
        return Hybrid(model, config)
    if config.get("decoder"):
        raise UnsupportedModel(
            f"decoder = {config['decoder']!r} applies to hybrid TDT/RNNT + CTC models only; "
            f"this one is a {type(model).__name__}"
        )
    if isinstance(model, EncDecRNNTModel):
        return Transducer(model, config)
    if isinstance(model, EncDecCTCModel):
        return Family(model, config)
    if isinstance(model, EncDecMultiTaskModel):
        return MultiTask(model, config)
    raise UnsupportedModel(
        f"{type(model).__name__} is not a speech-to-text model this server serves; "
        f"supported classes: {', '.join(SUPPORTED_CLASSES)}"
    )
