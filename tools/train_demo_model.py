#!/usr/bin/env python
"""Train the 41-word demo NeMo ASR model from scratch, offline, on the CPU.

Steps: synthesise utterances with espeak-ng (see ``tools/demo_speech.py``) -- a
``--multi-share`` of them (default 45%) made of 2-4 separately spoken phrases of 1-4
words joined by 0.15-2.5 s silences, the rest 1-8 words spoken continuously; a
``--codec-share`` of them (default 30%) sent through one of the ``--codec-kinds`` round
trips of ``tools/codec_augment.py`` (default: 8-bit WAV only; also 8 kHz, Opus, MP3, AAC),
as uploads are -- write NeMo manifests, train a small QuartzNet-style character-CTC
``EncDecCTCModel``, evaluate WER on

  (a) held-out word sequences spoken by training voices (odd speeds/pitches),
  (b) held-out word sequences spoken by voices never used in training,
  (c) held-out multi-phrase utterances (silences between phrases), unseen voices, and
  (d) "long clips": up to 20 s of 6-8 held-out utterances (unseen voices) joined with
      0.4-2.0 s pauses -- what the server sends the model after slicing long audio,

and save the ``.nemo`` file.  Seeds are fixed; training stops after ``--epochs`` or
``--max-minutes``, whichever comes first; the cosine learning-rate schedule is
shortened on the fly so that it ends when the time budget does.

Usage (from the repository root)::

    .venv/bin/python tools/train_demo_model.py            # full run (~45 min, 2 cores)
    .venv/bin/python tools/train_demo_model.py --n-train 200 --epochs 1 \\
        --n-eval 20 --out /tmp/smoke.nemo                 # smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
import wave
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import codec_augment
import demo_speech as ds

REPO_ROOT = Path(__file__).resolve().parent.parent
LABELS = [" "] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["'"]

# (filters, repeat, kernel, stride, residual, separable) -- see DEMO_MODEL_NOTES.md
ENCODER_BLOCKS = [
    (128, 1, 11, 2, False, True),
    (128, 2, 11, 1, True, True),
    (128, 2, 13, 1, True, True),
    (192, 2, 15, 1, True, True),
    (192, 2, 17, 1, True, True),
    (192, 2, 19, 1, True, True),
    (256, 1, 21, 1, False, True),
    (256, 1, 1, 1, False, False),
]


# --------------------------------------------------------------------------- data
def _synth_job(job: dict) -> dict:
    path = job["audio_filepath"]
    if not (os.path.exists(path) and os.path.getsize(path) > 44):
        tmp = path + ".tmp.wav"
        common = {
            "gain_db": job.get("gain_db", -3.0),
            "noise_db": job.get("noise_db"),
            "pad": tuple(job.get("pad", (0.0, 0.0))),
            "seed": job.get("seed", 0),
        }
        if "phrases" in job:  # several phrases joined by silences
            ds.synthesize_phrases(
                job["phrases"], job["gaps"], job["voice"], job["speed"], job["pitch"], tmp, **common
            )
        else:
            ds.synthesize(job["text"], job["voice"], job["speed"], job["pitch"], tmp, **common)
        if job.get("degrade"):  # a codec or bandwidth round trip, as uploads go through
            degraded = path + ".deg.wav"
            codec_augment.degrade(tmp, degraded, job["degrade"])
            os.replace(degraded, tmp)
        os.replace(tmp, path)
    with wave.open(path, "rb") as w:
        duration = w.getnframes() / w.getframerate()
    return {"audio_filepath": path, "duration": round(duration, 4), "text": job["text"]}


def build_set(
    name: str,
    utts: list[dict],
    work_dir: Path,
    procs: int,
    augment_seed: int | None = None,
    codec_share: float = 0.0,
    codec_kinds: list[str] | None = None,
) -> Path:
    """Synthesise ``utts`` into work_dir/name/ and write work_dir/name.json (manifest)."""
    out_dir = work_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(augment_seed)
    jobs = []
    for i, u in enumerate(utts):
        job = dict(u, audio_filepath=str(out_dir / f"{i:06d}.wav"))
        if augment_seed is not None:  # mild, seeded variation for training audio
            job["gain_db"] = round(rng.uniform(-12.0, -1.0), 2)
            job["noise_db"] = round(rng.uniform(-70.0, -45.0), 1) if rng.random() < 0.5 else None
            job["pad"] = (round(rng.uniform(0.0, 0.3), 3), round(rng.uniform(0.0, 0.3), 3))
            job["seed"] = rng.randrange(2**31)
            # Uploads arrive as 8 kHz telephone audio, 8-bit WAV, Opus, MP3, AAC...
            if rng.random() < codec_share:
                job["degrade"] = rng.choice(sorted(codec_kinds or codec_augment.DEGRADATIONS))
        jobs.append(job)
    t0 = time.time()
    manifest = work_dir / f"{name}.json"
    rows = _map_to_manifest(_synth_job, jobs, procs, 16, manifest)
    hours = sum(r["duration"] for r in rows) / 3600
    print(
        f"[data] {name}: {len(rows)} utterances, {hours:.2f} h audio, {time.time() - t0:.0f} s",
        flush=True,
    )
    return manifest


def _map_to_manifest(
    fn, jobs: list[dict], procs: int, chunksize: int, manifest: Path
) -> list[dict]:
    """Run ``fn`` on every job in ``procs`` processes; write the rows as a NeMo manifest."""
    with ProcessPoolExecutor(max_workers=procs) as pool:
        rows = list(pool.map(fn, jobs, chunksize=chunksize))
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def concat_manifests(name: str, manifests: list[Path], work_dir: Path) -> Path:
    out = work_dir / f"{name}.json"
    out.write_text("".join(m.read_text() for m in manifests))
    return out


def _long_job(job: dict) -> dict:
    path = job["audio_filepath"]
    meta_path = path + ".json"
    if not (os.path.exists(path) and os.path.exists(meta_path)):
        tmp = path + ".tmp.wav"
        meta = ds.pause_joined_clip(
            job["utts"], tmp, max_seconds=20.0, gap=(0.4, 2.0), seed=job["seed"]
        )
        os.replace(tmp, path)
        Path(meta_path).write_text(json.dumps(meta))
    meta = json.loads(Path(meta_path).read_text())
    return {
        "audio_filepath": path,
        "duration": meta["duration"],
        "text": meta["text"],
        "utterances": meta["utterances"],
    }


def build_long_set(name: str, n: int, work_dir: Path, procs: int) -> Path:
    """``n`` pause-joined clips of <= 20 s: clip k joins up to 8 held-out utterances of one
    unseen voice (one speed and pitch) with 0.4-2.0 s pauses (what the server sends)."""
    out_dir = work_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for k in range(n):
        voice = ds.HELDOUT_VOICES[k % len(ds.HELDOUT_VOICES)]
        utts = ds.heldout_utterances(8, seed=1000 + k, voices=[voice])
        for u in utts[1:]:
            u["speed"], u["pitch"] = utts[0]["speed"], utts[0]["pitch"]
        jobs.append({"audio_filepath": str(out_dir / f"{k:06d}.wav"), "utts": utts, "seed": k})
    t0 = time.time()
    manifest = work_dir / f"{name}.json"
    rows = _map_to_manifest(_long_job, jobs, procs, 4, manifest)
    n_utts = sum(r["utterances"] for r in rows)
    print(
        f"[data] {name}: {len(rows)} clips of {n_utts} utterances "
        f"({min(r['utterances'] for r in rows)}-{max(r['utterances'] for r in rows)} per clip), "
        f"{sum(r['duration'] for r in rows) / 3600:.2f} h audio, {time.time() - t0:.0f} s",
        flush=True,
    )
    return manifest


# -------------------------------------------------------------------------- model
def model_config(
    train_manifest: str,
    val_manifest: str,
    batch_size: int,
    highfreq: float | None = None,
    noise_prob: float = 0.0,
    log_floor: float = 2**-24,
):
    from omegaconf import OmegaConf

    jasper = [
        {
            "filters": f,
            "repeat": r,
            "kernel": [k],
            "stride": [s],
            "dilation": [1],
            "dropout": 0.0,
            "residual": res,
            "separable": sep,
        }
        for f, r, k, s, res, sep in ENCODER_BLOCKS
    ]
    cfg: dict[str, Any] = {
        "sample_rate": ds.SAMPLE_RATE,
        "labels": LABELS,
        "train_ds": {
            "manifest_filepath": train_manifest,
            "sample_rate": ds.SAMPLE_RATE,
            "labels": LABELS,
            "batch_size": batch_size,
            "shuffle": True,
            "num_workers": 1,
            "pin_memory": False,
            "drop_last": False,
            "max_duration": 20.0,
            "trim_silence": False,
            "use_semi_sorted_batching": True,
            "randomization_factor": 0.1,
        },
        "validation_ds": {
            "manifest_filepath": val_manifest,
            "sample_rate": ds.SAMPLE_RATE,
            "labels": LABELS,
            "batch_size": batch_size,
            "shuffle": False,
            "num_workers": 0,
            "pin_memory": False,
        },
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": ds.SAMPLE_RATE,
            "normalize": "per_feature",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": 64,
            "n_fft": 512,
            # The mel filters stop below 4 kHz: an 8 kHz upload, resampled to 16 kHz,
            # then looks to the model like any other (None = up to 8 kHz).
            "highfreq": highfreq,
            # Added to each mel energy before the log. Well above NeMo's 2**-24 it hides
            # low-level noise (8-bit quantisation), but the features then change with the
            # input level, which per-feature normalisation otherwise cancels.
            "log_zero_guard_type": "add",
            "log_zero_guard_value": log_floor,
            "frame_splicing": 1,
            "dither": 1e-5,
            "pad_to": 16,
        },
        "spec_augment": {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": 2,
            "time_masks": 2,
            "freq_width": 12,
            "time_width": 0.05,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConvASREncoder",
            "feat_in": 64,
            "activation": "relu",
            "conv_mask": True,
            "jasper": jasper,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": ENCODER_BLOCKS[-1][0],
            "num_classes": len(LABELS),
            "vocabulary": LABELS,
        },
        "decoding": {"strategy": "greedy_batch"},
        "optim": {
            "name": "adamw",
            "lr": 3e-3,
            "betas": [0.9, 0.98],
            "weight_decay": 1e-3,
            "sched": {"name": "CosineAnnealing", "warmup_ratio": 0.05, "min_lr": 1e-5},
        },
    }
    if noise_prob:
        # Fresh white noise every epoch (-90..-46 dBFS), meant to make small perturbations
        # such as 8-bit quantisation (about -53 dBFS while speech plays) harmless.
        cfg["train_ds"]["augmentor"] = {
            "white_noise": {"prob": noise_prob, "min_level": -90, "max_level": -46}
        }
    return OmegaConf.create(cfg)


# ------------------------------------------------------------------------ metrics
def _edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _timestamps_ok(hyp, text: str, duration: float) -> bool:
    """One word entry per output word, in order, starts non-decreasing, inside the audio."""
    entries = (getattr(hyp, "timestamp", None) or {}).get("word", [])
    if [e["word"] for e in entries] != text.split():
        return False
    starts = [float(e["start"]) for e in entries]
    ends = [float(e["end"]) for e in entries]
    spans = list(zip(starts, ends, strict=True))
    return all(a <= b for a, b in itertools.pairwise(starts)) and all(
        0.0 <= s <= e <= duration + 0.05 for s, e in spans
    )


def evaluate(
    model, manifest: Path, label: str, batch_size: int = 16, timestamps: bool = False
) -> dict:
    rows = [json.loads(line) for line in open(manifest)]
    paths = [r["audio_filepath"] for r in rows]
    t0 = time.time()
    hyps = model.transcribe(
        paths, batch_size=batch_size, verbose=False, num_workers=0, timestamps=timestamps
    )
    elapsed = time.time() - t0
    errors = words = bad_ts = 0
    examples: list[dict] = []
    for row, hyp in zip(rows, hyps, strict=True):
        text = hyp.text if hasattr(hyp, "text") else str(hyp)
        ref, out = row["text"].split(), text.split()
        e = _edit_distance(ref, out)
        errors += e
        words += len(ref)
        if timestamps and not _timestamps_ok(hyp, text, row["duration"]):
            bad_ts += 1
        if e and len(examples) < 10:
            examples.append({"ref": row["text"], "hyp": text, "audio": row["audio_filepath"]})
    wer = errors / max(words, 1)
    joined = sum(r.get("utterances", 1) for r in rows)
    parts = f", {joined} joined utterances" if joined != len(rows) else ""
    ts = f", word timestamps bad in {bad_ts} clips" if timestamps else ""
    print(
        f"[eval] {label}: WER {100 * wer:.2f}% ({errors} errors / {words} words, "
        f"{len(rows)} clips{parts}, {elapsed:.1f} s{ts})",
        flush=True,
    )
    for ex in examples:
        print(f"[eval]   ref={ex['ref']!r} hyp={ex['hyp']!r}", flush=True)
    result = {
        "wer": wer,
        "errors": errors,
        "words": words,
        "utterances": len(rows),
        "joined_utterances": joined,
        "audio_hours": round(sum(r["duration"] for r in rows) / 3600, 3),
        "transcribe_s": round(elapsed, 2),
        "examples": examples,
    }
    if timestamps:
        result["timestamps_bad"] = bad_ts
    return result


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/demo_model_work", type=Path)
    p.add_argument("--out", type=Path, default=str(REPO_ROOT / "aiotranscribe/models/demo.nemo"))
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument(
        "--multi-share",
        type=float,
        default=0.45,
        help="share of training/validation utterances made of phrases joined by silences",
    )
    p.add_argument(
        "--n-val",
        type=int,
        default=100,
        help="validation utterances (held-out texts, training voices)",
    )
    p.add_argument(
        "--n-eval", type=int, default=300, help="utterances in each of the two plain eval sets"
    )
    p.add_argument(
        "--n-multi-eval", type=int, default=200, help="multi-phrase eval utterances (unseen voices)"
    )
    p.add_argument("--n-long", type=int, default=40, help="pause-joined <=20 s eval clips")
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--max-minutes", type=float, default=42.0, help="training time budget")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val-every", type=int, default=4, help="validate every N epochs")
    p.add_argument("--procs", type=int, default=2, help="processes for audio synthesis")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for training")
    p.add_argument(
        "--eval-threads",
        type=int,
        default=1,
        help="torch CPU threads for evaluation (1 is much faster on a busy small CPU)",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--noise-prob",
        type=float,
        default=0.0,
        help="share of training utterances given fresh white noise each epoch (0 = off)",
    )
    p.add_argument(
        "--highfreq",
        type=float,
        default=3800.0,
        help="top of the mel filterbank in Hz; below 4 kHz so that 8 kHz (telephone-band) "
        "uploads look like 16 kHz ones to the model (0 = up to 8 kHz)",
    )
    p.add_argument(
        "--log-floor",
        type=float,
        default=2**-24,
        help="mel energy added before the log (default: NeMo's 2**-24). 3e-5 hid most "
        "8-bit quantisation noise but made the model sensitive to input level "
        "(one-channel stereo, Opus): see DEMO_MODEL.md",
    )
    p.add_argument(
        "--codec-share",
        type=float,
        default=0.3,
        help="share of training utterances sent through a --codec-kinds round trip before "
        "training (0 = off)",
    )
    p.add_argument(
        "--codec-kinds",
        type=lambda s: s.split(","),
        default=["u8"],
        help="comma-separated round trips for --codec-share to draw from, of "
        f"{','.join(sorted(codec_augment.DEGRADATIONS))} (default: u8, the format the model "
        "was unstable under without it; all six, tried once, did not fix it)",
    )
    args = p.parse_args(argv)
    args.highfreq = args.highfreq or None
    unknown = set(args.codec_kinds or ()) - set(codec_augment.DEGRADATIONS)
    if unknown:
        p.error(f"unknown --codec-kinds: {sorted(unknown)}")

    missing = ds.missing_voices(ds.TRAIN_VOICES + ds.HELDOUT_VOICES)
    if missing:
        sys.exit(f"espeak-ng lacks these voices: {missing}")

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    # Seeds 1/2/3 for the evaluation sets; heldout texts never overlap training texts.
    n_multi = round(args.n_train * args.multi_share)
    n_plain = args.n_train - n_multi
    # The plain part is a prefix of the all-plain list (same files as an all-plain run).
    codec = ""
    if args.codec_share:
        codec = f"_codec{round(args.codec_share * 100)}" + "".join(
            f"_{k}" for k in sorted(args.codec_kinds or ())
        )
    plain_m = build_set(
        f"train{args.n_train}{codec}",
        ds.training_utterances(args.n_train, seed=args.seed)[:n_plain],
        work,
        args.procs,
        augment_seed=args.seed,
        codec_share=args.codec_share,
        codec_kinds=args.codec_kinds,
    )
    multi_m = build_set(
        f"train_multi{n_multi}{codec}",
        ds.multi_phrase_utterances(n_multi, seed=args.seed),
        work,
        args.procs,
        augment_seed=args.seed + 1,
        codec_share=args.codec_share,
        codec_kinds=args.codec_kinds,
    )
    train_m = concat_manifests(f"train{args.n_train}_mix{n_multi}", [plain_m, multi_m], work)
    n_val_multi = round(args.n_val * args.multi_share)
    val_m = concat_manifests(
        f"val{args.n_val}_mix{n_val_multi}",
        [
            build_set(
                f"val{args.n_val - n_val_multi}",
                ds.heldout_utterances(args.n_val - n_val_multi, seed=3, voices=ds.TRAIN_VOICES),
                work,
                args.procs,
            ),
            build_set(
                f"val_multi{n_val_multi}",
                ds.multi_phrase_utterances(
                    n_val_multi, seed=3, voices=ds.TRAIN_VOICES, heldout=True
                ),
                work,
                args.procs,
            ),
        ],
        work,
    )
    seen_m = build_set(
        f"heldout_seen{args.n_eval}",
        ds.heldout_utterances(args.n_eval, seed=1, voices=ds.TRAIN_VOICES),
        work,
        args.procs,
    )
    unseen_m = build_set(
        f"heldout_unseen{args.n_eval}", ds.heldout_utterances(args.n_eval, seed=2), work, args.procs
    )
    multi_eval_m = build_set(
        f"heldout_multi_unseen{args.n_multi_eval}",
        ds.multi_phrase_utterances(
            args.n_multi_eval, seed=2, voices=ds.HELDOUT_VOICES, heldout=True
        ),
        work,
        args.procs,
    )
    long_m = build_long_set(f"long_unseen{args.n_long}", args.n_long, work, args.procs)
    data_s = time.time() - t_start

    t_import = time.time()
    import lightning.pytorch as pl
    import torch
    from nemo.collections.asr.models import EncDecCTCModel
    from omegaconf import open_dict

    print(f"[setup] import nemo: {time.time() - t_import:.1f} s", flush=True)

    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True)

    class EpochLog(pl.Callback):
        def __init__(self):
            self.t0 = time.time()

        def on_train_start(self, trainer, module):
            self.t0 = time.time()

        def on_train_epoch_end(self, trainer, module):
            m = trainer.callback_metrics
            loss = float(m["train_loss"]) if "train_loss" in m else float("nan")
            val = ""
            if (trainer.current_epoch + 1) % args.val_every == 0 and "val_wer" in m:
                val = f" val_wer {100 * float(m['val_wer']):.2f}%"
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            print(
                f"[train] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
                f"loss {loss:.3f}{val} lr {lr:.2e} step {trainer.global_step} "
                f"elapsed {(time.time() - self.t0) / 60:.2f} min",
                flush=True,
            )

    class FitScheduleToBudget(pl.Callback):
        """Shorten the cosine LR schedule so that it ends when --max-minutes runs out.

        The schedule is set up for --epochs; on a slow (shared) CPU the time budget
        would cut training at a high learning rate.  From the measured pace (validation
        included) project the steps that fit and end the cosine there instead.
        """

        def __init__(self, budget_s: float):
            self.budget_s = budget_s
            self.t0 = time.time()
            self.planned: int | None = None

        def on_train_start(self, trainer, module):
            self.t0 = time.time()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            step = trainer.global_step
            if step < 50 or not trainer.lr_scheduler_configs:
                return
            sched = trainer.lr_scheduler_configs[0].scheduler
            if self.planned is None:
                self.planned = sched.max_steps
            projected = int(step * self.budget_s / max(time.time() - self.t0, 1e-3))
            new = max(min(self.planned, projected), sched.warmup_steps + 1, step + 1)
            sched.max_steps = new
            sched.decay_steps = new - (sched.constant_steps + sched.warmup_steps)

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        max_time={"minutes": args.max_minutes},
        gradient_clip_val=1.0,
        check_val_every_n_epoch=args.val_every,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        callbacks=[EpochLog(), FitScheduleToBudget(0.97 * 60 * args.max_minutes)],
    )
    cfg = model_config(
        str(train_m), str(val_m), args.batch_size, args.highfreq, args.noise_prob, args.log_floor
    )
    model = EncDecCTCModel(cfg=cfg, trainer=trainer)  # trainer needed by the LR schedule
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[setup] parameters: {n_params:,}", flush=True)

    t_train = time.time()
    trainer.fit(model)
    train_s = time.time() - t_train
    epochs_done = trainer.current_epoch
    print(f"[train] done: {epochs_done} epochs in {train_s / 60:.1f} min", flush=True)

    # Save without machine-specific paths in the config.
    model.eval()
    with open_dict(model.cfg):
        for key in ("train_ds", "validation_ds"):
            model.cfg[key].manifest_filepath = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save_to(str(args.out))
    size = args.out.stat().st_size
    print(f"[save] {args.out} ({size / 1e6:.2f} MB)", flush=True)

    # Evaluate the saved artifact as a user would load it.
    torch.set_num_threads(args.eval_threads)
    restored = EncDecCTCModel.restore_from(str(args.out), map_location="cpu")
    restored.preprocessor.featurizer.dither = 0.0
    restored.eval()
    seen = evaluate(restored, seen_m, "held-out texts, training voices")
    restored.eval()
    unseen = evaluate(restored, unseen_m, "held-out texts, unseen voices")
    restored.eval()
    multi = evaluate(restored, multi_eval_m, "held-out multi-phrase (silences), unseen voices")
    restored.eval()
    long = evaluate(
        restored, long_m, "pause-joined <=20 s clips, unseen voices", batch_size=8, timestamps=True
    )

    result = {
        "parameters": n_params,
        "epochs": epochs_done,
        "n_train": args.n_train,
        "train_minutes": round(train_s / 60, 2),
        "data_minutes": round(data_s / 60, 2),
        "nemo_bytes": size,
        "heldout_seen_voices": seen,
        "heldout_unseen_voices": unseen,
        "heldout_multi_phrase_unseen_voices": multi,
        "long_pause_joined_unseen_voices": long,
        "n_train_multi_phrase": n_multi,
        "out": str(args.out),
        "argv": sys.argv,
    }
    (work / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"[result] parameters {n_params:,}; training {train_s / 60:.1f} min "
        f"({epochs_done} epochs); .nemo {size / 1e6:.2f} MB; "
        f"WER seen voices {100 * seen['wer']:.2f}%, unseen voices {100 * unseen['wer']:.2f}%, "
        f"multi-phrase {100 * multi['wer']:.2f}%, long clips {100 * long['wer']:.2f}%",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
