"""The web UI in a real browser (Debian's Chromium, driven by Playwright) against a real server.

Each test runs its own ``python -m aiotranscribe serve`` subprocess and its own browser, and
stops both before it ends (the autouse check wants no child processes left).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import ARTIFACTS, MODEL
from tests.ui_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Server,
    long_audio,
    start_server,
    utterances,
)

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)

TRANSCRIBE_TIMEOUT_MS = 120_000
UTTERANCES = [
    "hello world",
    "one two three four five",
    "please call tomorrow",
    "red green blue",
    "stop go left right",
    "six seven eight nine ten",
    "thank you",
    "open close",
]

ServerFactory = Callable[..., Server]
BrowserFactory = Callable[..., Browser]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    servers: list[Server] = []

    def make(*extra: str) -> Server:
        server = start_server(MODEL, tmp_path, *extra)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
        left = sorted(p.name for p in server.spool.iterdir()) if server.spool.exists() else []
        assert left == [], f"spool not empty after the server stopped: {left}"


@pytest.fixture
def browser_factory() -> Iterator[BrowserFactory]:
    with sync_playwright() as pw:
        browsers: list[Browser] = []

        def launch(*extra_args: str) -> Browser:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args]
            )
            browsers.append(browser)
            return browser

        yield launch
        for browser in browsers:
            browser.close()


def open_page(browser: Browser, server: Server, **context_args: Any) -> tuple[Page, list[str]]:
    """A new tab on the UI, and a list that collects its script errors and any request that
    does not go to this server (the page must load nothing from elsewhere)."""
    context = browser.new_context(base_url=server.url, **context_args)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
    local = (server.url, "blob:", "data:")
    page.on(
        "request",
        lambda req: None if req.url.startswith(local) else problems.append(f"request: {req.url}"),
    )
    page.goto("/")
    expect(page.locator("#server")).to_have_attribute("data-state", "ready")
    return page, problems


def wait_stage(page: Page, text: str, timeout: float = TRANSCRIBE_TIMEOUT_MS) -> None:
    """Wait for the stage line to read ``text``; fail early with the page's error if one shows."""
    page.wait_for_function(
        """(text) => document.querySelector('#stage').textContent === text
                     || !document.querySelector('#error').hidden""",
        arg=text,
        timeout=timeout,
    )
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    expect(page.locator("#stage")).to_have_text(text)


def page_words(page: Page) -> list[str]:
    return page.locator("#transcript .word").all_inner_texts()


def result_words(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for seg in result["segments"] for w in seg["words"]]


# Records every change of the two progress bars and of the transcript, with the job bar's
# value at that moment, so the test can tell the bars moved and segments came before the end.
WATCH = """() => {
  window.__log = [];
  const job = document.querySelector('#job-progress');
  const upload = document.querySelector('#upload-progress');
  const note = (what) => window.__log.push({
    what, job: job.value, upload: upload.value,
    segments: document.querySelectorAll('#transcript .segment').length,
    eta: document.querySelector('#eta').textContent,
  });
  new MutationObserver(() => note('job')).observe(job, {attributes: true});
  new MutationObserver(() => note('upload')).observe(upload, {attributes: true});
  new MutationObserver(() => note('transcript')).observe(
    document.querySelector('#transcript'), {childList: true});
}"""


