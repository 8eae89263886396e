"""Stream a multipart upload to ``spool/<job_id>/upload`` with aiofiles, under a byte cap.

The file part is read in chunks and written as it arrives (never buffered whole; aiohttp's
``client_max_size`` does not cap ``read_chunk``, so bytes are counted here). Its kind is
sniffed from the first bytes; anything outside the allow-list is refused before ffmpeg
ever sees it. The client's file name is kept as metadata only, never used in a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import unicodedata
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiofiles
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from aiotranscribe.audio import out_of_space
from aiotranscribe.sniff import SNIFF_BYTES, sniff

CHUNK_BYTES = 256 * 1024
# Room for the multipart framing and small form fields on top of the file cap, when judging
# a request by its Content-Length.
FORM_OVERHEAD_BYTES = 64 * 1024
FIELD_MAX_BYTES = 4096
# Fields are small but not free: bound their number so a body of many tiny fields cannot
# grow memory past what the upload cap allows for the file.
MAX_FIELDS = 32
FILE_FIELD = "file"
# A form field naming the audio's URL instead of a file part: fetched by ``fetch``.
URL_FIELD = "audio_url"
ALLOWED_KINDS = "wav, mp3, flac, ogg/opus, m4a/mp4/aac, webm/mkv"


class UploadError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass
class Upload:
    path: Path | None = None
    filename: str = "upload"
    size: int = 0
    kind: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    multi: dict[str, list[str]] = field(default_factory=dict)
    """Every value of each field, in order (repeated fields such as ``a[]``)."""


def clean_filename(name: str | None) -> str:
    """A display-safe version of the client's file name (metadata only)."""
    if not name:
        return "upload"
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    return name.strip()[:255] or "upload"


def too_large(limit: int) -> UploadError:
    mib = limit / (1024 * 1024)
    return UploadError(
        413, "too_large", f"the upload is larger than this server's limit of {mib:g} MiB"
    )


def check_content_length(request: web.Request, limit: int) -> None:
    length = request.content_length
    if length is not None and length > limit + FORM_OVERHEAD_BYTES:
        raise too_large(limit)


async def _read_field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(FIELD_MAX_BYTES):
        data.extend(chunk)
        if len(data) > FIELD_MAX_BYTES:
            raise UploadError(400, "field_too_large", f"form field {part.name!r} is too long")
    return data.decode("utf-8", "replace").strip()


@contextlib.contextmanager
def full_spool_is_507() -> Iterator[None]:
    """A full spool is the client's answer (507), not a server bug (500 and a traceback)."""
    try:
        yield
    except OSError as exc:
        if out_of_space(exc):
            raise UploadError(
                507,
                "insufficient_storage",
                "the server has no disk space left for this upload; try again later",
            ) from None
        raise


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK_BYTES):
        yield chunk


async def write_stream(
    chunks: AsyncIterator[bytes], dest: Path, limit: int, upload: Upload
) -> None:
    """Write ``chunks`` to ``dest`` under the byte cap, sniffing the kind from the first bytes,
    and fsync it. Raises UploadError (413, 415, 400 empty); the caller removes ``dest``."""
    head = bytearray()
    async with aiofiles.open(dest, "wb") as out:
        async for chunk in chunks:
            upload.size += len(chunk)
            if upload.size > limit:
                raise too_large(limit)
            if upload.kind is None:
                head.extend(chunk)
                if len(head) >= SNIFF_BYTES:
                    upload.kind = _judge(bytes(head))
            await out.write(chunk)
        await out.flush()
        # On disk before the job is committed: an accepted job's audio survives a crash.
        await asyncio.to_thread(os.fsync, out.fileno())
    if upload.size == 0:
        raise UploadError(400, "empty_file", "the uploaded file is empty")
    if upload.kind is None:
        upload.kind = _judge(bytes(head))


def _judge(head: bytes) -> str:
    kind = sniff(head)
    if kind is None:
        raise UploadError(
            415,
            "unsupported_media_type",
            f"the file is not audio this server accepts (allowed: {ALLOWED_KINDS})",
        )
    return kind


async def _next_part(reader: MultipartReader) -> MultipartReader | BodyPartReader | None:
    try:
        return await reader.next()
    except (ValueError, HttpProcessingError):  # e.g. control characters in a part's headers
        raise UploadError(400, "bad_request", "malformed multipart part headers") from None


def _publish(partial: Path, final: Path) -> None:
    """Rename the finished upload into place and make the rename durable."""
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def receive_upload(request: web.Request, job_dir: Path, limit: int) -> Upload:
    """Read the whole multipart body: the ``file`` part to disk, other parts as short fields.
    A form with an ``audio_url`` field and no file part comes back with ``path`` None.

    The file is written to ``upload.part``, fsynced, and renamed to ``upload`` only once the
    whole body was read, so ``upload`` is always complete. ``job_dir`` must exist. Raises
    UploadError (400/413/415; 507 when the spool's disk is full); the caller removes
    ``job_dir`` on any error.
    """
    check_content_length(request, limit)
    if not request.content_type.startswith("multipart/"):
        raise UploadError(
            400, "bad_request", "send the audio as multipart/form-data with a 'file' part"
        )
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise UploadError(400, "bad_request", f"malformed multipart body: {exc}") from None
    upload = Upload()
    fields_seen = 0
    partial = job_dir / "upload.part"
    while (part := await _next_part(reader)) is not None:
        if not isinstance(part, BodyPartReader):
            raise UploadError(400, "bad_request", "nested multipart bodies are not accepted")
        if part.name == FILE_FIELD and upload.path is None:
            upload.path = job_dir / "upload"
            upload.filename = clean_filename(part.filename)
            with full_spool_is_507():
                await write_stream(_part_chunks(part), partial, limit, upload)
        elif part.filename is not None or part.name == FILE_FIELD:
            raise UploadError(400, "bad_request", "send exactly one file, in the 'file' part")
        else:
            # Every other part is a field, named or not, and is read under the field limits:
            # a part skipped unread would be drained by aiohttp without counting its bytes.
            fields_seen += 1
            if fields_seen > MAX_FIELDS:
                raise UploadError(400, "bad_request", f"more than {MAX_FIELDS} form fields")
            value = await _read_field(part)
            if part.name:
                upload.fields[part.name] = value
                upload.multi.setdefault(part.name, []).append(value)
    if upload.path is None:
        if upload.fields.get(URL_FIELD):
            return upload  # the caller fetches it (``fetch``)
        raise UploadError(400, "missing_file", "no 'file' part (or 'audio_url' field) in the form")
    if upload.fields.get(URL_FIELD):
        raise UploadError(400, "bad_request", "send a 'file' part or an 'audio_url', not both")
    await publish(partial, upload.path)
    return upload


async def publish(partial: Path, final: Path) -> None:
    """Rename a finished ``upload.part`` to ``upload``, durably (507 on a full disk)."""
    with full_spool_is_507():
        await asyncio.to_thread(_publish, partial, final)
