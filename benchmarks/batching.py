"""Batching choices measured through the real ``InferencePool`` and a compute-heavy model.

Each experiment runs one workload (jobs of given slice lengths, arriving at given times)
under each choice, interleaved, ``--reps`` times; it prints medians and each choice's ratio
to the first one. Slices are submitted to the pool directly (no HTTP, no ffmpeg), so what
differs is only how batches are formed.

- like lengths: 2 long jobs (20-s slices) and 12 clips (2-6 s) at once: batches in
  round-robin order, sorted by closeness in length, and sorted with ``min_fill`` 0.5, 0.75
  and 0.9 (a slice under that share of the batch's longest waits for a batch of its own
  size); and 16
  uploads of 5-19 s at once (``make bench``'s P2 files) with ``min_fill`` 0.5, 0.75, 0.9.
- audio bound: 4 long jobs, ``max_batch_audio_s`` none, 80 s and 40 s (padded).
- fill wait: 24 three-second clips arriving every 3 ms on an idle worker, and one clip
  alone, ``max_batch_wait_ms`` 0, 5 and 50.
- ramp: one 150-s job alone (8 slices, default settings) with and without the ramp
  (1, 2, 4... slices of a new job per batch), and 4 long jobs with 12 clips.
- workers (``--workers-experiment``): 4 long jobs and 12 clips on one worker process with
  N torch threads against N worker processes with one thread each.

Run: .venv/bin/python benchmarks/batching.py [--model bench|demo|PATH] [--reps 3]
(``bench``: the FastConformer of ``bench_model.py``, ~3 s per audio minute on one core.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiotranscribe.jobs import Job  # noqa: E402
from aiotranscribe.logsetup import configure_logging  # noqa: E402
from aiotranscribe.pool import MIN_FILL_CPU, InferencePool  # noqa: E402
from aiotranscribe.store import MemoryStore  # noqa: E402
from aiotranscribe.workers import Worker, make_worker  # noqa: E402

RATE = 16000


@dataclass
class Spec:
    """A job of the workload: when it arrives and its slice lengths (seconds)."""

    kind: str
    arrive_s: float
    slices: list[float]


@dataclass
class Choice:
    name: str
    knobs: dict[str, Any] = field(default_factory=dict)


class CountingWorker:
    """The real worker, recording each call's slices and padded length."""

    def __init__(self, inner: Worker) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int, int]] = []  # (slices, longest, total frames)

    @property
    def pid(self) -> int | None:
        return self.inner.pid

    async def load(self) -> dict[str, Any]:
        return await self.inner.load()

    async def transcribe(
        self, slices: list[tuple[str, int, int]], options: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        frames = [n for _, _, n in slices]
        self.calls.append((len(frames), max(frames), sum(frames)))
        return await self.inner.transcribe(slices, options)

    async def stop(self, timeout: float = 5.0) -> None:
        await self.inner.stop(timeout)


class AllCalls:
    """The calls of every worker of a pool, as one ``CountingWorker``-like record."""

    def __init__(self, workers: list[CountingWorker]) -> None:
        self.workers = workers

    @property
    def calls(self) -> list[tuple[int, int, int]]:
        return [c for w in self.workers for c in w.calls]

    def clear(self) -> None:
        for w in self.workers:
            w.calls.clear()


def write_noise(path: Path, seconds: float) -> Path:
    """Speech-like loudness (bursts and pauses); the model's weights are random anyway."""
    rng = random.Random(7)
    import numpy as np

    out = np.zeros(int(seconds * RATE), dtype=np.float32)
    gen = np.random.default_rng(7)
    t = 0
    while t < len(out):
        burst = int(rng.uniform(0.3, 2.0) * RATE)
        out[t : t + burst] = gen.standard_normal(min(burst, len(out) - t)) * 0.2
        t += burst + int(rng.uniform(0.2, 0.8) * RATE)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes((np.clip(out, -1, 1) * 32767).astype("<i2").tobytes())
    return path


async def run_once(
    pool: InferencePool, worker: AllCalls, wav: Path, specs: list[Spec], tag: str
) -> dict[str, Any]:
    """Submit the workload; returns wall time, per-kind latencies and batch shapes."""
    store = pool.store
    with wave.open(str(wav)) as w:
        total_frames = w.getnframes()
    rng = random.Random(tag)
    worker.clear()
    latencies: dict[str, list[float]] = {}
    first: dict[str, list[float]] = {}
    t0 = time.perf_counter()

    async def job(n: int, spec: Spec) -> None:
        await asyncio.sleep(max(0.0, t0 + spec.arrive_s - time.perf_counter()))
        job_id = f"{tag}-{n}"
        slices = []
        for seconds in spec.slices:
            frames = int(seconds * RATE)
            slices.append((rng.randrange(0, total_frames - frames), frames))
        await store.create(Job(id=job_id, filename="x.wav", model=pool.name), [])
        await store.add_slices(job_id, slices, [])
        arrived = time.perf_counter()
        futures = pool.submit(
            job_id, [(i, str(wav), s, f) for i, (s, f) in enumerate(slices)], None
        )
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        first.setdefault(spec.kind, []).append(time.perf_counter() - arrived)
        await asyncio.gather(*futures)
        latencies.setdefault(spec.kind, []).append(time.perf_counter() - arrived)

    await asyncio.gather(*(job(n, s) for n, s in enumerate(specs)))
    wall = time.perf_counter() - t0
    audio = sum(sum(s.slices) for s in specs)
    padded = sum(n * longest for n, longest, _ in worker.calls) / RATE
    return {
        "wall_s": wall,
        "audio_per_s": audio / wall,
        "padding": padded / audio - 1,
        "batches": len(worker.calls),
        "mean_batch": statistics.mean(n for n, _, _ in worker.calls),
        **{f"{k}_latency_s": statistics.median(v) for k, v in latencies.items()},
        **{f"{k}_first_s": statistics.median(v) for k, v in first.items()},
    }


def long_jobs(n: int, slices: int = 6, at: float = 0.0) -> list[Spec]:
    return [Spec("long", at, [20.0 - 0.3 * (i % 3)] * slices) for i in range(n)]


def clips(
    n: int, seed: int, every_s: float = 0.0, low: float = 2.0, high: float = 6.0
) -> list[Spec]:
    rng = random.Random(seed)
    return [Spec("clip", i * every_s, [rng.uniform(low, high)]) for i in range(n)]


EXPERIMENTS: list[tuple[str, list[Spec], list[Choice]]] = [
    (
        "like lengths",
        long_jobs(2) + clips(12, 1, every_s=0.01),
        [
            Choice("round-robin", {"by_length": False, "min_fill": 0.0}),
            Choice("sorted by length", {"by_length": True, "min_fill": 0.0}),
            Choice("sorted, min_fill 0.5", {"by_length": True, "min_fill": 0.5}),
            Choice("sorted, min_fill 0.75", {"by_length": True, "min_fill": 0.75}),
            Choice("sorted, min_fill 0.9", {"by_length": True, "min_fill": 0.9}),
        ],
    ),
    (
        "like lengths, 16 uploads of 5-19 s",
        clips(16, 3, low=5.0, high=19.0),
        [
            Choice("round-robin", {"by_length": False, "min_fill": 0.0}),
            Choice("min_fill 0.5", {"min_fill": 0.5}),
            Choice("min_fill 0.75", {"min_fill": 0.75}),
            Choice("min_fill 0.9", {"min_fill": 0.9}),
        ],
    ),
    (
        "audio bound",
        long_jobs(4),
        [
            Choice("no bound", {"max_batch_audio_s": None}),
            Choice("80 s", {"max_batch_audio_s": 80.0}),
            Choice("40 s", {"max_batch_audio_s": 40.0}),
        ],
    ),
    (
        "fill wait",
        [Spec("clip", i * 0.003, [3.0]) for i in range(24)],
        [
            Choice("0 ms", {"max_batch_wait_s": 0.0}),
            Choice("5 ms", {"max_batch_wait_s": 0.005}),
            Choice("50 ms", {"max_batch_wait_s": 0.05}),
        ],
    ),
    (
        "fill wait, one clip alone",
        [Spec("clip", 0.0, [3.0])],
        [
            Choice("0 ms", {"max_batch_wait_s": 0.0}),
            Choice("5 ms", {"max_batch_wait_s": 0.005}),
            Choice("50 ms", {"max_batch_wait_s": 0.05}),
        ],
    ),
    (
        "ramp, one 150-s job",
        [Spec("long", 0.0, [18.75] * 8)],
        [Choice("no ramp", {"ramp": False}), Choice("ramp", {"ramp": True})],
    ),
    (
        "ramp, 4 long + 12 clips",
        long_jobs(4) + clips(12, 2, every_s=0.01),
        [Choice("no ramp", {"ramp": False}), Choice("ramp", {"ramp": True})],
    ),
]
DEFAULTS = {
    "by_length": True,
    "min_fill": MIN_FILL_CPU,
    "ramp": True,
    "max_batch_audio_s": None,
    "max_batch_wait_s": 0.005,
}


def model_path(name: str) -> str:
    if name == "bench":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import bench_model  # type: ignore[import-not-found]

        return str(bench_model.build("bench", "ctc"))
    return name


async def start_pool(
    spec: str, executor: str, workers: int, threads: int, batch_size: int
) -> tuple[InferencePool, list[CountingWorker]]:
    holder: list[CountingWorker] = []

    def factory(device: str) -> Worker:
        holder.append(CountingWorker(make_worker(executor, spec, device, threads)))
        return holder[-1]

    store = MemoryStore()
    await store.open()
    pool = InferencePool("bench", factory, store, devices=("cpu",) * workers, batch_size=batch_size)
    for name, value in DEFAULTS.items():
        setattr(pool, name, value)
    pool.start()
    while any(lane.state == "loading" for lane in pool.lanes):
        await asyncio.sleep(0.1)
    if any(lane.state != "ready" for lane in pool.lanes):
        raise SystemExit(f"model did not load: {pool.error}")
    return pool, holder


async def workers_experiment(spec: str, args: argparse.Namespace, wav: Path) -> dict[str, Any]:
    n = args.workers_experiment
    specs = long_jobs(4) + clips(12, 2, every_s=0.01)
    setups = {f"1 worker x {n} threads": (1, n), f"{n} workers x 1 thread": (n, 1)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in setups}
    for name, (workers, threads) in setups.items():
        pool, holder = await start_pool(spec, "process", workers, threads, args.batch_size)
        calls = AllCalls(holder)
        await run_once(pool, calls, wav, clips(4, 9), f"warm-{name}")
        for rep in range(args.reps):
            tag = f"workers-{name}-{rep}"
            runs[name].append(await run_once(pool, calls, wav, specs, tag))
        await pool.close()
        await pool.store.close()
    results = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    print_experiment(f"workers, {n} cores' worth", results, args.reps)
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("console", "warning")  # no line per batch
    spec = model_path(args.model)
    pool, holder = await start_pool(spec, "thread", 1, args.threads, args.batch_size)
    calls = AllCalls(holder)
    report: dict[str, Any] = {
        "model": spec,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
        "experiments": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        wav = write_noise(Path(tmp) / "noise.wav", 300.0)
        await run_once(pool, calls, wav, clips(4, 9), "warm")  # warm-up
        for title, specs, choices in EXPERIMENTS:
            if args.only and args.only not in title:
                continue
            runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in choices}
            for rep in range(args.reps):
                for choice in choices:
                    for name, value in {**DEFAULTS, **choice.knobs}.items():
                        setattr(pool, name, value)
                    tag = f"{title}-{choice.name}-{rep}"
                    runs[choice.name].append(await run_once(pool, calls, wav, specs, tag))
            report["experiments"][title] = {
                name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                for name, rs in runs.items()
            }
            print_experiment(title, report["experiments"][title], args.reps)
        await pool.close()
        await pool.store.close()
        if args.workers_experiment:
            report["experiments"]["workers"] = await workers_experiment(spec, args, wav)
    return report


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def print_experiment(title: str, results: dict[str, dict[str, float]], reps: int) -> None:
    names = list(results)
    base = results[names[0]]
    print(f"\n## {title} (medians of {reps})", flush=True)
    keys = [k for k in base if k not in ("batches",)]
    print("| choice | " + " | ".join(keys) + " | batches | throughput ratio |")
    print("|---" * (len(keys) + 3) + "|")
    for name in names:
        row = results[name]
        cells = [f"{row[k]:.3f}" for k in keys]
        ratio = row["audio_per_s"] / base["audio_per_s"]
        print(f"| {name} | " + " | ".join(cells) + f" | {row['batches']:.0f} | {ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bench", help="bench, demo or a .nemo path")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the medians here")
    parser.add_argument("--only", help="run only the experiments whose title contains this")
    parser.add_argument(
        "--workers-experiment",
        type=int,
        default=0,
        metavar="N",
        help="also compare 1 worker x N threads with N worker processes x 1 thread",
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    report = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