def test_upload_follow_result_seek_and_download(
    server_factory: ServerFactory, browser_factory: BrowserFactory, tmp_path: Path
) -> None:
    # Slices of at most 4 s, one per model call: each utterance is a slice of its own, so
    # progress moves in steps and segments stream in before the end. (The demo model,
    # trained on single utterances, glues words across a pause inside one slice.)
    server = server_factory("--chunk-seconds", "4", "--batch-size", "1")
    audio = utterances(UTTERANCES, tmp_path / "numbers and colours.wav")
    browser = browser_factory()
    page, problems = open_page(
        browser, server, accept_downloads=True, permissions=["clipboard-read", "clipboard-write"]
    )
    expect(page.locator("#server-text")).to_contain_text("ready")
    expect(page.locator("#start")).to_be_disabled()
    # The demo model cannot translate: no task to choose.
    expect(page.locator("#task-field")).to_be_hidden()

    page.set_input_files("#file", str(audio))
    expect(page.locator("#selected-name")).to_have_text(audio.name)
    page.fill("#language", "en")
    page.evaluate(WATCH)
    page.click("#start")
    wait_stage(page, "Done.")

    # The bars moved: upload to 100 %, the job bar through values between 0 and 1.
    log = page.evaluate("window.__log")
    uploads = [e["upload"] for e in log if e["what"] == "upload"]
    jobs = [e["job"] for e in log if e["what"] == "job"]
    assert uploads and max(uploads) == 1, uploads
    assert jobs[-1] == 1 and len({v for v in jobs if 0 < v < 1}) >= 2, jobs
    assert jobs == sorted(jobs), jobs
    expect(page.locator("#job-pct")).to_have_text("100%")
    # Segments appeared while the job was still running, and an ETA was shown.
    assert any(e["what"] == "transcript" and e["job"] < 1 for e in log), log
    assert any(e["eta"].endswith("left") for e in log), log

    # The transcript on the page is the server's result, word for word, and has the words.
    job_id = page.locator("#jobs li").first.get_attribute("data-job-id")
    assert job_id
    result = server.get_json(f"/jobs/{job_id}/result")
    assert page_words(page) == [w["word"] for w in result_words(result)]
    assert result["language"] == "en"
    # Each word carries the model's confidence; those under 0.5 are shaded as unsure.
    shown = page.eval_on_selector_all(
        "#transcript .word",
        "els => els.map(e => [Number(e.dataset.confidence), e.classList.contains('unsure')])",
    )
    assert shown == [[w["confidence"], w["confidence"] < 0.5] for w in result_words(result)]
    assert result["text"] == " ".join(UTTERANCES)
    expect(page.locator("#transcript .segment")).to_have_count(len(UTTERANCES))
    expect(page.locator("#jobs li").first).to_contain_text("completed")

    # Downloads are the server's renderings.
    with page.expect_download() as info:
        page.click("#dl-srt")
    download = info.value
    assert download.suggested_filename == "numbers and colours.srt"
    srt = Path(download.path()).read_text(encoding="utf-8")
    status, body = server.get(f"/jobs/{job_id}/result?format=srt")
    assert status == 200 and srt == body.decode("utf-8")
    assert "-->" in srt and "hello world" in srt
    for fmt in ("text", "vtt", "json"):
        href = page.locator(f"#dl-{fmt}").get_attribute("href")
        assert href == f"/jobs/{job_id}/result?format={fmt}"

    # Copy puts the text on the clipboard.
    page.click("#copy")
    expect(page.locator("#copied")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == result["text"]

    # Clicking a word seeks the player to that word's start and highlights it.
    target = next(w for w in result_words(result) if w["word"] == "green")
    word = page.locator("#transcript .word", has_text=re.compile("^green$")).first
    page.wait_for_function("document.querySelector('#audio').readyState >= 1")
    word.click()
    page.wait_for_function(
        "(t) => Math.abs(document.querySelector('#audio').currentTime - t) <= 0.1",
        arg=target["start"],
    )
    expect(word).to_have_class(re.compile(r"\bcurrent\b"))
    # The keyboard does the same: Right arrow moves to the next word, Enter seeks there.
    following = result_words(result)[result_words(result).index(target) + 1]
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "(t) => Math.abs(document.querySelector('#audio').currentTime - t) <= 0.1",
        arg=following["start"],
    )
    # During playback the highlight follows the audio.
    page.evaluate("document.querySelector('#audio').play()")
    page.wait_for_function(
        """(t) => { const w = document.querySelector('#transcript .word.current');
                    return w && Number(w.dataset.start) > t + 0.2; }""",
        arg=following["start"],
        timeout=20_000,
    )
    page.evaluate("document.querySelector('#audio').pause()")

    shots = ARTIFACTS
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / "ui-light.png"), full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(shots / "ui-dark.png"), full_page=True)
    # Phone width: nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(shots / "ui-phone-dark.png"), full_page=True)
    page.emulate_media(color_scheme="light")

    # The list (the server's) is there after a reload and a finished job can be reopened.
    page.reload()
    expect(page.locator("#jobs li")).to_have_count(1)
    expect(page.locator("#jobs li").first).to_contain_text("completed")
    page.locator("#jobs li .job-open").first.click()
    expect(page.locator("#transcript .word").first).to_be_visible()
    assert page_words(page) == [w["word"] for w in result_words(result)]
    expect(page.locator("#no-audio")).to_be_visible()  # the object URL died with the page
    expect(page.locator("#dl-srt")).to_have_attribute("href", f"/jobs/{job_id}/result?format=srt")
    assert problems == []


