"""Audio by URL: an ``audio_url`` form field instead of a file part.

The server downloads it under the same SSRF rules as webhooks (``netguard``: http(s) only,
public addresses only unless ``--allow-private-urls``, the checked address pinned for the
connection, at most ``MAX_REDIRECTS`` redirects, each checked) and streams it to the job's
spool directory exactly like an upload: the same byte cap, the same magic-byte sniff, the
same ``upload.part`` -> fsync -> ``upload`` rename. Deadlines: ``url_connect_timeout_s`` per
hop for DNS plus connect, ``fetch_timeout_s`` for the whole download.

What a client gets when it goes wrong (never a 500):

- 400 ``bad_request``: not an absolute URL; 400 ``url_forbidden``: another scheme, or an
  address the SSRF rules refuse (also after a redirect); 400 ``url_unsupported``: ``s3://``
  without an S3 client or credentials on the server (``aiotranscribe.s3``);
- 422 ``url_unreachable``: the name does not resolve, the connection fails or times out,
  the origin answers anything but 200, or the download passes ``fetch_timeout_s``;
- 413 ``too_large``, 415 ``unsupported_media_type``, 400 ``empty_file``: as for an upload.

In every case the job directory is removed by the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote

import aiohttp
from yarl import URL

from aiotranscribe import s3
from aiotranscribe.config import Settings
from aiotranscribe.netguard import Unreachable, UrlError, UrlPolicy, check_syntax, open_url
from aiotranscribe.uploads import (
    CHUNK_BYTES,
    URL_FIELD,
    Upload,
    clean_filename,
    full_spool_is_507,
    publish,
    too_large,
    write_stream,
)

# Redirect hops followed (each target checked like the first URL).
MAX_REDIRECTS = 5
# The status of a URL the server could not fetch: the request was well formed, the audio it
# names could not be had (422, like audio that cannot be decoded), unlike a malformed URL (400).
UNREACHABLE_STATUS = 422
ACCEPT = "audio/*, video/*, application/octet-stream;q=0.9, */*;q=0.5"


def unreachable(detail: str) -> UrlError:
    return UrlError(UNREACHABLE_STATUS, "url_unreachable", f"audio_url: {detail}", URL_FIELD)


def filename_of(url: URL) -> str:
    """The URL's last path segment, as a display name (metadata only)."""
    name = unquote(url.path.rsplit("/", 1)[-1])
    return clean_filename(name) if name else "audio"


def is_s3(raw: str) -> bool:
    return raw.lower().startswith("s3://")


def check_audio_url(raw: str) -> URL:
    """Syntax and scheme, before anything is fetched (400s)."""
    if is_s3(raw):
        bucket, key = s3.parse(raw)
        return URL.build(scheme="s3", host=bucket, path="/" + key)
    return check_syntax(raw, URL_FIELD)


@asynccontextmanager
async def _http_object(
    url: URL, settings: Settings
) -> AsyncIterator[tuple[int | None, AsyncIterator[bytes]]]:
    """``(content_length, chunks)`` of an http(s) URL, under the SSRF rules."""
    policy = UrlPolicy.of(settings, MAX_REDIRECTS)
    headers = {"Accept": ACCEPT}
    async with open_url("GET", url, policy, param=URL_FIELD, headers=headers) as response:
        if response.status != 200:
            raise unreachable(f"the server answered {response.status}, not 200")
        yield response.content_length, response.content.iter_chunked(CHUNK_BYTES)


async def fetch_audio(raw: str, job_dir: Path, settings: Settings, upload: Upload) -> None:
    """Download ``raw`` to ``job_dir/upload`` and fill in ``upload`` (path, size, kind,
    filename). Raises UrlError or UploadError; leaves removing ``job_dir`` to the caller."""
    url = check_audio_url(raw)
    limit = settings.max_upload_bytes
    partial = job_dir / "upload.part"
    upload.filename = filename_of(url)
    source = (
        s3.open_object(raw, settings.s3_endpoint_url, unreachable)
        if is_s3(raw)
        else _http_object(url, settings)
    )
    try:
        async with asyncio.timeout(settings.fetch_timeout_s), source as (length, chunks):
            if length is not None and length > limit:
                raise too_large(limit)
            with full_spool_is_507():
                await write_stream(chunks, partial, limit, upload)
    except TimeoutError:
        raise unreachable(f"the download took longer than {settings.fetch_timeout_s:g} s") from None
    except Unreachable as exc:
        raise unreachable(str(exc)) from None
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise unreachable(f"the download broke off ({type(exc).__name__})") from None
    upload.path = job_dir / "upload"
    await publish(partial, upload.path)
