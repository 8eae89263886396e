"""Durability and the cost of the durable store, measured on real server processes.

1. ``kill -9`` cycles: jobs are submitted, the whole server (its process group) is killed
   while they run, and it is restarted on the same directories, several times over. At the
   end every accepted job must have completed exactly once: one ``completed`` event, seqs
   1..n without gap or duplicate, a transcript equal to a run without crashes.
2. SQLite (``synchronous=FULL``) against the memory store on the same workload: batches of
   concurrent jobs, rounds alternating between the two stores; median job wall time
   (upload done -> completed) and events per second.

Usage: ``python benchmarks/durability.py [--cycles 5] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import TERMINAL, Server, make_speech, submit


async def events(session: aiohttp.ClientSession, url: str, job_id: str) -> list[dict[str, Any]]:
    out = []
    async with session.ws_connect(f"{url}/jobs/{job_id}/events") as ws:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            out.append(json.loads(msg.data))
    return out


def check(history: list[dict[str, Any]]) -> str | None:
    """What is wrong with a finished job's event history, or None."""
    seqs = [e["seq"] for e in history]
    if seqs != list(range(1, len(seqs) + 1)):
        return f"seqs not 1..n: {seqs[:5]}...{seqs[-5:]}"
    terminal = [e["type"] for e in history if e["type"] in TERMINAL]
    if terminal != ["completed"]:
        return f"terminal events: {terminal}"
    return None


async def kill_cycles(cycles: int, audio: list[Path]) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-durability-"))
    args = ("--chunk-seconds", "2", "--batch-size", "4", "--torch-threads", "1")
    accepted: dict[str, Path] = {}
    recovered = 0
    rng = random.Random(11)
    async with aiohttp.ClientSession() as session:
        for cycle in range(cycles):
            with Server(*args, root=root) as server:
                await server.wait_ready(session)
                for _ in range(4):
                    path = rng.choice(audio)
                    accepted[await submit(session, server.url, path)] = path
                await asyncio.sleep(rng.uniform(0.5, 3.0))
                server.kill9()
            print(f"  cycle {cycle + 1}: killed with {len(accepted)} jobs accepted so far")
        with Server(*args, "--log-level", "info", root=root) as server:
            await server.wait_ready(session)
            histories = await asyncio.gather(
                *(events(session, server.url, job_id) for job_id in accepted)
            )
            # The same files once more on the restarted server: the no-crash transcripts.
            clean = {}
            for path in set(accepted.values()):
                job_id = await submit(session, server.url, path)
                clean[path] = (await events(session, server.url, job_id))[-1]["result"]["text"]
        db = sqlite3.connect(root / "data" / "jobs.sqlite3")
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        recovered = db.execute(
            "SELECT COUNT(DISTINCT job_id) FROM events WHERE body LIKE '%\"recovered\":true%'"
        ).fetchone()[0]
        db.close()
    problems = {}
    completed = duplicated = wrong_text = 0
    for (job_id, path), history in zip(accepted.items(), histories, strict=True):
        problem = check(history)
        if problem:
            problems[job_id] = problem
            duplicated += "terminal" in problem or "seqs" in problem
            continue
        completed += 1
        wrong_text += history[-1]["result"]["text"] != clean[path]
    return {
        "cycles": cycles,
        "accepted": len(accepted),
        "killed": cycles,
        "recovered": recovered,
        "completed": completed,
        "duplicated": duplicated,
        "transcript_differs": wrong_text,
        "integrity": integrity,
        "problems": problems,
    }


async def store_round(store: str, files: list[Path], jobs: int) -> tuple[list[float], float, int]:
    """One server, ``jobs`` concurrent jobs; (job wall times, elapsed, events)."""
    extra = ("--store", store, "--batch-size", "8", "--torch-threads", "1")
    async with aiohttp.ClientSession() as session:
        with Server(*extra) as server:
            await server.wait_ready(session)
            await submit(session, server.url, files[0])  # warm-up: caches, first batch
            started = time.perf_counter()

            async def one(path: Path) -> tuple[float, int]:
                t0 = time.perf_counter()  # from the upload to the completed event
                job_id = await submit(session, server.url, path)
                history = await events(session, server.url, job_id)
                assert history[-1]["type"] == "completed", history[-1]
                return time.perf_counter() - t0, len(history)

            results = await asyncio.gather(*(one(files[i % len(files)]) for i in range(jobs)))
            elapsed = time.perf_counter() - started
    return [r[0] for r in results], elapsed, sum(r[1] for r in results)


async def store_cost(rounds: int, files: list[Path], jobs: int) -> dict[str, Any]:
    """Each round runs both stores back to back (order alternating); the ratios are the
    medians of each round's own sqlite/memory ratio, which cancels most of the drift of a
    shared machine."""
    walls: dict[str, list[float]] = {"memory": [], "sqlite": []}
    rates: dict[str, list[float]] = {"memory": [], "sqlite": []}
    for r in range(rounds):
        for store in ("memory", "sqlite") if r % 2 == 0 else ("sqlite", "memory"):
            times, elapsed, count = await store_round(store, files, jobs)
            walls[store].append(statistics.median(times))
            rates[store].append(count / elapsed)
            print(
                f"  round {r + 1} {store}: median job {walls[store][-1]:.3f} s, "
                f"{rates[store][-1]:.0f} events/s"
            )
    out: dict[str, Any] = {
        s: {
            "median_job_s": statistics.median(walls[s]),
            "events_per_s": statistics.median(rates[s]),
        }
        for s in walls
    }
    out["job_time_ratio"] = statistics.median(
        walls["sqlite"][i] / walls["memory"][i] for i in range(rounds)
    )
    out["events_rate_ratio"] = statistics.median(
        rates["sqlite"][i] / rates["memory"][i] for i in range(rounds)
    )
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=16, help="concurrent jobs per round")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-speech-"))
    audio = []
    for seconds in (20, 40, 60):
        (work / f"s{seconds}").mkdir()
        audio.append(make_speech(seconds, work / f"s{seconds}", seed=seconds)[0])
    print(f"machine: {platform.node()} {platform.machine()} python {platform.python_version()}")
    print(f"kill -9 cycles ({args.cycles}):")
    kills = await kill_cycles(args.cycles, audio)
    print(f"store cost ({args.rounds} rounds of {args.jobs} concurrent jobs):")
    cost = await store_cost(args.rounds, audio, args.jobs)
    print()
    print(
        "| kill -9 cycles | accepted | killed | recovered | completed | duplicated "
        "| transcript differs | integrity |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {kills['cycles']} | {kills['accepted']} | {kills['killed']} | {kills['recovered']} "
        f"| {kills['completed']} | {kills['duplicated']} | {kills['transcript_differs']} "
        f"| {kills['integrity']} |"
    )
    if kills["problems"]:
        print("problems:", kills["problems"])
    print()
    print("| store | median job wall time (s) | events/s |")
    print("|---|---|---|")
    for store in ("memory", "sqlite"):
        print(
            f"| {store} | {cost[store]['median_job_s']:.3f} | {cost[store]['events_per_s']:.0f} |"
        )
    print(
        f"\nsqlite/memory (median of the rounds' ratios): job time x{cost['job_time_ratio']:.3f}, "
        f"events/s x{cost['events_rate_ratio']:.3f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