def test_job_list_shows_the_servers_jobs_reopens_and_deletes(
    server_factory: ServerFactory, browser_factory: BrowserFactory, tmp_path: Path
) -> None:
    """A job started in one tab is listed in another (a session of its own), which can
    reopen it and delete it; deleting a running job cancels it where it is followed."""
    server = server_factory("--batch-size", "1", "--chunk-seconds", "5")
    browser = browser_factory()
    first, problems = open_page(browser, server)
    first.set_input_files("#file", str(utterances(["hello world"], tmp_path / "short.wav")))
    first.click("#start")
    wait_stage(first, "Done.")
    job_id = first.locator("#jobs li").first.get_attribute("data-job-id")
    result = server.get_json(f"/jobs/{job_id}/result")

    other, more_problems = open_page(browser, server)
    expect(other.locator("#jobs li")).to_have_count(1)
    item = other.locator(f'#jobs li[data-job-id="{job_id}"]')
    expect(item).to_contain_text("short.wav")
    expect(item).to_contain_text("completed")
    item.locator(".job-open").click()
    expect(other.locator("#transcript .word").first).to_be_visible()
    assert page_words(other) == [w["word"] for w in result_words(result)]

    # Deleting asks first; declined, nothing happens.
    other.once("dialog", lambda dialog: dialog.dismiss())
    item.locator(".job-delete").click()
    expect(item).to_be_visible()
    other.once("dialog", lambda dialog: dialog.accept())
    item.locator(".job-delete").click()
    expect(other.locator("#jobs li")).to_have_count(0)
    expect(other.locator("#jobs-empty")).to_be_visible()
    expect(other.locator("#result-card")).to_be_hidden()
    assert server.get(f"/jobs/{job_id}/status")[0] == 404

    # A running job followed in the first tab, deleted from the other: cancelled there.
    first.set_input_files("#file", str(long_audio(tmp_path / "long.wav", minutes=3)))
    first.click("#start")
    expect(first.locator("#stage")).to_have_text("Transcribing…", timeout=TRANSCRIBE_TIMEOUT_MS)
    running = first.locator("#jobs li").first.get_attribute("data-job-id")
    other.reload()
    other.once("dialog", lambda dialog: dialog.accept())
    other.locator(f'#jobs li[data-job-id="{running}"] .job-delete').click()
    expect(other.locator("#jobs li")).to_have_count(0)
    wait_stage(first, "Cancelled: deleted by client.")
    assert server.get(f"/jobs/{running}/status")[0] == 404
    assert problems == [] and more_problems == []


