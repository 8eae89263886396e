"""Server settings: one frozen dataclass, built from CLI flags and ``AIOTRANSCRIBE_*`` env vars.

Nothing reads configuration from globals: ``create_app(settings)`` gets everything it needs.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "AIOTRANSCRIBE_"

Executor = Literal["process", "thread"]
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")
Synchronous = Literal["full", "normal"]
MetricsAccess = Literal["key", "open"]
LogFormat = Literal["json", "console"]


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """Address to bind. Use 0.0.0.0 in a container."""

    port: int = 8000
    """TCP port to listen on."""

    models: tuple[str, ...] = ()
    """Models to serve, each ``SOURCE`` or ``NAME=SOURCE``; a source is a `.nemo` path, a
    Hugging Face/NGC name (``nvidia/parakeet-tdt-0.6b-v2``) or ``demo`` (the 41-word model
    shipped in the package). Served after those of ``models_file``; the first model of all is
    the default for requests that do not name one. None at all: ``demo``."""

    models_file: Path | None = None
    """A TOML file with one ``[models.NAME]`` table per model (``source``, and optionally
    ``decoder``, ``max_slice_s``, ``languages``, ``batch_size``, ``device``, ``workers``,
    ``max_batch_audio_s``, ``precision``, ``fast_decoding``)."""

    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; several,
    comma-separated (``cuda:0,cuda:1``), run one worker on each, all fed from one queue."""

    workers: int = 1
    """Worker processes per model on each ``device`` entry (each holds its own copy of the
    model). On a CPU host, N workers with ``torch_threads`` cores each."""

    torch_threads: int | None = None
    """CPU threads torch may use per worker (``torch.set_num_threads``); None keeps torch's
    default (one per core). On a shared or small CPU host, 1 is often several times faster;
    with ``workers`` N, give each worker its share of the cores."""

    executor: Executor = "process"
    """``process``: each model lives in its own spawned worker process (the server never
    imports torch). ``thread``: the model lives in this process behind a one-thread executor."""

    spool_dir: Path = Path("spool")
    """Where uploads and converted audio live while a job runs; one sub-directory per job,
    each holding a marker file. The server only ever removes such directories."""

    store: str = "sqlite"
    """Where jobs and their events live: ``sqlite`` (a file in ``data_dir``; jobs survive
    crashes and restarts), ``memory`` (lost when the server stops) or a Redis URL,
    ``redis://[:password@]host:port/db`` (also ``rediss://`` for TLS, ``unix:///path?db=N``):
    jobs survive what that Redis's persistence survives (AOF ``appendfsync always``: a
    ``kill -9`` of redis-server too)."""

    data_dir: Path = Path("data")
    """Directory of the SQLite job database (``jobs.sqlite3``). Keep it on a local disk
    (WAL does not work on network filesystems), ideally the spool's."""

    sqlite_synchronous: Synchronous = "full"
    """``full``: a committed job survives power loss too. ``normal``: faster commits; it
    survives a crash of the server, but the last commits may roll back after a power loss."""

    owner_ttl_s: float = 15.0
    """With a store shared by several replicas (Redis): how long a replica that stopped
    renewing its liveness (killed, cut off) still owns its jobs; then another adopts them.
    Also how long a stopped replica's jobs wait before a restart on a new process resumes
    them (a clean stop hands them over at once)."""

    no_workers: bool = False
    """Run no model in this server: each model's batches go, through the Redis that
    ``store`` names (a Redis URL then), to ``aiotranscribe worker`` processes on any host
    that reaches the audio (``shared_dir``, ``blob_store``; with neither, the spool at the
    same path). ``workers`` is then how many batches per model are out at once."""

    shared_dir: Path | None = None
    """A directory every replica and worker reaches (an RWX volume, mounted anywhere): job
    directories live there instead of in ``spool_dir``, so another replica can take a job
    over and workers read audio by a name relative to it (``blob=shared:<id>/audio.wav``).
    Uploads still arrive in ``spool_dir`` and move there once the job is in the store.
    Needs a Redis ``store``."""

    blob_store: str | None = None
    """``s3://bucket/prefix``: each job's converted audio is put there once
    (``<prefix>/<id>/audio.wav``) and workers fetch just their slice's bytes with a range
    GET; the object goes when the job's audio does. Endpoint and credentials as for
    ``s3_endpoint_url``. Needs ``no_workers``."""

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

    max_batch_audio_s: float | None = None
    """Most audio in one model call, in seconds, counted padded (slices x the longest one),
    which is what GPU memory grows with. None: bounded by ``batch_size`` only."""

    max_batch_wait_ms: float = 5.0
    """How long a free worker may wait for more slices to fill a batch, in milliseconds,
    counted from the oldest waiting slice's arrival (so work that waited already does not
    wait again). 0: take what waits at once."""

    precision: Precision = "fp32"
    """Inference precision on CUDA: ``fp32``, or ``bf16``/``fp16`` autocast (faster, within
    rounding of fp32; bf16 needs Ampere or newer, else fp16 is used). CPU always runs fp32."""

    fast_decoding: bool = True
    """RNNT/TDT models decode with NeMo's batched greedy label-looping decoder, with CUDA
    graphs on a GPU, whatever their checkpoint says. Off: the checkpoint's own settings."""

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

    allow_private_urls: bool = False
    """Let ``audio_url`` and ``callback_url`` reach loopback, private and link-local
    addresses (a receiver on this host or LAN). Off: only public addresses (SSRF guard)."""

    allowed_networks: tuple[str, ...] = ()
    """Networks (CIDR, ``10.1.2.3/32``) that ``audio_url`` and ``callback_url`` may reach
    even though they are private: one internal host, without ``allow_private_urls``."""

    url_connect_timeout_s: float = 5.0
    """Name resolution plus connect (and TLS) deadline of each outbound request, in seconds."""

    fetch_timeout_s: float = 300.0
    """Longest an ``audio_url`` download may take, in seconds (then 422 url_unreachable)."""

    s3_endpoint_url: str | None = None
    """Where ``audio_url=s3://bucket/key`` is read from: None is AWS S3; set it for an
    S3-compatible store (MinIO, Ceph). Credentials come from the usual AWS places (env vars,
    ``~/.aws``, instance roles); without any, s3:// URLs are refused."""

    public_url: str | None = None
    """Base URL clients reach this server at (``https://asr.example.com``), for the links in
    webhook payloads. None: the scheme and host of the request that submitted the job."""

    webhook_secret: str | None = None
    """Key that signs webhooks (HMAC-SHA256, Standard Webhooks): ``whsec_`` + base64 of the
    key bytes, or any other string (its UTF-8 bytes). None: webhooks are sent unsigned."""

    webhook_timeout_s: float = 10.0
    """One webhook attempt's deadline (connect, send, answer), in seconds."""

    webhook_retry_for_s: float = 86400.0
    """How long a webhook is retried after the job ended, in seconds; then it is failed."""

    webhook_retry_base_s: float = 5.0
    """First retry's back-off ceiling, in seconds; it doubles per attempt (full jitter: each
    wait is random between 0 and the ceiling)."""

    webhook_retry_max_delay_s: float = 3600.0
    """Largest back-off ceiling between two webhook attempts, in seconds."""

    webhook_inline_max_kib: float = 256.0
    """A result whose JSON is at most this many KiB is sent inside the webhook; a bigger one
    only as ``result_url``."""

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

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def env_default(name: str, fallback: str | None = None) -> str | None:
    """The value of ``AIOTRANSCRIBE_<NAME>`` (flag name with dashes as underscores)."""
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), fallback)


