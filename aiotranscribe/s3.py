"""``audio_url=s3://bucket/key``: read an object with aiobotocore (the ``s3`` extra), streamed
into the spool like any download.

The endpoint is the operator's (``--s3-endpoint-url``, default AWS), so the SSRF rules for
client-given URLs do not apply to it; the bucket and key are the client's. Credentials come
from botocore's usual chain (env vars, ``~/.aws``, instance roles): without any, or without
aiobotocore installed, s3:// URLs are refused with 400 ``url_unsupported``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from yarl import URL

from aiotranscribe.netguard import UrlError
from aiotranscribe.uploads import CHUNK_BYTES, URL_FIELD

# Missing objects, buckets and access rights, as botocore names them.
NOT_THERE = {"NoSuchKey", "NoSuchBucket", "404", "AccessDenied", "403", "InvalidBucketName"}


def unsupported(detail: str) -> UrlError:
    return UrlError(400, "url_unsupported", f"audio_url: {detail}", URL_FIELD)


def parse(raw: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://bucket/key`` URL; 400 when either is missing."""
    url = URL(raw)
    bucket, key = url.host or "", url.path.lstrip("/")
    if not bucket or not key:
        raise UrlError(400, "bad_request", "audio_url: expected s3://bucket/key", URL_FIELD)
    return bucket, key


@asynccontextmanager
async def open_object(
    raw: str, endpoint_url: str | None, unreachable: Callable[[str], UrlError]
) -> AsyncIterator[tuple[int | None, AsyncIterator[bytes]]]:
    """``(content_length, chunks)`` of the object; ``unreachable`` builds the error for an
    object that cannot be had (missing, denied, endpoint down)."""
    bucket, key = parse(raw)
    try:
        from aiobotocore.session import get_session
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise unsupported(
            "this server has no S3 client (install aiotranscribe[s3]); give an https URL "
            "(an S3 presigned URL works)"
        ) from None
    session = get_session()
    if await session.get_credentials() is None:
        raise unsupported("no S3 credentials are configured on this server")
    try:
        async with session.create_client("s3", endpoint_url=endpoint_url) as client:
            try:
                answer: dict[str, Any] = await client.get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                reason = "not found or not readable" if code in NOT_THERE else code
                raise unreachable(f"s3://{bucket}/{key}: {reason}") from None
            body = answer["Body"]
            try:
                yield answer.get("ContentLength"), body.iter_chunks(CHUNK_BYTES)
            finally:
                body.close()
    except BotoCoreError as exc:
        raise unreachable(f"S3 endpoint: {type(exc).__name__}") from None
