"""The seed's design, for comparison only: FastAPI with the model called inside ``async def``.

This is what aiotranscribe replaced (see CLIENT_CONTRACT.md's list of defects): the upload
is read whole into memory, converted with a blocking ffmpeg call, and ``model.transcribe``
runs on the event loop, so every other request (``/health`` included) waits for it.
Do not copy it. Run: .venv/bin/python benchmarks/seed_baseline.py --model X.nemo --port 8001
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import tempfile
import wave
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from nemo.collections.asr.models import ASRModel
from nemo.utils import logging as nemo_logging


def create_app(model_path: str, threads: int) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        torch.set_num_threads(threads)
        nemo_logging.setLevel(logging.WARNING)  # else an info line per request
        model = ASRModel.restore_from(model_path, map_location="cpu")
        model.eval()
        model.preprocessor.featurizer.dither = 0.0
        state["model"] = model
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "healthy", "model_loaded": "model" in state, "model_name": model_path}

    @app.post("/transcribe")
    async def transcribe(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008
        data = await file.read()  # the whole upload in memory
        with tempfile.TemporaryDirectory() as tmp:
            src, wav = Path(tmp) / "in", Path(tmp) / "in.wav"
            src.write_bytes(data)
            args = ["-i", str(src), "-ac", "1", "-ar", "16000", str(wav)]
            # Blocking, as pydub's call was: the seed's design, on purpose.
            subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", *args], check=True)  # noqa: ASYNC221
            with wave.open(str(wav), "rb") as pcm:
                raw = pcm.readframes(pcm.getnframes())
            samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
            with torch.inference_mode():  # blocks the event loop for the whole inference
                hyp = state["model"].transcribe(
                    [samples], batch_size=1, timestamps=True, verbose=False, num_workers=0
                )[0]
        return {
            "text": hyp.text,
            "segments": [
                {"start": float(s["start"]), "end": float(s["end"]), "text": s["segment"]}
                for s in hyp.timestamp.get("segment", [])
            ],
            "filename": file.filename,
            "timestamp": datetime.now(UTC).isoformat(),
            "model": model_path,
            "language": None,
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a .nemo file")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    app = create_app(args.model, args.threads)
    # Keep-alive as long as aiohttp's (uvicorn's 5 s races a client reusing an idle connection).
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", timeout_keep_alive=75)


if __name__ == "__main__":
    main()
