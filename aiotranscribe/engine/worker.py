"""Entry point of a model worker process (started with the ``spawn`` context).

Protocol over one ``multiprocessing`` pipe, one request in flight at a time:
the parent sends ``(op, payload)``; the worker answers ``("ok", result)`` or
``("error", code, message)``. ``op`` is ``"load"`` or ``"transcribe"``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import MutableMapping
from multiprocessing.connection import Connection
from typing import Any

from aiotranscribe.engine.nemo_engine import ModelLoadError, NemoEngine


def handle(engine: NemoEngine, op: str, payload: Any) -> tuple[Any, ...]:
    try:
        if op == "load":
            return ("ok", engine.load())
        if op == "transcribe":
            slices, options = payload
            return ("ok", engine.transcribe(slices, options))
        return ("error", "bad_request", f"unknown op {op!r}")
    except ModelLoadError as exc:
        return ("error", exc.code, str(exc))
    except Exception as exc:  # the parent logs it; the worker stays up for the next call
        return ("error", "inference_failed", f"{type(exc).__name__}: {exc}")


# CUDA's caching allocator grows segments instead of reserving new fixed-size ones: batches
# of varying length fragment memory far less, so long batches fit where they would not.
# Read once, when CUDA is first used: it must be in the environment before that.
CUDA_ALLOC_CONF = "expandable_segments:True"


def prepare_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Environment a model process wants, unless the operator set it: call before torch
    uses CUDA (a worker process does, before importing torch)."""
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "PYTORCH_ALLOC_CONF" not in environ:  # torch >= 2.9 reads either; never set both
        environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


def main(
    conn: Connection,
    spec: str,
    device: str,
    threads: int | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    # Ctrl-C in a terminal goes to the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prepare_environment()
    engine = NemoEngine(spec, device, threads, config)
    while True:
        try:
            op, payload = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if op == "stop":
            return
        conn.send(handle(engine, op, payload))
