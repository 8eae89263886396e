"""The server returns what the model says: held-out speech in every accepted encoding,
and five minutes of it in one file (chunked). Uses the shipped demo model."""

from __future__ import annotations

import difflib
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from tests import fidelity, speech
from tests.conftest import MODEL
from tests.helpers import form

pytestmark = pytest.mark.skipif(
    not Path(MODEL).name.startswith("demo"), reason="fidelity needs the shipped demo model"
)
FORMAT_UTTERANCES = 60
LONG_UTTERANCES = 90


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> list[fidelity.Reference]:
    work = tmp_path_factory.mktemp("heldout")
    return fidelity.offline_reference(MODEL, fidelity.make_utterances(LONG_UTTERANCES, work))


def poster(client):
    async def post(path: Path) -> dict[str, Any]:
        resp = await client.post("/transcribe", data=form(path))
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    return post


async def test_every_format_matches_offline(make_client, references, tmp_path):
    refs = references[:FORMAT_UTTERANCES]
    files = fidelity.encode_all(refs, tmp_path)
    client = await make_client(batch_size=16)
    rows = await fidelity.measure(refs, files, poster(client))
    print("\n" + fidelity.table(rows))
    for row in rows:
        assert row["offline_wer"] <= 3.0, row
        assert row["median_start_error_ms"] <= 40.0, row
        assert row["wer"] - row["offline_wer"] <= 0.5, row


async def test_five_minutes_chunked_keeps_words_in_their_utterance(
    make_client, references, tmp_path
):
    rng = random.Random(99)
    parts, spans, t = [], [], 0.0
    pauses = {}
    for ref in references:
        seconds = round(rng.uniform(0.4, 2.0), 1)
        if seconds not in pauses:
            pauses[seconds] = speech.silence(tmp_path / f"p{seconds}.wav", seconds)
        length = speech.duration(ref.wav)
        spans.append((t, t + length))
        parts += [ref.wav, pauses[seconds]]
        t += length + speech.duration(pauses[seconds])
    assert t >= 240.0, t
    long_wav = speech.concat(parts, tmp_path / "five-minutes.wav")
    client = await make_client(chunk_seconds=20)
    resp = await client.post("/transcribe", data=form(long_wav))
    assert resp.status == 200
    result = await resp.json()

    # (word, its utterance, its place in the utterance)
    truth = [(w, i, n) for i, ref in enumerate(references) for n, w in enumerate(ref.truth.split())]
    offline_edits = sum(fidelity.wer(r.truth.split(), r.text.split())[0] for r in references)
    got = [w for s in result["segments"] for w in s["words"]]
    truth_words, got_words = [w for w, _, _ in truth], [w["word"] for w in got]
    edits, total = fidelity.wer(truth_words, got_words)
    assert 100.0 * (edits - offline_edits) / total <= 1.0, (edits, offline_edits, total)

    matcher = difflib.SequenceMatcher(a=truth_words, b=got_words, autojunk=False)
    checked, shifts = 0, []
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            _, i, n = truth[block.a + k]
            start, end = spans[i]
            gap_before = start - spans[i - 1][1] if i > 0 else float("inf")
            gap_after = spans[i + 1][0] - end if i + 1 < len(spans) else float("inf")
            word = got[block.b + k]
            # In its own utterance: nearer to it than to either neighbour, so it may stick
            # out into a pause by less than half the pause. After a pause this model
            # stamps an utterance's first word 90-180 ms before its audio starts (alone,
            # offline, it has no audio before the word and says ~0 s).
            assert word["start"] > start - gap_before / 2, (word, spans[i - 1 : i + 1])
            assert word["end"] < end + gap_after / 2, (word, spans[i : i + 2])
            assert word["start"] < end and word["end"] > start, (word, start, end)
            checked += 1
            ref = references[i]
            if n > 0 and ref.text.split() == ref.truth.split():
                shifts.append(abs(word["start"] - (start + ref.starts[n])))
    # Within an utterance the chunked server stamps words where the model does offline.
    median_shift = statistics.median(shifts)
    print(f"median |word start - offline| within utterances: {median_shift:.3f} s")
    assert median_shift <= 0.04, median_shift
    assert checked >= 0.95 * total
