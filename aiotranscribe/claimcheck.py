"""The claim check: a slice entry names its audio and never carries it (SCALEOUT §2.4).

The replica (``Tickets``) gives each entry of ``q:slices:<model>`` the job's id (``job``:
workers skip slices of jobs that have ended) and one of:

- ``blob=s3://bucket/<prefix>/<job>/audio.wav`` and ``offset`` (where the WAV's samples
  start), with ``--blob-store``: the worker range-GETs exactly its slice's bytes;
- ``blob=shared:<job>/audio.wav``, with ``--shared-dir``: a name relative to the shared
  volume, which each worker resolves under its own ``--shared-dir`` (mounted anywhere);
- ``path=<absolute path>``, with neither: workers on the same host (today's behaviour).

The worker (``Claims``) turns an entry back into the ``(path, start, frames)`` its model
reads: the shared file itself, or a small WAV of the fetched slice in its scratch directory.
"""

from __future__ import annotations

import asyncio
import wave
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from aiotranscribe.audio import SAMPLE_RATE
from aiotranscribe.blobstore import S3, BlobError, data_offset
from aiotranscribe.janitor import JOB_ID

SHARED = "shared:"
S3_SCHEME = "s3://"


class AudioUnavailable(Exception):
    """A worker cannot get a slice's audio (its flags or the store say why)."""


class Tickets:
    """The replica's side: the entry fields that name a slice's audio."""

    def __init__(
        self, shared_dir: Path | None = None, blob_url: Callable[[str], str] | None = None
    ) -> None:
        self.shared_dir = shared_dir
        # job id -> s3:// URL of its object (``BlobStore.url``), with --blob-store.
        self.blob_url = blob_url

    def fields(self, path: str) -> dict[str, str | int]:
        """The fields for audio at ``path`` (a job's WAV: ``<job dir>/audio.wav``, and a job
        directory is named by its job id). Reads the WAV's header for ``--blob-store``."""
        wav = Path(path)
        job = wav.parent.name
        out: dict[str, str | int] = {"job": job} if JOB_ID.fullmatch(job) else {}
        if self.blob_url is not None and "job" in out:
            out["blob"] = self.blob_url(job)
            out["offset"] = data_offset(wav)
            return out
        if self.shared_dir is not None:
            try:
                relative = wav.relative_to(self.shared_dir)
            except ValueError:
                pass
            else:
                out["blob"] = SHARED + relative.as_posix()
                return out
        out["path"] = path
        return out

    async def many(self, paths: list[str]) -> dict[str, dict[str, str | int]]:
        """``fields`` of each distinct path (header reads off the event loop)."""
        distinct = sorted(set(paths))
        found = await asyncio.to_thread(lambda: [self.fields(p) for p in distinct])
        return dict(zip(distinct, found, strict=True))


def write_wav(path: Path, pcm: bytes) -> None:
    """A fetched slice as the same kind of WAV as ``audio.convert`` writes."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm)


class Claims:
    """The worker's side: where its model reads an entry's audio."""

    def __init__(
        self, shared_dir: Path | None, scratch: Path, s3_endpoint_url: str | None = None
    ) -> None:
        self.shared_dir = shared_dir
        self.scratch = scratch
        self.s3_endpoint_url = s3_endpoint_url
        self.fetched_bytes = 0
        # Opened at the first slice in S3: a worker fed only shared-dir slices needs neither
        # an S3 client nor credentials.
        self._s3: S3 | None = None
        self._opening = asyncio.Lock()

    async def _client(self) -> S3:
        async with self._opening:
            if self._s3 is None:
                s3 = S3(self.s3_endpoint_url)
                try:
                    await s3.open()
                except BlobError as exc:
                    raise AudioUnavailable(f"the slice is in S3: {exc}") from None
                self._s3 = s3
            return self._s3

    async def close(self) -> None:
        if self._s3 is not None:
            await self._s3.close()
            self._s3 = None

    async def resolve(self, entry_id: str, fields: dict[str, str]) -> tuple[str, int, int]:
        """``(path, start_frame, num_frames)`` for the model; AudioUnavailable when this
        worker cannot reach the audio."""
        try:
            start, frames = int(fields["start"]), int(fields["frames"])
            blob = fields.get("blob")
            if blob is None:
                return fields["path"], start, frames
            offset = int(fields.get("offset", 0))
        except (KeyError, ValueError) as exc:
            raise AudioUnavailable(f"a malformed entry: {exc!r}") from None
        if blob.startswith(SHARED):
            return str(self._shared(blob[len(SHARED) :])), start, frames
        if blob.startswith(S3_SCHEME):
            s3 = await self._client()
            try:
                pcm = await s3.read_frames(blob, offset, start, frames)
            except (BlobError, ValueError) as exc:
                raise AudioUnavailable(str(exc)) from None
            self.fetched_bytes += len(pcm)
            local = self.scratch / f"{entry_id}.wav"
            try:
                await asyncio.to_thread(write_wav, local, pcm)
            except OSError as exc:  # a full scratch disk: this slice fails, not the worker
                raise AudioUnavailable(f"scratch copy: {exc}") from None
            return str(local), 0, frames
        raise AudioUnavailable(f"unknown audio reference {blob[:40]!r}")

    def _shared(self, name: str) -> Path:
        if self.shared_dir is None:
            raise AudioUnavailable("the slice names the shared dir but this worker has none")
        relative = PurePosixPath(name)
        # The name comes from Redis: it may only lead into the shared dir.
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise AudioUnavailable(f"not a name inside the shared dir: {name[:80]!r}")
        return self.shared_dir / relative

    def release(self, entry_ids: list[str]) -> None:
        """Remove the scratch copies of these entries' slices (after the model call)."""
        for entry_id in entry_ids:
            (self.scratch / f"{entry_id}.wav").unlink(missing_ok=True)
