"""``aiotranscribe transcribe FILE``: upload, follow the job live, print or save the result.

Exits 0 on success, 1 with the server's message on failure, 130 after Ctrl-C (the job is
cancelled on the server first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

FORMATS = ("text", "json", "srt", "vtt", "verbose_json")
UPLOAD_CHUNK = 256 * 1024
SERVICE_RESTART = 1012
# How long the client waits for a restarting server to come back before it gives up.
RESTART_WAIT_S = 300.0


class ClientFailure(Exception):
    pass


def add_client_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("transcribe", help="transcribe a file with a running server")
    p.add_argument("file", type=Path)
    p.add_argument("--url", default=os.environ.get("AIOTRANSCRIBE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--format", default="text", choices=FORMATS)
    p.add_argument("--model", default=None, help="served model name (default: the server's)")
    p.add_argument("--language", default=None, help="ISO 639-1 code of the speech, e.g. en")
    p.add_argument(
        "--task",
        default=None,
        choices=("transcribe", "translate"),
        help="translate: text in --target-language (default en), for models that translate",
    )
    p.add_argument("--target-language", default=None, help="language of the text when translating")
    p.add_argument("-o", "--output", type=Path, default=None, help="write here instead of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


async def _chunks(path: Path, progress: Progress, task: Any) -> AsyncIterator[bytes]:
    with path.open("rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, UPLOAD_CHUNK):
            progress.advance(task, len(chunk))
            yield chunk


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    try:
        body = await resp.json(content_type=None)
        return str(body.get("detail") or body)
    except (ValueError, aiohttp.ContentTypeError):
        return (await resp.text())[:500]


async def _submit(
    session: aiohttp.ClientSession, args: argparse.Namespace, progress: Progress
) -> str:
    size = args.file.stat().st_size
    task = progress.add_task("upload", total=size, stage="uploading")
    with aiohttp.MultipartWriter("form-data") as form:
        part = form.append(_chunks(args.file, progress, task))
        part.set_content_disposition("form-data", name="file", filename=args.file.name)
        for name in ("model", "language", "task", "target_language"):
            value = getattr(args, name)
            if value:
                form.append(value).set_content_disposition("form-data", name=name)
        async with session.post(f"{args.url}/transcribe/async", data=form) as resp:
            if resp.status >= 400:
                raise ClientFailure(f"upload refused ({resp.status}): {await _error_text(resp)}")
            body = await resp.json()
    progress.remove_task(task)
    return str(body["job_id"])


async def _follow(
    session: aiohttp.ClientSession, url: str, job_id: str, progress: Progress
) -> dict[str, Any]:
    """Watch the job's events until a terminal one; returns it. Reconnects with ``after``
    when the socket drops, and waits out a server restart (close code 1012; the job is kept)
    for up to ``RESTART_WAIT_S``."""
    task = progress.add_task("job", total=1.0, stage="queued")
    last = 0
    unreachable_since: float | None = None
    loop = asyncio.get_running_loop()
    while True:
        ws_url = f"{url}/jobs/{job_id}/events?after={last}"
        try:
            async with session.ws_connect(ws_url, heartbeat=30) as ws:
                unreachable_since = None
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    event = json.loads(msg.data)
                    last = event["seq"]
                    if event["type"] == "progress":
                        progress.update(task, completed=event["progress"], stage=event["stage"])
                    elif event["type"] == "status":
                        progress.update(task, stage=event["stage"])
                    elif event["type"] in ("completed", "failed", "cancelled"):
                        done = 1.0 if event["type"] == "completed" else None
                        progress.update(task, completed=done)
                        return event
                if ws.close_code == SERVICE_RESTART:
                    progress.update(task, stage="restarting")
        except (aiohttp.ClientConnectionError, aiohttp.WSServerHandshakeError) as exc:
            if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status == 404:
                raise ClientFailure(f"job {job_id} is gone from the server") from exc
            unreachable_since = unreachable_since or loop.time()
            if loop.time() - unreachable_since > RESTART_WAIT_S:
                raise
            progress.update(task, stage="restarting")
            await asyncio.sleep(2.0)
            continue
        await asyncio.sleep(0.5)  # the socket dropped before the end: resume after `last`


async def transcribe_file(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    columns = [
        TextColumn("[bold]{task.fields[stage]:>12}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeRemainingColumn(),
    ]
    progress = Progress(*columns, DownloadColumn(), console=console, disable=args.quiet)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    job_id = None
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            with progress:
                job_id = await _submit(session, args, progress)
                final = await _follow(session, args.url, job_id, progress)
            if final["type"] == "failed":
                raise ClientFailure(f"transcription failed: {final['error']['message']}")
            if final["type"] == "cancelled":
                raise ClientFailure(f"job cancelled: {final.get('reason')}")
            async with session.get(
                f"{args.url}/jobs/{job_id}/result", params={"format": args.format}
            ) as resp:
                if resp.status >= 400:
                    raise ClientFailure(f"could not fetch the result: {await _error_text(resp)}")
                text = await resp.text()
        except asyncio.CancelledError:
            if job_id is not None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with asyncio.timeout(5):
                        await session.post(f"{args.url}/jobs/{job_id}/cancel")
                console.print(f"cancelled job {job_id}")
            raise
    if args.output:
        args.output.write_text(text, encoding="utf-8")
        console.print(f"wrote {args.output}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def run_client(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        print(f"error: no such file: {args.file}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(transcribe_file(args))
    except KeyboardInterrupt:
        return 130
    except ClientFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except aiohttp.ClientError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
