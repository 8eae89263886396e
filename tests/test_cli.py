"""``aiotranscribe transcribe`` against a test server, in a real subprocess."""

from __future__ import annotations

import asyncio
import sys

from tests.helpers import eventually, jobs_of
from tests.test_formats import check_cues, parse_srt


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiotranscribe",
        "transcribe",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_writes_srt(client, long_audio, tmp_path):
    path, texts = long_audio
    url = str(client.make_url("")).rstrip("/")
    out_file = tmp_path / "out.srt"
    code, _, err = await run_cli(str(path), "--url", url, "--format", "srt", "-o", str(out_file))
    assert code == 0, err
    parsed = parse_srt(out_file.read_text())
    check_cues(parsed, 200.0)
    assert " ".join(t for _, _, t in parsed) == " ".join(texts)


async def test_cli_prints_text_and_reports_server_errors(client, voices, tmp_path):
    url = str(client.make_url("")).rstrip("/")
    code, out, err = await run_cli(str(voices["hello"]), "--url", url, "--quiet")
    assert code == 0, err
    assert out.strip() == "hello world"
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"#EXTM3U\nhttp://example.invalid/x.ts\n" * 10)
    code, out, err = await run_cli(str(junk), "--url", url, "--quiet")
    assert code == 1
    assert "415" in err and "not audio" in err


async def test_cli_ctrl_c_cancels_the_job(make_client, long_audio):
    import signal

    path, _ = long_audio
    client = await make_client(chunk_seconds=5, batch_size=1)
    url = str(client.make_url("")).rstrip("/")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiotranscribe",
        "transcribe",
        str(path),
        "--url",
        url,
        "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # A shell starting the tests in the background (`make test &`) ignores SIGINT, and
        # children inherit that: give the CLI the disposition a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    async def transcribing() -> bool:
        return any(job.stage == "transcribing" for job in await jobs_of(client))

    await eventually(transcribing)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130, err.decode()
    (job,) = await jobs_of(client)
    assert job.status == "cancelled"
