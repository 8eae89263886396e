#!/usr/bin/env python
"""Train the 41-word demo NeMo ASR model from scratch, offline, on the CPU.

Steps: synthesise utterances of 1-8 vocabulary words with espeak-ng (see
``tools/demo_speech.py``), write NeMo manifests, train a small QuartzNet-style
character-CTC ``EncDecCTCModel``, evaluate WER on

  (a) held-out word sequences spoken by training voices (odd speeds/pitches), and
  (b) held-out word sequences spoken by voices never used in training,

and save the ``.nemo`` file.  Seeds are fixed; training stops after ``--epochs`` or
``--max-minutes``, whichever comes first.

Usage (from the repository root)::

    .venv/bin/python tools/train_demo_model.py            # full run (~30 min, 2 cores)
    .venv/bin/python tools/train_demo_model.py --n-train 200 --epochs 1 \\
        --n-eval 20 --out /tmp/smoke.nemo                 # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import wave
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
        ds.synthesize(
            job["text"],
            job["voice"],
            job["speed"],
            job["pitch"],
            tmp,
            gain_db=job.get("gain_db", -3.0),
            noise_db=job.get("noise_db"),
            pad=tuple(job.get("pad", (0.0, 0.0))),
            seed=job.get("seed", 0),
        )
        os.replace(tmp, path)
    with wave.open(path, "rb") as w:
        duration = w.getnframes() / w.getframerate()
    return {"audio_filepath": path, "duration": round(duration, 4), "text": job["text"]}


def build_set(
    name: str, utts: list[dict], work_dir: Path, procs: int, augment_seed: int | None = None
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
        jobs.append(job)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=procs) as pool:
        rows = list(pool.map(_synth_job, jobs, chunksize=16))
    manifest = work_dir / f"{name}.json"
    with open(manifest, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    hours = sum(r["duration"] for r in rows) / 3600
    print(
        f"[data] {name}: {len(rows)} utterances, {hours:.2f} h audio, {time.time() - t0:.0f} s",
        flush=True,
    )
    return manifest


# -------------------------------------------------------------------------- model
def model_config(train_manifest: str, val_manifest: str, batch_size: int):
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
    cfg = {
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


def evaluate(model, manifest: Path, label: str, batch_size: int = 16) -> dict:
    rows = [json.loads(line) for line in open(manifest)]
    paths = [r["audio_filepath"] for r in rows]
    t0 = time.time()
    hyps = model.transcribe(paths, batch_size=batch_size, verbose=False, num_workers=0)
    elapsed = time.time() - t0
    errors = words = 0
    examples: list[dict] = []
    for row, hyp in zip(rows, hyps, strict=True):
        text = hyp.text if hasattr(hyp, "text") else str(hyp)
        ref, out = row["text"].split(), text.split()
        e = _edit_distance(ref, out)
        errors += e
        words += len(ref)
        if e and len(examples) < 10:
            examples.append({"ref": row["text"], "hyp": text, "audio": row["audio_filepath"]})
    wer = errors / max(words, 1)
    print(
        f"[eval] {label}: WER {100 * wer:.2f}% ({errors} errors / {words} words, "
        f"{len(rows)} utterances, {elapsed:.1f} s)",
        flush=True,
    )
    for ex in examples:
        print(f"[eval]   ref={ex['ref']!r} hyp={ex['hyp']!r}", flush=True)
    return {
        "wer": wer,
        "errors": errors,
        "words": words,
        "utterances": len(rows),
        "transcribe_s": round(elapsed, 2),
        "examples": examples,
    }


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/demo_model_work", type=Path)
    p.add_argument("--out", type=Path, default=str(REPO_ROOT / "aiotranscribe/models/demo.nemo"))
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument(
        "--n-val",
        type=int,
        default=100,
        help="validation utterances (held-out texts, training voices)",
    )
    p.add_argument(
        "--n-eval", type=int, default=300, help="utterances in each of the two evaluation sets"
    )
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--max-minutes", type=float, default=35.0, help="training time budget")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val-every", type=int, default=4, help="validate every N epochs")
    p.add_argument("--procs", type=int, default=2, help="processes for audio synthesis")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    missing = ds.missing_voices(ds.TRAIN_VOICES + ds.HELDOUT_VOICES)
    if missing:
        sys.exit(f"espeak-ng lacks these voices: {missing}")

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    # Seeds 1/2/3 for the evaluation sets; heldout texts never overlap training texts.
    train_m = build_set(
        f"train{args.n_train}",
        ds.training_utterances(args.n_train, seed=args.seed),
        work,
        args.procs,
        augment_seed=args.seed,
    )
    val_m = build_set(
        f"val{args.n_val}",
        ds.heldout_utterances(args.n_val, seed=3, voices=ds.TRAIN_VOICES),
        work,
        args.procs,
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
            print(
                f"[train] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
                f"loss {loss:.3f}{val} elapsed {(time.time() - self.t0) / 60:.2f} min",
                flush=True,
            )

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
        callbacks=[EpochLog()],
    )
    cfg = model_config(str(train_m), str(val_m), args.batch_size)
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
    restored = EncDecCTCModel.restore_from(str(args.out), map_location="cpu")
    restored.preprocessor.featurizer.dither = 0.0
    restored.eval()
    seen = evaluate(restored, seen_m, "held-out texts, training voices")
    restored.eval()
    unseen = evaluate(restored, unseen_m, "held-out texts, unseen voices")

    result = {
        "parameters": n_params,
        "epochs": epochs_done,
        "n_train": args.n_train,
        "train_minutes": round(train_s / 60, 2),
        "data_minutes": round(data_s / 60, 2),
        "nemo_bytes": size,
        "heldout_seen_voices": seen,
        "heldout_unseen_voices": unseen,
        "out": str(args.out),
        "argv": sys.argv,
    }
    (work / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"[result] parameters {n_params:,}; training {train_s / 60:.1f} min "
        f"({epochs_done} epochs); .nemo {size / 1e6:.2f} MB; "
        f"WER seen voices {100 * seen['wer']:.2f}%, unseen voices {100 * unseen['wer']:.2f}%",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
