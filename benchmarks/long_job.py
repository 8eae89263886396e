"""A 10-minute file through the server (process executor) versus model.transcribe directly.

Prints: time to the first `progress` event after the upload is answered, the number of
progress events, total time (upload start to `completed`) against one direct
`model.transcribe` of the same file measured in the same run, and peak RSS of the server
and of its worker process. Run: .venv/bin/python benchmarks/long_job.py [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from _common import ROOT, Server, children, make_speech

DIRECT = """
import sys, time, wave, numpy as np, torch
from nemo.collections.asr.models import ASRModel
m = ASRModel.restore_from(sys.argv[1], map_location="cpu"); m.eval()
m.preprocessor.featurizer.dither = 0.0
with wave.open(sys.argv[2]) as w:
    a = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
t0 = time.perf_counter()
with torch.inference_mode():
    h = m.transcribe([a], batch_size=1, timestamps=True, verbose=False, num_workers=0)
print(time.perf_counter() - t0, len(h[0].text.split()))
"""


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def through_server(audio: Path) -> dict[str, float]:
    with Server("--executor", "process") as server:
        async with aiohttp.ClientSession() as session:
            await server.wait_ready(session)
            worker = children(server.proc.pid)
            form = aiohttp.FormData()
            form.add_field("file", audio.open("rb"), filename=audio.name)
            t0 = time.perf_counter()
            async with session.post(f"{server.url}/transcribe/async", data=form) as resp:
                job_id = (await resp.json())["job_id"]
            t_upload = time.perf_counter()
            first_progress = None
            progress_events = 0
            async with session.ws_connect(f"{server.url}/jobs/{job_id}/events") as ws:
                async for msg in ws:
                    event = json.loads(msg.data)
                    if event["type"] == "progress":
                        progress_events += 1
                        if first_progress is None:
                            first_progress = time.perf_counter() - t_upload
                    if event["type"] in ("completed", "failed", "cancelled"):
                        assert event["type"] == "completed", event
                        words = len(event["result"]["text"].split())
            total = time.perf_counter() - t0
            server_peak = peak_mib(server.proc.pid)
            worker_peak = max((peak_mib(p) for p in worker), default=0.0)
    return {
        "upload_s": t_upload - t0,
        "first_progress_s": first_progress or -1.0,
        "progress_events": progress_events,
        "total_s": total,
        "words": words,
        "server_peak_mib": server_peak,
        "worker_peak_mib": worker_peak,
    }


def direct(audio: Path) -> tuple[float, int]:
    model = str(ROOT / "aiotranscribe" / "models" / "demo.nemo")
    out = subprocess.run(
        [sys.executable, "-c", DIRECT, model, str(audio)],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, words = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(words)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-long-"))
    audio, texts = make_speech(args.minutes * 60, work)
    expected_words = sum(len(t.split()) for t in texts)
    served = asyncio.run(through_server(audio))
    direct_s, direct_words = direct(audio)
    print(
        f"audio: {args.minutes:g} min, {audio.stat().st_size / 1e6:.1f} MB WAV, "
        f"{expected_words} words spoken"
    )
    print(
        f"server: upload answered in {served['upload_s']:.2f} s; first progress event "
        f"{served['first_progress_s']:.3f} s after; {served['progress_events']} progress events"
    )
    print(f"server: total {served['total_s']:.2f} s (upload to completed), {served['words']} words")
    print(
        f"direct model.transcribe (one pass, model already loaded): {direct_s:.2f} s, "
        f"{direct_words} words"
    )
    print(f"ratio server/direct: {served['total_s'] / direct_s:.2f}")
    print(
        f"peak RSS: server {served['server_peak_mib']:.0f} MiB, "
        f"worker {served['worker_peak_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