def test_microphone_recording(
    server_factory: ServerFactory, browser_factory: BrowserFactory, tmp_path: Path
) -> None:
    server = server_factory()
    spoken = "please call tomorrow"
    wav = utterances([spoken], tmp_path / "mic.wav", gap_s=1.0)
    browser = browser_factory(
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
    )
    page, problems = open_page(browser, server, permissions=["microphone"])
    page.click("#record")
    expect(page.locator("#record")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#record-label")).to_contain_text("Stop recording (0:0")
    page.wait_for_timeout(4500)  # the file is ~3.5 s; a little silence after does no harm
    page.click("#record")
    expect(page.locator("#record")).to_have_attribute("aria-pressed", "false")
    expect(page.locator("#selected-name")).to_have_text(re.compile(r"^recording-.*\.webm$"))
    page.click("#start")
    wait_stage(page, "Done.")
    text = " ".join(page_words(page))
    assert spoken in text, text
    expect(page.locator("#jobs li").first).to_contain_text("recording-")
    assert problems == []


def test_errors_reconnect_cancel_and_polling(
    server_factory: ServerFactory, browser_factory: BrowserFactory, tmp_path: Path
) -> None:
    # One short slice per model call makes a 3-minute job take long enough to cancel.
    server = server_factory("--max-upload-mb", "8", "--batch-size", "1", "--chunk-seconds", "5")
    browser = browser_factory()
    page, problems = open_page(browser, server)

    # Not audio, whatever the name says: the 415 in plain words.
    fake = tmp_path / "notes.mp3"
    fake.write_text("These are my meeting notes, not a recording.\n" * 50)
    page.set_input_files("#file", str(fake))
    page.click("#start")
    expect(page.locator("#error")).to_contain_text("not audio this server can read")
    expect(page.locator("#error")).to_contain_text("wav, mp3, flac")
    expect(page.locator("#progress-card")).to_be_hidden()

    # Looks like a WAV, is not one: the job fails with the 422 reason in plain words.
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x24\x00\x01\x00WAVEfmt " + bytes(range(256)) * 64)
    page.set_input_files("#file", str(broken))
    page.click("#start")
    expect(page.locator("#error")).to_contain_text("could not be decoded")
    expect(page.locator("#stage")).to_have_text("Failed.")
    expect(page.locator("#jobs li").first).to_contain_text("failed")

    # Too large: the 413 names the server's limit.
    big = tmp_path / "big.wav"
    with big.open("wb") as out:
        out.write(b"RIFF\xff\xff\xff\xffWAVEfmt ")
        out.truncate(9 * 1024 * 1024)
    page.set_input_files("#file", str(big))
    page.click("#start")
    expect(page.locator("#error")).to_contain_text("too large")
    expect(page.locator("#error")).to_contain_text("8 MiB")

    # A long job. Its first events socket is dropped after two events: the page reconnects
    # with ?after=2 and carries on; then Cancel stops the job.
    sockets: list[str] = []

    def drop_first(ws: Any) -> None:
        sockets.append(ws.url)
        upstream = ws.connect_to_server()
        if len(sockets) > 1:
            return  # later sockets pass through untouched
        seen = []

        def forward(message: str | bytes) -> None:
            seen.append(message)
            ws.send(message)
            if len(seen) == 2:
                ws.close(code=4000, reason="test: dropped")
                upstream.close()

        upstream.on_message(forward)

    page.route_web_socket(re.compile(r"/jobs/[0-9a-f]+/events"), drop_first)
    long_wav = long_audio(tmp_path / "long meeting.wav", minutes=3)
    page.set_input_files("#file", str(long_wav))
    page.click("#start")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#stage")).to_have_text("Transcribing…", timeout=TRANSCRIBE_TIMEOUT_MS)
    assert len(sockets) >= 2 and sockets[0].endswith("?after=0"), sockets
    assert sockets[1].endswith("?after=2"), sockets
    page.click("#cancel")
    wait_stage(page, "Cancelled.")
    expect(page.locator("#cancel")).to_be_hidden()
    job_id = page.locator("#jobs li").first.get_attribute("data-job-id")
    expect(page.locator("#jobs li").first).to_contain_text("cancelled")
    info = server.get_json(f"/jobs/{job_id}/status")
    assert info["status"] == "cancelled" and info["progress"] < 1, info

    # Without WebSockets the page polls /jobs/{id}/status instead, and still finishes.
    polling = browser.new_context(base_url=server.url)
    polling.add_init_script("delete window.WebSocket")
    page2 = polling.new_page()
    opened: list[str] = []
    page2.on("websocket", lambda ws: opened.append(ws.url))
    status_polls: list[str] = []
    page2.on("request", lambda r: status_polls.append(r.url) if r.url.endswith("/status") else None)
    page2.goto("/")
    short = utterances(["hello world"], tmp_path / "hello.wav")
    page2.set_input_files("#file", str(short))
    page2.click("#start")
    wait_stage(page2, "Done.")
    assert "hello world" in " ".join(page_words(page2))
    assert opened == [] and status_polls, (opened, status_polls)
    # The second tab lists the server's jobs, the first tab's too: newest first.
    expect(page2.locator("#jobs li")).to_have_count(3)
    expect(page2.locator("#jobs li").first).to_contain_text("hello.wav")
    assert problems == []


def test_server_status_and_busy_message(
    server_factory: ServerFactory, browser_factory: BrowserFactory
) -> None:
    """/health's failed model is shown with its error; a 503's Retry-After is read out."""
    server = server_factory()
    browser = browser_factory()
    page, problems = open_page(browser, server)
    # Answer /health as a server whose model failed to load, and the upload as a busy one.
    failed = {
        "status": "model_not_loaded",
        "model_loaded": False,
        "model_name": "parakeet",
        "models": [{"name": "parakeet", "state": "failed", "error": "CUDA out of memory"}],
    }
    page.route(
        "**/health",
        lambda route: route.fulfill(json=failed),
    )
    page.route(
        "**/transcribe/async",
        lambda route: route.fulfill(
            status=503,
            headers={"Retry-After": "7", "Content-Type": "application/json"},
            body=json.dumps({"detail": "the server is busy; retry in 7 s", "code": "queue_full"}),
        ),
    )
    page.reload()
    expect(page.locator("#server")).to_have_attribute("data-state", "failed")
    expect(page.locator("#server-text")).to_contain_text("CUDA out of memory")
    page.set_input_files(
        "#file", {"name": "x.wav", "mimeType": "audio/wav", "buffer": b"RIFF0000WAVE" * 10}
    )
    page.click("#start")
    expect(page.locator("#error")).to_have_text("The server is busy. Try again in 7 s.")
    # Network failure: the server is gone.
    page.unroute("**/transcribe/async")
    page.route("**/transcribe/async", lambda route: route.abort("connectionrefused"))
    page.click("#start")
    expect(page.locator("#error")).to_contain_text("could not be reached")
    assert problems == []


def test_page_resumes_a_job_across_a_server_restart(
    browser_factory: BrowserFactory, tmp_path: Path
) -> None:
    """SIGTERM while the page follows a long job: the page says the server is restarting,
    and once it is back on the same address the job finishes on the page, every segment
    once."""
    args = ("--batch-size", "1", "--chunk-seconds", "4", "--shutdown-timeout-s", "0.5")
    server = start_server(MODEL, tmp_path, *args)
    try:
        page, problems = open_page(browser_factory(), server)
        page.set_input_files("#file", str(long_audio(tmp_path / "long.wav", minutes=2)))
        page.click("#start")
        wait_stage(page, "Transcribing…")
        server.stop()  # the job is kept; its socket closes with 1012
        expect(page.locator("#connection")).to_contain_text("restarting")
        server = start_server(MODEL, tmp_path, *args, port=int(server.url.rsplit(":", 1)[1]))
        wait_stage(page, "Done.")
        expect(page.locator("#connection")).to_have_text("")
        starts = page.evaluate(
            "[...document.querySelectorAll('#transcript .segment')]"
            ".map(e => Number(e.querySelector('[data-start]').dataset.start))"
        )
        # Every segment once, in time order: none lost or repeated across the restart.
        assert len(starts) > 10 and starts == sorted(set(starts)), starts
        assert problems == []
    finally:
        server.stop()


def test_page_asks_for_an_api_key_and_uses_it(
    server_factory: ServerFactory, browser_factory: BrowserFactory, tmp_path: Path
) -> None:
    """A server with keys: the page asks once (a wrong key is asked again), then uploads,
    follows the job over the WebSocket (key as a subprotocol) and downloads with it."""
    key = "ui-secret-key-123"
    server = server_factory("--api-key", key, "--chunk-seconds", "4", "--batch-size", "1")
    audio = utterances(UTTERANCES[:3], tmp_path / "keyed.wav")
    browser = browser_factory()
    context = browser.new_context(base_url=server.url, accept_downloads=True)
    page = context.new_page()
    answers = iter(["wrong-key", key])
    asked: list[str] = []

    def on_dialog(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept(next(answers))

    page.on("dialog", on_dialog)
    page.goto("/")
    expect(page.locator("#server")).to_have_attribute("data-state", "ready")
    page.wait_for_function("sessionStorage.getItem('aiotranscribe.apiKey') !== null")
    page.wait_for_function(f"sessionStorage.getItem('aiotranscribe.apiKey') === '{key}'")
    assert len(asked) == 2 and "not accepted" in asked[1], asked

    page.set_input_files("#file", str(audio))
    page.evaluate(WATCH)
    page.click("#start")
    wait_stage(page, "Done.")
    log = page.evaluate("window.__log")
    jobs = [e["job"] for e in log if e["what"] == "job"]
    assert len({v for v in jobs if 0 < v < 1}) >= 1, "no live progress over the socket"
    expect(page.locator("#connection")).to_have_text("")
    with page.expect_download() as info:
        page.click("#dl-text")
    assert Path(info.value.path()).read_text(encoding="utf-8").strip() == " ".join(UTTERANCES[:3])
    # Without the key the server refuses, and the key never reaches the access log.
    status, _ = server.get("/jobs/0/status")
    assert status == 401
    assert key not in server.log_tail(400) and "api_key=REDACTED" in server.log_tail(400)
