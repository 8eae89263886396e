"""``make bench-scaleout``: 2 API replicas and 2 model workers on one Redis, against one
``serve`` on the same files and the same model (issue 14).

The setups run side by side on this machine, one model (``bench_model.py``'s
FastConformer-CTC, one torch thread in every model process), two model processes each:

(a) one ``serve --workers 2`` with its default store (SQLite): today's single host
(b) the same with ``--store redis://``: what the Redis store costs by itself
(c) two ``serve --store redis:// --no-workers --workers 1`` replicas and two ``aiotranscribe
    worker`` processes: every batch goes through the work stream and back
(d) the same with ``--workers 2`` on each replica (each has two batches out at once), on
    the same two workers (``--replica-lanes 1,2``: one such setup per value)

Each rep sends ``make bench``'s 16 files (5-19 s, 178 s of speech) ``--rounds`` times to
``POST /transcribe`` from ``--clients`` clients, each posting its share one after another
(one slice per file: the batches are what the pools form); in (c) and (d) each request goes
to the next replica in turn. Throughput is audio seconds per wall second, the median of
``--reps`` reps; within a rep the setups run one after another, each going first in turn,
so other load on the host falls on all of them alike. Ratios are against (a).

On a 2-core host (c) cannot beat (a): the same two model processes do the work, and the
replicas and Redis share the cores with them. The ratio shows the cost of the streams hop;
what (c) buys is that replicas and workers may sit on other machines.

Run: .venv/bin/python benchmarks/scaleout.py [--reps 3] [--rounds 3] [--clients 8] [--size bench]
    [--replica-lanes 1,2] [--appendfsync always]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from _common import ROOT, RedisServer, Server, children, median
from bench import machine, post_file, prepare
from bench_model import build

from aiotranscribe.remote import GROUP, queue_key, workers_key
from tests import speech

MODEL = "bench"  # the name every server and worker knows the model by


def say(text: str) -> None:
    print(f"[scaleout {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Worker:
    """``aiotranscribe worker`` in a subprocess (its own process group), its JSON log in
    ``log``; stopped on exit (SIGTERM: it finishes the batch under way)."""

    def __init__(self, store: str, model: str, log: Path, batch_size: int) -> None:
        self.log = log
        self.args = [sys.executable, "-m", "aiotranscribe", "worker", "--store", store]
        self.args += ["--model", model, "--device", "cpu", "--executor", "process"]
        self.args += ["--torch-threads", "1", "--batch-size", str(batch_size)]
        self.args += ["--consumer", log.stem, "--log-format", "json"]

    def __enter__(self) -> Worker:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(120)

    def batches(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in events if e.get("event") == "worker_batch"]


@dataclass
class Setup:
    key: str
    name: str
    urls: list[str]
    # Its processes by role: "server" (with its ffmpeg runs), "worker", "redis"; the model
    # processes are their children (counted as "model").
    pids: dict[str, list[int]]
    remote: bool = False
    times: list[float] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)  # CPU seconds a rep, by role
    texts: dict[str, str] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)  # its workers' model calls

    def rate(self, audio_s: float) -> float:
        return audio_s / median(self.times)

    def paired(self, base: Setup) -> float:
        """Throughput against ``base`` rep by rep (each pair ran back to back, under the same
        load from elsewhere), the median of those ratios."""
        return median([b / t for b, t in zip(base.times, self.times, strict=True)])


def usage(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far by role; a process's live children are its model processes (read
    between workloads, when no ffmpeg runs), its reaped ones are in its own figure."""
    out = {"model": 0.0}
    for role, group in pids.items():
        out[role] = 0.0
        for pid in group:
            kids = cpu_s(children(pid))
            out["model"] += kids
            out[role] += cpu_s([pid]) - kids
    return out


# The CPU figure's parts, in the order shown.
ROLES = ("model", "server", "worker", "redis")


def per_minute(setup: Setup, audio_s: float) -> dict[str, float]:
    """CPU seconds per minute of audio, by role and in ``all``, medians of the reps."""
    roles = [*setup.cpu[0], "all"]
    reps = [{**rep, "all": sum(rep.values())} for rep in setup.cpu]
    return {role: 60 * median([rep[role] for rep in reps]) / audio_s for role in roles}


