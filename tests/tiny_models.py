"""Tiny NeMo ASR models of every family, built offline from hand-written configs.

Each model has random (but seeded, so reproducible) weights: what it transcribes is noise,
yet it loads, runs ``transcribe`` and has the class, config, tokenizer and hypotheses
(timestamps included) of the real models of its family. NeMo's pip package ships no
example configs, so the configs are written out here; the SentencePiece tokenizers are
trained on a generated English and German corpus. Nothing is downloaded.

    from tests.tiny_models import FAMILIES, build
    path = build("tdt", Path(".cache/tiny-models"))  # -> .cache/tiny-models/tdt-<hash>.nemo

``build`` caches: the file name carries a hash of this module's source and of the NeMo,
torch and sentencepiece versions, so an edit here (or an upgrade) builds a new file rather
than reusing a stale one. Importing NeMo takes ~7 s; each build then takes 0.1-0.4 s.

Families (:data:`FAMILIES`):

``ctc``          ``EncDecCTCModelBPE``
``rnnt``         ``EncDecRNNTBPEModel``, plain RNN-T (``cfg.decoding`` has no ``model_type``,
                 ``cfg.loss.loss_name: default``)
``tdt``          ``EncDecRNNTBPEModel`` with TDT loss and decoding (``cfg.decoding.model_type:
                 tdt``, ``cfg.loss.loss_name: tdt``, ``cfg.model_defaults.tdt_durations``)
``hybrid``       ``EncDecHybridRNNTCTCBPEModel``: TDT plus an auxiliary CTC decoder
                 (``cfg.aux_ctc``), like parakeet-tdt_ctc-110m
``canary``       ``EncDecMultiTaskModel``, ``prompt_format: canary``, languages en and de,
                 no ``prompt_defaults``; the decoder is wired to heed the prompt's language
                 (see :func:`_wire_canary_prompt`), so en and de decode differently
``canary2``      the same with ``prompt_format: canary2`` and its extra special tokens
``bad``          an ``EncDecCTCModelBPE`` that loads but whose ``transcribe`` always raises
                 ``ValueError`` (its preprocessor makes 80 mel bands, its encoder takes 64)
``unsupported``  an ``EncDecFrameClassificationModel`` (frame VAD): an ``ASRModel`` subclass
                 whose ``transcribe`` takes no ASR keywords and returns no text

Every model: 16 kHz, ``AudioToMelSpectrogramPreprocessor`` (64 mel, 10 ms hop, saved
``dither: 0``), ``ConformerEncoder`` with d_model 64, 2 layers, 8x ``striding``
subsampling (one encoder frame per 80 ms), 64-token SentencePiece BPE per language.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SEED = 1235
SAMPLE_RATE = 16000
D_MODEL = 64
VOCAB_SIZE = 64
LANGUAGES = ("en", "de")
TDT_DURATIONS = [0, 1, 2, 3, 4]
CANARY_PROMPT_SCALE = 20.0
CANARY_ATTEND_LANG = 5.0  # query bias towards the language tokens' keys
CANARY_AMPLIFY = 10.0  # gain of the first decoder layer's self-attention output

FAMILIES = ("ctc", "rnnt", "tdt", "hybrid", "canary", "canary2", "bad", "unsupported")

# Canary special tokens beyond CanaryTokenizer.DEFAULT_TOKENS (which build_special_tokenizer
# always prepends: <|nospeech|> <pad> <|endoftext|> <|startoftranscript|> <|pnc|> <|nopnc|>).
CANARY_SPECIAL = ["<|transcribe|>", "<|translate|>"]
CANARY2_SPECIAL = [
    "<|startofcontext|>",
    "<|itn|>",
    "<|noitn|>",
    "<|timestamp|>",
    "<|notimestamp|>",
    "<|diarize|>",
    "<|nodiarize|>",
    "<|spkchange|>",
    "<|emo:undefined|>",
    "<|emo:neutral|>",
    "<|emo:angry|>",
    "<|emo:happy|>",
    "<|emo:sad|>",
    # Frame offsets for word timestamps (canary-1b-flash has <|0|> ... <|N|>); a handful suffices.
    *(f"<|{i}|>" for i in range(40)),
]
# Tokens whose decoder embedding rows are made large so that the prompt changes the output.
PROMPT_TOKENS = [
    *(f"<|{lang}|>" for lang in LANGUAGES),
    "<|transcribe|>",
    "<|translate|>",
    "<|pnc|>",
    "<|nopnc|>",
    "<|itn|>",
    "<|noitn|>",
    "<|timestamp|>",
    "<|notimestamp|>",
    "<|diarize|>",
    "<|nodiarize|>",
]


# ---------------------------------------------------------------------------------------------
# Text corpus for the tokenizers


_EN_WORDS = (
    "the a one two three four five six seven eight nine ten hello world yes no stop go left "
    "right up down on off start pause play next back open close red green blue please thank "
    "you call send time today tomorrow morning evening house water music window table small "
    "large quick brown fox jumps over lazy dog station train ticket weather rain sun cold warm "
    "friend family number letter question answer speak listen write read"
).split()
_DE_WORDS = (
    "der die das ein eins zwei drei vier fünf sechs sieben acht neun zehn hallo welt ja nein "
    "halt los links rechts auf ab an aus start pause spielen weiter zurück öffnen schließen rot "
    "grün blau bitte danke du rufen senden zeit heute morgen abend haus wasser musik fenster "
    "tisch klein groß schnell braun fuchs springt über faul hund bahnhof zug fahrkarte wetter "
    "regen sonne kalt warm freund familie nummer brief frage antwort sprechen hören schreiben"
).split()


def corpus(lang: str, lines: int = 400) -> str:
    """A deterministic corpus of random sentences from a small word list."""
    words = {"en": _EN_WORDS, "de": _DE_WORDS}[lang]
    rng = random.Random(f"{SEED}-{lang}")
    out = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ""]))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Configs


def _preprocessor() -> dict[str, Any]:
    return {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": SAMPLE_RATE,
        "normalize": "per_feature",
        "window_size": 0.025,
        "window_stride": 0.01,
        "window": "hann",
        "features": 64,
        "n_fft": 512,
        "log": True,
        "frame_splicing": 1,
        "dither": 0.0,
        "pad_to": 0,
        "pad_value": 0.0,
    }


def _encoder() -> dict[str, Any]:
    return {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 64,
        "feat_out": -1,
        "n_layers": 2,
        "d_model": D_MODEL,
        "subsampling": "striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": 32,
        "causal_downsampling": False,
        "ff_expansion_factor": 2,
        "self_attention_model": "rel_pos",
        "n_heads": 4,
        "att_context_size": [-1, -1],
        "xscaling": True,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": 9,
        "conv_norm_type": "batch_norm",
        "conv_context_size": None,
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
    }


def _ctc_decoder() -> dict[str, Any]:
    return {
        "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
        "feat_in": D_MODEL,
        "num_classes": -1,
        "vocabulary": [],
    }


def _rnnt_parts(tdt: bool) -> dict[str, Any]:
    model_defaults: dict[str, Any] = {"enc_hidden": D_MODEL, "pred_hidden": 32, "joint_hidden": 32}
    joint: dict[str, Any] = {
        "_target_": "nemo.collections.asr.modules.RNNTJoint",
        "log_softmax": None,
        "preserve_memory": False,
        "fuse_loss_wer": True,
        "fused_batch_size": 4,
        "jointnet": {"joint_hidden": 32, "activation": "relu", "dropout": 0.0},
    }
    decoding: dict[str, Any] = {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}}
    loss: dict[str, Any] = {"loss_name": "default"}
    if tdt:
        model_defaults["tdt_durations"] = TDT_DURATIONS
        model_defaults["num_tdt_durations"] = len(TDT_DURATIONS)
        joint["num_extra_outputs"] = len(TDT_DURATIONS)
        decoding["model_type"] = "tdt"
        decoding["durations"] = TDT_DURATIONS
        loss = {
            "loss_name": "tdt",
            "tdt_kwargs": {
                "fastemit_lambda": 0.0,
                "clamp": -1.0,
                "durations": TDT_DURATIONS,
                "sigma": 0.02,
                "omega": 0.1,
            },
        }
    return {
        "model_defaults": model_defaults,
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "prednet": {"pred_hidden": 32, "pred_rnn_layers": 1, "t_max": None, "dropout": 0.0},
        },
        "joint": joint,
        "decoding": decoding,
        "loss": loss,
    }


def _base(tokenizer_dir: str) -> dict[str, Any]:
    return {
        "sample_rate": SAMPLE_RATE,
        "log_prediction": False,
        "tokenizer": {"dir": tokenizer_dir, "type": "bpe"},
        "preprocessor": _preprocessor(),
        "spec_augment": None,
        "encoder": _encoder(),
    }


def _ctc_cfg(tokenizer_dir: str) -> dict[str, Any]:
    return {
        **_base(tokenizer_dir),
        "decoder": _ctc_decoder(),
        "decoding": {"strategy": "greedy_batch"},
    }


def _rnnt_cfg(tokenizer_dir: str, tdt: bool) -> dict[str, Any]:
    return {**_base(tokenizer_dir), **_rnnt_parts(tdt), "compute_eval_loss": False}


def _hybrid_cfg(tokenizer_dir: str) -> dict[str, Any]:
    cfg = _rnnt_cfg(tokenizer_dir, tdt=True)
    cfg["aux_ctc"] = {
        "ctc_loss_weight": 0.3,
        "use_cer": False,
        "ctc_reduction": "mean_batch",
        "decoder": _ctc_decoder(),
        "decoding": {"strategy": "greedy_batch"},
    }
    return cfg


_TRANSFORMER_ENCODER = (
    "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder"
)
_SMOOTHED_CE = "nemo.collections.common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss"


def _canary_cfg(tokenizer_dirs: dict[str, str], prompt_format: str) -> dict[str, Any]:
    hidden = D_MODEL
    return {
        "sample_rate": SAMPLE_RATE,
        "prompt_format": prompt_format,
        # No prompt_defaults, on purpose: transcribe() must then be told the languages.
        "model_defaults": {
            "asr_enc_hidden": D_MODEL,
            "lm_enc_hidden": hidden,
            "lm_dec_hidden": hidden,
        },
        "tokenizer": {
            "dir": None,
            "type": "agg",
            "langs": {lang: {"dir": d, "type": "bpe"} for lang, d in tokenizer_dirs.items()},
            "custom_tokenizer": {
                "_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer",
            },
        },
        "preprocessor": _preprocessor(),
        "spec_augment": None,
        "encoder": _encoder(),
        "transf_encoder": {
            "_target_": _TRANSFORMER_ENCODER,
            "num_layers": 0,
            "hidden_size": hidden,
            "inner_size": hidden * 2,
            "num_attention_heads": 4,
        },
        "transf_decoder": {
            "_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer",
            "model_name": None,
            "pretrained": False,
            "encoder": False,
            "pre_ln_final_layer_norm": True,
            "config_dict": {
                "max_sequence_length": 256,
                "num_token_types": 0,
                "embedding_dropout": 0.0,
                "learn_positional_encodings": False,
                "hidden_size": hidden,
                "inner_size": hidden * 2,
                "num_layers": 2,
                "num_attention_heads": 4,
                "ffn_dropout": 0.0,
                "attn_score_dropout": 0.0,
                "attn_layer_dropout": 0.0,
                "hidden_act": "relu",
                "pre_ln": True,
                "vocab_size": None,
            },
        },
        "head": {
            "_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
            "num_layers": 1,
            "activation": "relu",
            "log_softmax": True,
            "hidden_size": hidden,
            "num_classes": None,
            "dropout": 0.0,
            "use_transformer_init": True,
        },
        "decoding": {
            "strategy": "beam",
            "return_best_hypothesis": True,
            "beam": {"beam_size": 1, "len_pen": 0.0, "max_generation_delta": 8},
        },
        "loss": {
            "_target_": _SMOOTHED_CE,
            "label_smoothing": 0.0,
            "pad_id": None,
        },
    }


def _vad_cfg() -> dict[str, Any]:
    return {
        "sample_rate": SAMPLE_RATE,
        "labels": ["0", "1"],
        "num_classes": 2,
        "preprocessor": _preprocessor(),
        "spec_augment": None,
        "encoder": _encoder(),
        "decoder": {
            "_target_": "nemo.collections.common.parts.MultiLayerPerceptron",
            "hidden_size": D_MODEL,
            "num_classes": -1,
            "num_layers": 1,
            "activation": "relu",
            "log_softmax": False,
        },
        "loss": {"_target_": "nemo.collections.common.losses.CrossEntropyLoss"},
    }


# ---------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back NeMo's and SentencePiece's chatter while building; replay it on failure.

    SentencePiece's C++ trainer logs straight to file descriptor 2, so that is redirected.
    """
    from nemo.utils import logging as nemo_logging

    level = nemo_logging.get_verbosity()
    nemo_logging.set_verbosity(nemo_logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            log.seek(0)
            os.write(2, log.read()[-20000:])
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            nemo_logging.set_verbosity(level)


def _train_tokenizer(out_dir: Path, lang: str) -> str:
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    text = out_dir / f"corpus-{lang}.txt"
    text.write_text(corpus(lang), encoding="utf-8")
    tok_dir = out_dir / f"tok-{lang}"
    create_spt_model(
        str(text),
        vocab_size=VOCAB_SIZE,
        sample_size=-1,
        do_lower_case=False,
        tokenizer_type="bpe",
        output_dir=str(tok_dir),
    )
    return str(tok_dir)


def _spl_tokenizer(out_dir: Path, canary2: bool) -> str:
    from nemo.collections.common.tokenizers.canary_tokenizer import CanaryTokenizer

    tok_dir = out_dir / "tok-spl_tokens"
    tokens = [
        *CANARY_SPECIAL,
        *(CANARY2_SPECIAL if canary2 else []),
        *(f"<|{x}|>" for x in LANGUAGES),
    ]
    CanaryTokenizer.build_special_tokenizer(tokens, tok_dir)
    return str(tok_dir)


def _seed() -> None:
    import numpy as np
    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


@contextlib.contextmanager
def _own_rng() -> Iterator[None]:
    """Leave the caller's random, numpy and torch generators as they were."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _wire_canary_prompt(model: Any) -> None:
    """Make a random-weight Canary listen to its prompt.

    With small random weights the decoder ignores its prompt: its token embeddings (std
    ``1/sqrt(d)``) are swamped by the sinusoidal position encodings, and every language and
    task decodes the same tokens. So, all with fixed seeds:

    1. the prompt tokens' embedding rows become large distinct random vectors
       (scale :data:`CANARY_PROMPT_SCALE`), so they dominate their position encoding;
    2. the first decoder layer's self-attention gets a query bias along the keys of the
       language tokens, so every position attends mostly to ``<|src|>`` and ``<|tgt|>``,
       and its output projection is amplified so what it reads dominates the residual
       (both alike, so en->de differs from en->en but hardly from de->en);
    3. the output layer (tied to the embedding, so it would now favour prompt tokens) gets
       a -1e4 bias on every ``spl_tokens`` id but ``<|endoftext|>``, on the ``<unk>`` pieces
       and on the padding rows beyond the vocabulary (NeMo rounds the output layer up to a
       multiple of 8; an id there makes decoding raise ``KeyError``), so the decoded text is
       always plain text of the languages.
    """
    import torch

    tok = model.tokenizer
    dec = model.transf_decoder
    emb = dec.embedding.token_embedding.weight
    layer = dec._decoder.layers[0]
    attn = layer.first_sub_layer
    bias = model.log_softmax.mlp.layer0.bias
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for token in PROMPT_TOKENS:
            if (idx := tok.special_tokens.get(token)) is not None:
                emb[idx] = torch.randn(emb.shape[1], generator=gen) * CANARY_PROMPT_SCALE
        langs = [tok.special_tokens[f"<|{lang}|>"] for lang in LANGUAGES]
        keys = attn.key_net(layer.layer_norm_1(dec.embedding.layer_norm(emb[langs])))
        direction = keys.sum(0)
        attn.query_net.bias.copy_(CANARY_ATTEND_LANG * direction / direction.norm())
        attn.out_projection.weight.mul_(CANARY_AMPLIFY)
        for idx in range(tok.vocab_size):
            if tok.langs_by_token_id[idx] == "spl_tokens" and idx != tok.eos_id:
                bias[idx] = -1e4
        for lang in LANGUAGES:  # each SentencePiece model's <unk> (its id 0)
            bias[tok.token_id_offset[lang]] = -1e4
        bias[tok.vocab_size :] = -1e4


def _make(family: str, work: Path) -> Any:
    from nemo.collections.asr.models import (
        EncDecCTCModelBPE,
        EncDecFrameClassificationModel,
        EncDecHybridRNNTCTCBPEModel,
        EncDecMultiTaskModel,
        EncDecRNNTBPEModel,
    )
    from omegaconf import OmegaConf

    if family in ("canary", "canary2"):
        dirs = {"spl_tokens": _spl_tokenizer(work, family == "canary2")}
        dirs.update({lang: _train_tokenizer(work, lang) for lang in LANGUAGES})
        cfg = OmegaConf.create(_canary_cfg(dirs, family))
        _seed()
        # A restore_from earlier in this process leaves its path in NeMo's global AppState
        # (its unpacked folder gone), and a new multitask model then looks there for a
        # timestamps model: TypeError. Building from config restores nothing: clear it.
        from nemo.utils.app_state import AppState

        AppState().model_restore_path = None
        model = EncDecMultiTaskModel(cfg=cfg)
        _wire_canary_prompt(model)
        return model
    if family == "unsupported":
        _seed()
        return EncDecFrameClassificationModel(cfg=OmegaConf.create(_vad_cfg()))

    tok = _train_tokenizer(work, "en")
    _seed()
    if family == "ctc":
        return EncDecCTCModelBPE(cfg=OmegaConf.create(_ctc_cfg(tok)))
    if family == "rnnt":
        return EncDecRNNTBPEModel(cfg=OmegaConf.create(_rnnt_cfg(tok, tdt=False)))
    if family == "tdt":
        return EncDecRNNTBPEModel(cfg=OmegaConf.create(_rnnt_cfg(tok, tdt=True)))
    if family == "hybrid":
        return EncDecHybridRNNTCTCBPEModel(cfg=OmegaConf.create(_hybrid_cfg(tok)))
    if family == "bad":
        return EncDecCTCModelBPE(cfg=OmegaConf.create(_bad_cfg(tok)))
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def _bad_cfg(tokenizer_dir: str) -> dict[str, Any]:
    """A CTC config whose preprocessor emits 80 mel bands to an encoder built for 64.

    Every module is consistent with its own saved weights, so ``restore_from`` succeeds;
    the first forward pass fails in the encoder's subsampling (a shape mismatch), whatever
    the audio.
    """
    cfg = _ctc_cfg(tokenizer_dir)
    cfg["preprocessor"]["features"] = 80
    return cfg


def cache_key(family: str) -> str:
    """A hash of everything a built file depends on: this module's source and the versions.

    Any edit to this file (a config, the corpus, the seed, the wiring) names new files.
    """
    from importlib.metadata import version

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    h = hashlib.sha256(Path(__file__).read_bytes())
    for dist in ("nemo_toolkit", "torch", "sentencepiece"):
        h.update(f"{dist}={version(dist)}".encode())
    h.update(family.encode())
    return h.hexdigest()[:16]


def build(family: str, out_dir: Path) -> Path:
    """Build (or reuse from ``out_dir``) the tiny model of ``family``; return its ``.nemo`` path.

    The file is ``out_dir/<family>-<cache_key>.nemo``; it is written under a temporary name
    and renamed, so concurrent builders (pytest-xdist workers) never see a partial file.
    """
    out_dir = Path(out_dir)
    path = out_dir / f"{family}-{cache_key(family)}.nemo"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{path.name}.{os.getpid()}.part"
    try:
        with tempfile.TemporaryDirectory(prefix=f"tiny-{family}-") as work, _quiet(), _own_rng():
            model = _make(family, Path(work))
            model.eval()
            model.save_to(str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def build_all(out_dir: Path) -> dict[str, Path]:
    """Every family's model, by family."""
    return {family: build(family, out_dir) for family in FAMILIES}


__all__ = ["FAMILIES", "LANGUAGES", "build", "build_all", "cache_key", "corpus"]
