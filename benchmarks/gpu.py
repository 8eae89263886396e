"""The GPU run of issue 13: a parakeet-sized FastConformer-TDT, offline and through the server.

Builds a FastConformer-TDT of parakeet-tdt-0.6b-v2's shape (``bench_model.py --size
parakeet``: ~0.6 B parameters, random weights, nothing downloaded) on the device, then:

1. offline RTFx (audio seconds per wall second) of ``model.transcribe`` at batch 1, 8, 32
   and 128 over the same files, in this process, at ``--precision`` (autocast);
2. RTFx through ``aiotranscribe serve`` (a subprocess on the same device, ``--batch-size``
   the best offline batch up to 64) with 16 and 64 concurrent clients, each posting its
   share of the files to ``POST /transcribe`` one after another;
3. the ratio of each server figure to the best offline one.

The files are speech-like synthetic audio (noise bursts and pauses, 5-25 s each): a
random-weight model transcribes noise as fast as speech, and no espeak is needed. Published
anchor: parakeet-tdt-0.6b-v2 offline RTFx ~3,380 at batch 128 (bf16, trained weights; our
blank is calibrated to emit as many tokens as speech would).

Run through ``benchmarks/gpu.sh``. Smoke test on any CPU:
    .venv/bin/python benchmarks/gpu.py --size tiny --device cpu --files 8 --batch-sizes 1,4 \\
        --clients 2,4 --reps 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import bench_model
from _common import ROOT, Server, median
from bench import workload

PRECISIONS = ("fp32", "bf16", "fp16")


def make_files(count: int, out: Path, seed: int = 7) -> list[Path]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        seconds = float(rng.uniform(5, 25))
        samples = bench_model.synthetic_speech(seconds, seed=seed * 1000 + i)
        files.append(bench_model.write_wav(out / f"f{i:03d}.wav", samples))
    return files


def offline(
    path: Path, device: str, files: list[Path], batches: list[int], reps: int, precision: str
) -> tuple[dict[int, float], int]:
    """Median seconds per batch size for all ``files``, and the parameter count."""
    import torch

    model = bench_model.load(path, device)
    audio = [bench_model.read_wav(f) for f in files]
    on_cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (
        torch.autocast("cuda" if on_cuda else "cpu", dtype=dtype)
        if dtype
        else contextlib.nullcontext()
    )
    with autocast:
        times = bench_model.direct(model, audio, batches, reps, sync=sync)
    count = bench_model.parameters(model)
    del model
    if on_cuda:
        torch.cuda.empty_cache()
    return {b: median(t) for b, t in times.items()}, count


def server_has(flag: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "aiotranscribe", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return flag in out.stdout


async def served(
    path: Path, flags: list[str], files: list[Path], clients: list[int], reps: int
) -> dict[int, float]:
    """Median seconds for ``clients`` clients to get every file transcribed."""
    out: dict[int, float] = {}
    with Server(*flags, model=f"bench={path}") as server:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            await server.wait_ready(session, timeout=900)
            await workload(session, server.url, files[: max(clients)], max(clients))  # warm-up
            for n in clients:
                runs = [await workload(session, server.url, files, n) for _ in range(reps)]
                out[n] = median(runs)
                print(f"server, {n} clients: {[round(r, 2) for r in runs]} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(bench_model.SIZES), default="parakeet")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (smoke test)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--files", type=int, default=256, help="synthetic files, 5-25 s each")
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--clients", default="16,64")
    parser.add_argument("--reps", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--server-batch-size", type=int, help="default: best offline, <= 64")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra serve flag (repeatable)"
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    clients = [int(c) for c in args.clients.split(",")]

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("CUDA is not available to this torch: install a CUDA build, or --device cpu")
    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    )
    precision = args.precision
    server_flags = ["--device", args.device, "--executor", "process", *args.server_arg]
    if precision != "fp32":
        if server_has("--precision"):
            server_flags += ["--precision", precision]
        else:
            print(f"this server has no --precision: measuring fp32 on both sides, not {precision}")
            precision = "fp32"

    t0 = time.perf_counter()
    path = bench_model.build(args.size, "tdt", device=args.device)
    print(f"model: {path.name} (built or reused in {time.perf_counter() - t0:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        files = make_files(args.files, Path(work))
        audio_s = sum(bench_model.read_wav(f).size for f in files) / bench_model.SAMPLE_RATE
        print(f"audio: {len(files)} files, {audio_s:.0f} s", flush=True)
        times, count = offline(path, args.device, files, batches, args.reps, precision)
        rtfx = {b: audio_s / s for b, s in times.items()}
        for b, r in rtfx.items():
            print(f"offline batch {b}: RTFx {r:.0f}", flush=True)
        best = max(rtfx, key=lambda b: rtfx[b])
        server_batch = args.server_batch_size or min(best, 64)
        server_flags += ["--batch-size", str(server_batch)]
        through = asyncio.run(served(path, server_flags, files, clients, args.reps))
    rows: list[tuple[str, Any, str]] = [
        (f"offline, batch {b}", f"{r:,.0f}", f"{r / rtfx[best]:.2f}×") for b, r in rtfx.items()
    ]
    for n, seconds in through.items():
        r = audio_s / seconds
        rows.append((f"server, {n} clients", f"{r:,.0f}", f"{r / rtfx[best]:.2f}×"))
    print()
    print(
        f"{device_name}; {path.name}: {count / 1e6:.1f} M parameters, FastConformer-TDT, "
        f"random weights; {precision}; {len(files)} files, {audio_s:.0f} s of audio; medians "
        f"of {args.reps} runs; server flags: {' '.join(server_flags)}"
    )
    print("| run | RTFx | ÷ best offline |")
    print("|---|---|---|")
    for run, value, ratio in rows:
        print(f"| {run} | {value} | {ratio} |")


if __name__ == "__main__":
    main()