def cpu_s(pids: list[int]) -> float:
    """CPU seconds used by ``pids`` and their descendants so far, the reaped children of
    each included (an ffmpeg that ended counts in its server's figure)."""
    ticks = 0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            todo += children(pid)
    return ticks / os.sysconf("SC_CLK_TCK")


async def workload(
    session: aiohttp.ClientSession, setup: Setup, files: list[Path], clients: int
) -> float:
    """Every file transcribed once by ``clients`` clients, each sending its share one after
    another, each request to the setup's next server; the wall time until the last answer."""
    turn = itertools.count()

    async def client(mine: list[Path]) -> None:
        for path in mine:
            url = setup.urls[next(turn) % len(setup.urls)]
            setup.texts[path.name] = (await post_file(session, url, path))["text"]

    t0 = time.perf_counter()
    await asyncio.gather(*(client(files[i::clients]) for i in range(clients)))
    return time.perf_counter() - t0


async def wait_workers(redis_url: str, count: int, timeout: float = 600) -> None:
    """Until ``count`` workers have loaded the model and announced themselves."""
    async with aioredis.Redis.from_url(redis_url) as redis:
        async with asyncio.timeout(timeout):
            while await redis.hlen(workers_key(MODEL)) < count:
                await asyncio.sleep(0.2)


async def queue_left(redis_url: str) -> tuple[int, int]:
    """Entries left in the work stream and in its pending list (both 0 when every slice was
    answered and acknowledged)."""
    async with aioredis.Redis.from_url(redis_url) as redis:
        pending = await redis.xpending(queue_key(MODEL), GROUP)
        return int(await redis.xlen(queue_key(MODEL))), int(pending["pending"])


def batch_stats(batches: list[dict[str, Any]]) -> str:
    if not batches:
        return "no batches logged"
    slices = sum(b["slices"] for b in batches)
    mixed = sum(b["replicas"] > 1 for b in batches)
    again = sum(b["redelivered"] for b in batches)
    return (
        f"{len(batches)} worker model calls of {slices / len(batches):.1f} slices on average, "
        f"{mixed} holding slices of both replicas, {again} slices computed twice"
    )


async def run(args: argparse.Namespace, tmp: Path) -> str:
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        say(f"warning: load average {load_before:.1f} before the run; other work skews figures")
    say("inputs and model (cached under .cache/)")
    files = prepare(2).files  # make bench's 16 files (and a 2-minute MP3 not used here)
    audio_s = args.rounds * sum(speech.duration(f) for f in files)
    model = f"{MODEL}={build(args.size)}"
    common = ["--executor", "process", "--device", "cpu", "--torch-threads", "1"]
    common += ["--batch-size", str(args.batch_size)]
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp / "redis", args.appendfsync))
        url_b, url_c = redis.url(0), redis.url(1)  # (b) and (c) in databases of their own
        single = stack.enter_context(Server(*common, "--workers", "2", model=model, root=tmp / "a"))
        redis_single = stack.enter_context(
            Server(*common, "--workers", "2", "--store", url_b, model=model, root=tmp / "b")
        )
        workers = [
            stack.enter_context(Worker(url_c, model, tmp / f"worker{n}.log", args.batch_size))
            for n in (1, 2)
        ]
        setups = [
            Setup(
                "a",
                "one `serve --workers 2` (SQLite store)",
                [single.url],
                {"server": [single.proc.pid]},
            ),
            Setup(
                "b",
                "one `serve --workers 2 --store redis://`",
                [redis_single.url],
                {"server": [redis_single.proc.pid], "redis": [redis.proc.pid]},
            ),
        ]
        servers = [single, redis_single]
        # Every replica pair shares the two workers: they serve whichever replica sends.
        for key, lanes in zip("cdefgh", args.replica_lanes, strict=False):
            pair = [
                stack.enter_context(
                    Server(
                        *common,
                        *("--workers", str(lanes), "--store", url_c, "--no-workers"),
                        model=model,
                        root=tmp / f"{key}{n}",
                    )
                )
                for n in (1, 2)
            ]
            servers += pair
            name = f"2 × `serve --no-workers --workers {lanes}` + 2 × `aiotranscribe worker`"
            pids = {"server": [r.proc.pid for r in pair], "worker": [w.proc.pid for w in workers]}
            pids["redis"] = [redis.proc.pid]
            setups.append(Setup(key, name, [r.url for r in pair], pids, remote=True))
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            say(f"starting {len(servers)} servers, 2 workers and redis-server (6 models load)")
            for server in servers:
                await server.wait_ready(session, timeout=600)
            await wait_workers(url_c, len(workers))
            for setup in setups:  # warm-up: first model calls, connections, SQLite pages
                await workload(session, setup, files[:4], 4)
            for rep in range(args.reps):
                turn = rep % len(setups)  # each setup goes first in turn
                for setup in setups[turn:] + setups[:turn]:
                    seen = [len(w.batches()) for w in workers]
                    cpu0 = usage(setup.pids)
                    took = await workload(session, setup, files * args.rounds, args.clients)
                    setup.cpu.append({k: v - cpu0[k] for k, v in usage(setup.pids).items()})
                    setup.times.append(took)
                    if setup.remote:
                        for worker, before in zip(workers, seen, strict=True):
                            setup.batches += worker.batches()[before:]
                say(
                    f"rep {rep + 1}: " + "; ".join(f"({s.key}) {s.times[-1]:.2f} s" for s in setups)
                )
        left = await queue_left(url_c)
    return report(args, setups, audio_s, left, (load_before, os.getloadavg()[0]))


