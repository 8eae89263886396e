"""/health latency while a 60-second file is transcribed by the process executor.

Prints the median and p95 of 50 sequential /health calls when idle (the baseline, same run)
and during the transcription, and their ratio. Run: .venv/bin/python benchmarks/health_latency.py
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
from _common import Server, make_speech, median, pct


async def sample(session: aiohttp.ClientSession, url: str, n: int = 50) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.get(f"{url}/health") as resp:
            await resp.read()
        out.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.02)
    return out


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-health-"))
    audio, _ = make_speech(60.0, work)
    runs: list[float] = []
    with Server("--executor", "process", "--batch-size", "1", "--chunk-seconds", "10") as server:
        async with aiohttp.ClientSession() as session:
            await server.wait_ready(session)
            idle = await sample(session, server.url)

            async def transcribe_once() -> None:
                form = aiohttp.FormData()
                form.add_field("file", audio.read_bytes(), filename=audio.name)
                t0 = time.perf_counter()
                async with session.post(f"{server.url}/transcribe", data=form) as resp:
                    assert resp.status == 200, await resp.text()
                runs.append(time.perf_counter() - t0)

            # Sample only while a transcription is in flight; start another when one ends.
            busy: list[float] = []
            job = asyncio.create_task(transcribe_once())
            await asyncio.sleep(0.3)
            while len(busy) < 50:
                if job.done():
                    job.result()
                    job = asyncio.create_task(transcribe_once())
                    await asyncio.sleep(0.3)
                    continue
                busy += await sample(session, server.url, n=1)
            await job
    print(f"audio: 60 s file; {len(runs)} transcriptions, median {median(runs):.2f} s each")
    print(f"/health idle:  median {median(idle):.2f} ms  p95 {pct(idle, 0.95):.2f} ms  (n=50)")
    print(f"/health busy:  median {median(busy):.2f} ms  p95 {pct(busy, 0.95):.2f} ms  (n=50)")
    print(f"ratio busy/idle (median): {median(busy) / median(idle):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
