"""Server settings: one frozen dataclass, built from CLI flags and ``AIOTRANSCRIBE_*`` env vars.

Nothing reads configuration from globals: ``create_app(settings)`` gets everything it needs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ENV_PREFIX = "AIOTRANSCRIBE_"

Executor = Literal["process", "thread"]
StoreKind = Literal["sqlite", "memory"]
Synchronous = Literal["full", "normal"]
MetricsAccess = Literal["key", "open"]
LogFormat = Literal["json", "console"]


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """Address to bind. Use 0.0.0.0 in a container."""

    port: int = 8000
    """TCP port to listen on."""

    models: tuple[str, ...] = ("demo",)
    """Models to serve, each a `.nemo` path, a Hugging Face/NGC name
    (``nvidia/parakeet-tdt-0.6b-v2``) or ``demo`` (the 41-word model shipped in the package).
    The first one is the default for requests that do not name one."""

    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

    torch_threads: int | None = None
    """CPU threads torch may use per model (``torch.set_num_threads``); None keeps torch's
    default (one per core). On a shared or small CPU host, 1 is often several times faster."""

    executor: Executor = "process"
    """``process``: each model lives in its own spawned worker process (the server never
    imports torch). ``thread``: the model lives in this process behind a one-thread executor."""

    spool_dir: Path = Path("spool")
    """Where uploads and converted audio live while a job runs; one sub-directory per job,
    each holding a marker file. The server only ever removes such directories."""

    store: StoreKind = "sqlite"
    """Where jobs and their events live: ``sqlite`` (a file in ``data_dir``; jobs survive
    crashes and restarts) or ``memory`` (lost when the server stops)."""

    data_dir: Path = Path("data")
    """Directory of the SQLite job database (``jobs.sqlite3``). Keep it on a local disk
    (WAL does not work on network filesystems), ideally the spool's."""

    sqlite_synchronous: Synchronous = "full"
    """``full``: a committed job survives power loss too. ``normal``: faster commits; it
    survives a crash of the server, but the last commits may roll back after a power loss."""

    max_upload_mb: float = 512.0
    """Largest accepted upload, in MiB (1 MiB = 1,048,576 bytes). Bigger uploads get 413."""

    max_audio_seconds: float = 4 * 3600.0
    """Longest accepted audio, in seconds. Longer audio gets 413."""

    convert_timeout_s: float = 600.0
    """Wall-clock limit on one ffmpeg conversion, in seconds; then its process group is killed."""

    ffmpeg: str = "ffmpeg"
    """The ffmpeg binary (a name on PATH or a path)."""

    ffprobe: str = "ffprobe"
    """The ffprobe binary (a name on PATH or a path)."""

    chunk_seconds: float | None = None
    """Longest slice sent to the model, in seconds. None: 20 s on CPU, 60 s on a GPU."""

    batch_size: int = 8
    """Most slices the pool sends to a worker in one call (slices of different jobs mix)."""

    max_queued_audio_s: float = 36000.0
    """Admission limit per model, in seconds of audio: every admitted job counts, from its
    first upload byte (uploading, converting, queued, transcribing) until it ends. A request
    that would pass it gets 503 + Retry-After before its body is read."""

    admission_estimate_s: float = 60.0
    """Seconds of audio a job counts for while its length is unknown (uploading, before the
    probe)."""

    job_ttl_s: float = 3600.0
    """How long a finished job (its record, events and result) is kept, in seconds."""

    janitor_interval_s: float = 300.0
    """How often the janitor sweeps the spool for directories no live job owns, in seconds."""

    shutdown_timeout_s: float = 30.0
    """On SIGTERM, how long running jobs may go on before the server stops, in seconds
    (Kubernetes' default grace period). What is left resumes at the next start."""

    header_timeout_s: float = 10.0
    """How long a client may take to send a request's headers, in seconds; then the
    connection is closed (slow-header clients cannot hold connections)."""

    upload_min_rate_kib_s: float = 16.0
    """Slowest accepted request body, in KiB/s averaged from the start of the body (after
    ``upload_grace_s``). A slower upload gets 408 and its spool space is freed."""

    upload_grace_s: float = 10.0
    """Seconds a body may lag behind ``upload_min_rate_kib_s`` before it counts as too slow."""

    ws_send_timeout_s: float = 30.0
    """An event WebSocket whose client has taken no frame for this long is closed (1008)."""

    sse_keepalive_s: float = 15.0
    """An SSE stream that has sent nothing for this long gets a ``: keep-alive`` comment."""

    convert_min_timeout_s: float = 60.0
    """Floor of a conversion's wall-clock limit, in seconds; the limit grows with the audio's
    declared length up to ``convert_timeout_s``."""

    ffmpeg_max_memory_mb: float = 2048.0
    """Address-space limit (RLIMIT_AS) of each ffmpeg/ffprobe process, in MiB; 0: none."""

    ffmpeg_max_cpu_s: float | None = None
    """CPU-time limit (RLIMIT_CPU) of each ffmpeg/ffprobe process, in seconds; None: the
    process's wall-clock limit."""

    api_keys: tuple[str, ...] = ()
    """Accepted API keys, each ``key`` or ``tenant=key``. Empty (and no keys file): no key
    is asked for. Keys with the same tenant see the same jobs; unnamed keys share the tenant
    ``default``."""

    api_keys_file: Path | None = None
    """A file of API keys, one ``tenant key`` pair per line (``#`` comments)."""

    metrics_access: MetricsAccess = "key"
    """``key``: ``/metrics`` needs a key when keys are configured; ``open``: it never does."""

    cors_origins: tuple[str, ...] = ()
    """Origins (``https://app.example``) allowed to call the API from a browser, and to open
    event WebSockets. Empty: same-origin only."""

    allowed_hosts: tuple[str, ...] = ()
    """``Host`` names this server answers to (DNS-rebinding guard). Empty: the bind address,
    plus ``localhost`` and loopback addresses when bound to loopback, or any host when bound
    to 0.0.0.0/::. ``*`` allows any."""

    log_format: LogFormat | None = None
    """``json`` or ``console``; None picks console on a TTY, JSON lines otherwise."""

    log_level: str = "info"
    """Lowest level logged."""

    static_dir: Path = field(
        default_factory=lambda: Path(__file__).resolve().parent.parent / "static"
    )
    """Web UI files served at ``/``."""

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def default_model(self) -> str:
        return self.models[0]

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def env_default(name: str, fallback: str | None = None) -> str | None:
    """The value of ``AIOTRANSCRIBE_<NAME>`` (flag name with dashes as underscores)."""
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), fallback)