def report(
    args: argparse.Namespace,
    setups: list[Setup],
    audio_s: float,
    left: tuple[int, int],
    load: tuple[float, float],
) -> str:
    base = setups[0]
    base_cpu = per_minute(base, audio_s)
    rows, notes = [], []
    for s in setups:
        same = sum(s.texts[k] == base.texts[k] for k in base.texts)
        cpu = per_minute(s, audio_s)
        parts = ", ".join(f"{role} {cpu[role]:.2f}" for role in ROLES if role in cpu)
        rows.append(
            f"| ({s.key}) | {s.name} | "
            f"{s.rate(audio_s):.1f} ({audio_s / max(s.times):.1f}-{audio_s / min(s.times):.1f})"
            f" | **{s.paired(base):.2f}×** | {cpu['all']:.2f} s ({parts}) "
            f"| {cpu['all'] / base_cpu['all']:.2f}× | {same}/{len(base.texts)} |"
        )
        if s.remote:
            notes.append(f"({s.key}): {batch_stats(s.batches)}.")
    return "\n".join(
        [
            f"Machine: {machine(load)}.",
            "",
            f"Model: `{args.size}` of `bench_model.py`, one torch thread per model process, "
            f"2 model processes in every setup, batch size {args.batch_size}. Workload: "
            f"{len(base.texts)} files sent {args.rounds} times a rep, {audio_s:.0f} s of speech, "
            f"{args.clients} clients; median of {args.reps} reps (range in brackets); the "
            "throughput ratio is the median of each rep's ratio to the (a) of the same rep. CPU: "
            "seconds used by the setup's processes while it ran, per minute of audio, median of "
            "the reps; parts: the model processes, the servers (their ffmpeg runs included), the "
            "worker processes around the models, redis-server. "
            f"Redis: one `redis-server` {redis_version()}, AOF `appendfsync {args.appendfsync}`.",
            "",
            "| | setup | audio s/s | ÷ (a), rep by rep | CPU s per audio minute (parts) | ÷ (a) "
            "| transcripts equal to (a)'s |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            *notes,
            f"Left in the work stream / its pending list after the run: {left[0]} / {left[1]}.",
        ]
    )


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="reps per setup (median)")
    parser.add_argument("--rounds", type=int, default=3, help="times each rep sends the files")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--size", default="bench", help="bench_model.py size (tiny: smoke test)")
    parser.add_argument("--batch-size", type=int, default=8, help="most slices per model call")
    parser.add_argument(
        "--replica-lanes",
        default="1,2",
        help="batches each replica has out at once (its --workers): one setup per value",
    )
    parser.add_argument(
        "--appendfsync", default="always", choices=["always", "everysec", "no"], help="Redis AOF"
    )
    args = parser.parse_args()
    args.replica_lanes = [int(n) for n in args.replica_lanes.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        table = asyncio.run(run(args, Path(tmp)))
    print(table)
    say(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