# -- models ------------------------------------------------------------------------------------

DECODERS = ("tdt", "ctc")
MODEL_KEYS = (
    "source",
    "decoder",
    "max_slice_s",
    "languages",
    "batch_size",
    "device",
    "workers",
    "max_batch_audio_s",
    "precision",
    "fast_decoding",
)


class ModelsError(ValueError):
    """The models to serve are not usable as configured (the message says which and why)."""


@dataclass(frozen=True)
class ModelSettings:
    """One served model, from ``--model`` or a ``[models.NAME]`` table. Fields left None take
    the server-wide setting (``resolved``) or the family's default."""

    name: str
    source: str
    decoder: str | None = None
    """Hybrid TDT/RNNT + CTC models: which head decodes (``tdt`` or ``ctc``)."""
    max_slice_s: float | None = None
    """Longest slice this model is given; caps ``chunk_seconds``."""
    languages: tuple[str, ...] | None = None
    """ISO 639-1 codes it transcribes, where its tokenizer does not say."""
    batch_size: int | None = None
    device: str | None = None
    """One device, or several comma-separated: one worker each (times ``workers``)."""
    workers: int | None = None
    max_batch_audio_s: float | None = None
    precision: Precision | None = None
    fast_decoding: bool | None = None
    origin: str = "--model"
    """Where it was configured (for error messages)."""

    def resolved(self, settings: Settings) -> ModelSettings:
        """This model with the server-wide settings where it sets none."""
        return dataclasses.replace(
            self,
            batch_size=self.batch_size or settings.batch_size,
            device=self.device or settings.device,
            workers=self.workers or settings.workers,
            max_batch_audio_s=self.max_batch_audio_s or settings.max_batch_audio_s,
            precision=self.precision or settings.precision,
            fast_decoding=(
                settings.fast_decoding if self.fast_decoding is None else self.fast_decoding
            ),
        )

    def worker_devices(self) -> tuple[str, ...]:
        """The device of each worker: every ``device`` entry, ``workers`` times."""
        entries = [d.strip() for d in (self.device or "auto").split(",") if d.strip()]
        return tuple(d for d in entries or ["auto"] for _ in range(self.workers or 1))

    def engine_config(self) -> dict[str, Any]:
        """What the worker needs to know besides source and device (plain data: it is
        pickled to the worker process)."""
        return {
            "name": self.name,
            "decoder": self.decoder,
            "max_slice_s": self.max_slice_s,
            "languages": list(self.languages) if self.languages is not None else None,
            "precision": self.precision,
            "fast_decoding": self.fast_decoding,
        }


