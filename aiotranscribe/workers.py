"""Handles on the place a model lives: a spawned worker process, or a thread in this process.

Both expose ``load()``, ``transcribe(slices)`` and ``stop()``; the pool never knows which it has.
Each handle allows one call in flight, which is what NeMo needs (transcribe is not thread-safe).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)


# What clients are told of a worker error, by its code: never the message itself, which
# can hold model paths, exception names and tracebacks (those go to the log).
PUBLIC_REASONS = {
    "model_not_found": "its .nemo file was not found",
    "model_unreadable": "its .nemo file could not be restored",
    "hub_unavailable": "it is not in the local Hugging Face/NGC cache and the hub cannot be "
    "reached (serve a .nemo path instead)",
    "device_unavailable": "the configured device is not available",
    "unsupported_model": "it is not a model class this server serves (supported: CTC, RNNT, "
    "TDT, hybrid TDT/RNNT + CTC, and Canary multitask models)",
    "self_check_failed": "it loaded but could not transcribe a test clip",
    "inference_failed": "the model failed on this audio",
    "worker_crashed": "the model worker process died",
    "internal_error": "internal error",
}


def public_reason(code: str) -> str:
    return PUBLIC_REASONS.get(code, "the model worker failed")


class WorkerError(Exception):
    """The worker answered with an error (``code`` says which kind)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WorkerCrashed(WorkerError):
    """The worker process died (or was stopped) with a call in flight."""

    def __init__(self, message: str = "the model worker process died") -> None:
        super().__init__("worker_crashed", message)


class Worker(Protocol):
    async def load(self) -> dict[str, Any]: ...

    async def transcribe(
        self, slices: list[tuple[str, int, int]], options: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]: ...

    async def stop(self, timeout: float = 5.0) -> None: ...

    @property
    def pid(self) -> int | None: ...


class ProcessWorker:
    """A model in a child process started with ``spawn`` (CUDA cannot live in a forked child)."""

    def __init__(
        self,
        spec: str,
        device: str,
        threads: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.threads = threads
        self.config = dict(config or {})
        self._ctx = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Any = None
        # Pipe I/O blocks, so it runs on a thread of our own: never on the loop, and never on
        # the default executor that aiofiles shares.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-io")
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _spawn(self) -> None:
        from aiotranscribe.engine import worker

        parent, child = self._ctx.Pipe()
        self._process = self._ctx.Process(
            target=worker.main,
            args=(child, self.spec, self.device, self.threads, self.config),
            name="aiotranscribe-worker",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._conn = parent

    def _roundtrip(self, op: str, payload: Any) -> Any:
        try:
            self._conn.send((op, payload))
            reply = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError) as exc:
            raise WorkerCrashed() from exc
        if reply[0] == "ok":
            return reply[1]
        raise WorkerError(reply[1], reply[2])

    async def _call(self, op: str, payload: Any = None) -> Any:
        async with self._lock:
            if self._process is None or not self._process.is_alive():
                raise WorkerCrashed("the model worker is not running")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._io, self._roundtrip, op, payload)

    async def load(self) -> dict[str, Any]:
        self._spawn()
        info: dict[str, Any] = await self._call("load")
        return info

    async def transcribe(
        self, slices: list[tuple[str, int, int]], options: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("transcribe", (slices, options or {}))
        return result

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the process: politely when idle, else terminate, then kill. Never leaves it."""
        process = self._process
        if process is not None:
            loop = asyncio.get_running_loop()
            if not self._lock.locked() and process.is_alive():
                try:
                    self._conn.send(("stop", None))
                except OSError:
                    pass
                await loop.run_in_executor(None, process.join, timeout)
            if process.is_alive():
                process.terminate()
                await loop.run_in_executor(None, process.join, timeout)
            if process.is_alive():
                process.kill()
                await loop.run_in_executor(None, process.join, timeout)
            self._conn.close()
            process.close()
            self._process = None
        # Any call blocked on the pipe has returned now that the process is gone.
        self._io.shutdown(wait=True)


class ThreadWorker:
    """A model in this process, behind one thread and a lock (``--executor thread``).

    A running batch cannot be interrupted; ``stop`` waits for it.
    """

    def __init__(
        self,
        spec: str,
        device: str,
        threads: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        from aiotranscribe.engine.nemo_engine import NemoEngine
        from aiotranscribe.engine.worker import prepare_environment

        prepare_environment()  # effective while nothing in this process has used CUDA yet
        self._engine = NemoEngine(spec, device, threads, config)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._model_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return None

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._model_lock:
            return fn(*args)

    async def _run(self, fn: Any, *args: Any) -> Any:
        from aiotranscribe.engine.nemo_engine import ModelLoadError

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._io, self._locked, fn, *args)
        except ModelLoadError as exc:
            raise WorkerError(exc.code, str(exc)) from exc
        except RuntimeError as exc:
            if "after shutdown" in str(exc):
                raise WorkerCrashed("the model thread is stopped") from exc
            raise WorkerError("inference_failed", f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise WorkerError("inference_failed", f"{type(exc).__name__}: {exc}") from exc

    async def load(self) -> dict[str, Any]:
        info: dict[str, Any] = await self._run(self._engine.load)
        return info

    async def transcribe(
        self, slices: list[tuple[str, int, int]], options: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._run(
            self._engine.transcribe, slices, options or {}
        )
        return result

    async def stop(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self._io.shutdown(wait=True, cancel_futures=True))


def make_worker(
    executor: str,
    spec: str,
    device: str,
    threads: int | None = None,
    config: dict[str, Any] | None = None,
) -> Worker:
    """A worker for model ``spec``; ``config`` is its ``ModelSettings.engine_config()``."""
    if executor == "thread":
        return ThreadWorker(spec, device, threads, config)
    return ProcessWorker(spec, device, threads, config)
