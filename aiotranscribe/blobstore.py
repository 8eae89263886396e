"""Converted audio in S3-compatible object storage, for workers on other machines.

``serve --blob-store s3://bucket/prefix``: once a job's audio is converted, the replica puts
the 16 kHz mono 16-bit WAV once, as ``<prefix>/<job id>/audio.wav``; a slice entry names
that object (``claimcheck``), and a worker fetches exactly its slice's bytes with one range
GET (the WAV's data offset + 2 bytes per frame). The object goes when the job's audio does
(the job ended, was deleted or expired); a bucket lifecycle rule is the backstop for a
delete that failed. Endpoint and credentials are found as for ``audio_url=s3://``
(``--s3-endpoint-url``; botocore's usual chain: env vars, ``~/.aws``, instance roles).
Redis only ever holds the object's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from aiotranscribe.sniff import wav_data_chunk

log = structlog.get_logger(__name__)

WAV = "audio.wav"
# What ``audio.convert`` writes: mono 16-bit PCM.
BYTES_PER_FRAME = 2
# Objects above this size go up in parts of it (S3 wants parts of 5 MiB at least, the last
# excepted), so no more than one part is ever held in memory.
PART_BYTES = 16 * 1024 * 1024
# How long closing waits for deletes under way.
CLOSE_WAIT_S = 10.0


class BlobError(Exception):
    """The object store refused or could not be reached (the message says which object)."""


def check_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket[/prefix]``; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"expected s3://bucket/prefix, not {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"no query or fragment in the blob store's URL: {url!r}")
    return parts.netloc, parts.path.strip("/")


def split_object_url(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; ValueError without a key."""
    bucket, key = check_url(url)
    if not key:
        raise ValueError(f"expected s3://bucket/key, not {url!r}")
    return bucket, key


def data_offset(wav: Path) -> int:
    """Where ``wav``'s samples start (44 for ffmpeg's ``-bitexact`` output, read rather than
    assumed: a WAV may carry other chunks before ``data``)."""
    with wav.open("rb") as f:
        found = wav_data_chunk(f)
    if found is None:
        raise BlobError(f"{wav.name}: no WAV data chunk")
    return found[0]


class S3:
    """One aiobotocore S3 client, open for the process's lifetime."""

    def __init__(self, endpoint_url: str | None) -> None:
        self.endpoint_url = endpoint_url
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("the S3 client is not open")
        return self._client

    async def open(self) -> None:
        try:
            from aiobotocore.session import get_session
        except ImportError:
            raise BlobError("no S3 client: install aiotranscribe[s3]") from None
        session = get_session()
        if await session.get_credentials() is None:
            raise BlobError("no S3 credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY...)")
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", endpoint_url=self.endpoint_url)
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def read_frames(self, url: str, offset: int, start: int, frames: int) -> bytes:
        """``frames`` frames from ``start`` of the WAV object ``url`` whose samples begin at
        byte ``offset``: one range GET of exactly those bytes."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_object_url(url)
        first = offset + BYTES_PER_FRAME * start
        wanted = BYTES_PER_FRAME * frames
        try:
            answer = await self.client.get_object(
                Bucket=bucket, Key=key, Range=f"bytes={first}-{first + wanted - 1}"
            )
            body = answer["Body"]
            try:
                data: bytes = await body.read()
            finally:
                body.close()
        except (BotoCoreError, ClientError) as exc:
            raise BlobError(f"{url}: {type(exc).__name__}: {exc}") from None
        if len(data) != wanted:
            raise BlobError(f"{url}: {len(data)} bytes instead of {wanted}")
        return data


class BlobStore:
    """The replica's side: puts each job's WAV once, deletes it with the job's audio."""

    def __init__(self, url: str, endpoint_url: str | None) -> None:
        self.bucket, self.prefix = check_url(url)
        self.s3 = S3(endpoint_url)
        self._deletes: set[asyncio.Task[None]] = set()

    def key(self, job_id: str) -> str:
        return f"{self.prefix}/{job_id}/{WAV}" if self.prefix else f"{job_id}/{WAV}"

    def url(self, job_id: str) -> str:
        return f"s3://{self.bucket}/{self.key(job_id)}"

    async def ctx(self, _app: web.Application) -> AsyncIterator[None]:
        """A cleanup context: the client is open while the app runs; deletes under way at
        teardown get a moment to finish."""
        await self.s3.open()
        yield
        if self._deletes:
            await asyncio.wait(list(self._deletes), timeout=CLOSE_WAIT_S)
        await self.s3.close()

    async def publish(self, job_id: str, wav: Path) -> None:
        """Put ``wav`` as the job's object, unless an object of its size is there already (a
        resumed job). Raises BlobError."""
        from botocore.exceptions import BotoCoreError, ClientError

        client, key = self.s3.client, self.key(job_id)
        size = await asyncio.to_thread(os.path.getsize, wav)
        try:
            with contextlib.suppress(ClientError):  # 404: not there yet
                head = await client.head_object(Bucket=self.bucket, Key=key)
                if head.get("ContentLength") == size:
                    return
            if size <= PART_BYTES:
                body = await asyncio.to_thread(wav.read_bytes)
                await client.put_object(Bucket=self.bucket, Key=key, Body=body)
            else:
                await self._put_in_parts(key, wav)
        except (BotoCoreError, ClientError) as exc:
            raise BlobError(f"{self.url(job_id)}: {type(exc).__name__}: {exc}") from None
        log.info("blob_published", job_id=job_id, bytes=size)

    async def _put_in_parts(self, key: str, wav: Path) -> None:
        client = self.s3.client
        upload = await client.create_multipart_upload(Bucket=self.bucket, Key=key)
        upload_id = upload["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            with wav.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, PART_BYTES):
                    number = len(parts) + 1
                    answer = await client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                    )
                    parts.append({"ETag": answer["ETag"], "PartNumber": number})
            await client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    async def delete(self, job_id: str) -> None:
        """Delete the job's object (a missing one is no error); failures are logged."""
        try:
            await self.s3.client.delete_object(Bucket=self.bucket, Key=self.key(job_id))
        except Exception as exc:
            log.warning("blob_delete_failed", job_id=job_id, error=f"{type(exc).__name__}: {exc}")

    def forget(self, job_id: str) -> None:
        """Delete the job's object in the background (never blocks; a ``discard`` hook)."""
        task = asyncio.ensure_future(self.delete(job_id))
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)