def model_display_name(source: str) -> str:
    """The name clients use for a model given without one: ``demo``, a hub name, or a
    ``.nemo`` file's stem."""
    if source == "demo":
        return "demo"
    if source.endswith(".nemo") or (os.sep in source and Path(source).exists()):
        return Path(source).stem
    return source


def _model_from_table(name: str, table: Any, origin: str) -> ModelSettings:
    if not isinstance(table, dict):
        raise ModelsError(f"{origin}: [models.{name}] must be a table")
    unknown = sorted(set(table) - set(MODEL_KEYS))
    if unknown:
        raise ModelsError(
            f"{origin}: [models.{name}] has unknown keys {unknown} (known: {', '.join(MODEL_KEYS)})"
        )
    source = table.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ModelsError(
            f'{origin}: [models.{name}] needs source = "demo", a .nemo path or a hub name'
        )
    decoder = table.get("decoder")
    if decoder is not None and decoder not in DECODERS:
        raise ModelsError(f"{origin}: [models.{name}] decoder must be one of {', '.join(DECODERS)}")
    languages = table.get("languages")
    if languages is not None and (
        not isinstance(languages, list) or not all(isinstance(x, str) and x for x in languages)
    ):
        raise ModelsError(f"{origin}: [models.{name}] languages must be a list of codes")
    try:
        max_slice = float(table["max_slice_s"]) if "max_slice_s" in table else None
        batch = int(table["batch_size"]) if "batch_size" in table else None
        workers = int(table["workers"]) if "workers" in table else None
        batch_audio = float(table["max_batch_audio_s"]) if "max_batch_audio_s" in table else None
    except (TypeError, ValueError) as exc:
        raise ModelsError(f"{origin}: [models.{name}]: {exc}") from None
    if (max_slice is not None and max_slice < 2) or (batch is not None and batch < 1):
        raise ModelsError(f"{origin}: [models.{name}] max_slice_s must be >= 2, batch_size >= 1")
    if (workers is not None and workers < 1) or (batch_audio is not None and batch_audio <= 0):
        raise ModelsError(f"{origin}: [models.{name}] workers must be >= 1, max_batch_audio_s > 0")
    precision = table.get("precision")
    if precision is not None and precision not in PRECISIONS:
        raise ModelsError(
            f"{origin}: [models.{name}] precision must be one of {', '.join(PRECISIONS)}"
        )
    fast = table.get("fast_decoding")
    if fast is not None and not isinstance(fast, bool):
        raise ModelsError(f"{origin}: [models.{name}] fast_decoding must be true or false")
    device = table.get("device")
    return ModelSettings(
        name=name,
        source=source.strip(),
        decoder=decoder,
        max_slice_s=max_slice,
        languages=tuple(x.lower() for x in languages) if languages is not None else None,
        batch_size=batch,
        device=str(device) if device is not None else None,
        workers=workers,
        max_batch_audio_s=batch_audio,
        precision=precision,
        fast_decoding=fast,
        origin=origin,
    )


def _models_file(path: Path) -> list[ModelSettings]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelsError(f"cannot read models file {path}: {exc}") from None
    tables = data.get("models")
    if not isinstance(tables, dict) or not tables:
        raise ModelsError(f"models file {path} has no [models.NAME] table")
    base = path.parent
    found = []
    for name, table in tables.items():
        model = _model_from_table(name, table, str(path))
        source = model.source
        if source.endswith(".nemo") and not Path(source).is_absolute():
            # Relative paths are relative to the file, as users expect of a config file.
            model = dataclasses.replace(model, source=str(base / source))
        found.append(model)
    return found


def model_table(settings: Settings) -> dict[str, ModelSettings]:
    """Every served model by name, in order (the first is the default). Raises
    ``ModelsError`` for a bad models file or two models with one name."""
    found = _models_file(settings.models_file) if settings.models_file is not None else []
    for item in settings.models:
        name, sep, source = item.partition("=")
        if not sep or os.sep in name:  # a path may hold "=" too
            name, source = model_display_name(item), item
        name, source = name.strip(), source.strip()
        if not name or not source:
            raise ModelsError(f"--model {item!r}: expected SOURCE or NAME=SOURCE")
        found.append(ModelSettings(name=name, source=source))
    if not found:
        found.append(ModelSettings(name="demo", source="demo"))
    # The demo model knows English only (its tokenizer does not say so).
    found = [
        dataclasses.replace(m, languages=("en",))
        if m.source == "demo" and m.languages is None
        else m
        for m in found
    ]
    table: dict[str, ModelSettings] = {}
    for model in found:
        other = table.get(model.name)
        if other is not None:
            raise ModelsError(
                f"two models are named {model.name!r}: {other.source} ({other.origin}) and "
                f"{model.source} ({model.origin}); give one another name (NAME=SOURCE or a "
                "[models.NAME] table)"
            )
        table[model.name] = model
    return table
