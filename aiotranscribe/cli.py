"""``aiotranscribe serve`` and ``aiotranscribe transcribe FILE``.

Every ``serve`` flag can also be set with an env var: ``--max-upload-mb`` is
``AIOTRANSCRIBE_MAX_UPLOAD_MB``. Flags win over env vars.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from aiotranscribe.config import ENV_PREFIX, Settings, env_default

TRUE = ("1", "true", "yes", "on")


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the HTTP server")
    d = Settings()
    # argparse checks ``choices`` only for values given on the command line, not for
    # defaults: an env var is checked after parsing (see ``check_env_choices``).
    env_choices: list[tuple[str, str, tuple[str, ...]]] = []

    def opt(flag: str, default: object, help: str, **kw: object) -> None:
        name = flag.lstrip("-")
        env = env_default(name)
        p.add_argument(flag, default=env if env is not None else default, help=help, **kw)  # type: ignore[arg-type]
        choices = kw.get("choices")
        if env is not None and isinstance(choices, list):
            env_choices.append((name.replace("-", "_"), flag, tuple(choices)))

    p.set_defaults(env_choices=env_choices)

    def many(flag: str, help: str) -> None:
        """A repeatable flag; its env var holds the values comma-separated."""
        env = env_default(flag.lstrip("-"))
        values = [v.strip() for v in env.split(",") if v.strip()] if env else []
        p.add_argument(flag, action="append", default=None, help=help)
        p.set_defaults(**{"env_" + flag.lstrip("-").replace("-", "_"): values})

    opt("--host", d.host, "address to bind (0.0.0.0 in a container)")
    opt("--port", d.port, "TCP port", type=int)
    opt(
        "--model",
        ",".join(d.models),
        "model(s) to serve, comma-separated, each SOURCE or NAME=SOURCE: 'demo', a .nemo "
        "path, or a hub name such as nvidia/parakeet-tdt-0.6b-v2; the first is the default "
        "(none and no --models-file: demo)",
    )
    opt(
        "--models-file",
        None,
        "a TOML file of [models.NAME] tables (source, decoder, max_slice_s, languages, "
        "batch_size, device, workers, max_batch_audio_s, precision, fast_decoding); its "
        "models come before --model's",
    )
    opt("--device", d.device, "auto, cpu, cuda or cuda:N; comma-separated: one worker each")
    opt(
        "--executor",
        d.executor,
        "where models live: process (default) or thread",
        choices=["process", "thread"],
    )
    opt("--torch-threads", d.torch_threads, "CPU threads per worker (default: torch's)", type=int)
    opt("--spool-dir", str(d.spool_dir), "directory for uploads and converted audio")
    opt(
        "--store",
        d.store,
        "where jobs live: sqlite (durable, default), memory, or a Redis URL "
        "redis://[:password@]host:port/db",
    )
    opt("--data-dir", str(d.data_dir), "directory of the SQLite job database")
    opt(
        "--owner-ttl-s",
        d.owner_ttl_s,
        "Redis store: a replica silent this long loses its jobs to another replica, seconds",
        type=float,
    )
    opt(
        "--sqlite-synchronous",
        d.sqlite_synchronous,
        "full (survives power loss, default) or normal (survives crashes)",
        choices=["full", "normal"],
    )
    p.add_argument(
        "--no-workers",
        action="store_true",
        default=(env_default("no-workers") or "").lower() in TRUE,
        help="run no model here: batches go to `aiotranscribe worker` processes through "
        "the Redis of --store",
    )
    opt(
        "--shared-dir",
        None,
        "a directory every replica and worker reaches (RWX volume): job directories live "
        "there and workers read audio by a name relative to it (needs --store redis://)",
    )
    opt(
        "--blob-store",
        None,
        "s3://bucket/prefix: converted audio is put there for workers, which fetch their "
        "slices' bytes (needs --no-workers; endpoint: --s3-endpoint-url)",
    )
    opt("--max-upload-mb", d.max_upload_mb, "largest upload, MiB", type=float)
    opt("--max-audio-seconds", d.max_audio_seconds, "longest audio, seconds", type=float)
    opt(
        "--chunk-seconds",
        d.chunk_seconds,
        "longest slice sent to the model (default: 20 CPU, 60 GPU)",
        type=float,
    )
    opt("--batch-size", d.batch_size, "most slices per model call", type=int)
    opt(
        "--max-batch-audio-s",
        d.max_batch_audio_s,
        "most audio per model call, seconds, padded (slices x the longest); default: no bound",
        type=float,
    )
    opt(
        "--max-batch-wait-ms",
        d.max_batch_wait_ms,
        "how long a free worker waits to fill a batch, from the oldest slice's arrival",
        type=float,
    )
    opt(
        "--workers",
        d.workers,
        "worker processes per model on each --device entry (each loads the model)",
        type=int,
    )
    opt(
        "--precision",
        d.precision,
        "inference precision on CUDA: fp32 (default), bf16 or fp16 autocast",
        choices=["fp32", "bf16", "fp16"],
    )
    fast = env_default("fast-decoding")
    p.add_argument(
        "--fast-decoding",
        action=argparse.BooleanOptionalAction,
        default=d.fast_decoding if fast is None else fast.lower() not in ("0", "false", "off"),
        help="RNNT/TDT: NeMo's greedy label-looping decoder with CUDA graphs (default: on)",
    )
    opt(
        "--max-queued-audio-s",
        d.max_queued_audio_s,
        "audio seconds admitted per model (every job not ended) before 503",
        type=float,
    )
    opt(
        "--admission-estimate-s",
        d.admission_estimate_s,
        "audio seconds a job counts for until its length is known",
        type=float,
    )
    opt("--job-ttl-s", d.job_ttl_s, "how long finished jobs are kept, seconds", type=float)
    opt(
        "--shutdown-timeout-s",
        d.shutdown_timeout_s,
        "on SIGTERM, how long running jobs may go on before the server stops",
        type=float,
    )
    opt(
        "--log-format",
        d.log_format,
        "json or console (default: console on a TTY)",
        choices=["json", "console"],
    )
    opt("--log-level", d.log_level, "debug, info, warning, error")
    opt("--static-dir", str(d.static_dir), "web UI files served at /")
    opt(
        "--convert-timeout-s",
        d.convert_timeout_s,
        "wall-clock limit on one ffmpeg conversion, seconds",
        type=float,
    )
    opt(
        "--janitor-interval-s",
        d.janitor_interval_s,
        "how often the spool is swept and old jobs are deleted, seconds",
        type=float,
    )
    opt(
        "--header-timeout-s",
        d.header_timeout_s,
        "how long a client may take to send request headers, seconds",
        type=float,
    )
    opt(
        "--upload-min-rate-kib-s",
        d.upload_min_rate_kib_s,
        "slowest accepted request body, KiB/s (then 408)",
        type=float,
    )
    opt(
        "--upload-grace-s",
        d.upload_grace_s,
        "seconds a body may lag behind the minimum rate",
        type=float,
    )
    opt(
        "--ws-send-timeout-s",
        d.ws_send_timeout_s,
        "an event WebSocket not taking frames this long is closed (1008), seconds",
        type=float,
    )
    opt(
        "--sse-keepalive-s",
        d.sse_keepalive_s,
        "SSE streams send a keep-alive comment after this long without output, seconds",
        type=float,
    )
    opt(
        "--convert-min-timeout-s",
        d.convert_min_timeout_s,
        "floor of a conversion's wall-clock limit, seconds",
        type=float,
    )
    opt(
        "--ffmpeg-max-memory-mb",
        d.ffmpeg_max_memory_mb,
        "address-space limit of each ffmpeg/ffprobe process, MiB (0: none)",
        type=float,
    )
    opt(
        "--ffmpeg-max-cpu-s",
        d.ffmpeg_max_cpu_s,
        "CPU-time limit of each ffmpeg/ffprobe process, seconds (default: its wall limit)",
        type=float,
    )
    many(
        "--api-key",
        "an accepted API key, 'key' or 'tenant=key' (repeatable; env: comma-separated)",
    )
    opt("--api-keys-file", d.api_keys_file, "file of API keys, one 'tenant key' per line")
    opt(
        "--metrics-access",
        d.metrics_access,
        "key (default: /metrics needs a key when keys are set) or open",
        choices=["key", "open"],
    )
    many("--cors-origin", "an origin allowed to call the API from a browser (repeatable)")
    many(
        "--allowed-host",
        "a Host name this server answers to (repeatable; default: the bind address, "
        "and loopback names when bound to loopback; '*': any)",
    )
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        default=(env_default("allow-private-urls") or "").lower() in TRUE,
        help="let audio_url and callback_url reach loopback, private and link-local addresses",
    )
    many(
        "--allow-network",
        "a network (CIDR) audio_url and callback_url may reach though private (repeatable)",
    )
    opt(
        "--url-connect-timeout-s",
        d.url_connect_timeout_s,
        "DNS plus connect deadline of outbound requests, seconds",
        type=float,
    )
    opt("--fetch-timeout-s", d.fetch_timeout_s, "longest audio_url download, seconds", type=float)
    opt(
        "--s3-endpoint-url",
        d.s3_endpoint_url,
        "S3-compatible endpoint for audio_url=s3://bucket/key (default: AWS; credentials from "
        "the usual AWS env vars/files)",
    )
    opt("--public-url", d.public_url, "base URL of this server for links in webhooks")
    opt("--webhook-secret", d.webhook_secret, "webhook signing key (whsec_<base64> or text)")
    opt("--webhook-timeout-s", d.webhook_timeout_s, "one webhook attempt's deadline", type=float)
    opt(
        "--webhook-retry-for-s",
        d.webhook_retry_for_s,
        "how long webhooks are retried after the job ended, seconds",
        type=float,
    )
    opt(
        "--webhook-retry-base-s",
        d.webhook_retry_base_s,
        "first webhook retry's back-off ceiling (doubles per attempt), seconds",
        type=float,
    )
    opt(
        "--webhook-retry-max-delay-s",
        d.webhook_retry_max_delay_s,
        "largest back-off ceiling between webhook attempts, seconds",
        type=float,
    )
    opt(
        "--webhook-inline-max-kib",
        d.webhook_inline_max_kib,
        "largest result sent inside a webhook (bigger: a link only), KiB",
        type=float,
    )
    opt("--ffmpeg", d.ffmpeg, "ffmpeg binary")
    opt("--ffprobe", d.ffprobe, "ffprobe binary")


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        host=args.host,
        port=int(args.port),
        models=tuple(m.strip() for m in str(args.model).split(",") if m.strip()),
        models_file=Path(args.models_file) if args.models_file else None,
        device=args.device,
        executor=args.executor,
        torch_threads=int(args.torch_threads) if args.torch_threads else None,
        spool_dir=Path(args.spool_dir),
        store=args.store,
        data_dir=Path(args.data_dir),
        sqlite_synchronous=args.sqlite_synchronous,
        no_workers=bool(args.no_workers),
        shared_dir=Path(args.shared_dir) if args.shared_dir else None,
        blob_store=args.blob_store or None,
        max_upload_mb=float(args.max_upload_mb),
        max_audio_seconds=float(args.max_audio_seconds),
        chunk_seconds=float(args.chunk_seconds) if args.chunk_seconds else None,
        batch_size=int(args.batch_size),
        max_batch_audio_s=float(args.max_batch_audio_s) if args.max_batch_audio_s else None,
        max_batch_wait_ms=float(args.max_batch_wait_ms),
        workers=int(args.workers),
        precision=args.precision,
        fast_decoding=bool(args.fast_decoding),
        max_queued_audio_s=float(args.max_queued_audio_s),
        admission_estimate_s=float(args.admission_estimate_s),
        job_ttl_s=float(args.job_ttl_s),
        owner_ttl_s=float(args.owner_ttl_s),
        shutdown_timeout_s=float(args.shutdown_timeout_s),
        convert_timeout_s=float(args.convert_timeout_s),
        janitor_interval_s=float(args.janitor_interval_s),
        static_dir=Path(args.static_dir),
        ffmpeg=args.ffmpeg,
        ffprobe=args.ffprobe,
        log_format=args.log_format,
        log_level=args.log_level,
        header_timeout_s=float(args.header_timeout_s),
        upload_min_rate_kib_s=float(args.upload_min_rate_kib_s),
        upload_grace_s=float(args.upload_grace_s),
        ws_send_timeout_s=float(args.ws_send_timeout_s),
        sse_keepalive_s=float(args.sse_keepalive_s),
        convert_min_timeout_s=float(args.convert_min_timeout_s),
        ffmpeg_max_memory_mb=float(args.ffmpeg_max_memory_mb),
        ffmpeg_max_cpu_s=float(args.ffmpeg_max_cpu_s) if args.ffmpeg_max_cpu_s else None,
        api_keys=_many(args, "api_key"),
        api_keys_file=Path(args.api_keys_file) if args.api_keys_file else None,
        metrics_access=args.metrics_access,
        cors_origins=_many(args, "cors_origin"),
        allowed_hosts=_many(args, "allowed_host"),
        allow_private_urls=bool(args.allow_private_urls),
        allowed_networks=_many(args, "allow_network"),
        url_connect_timeout_s=float(args.url_connect_timeout_s),
        fetch_timeout_s=float(args.fetch_timeout_s),
        s3_endpoint_url=args.s3_endpoint_url or None,
        public_url=args.public_url or None,
        webhook_secret=args.webhook_secret or None,
        webhook_timeout_s=float(args.webhook_timeout_s),
        webhook_retry_for_s=float(args.webhook_retry_for_s),
        webhook_retry_base_s=float(args.webhook_retry_base_s),
        webhook_retry_max_delay_s=float(args.webhook_retry_max_delay_s),
        webhook_inline_max_kib=float(args.webhook_inline_max_kib),
    )


def _many(args: argparse.Namespace, dest: str) -> tuple[str, ...]:
    """A repeatable flag's values; its env var's when the flag was not given."""
    given = getattr(args, dest)
    return tuple(given if given is not None else getattr(args, "env_" + dest))


def serve(settings: Settings) -> None:
    from aiotranscribe.logsetup import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(_serve(settings))


# How long aiohttp waits for request handlers once the jobs are stopped (they end at once).
HANDLER_GRACE_S = 5.0


async def _serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT; then drain while still listening (``/ready`` 503, new
    submissions 503) for up to ``shutdown_timeout_s``, then stop. A second signal stops at
    once. Either way, what is left resumes at the next start."""
    import structlog
    from aiohttp import web

    from aiotranscribe.app import create_app
    from aiotranscribe.keys import service_key

    log = structlog.get_logger("aiotranscribe.cli")
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=HANDLER_GRACE_S,
        # The header deadline: aiohttp closes a connection that has not delivered a whole
        # request head this long after it opened or after its previous answer (a request
        # that is being handled is never cut by it).
        keepalive_timeout=settings.header_timeout_s,
        access_log_format='%a "%r" %s %b %Tf',
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info("listening", host=settings.host, port=settings.port)
        loop = asyncio.get_running_loop()
        first, second = asyncio.Event(), asyncio.Event()

        def on_signal(name: str) -> None:
            log.info("signal", signal=name, stopping_now=first.is_set())
            (second if first.is_set() else first).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        await first.wait()
        drain = asyncio.ensure_future(app[service_key].drain(settings.shutdown_timeout_s))
        hurry = asyncio.ensure_future(second.wait())
        await asyncio.wait({drain, hurry}, return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
    finally:
        await runner.cleanup()
    if not drain.done():
        drain.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aiotranscribe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    from aiotranscribe.client import add_client_parser

    add_client_parser(sub)
    from aiotranscribe.remote_worker import add_worker_parser

    add_worker_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        for dest, flag, choices in args.env_choices:
            if getattr(args, dest) not in choices:
                env = ENV_PREFIX + dest.upper()
                parser.error(
                    f"{env} (for {flag}): invalid choice {getattr(args, dest)!r} "
                    f"(choose from {', '.join(choices)})"
                )
        settings = settings_from_args(args)
        from aiotranscribe.store import REDIS_SCHEMES, check_store

        try:
            check_store(settings.store)
        except ValueError as exc:
            parser.error(f"--store: {exc}")
        if settings.no_workers and not settings.store.startswith(REDIS_SCHEMES):
            parser.error("--no-workers needs --store redis://... (the workers' queue)")
        if settings.shared_dir and not settings.store.startswith(REDIS_SCHEMES):
            parser.error("--shared-dir needs --store redis://... (the replicas' shared jobs)")
        if settings.blob_store:
            from aiotranscribe.blobstore import check_url

            if not settings.no_workers:
                parser.error("--blob-store is for remote workers: it needs --no-workers")
            try:
                check_url(settings.blob_store)
            except ValueError as exc:
                parser.error(f"--blob-store: {exc}")
        from aiotranscribe.api.access import KeysFileError, load_keys
        from aiotranscribe.config import ModelsError, model_table
        from aiotranscribe.netguard import UrlPolicy

        try:
            load_keys(settings.api_keys, settings.api_keys_file)
            model_table(settings)
            UrlPolicy.of(settings)
        except (KeysFileError, ModelsError) as exc:
            parser.error(str(exc))
        except ValueError as exc:
            parser.error(f"--allow-network: {exc}")
        serve(settings)
    elif args.command == "worker":
        from aiotranscribe.store import REDIS_SCHEMES

        if not str(args.store or "").startswith(REDIS_SCHEMES):
            parser.error("worker: --store redis://... (the servers' Redis) is needed")
        from aiotranscribe.remote_worker import run_worker

        sys.exit(run_worker(args))
    else:
        from aiotranscribe.client import run_client

        sys.exit(run_client(args))
