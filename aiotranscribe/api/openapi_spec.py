"""The OpenAPI 3.1 document of every route, built once from plain dicts.

A test checks that each route the app registers appears here and that the document
validates; schemathesis checks that the server's answers agree with it.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from aiotranscribe import __version__
from aiotranscribe.api.joblist import DEFAULT_LIMIT as LIMIT
from aiotranscribe.api.joblist import MAX_LIMIT
from aiotranscribe.formats import FORMATS

Schema = dict[str, Any]

JOB_ID = r"^[0-9a-f]{32}$"
STATUSES = ["pending", "processing", "completed", "failed", "cancelled"]
STAGES = ["queued", "converting", "transcribing", "finalizing"]
AUDIO_TYPES = "audio/*, video/*, application/octet-stream"


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: list[str] | None = None, **properties: Schema) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    out["required"] = list(properties) if required is None else required
    return out


STR: Schema = {"type": "string"}
NUM: Schema = {"type": "number"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
SECONDS: Schema = {"type": "number", "minimum": 0}

WORD = obj(
    ["word", "start", "end"],
    word=STR,
    start=SECONDS,
    end=SECONDS,
    confidence={
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "The model's confidence in the word, where it gives one (CTC and "
        "transducer models)",
    },
)
SEGMENT = obj(
    ["id", "start", "end", "text"],
    id=INT,
    start=SECONDS,
    end=SECONDS,
    text=STR,
    words={"type": "array", "items": ref("Word")},
)
TRANSCRIPTION = obj(
    ["text", "segments", "filename", "timestamp", "model", "language"],
    text=STR,
    segments={"type": "array", "items": ref("Segment")},
    filename={"type": "string", "description": "The client's file name (metadata only)"},
    timestamp={"type": "string", "description": "When the transcription finished (ISO 8601)"},
    model=STR,
    language=nullable(STR),
    duration={**SECONDS, "description": "Audio length in seconds"},
    job_id=STR,
    task={"type": "string", "enum": ["transcribe", "translate"]},
    word_timestamps={
        "type": "boolean",
        "description": "Whether the model gave word times (false: no words, segment times "
        "from slice bounds)",
    },
)
CAPABILITIES = obj(
    ["family", "class", "languages", "tasks", "punctuation", "word_timestamps", "max_slice_s"],
    family={"type": "string", "enum": ["ctc", "rnnt", "tdt", "hybrid", "aed"]},
    **{"class": {"type": "string", "description": "The NeMo model class"}},
    languages={
        **nullable({"type": "array", "items": STR}),
        "description": "ISO 639-1 codes it takes; null: unknown (language is a hint only)",
    },
    language_hint_only=BOOL,
    tasks={"type": "array", "items": {"type": "string", "enum": ["transcribe", "translate"]}},
    punctuation={"type": "boolean", "description": "Whether `punctuation` can switch it"},
    word_timestamps=BOOL,
    word_confidence=BOOL,
    decoder=nullable(STR),
    max_slice_s=nullable(NUM),
    sample_rate=INT,
    prompt_format=STR,
)
JOB_INFO = obj(
    ["job_id", "status", "filename", "created_at", "completed_at", "error", "result"],
    job_id=STR,
    status={"type": "string", "enum": STATUSES},
    filename=STR,
    created_at=STR,
    completed_at=nullable(STR),
    error=nullable(STR),
    result=nullable(ref("TranscriptionResponse")),
    stage={"type": "string", "enum": STAGES},
    progress={"type": "number", "minimum": 0, "maximum": 1},
    model=STR,
    webhook={
        **nullable(ref("WebhookDelivery")),
        "description": "The delivery to `callback_url`; null when the job has none",
    },
)
NULL_TIME = {**nullable(STR), "description": "ISO 8601 UTC"}
WEBHOOK_DELIVERY = obj(
    ["state", "attempts"],
    state={
        "type": "string",
        "enum": ["pending", "delivered", "failed"],
        "description": "pending: not delivered yet (also while the job runs); delivered: a "
        "2xx; failed: given up (a non-retryable answer, a refused URL, or the retry window "
        "closed)",
    },
    attempts=INT,
    last_status={**nullable(INT), "description": "The receiver's last HTTP status"},
    last_error=nullable(STR),
    last_attempt_at=NULL_TIME,
    next_attempt_at=NULL_TIME,
    delivered_at=NULL_TIME,
    result_url=STR,
)
WEBHOOK_PAYLOAD = obj(
    ["type", "job_id", "status", "result_url", "result", "error", "reason"],
    type={"type": "string", "enum": ["job.completed", "job.failed", "job.cancelled"]},
    job_id=STR,
    status={"type": "string", "enum": ["completed", "failed", "cancelled"]},
    model=STR,
    filename=STR,
    created_at=STR,
    completed_at=nullable(STR),
    result_url={"type": "string", "description": "GET it for the result (any format)"},
    result={
        **nullable(ref("TranscriptionResponse")),
        "description": "The result when its JSON is at most `--webhook-inline-max-kib` "
        "(256 KiB); else null (follow `result_url`)",
    },
    error=nullable(obj(code=STR, message=STR)),
    reason={**nullable(STR), "description": "Why a cancelled job was cancelled"},
)
JOB_SUMMARY = obj(
    ["job_id", "status", "filename", "model", "created_at", "links"],
    job_id=STR,
    status={"type": "string", "enum": STATUSES},
    stage={"type": "string", "enum": STAGES},
    progress={"type": "number", "minimum": 0, "maximum": 1},
    filename=STR,
    model=STR,
    language=nullable(STR),
    created_at=STR,
    completed_at=nullable(STR),
    duration_s=nullable(SECONDS),
    error=nullable(STR),
    links=obj(status=STR, result=STR, events=STR),
)
ERROR = obj(detail={"type": "string", "description": "Human-readable"}, code=STR)
OPENAI_ERROR = obj(
    error=obj(
        message=STR,
        type={"type": "string", "enum": ["invalid_request_error", "server_error"]},
        param=nullable(STR),
        code=nullable(STR),
    )
)
USAGE = obj(type={"type": "string", "const": "duration"}, seconds=SECONDS)
VERBOSE_SEGMENT = obj(
    None,
    id=INT,
    seek=INT,
    start=SECONDS,
    end=SECONDS,
    text=STR,
    tokens={"type": "array", "items": INT},
    temperature=NUM,
    avg_logprob=NUM,
    compression_ratio=NUM,
    no_speech_prob=NUM,
)
VERBOSE = obj(
    ["task", "language", "duration", "text"],
    task={"type": "string", "const": "transcribe"},
    language=STR,
    duration=SECONDS,
    text=STR,
    segments={
        "type": "array",
        "items": ref("VerboseSegment"),
        "description": "With the segment granularity (the default)",
    },
    words={
        "type": "array",
        "items": ref("Word"),
        "description": "With the word granularity",
    },
    usage=ref("Usage"),
)


def event(type_: str, description: str, **fields: Schema) -> Schema:
    schema = obj(
        ["type", "job_id", "seq", "ts", *fields],
        type={"type": "string", "const": type_},
        job_id=STR,
        seq={"type": "integer", "minimum": 1},
        ts={"type": "string", "description": "ISO 8601 UTC"},
        **fields,
    )
    schema["description"] = description
    return schema


EVENTS: dict[str, Schema] = {
    "StatusEvent": event(
        "status",
        "The job moved to a new status or stage, or its place in the model's line changed.",
        status={"type": "string", "enum": STATUSES},
        stage={"type": "string", "enum": STAGES},
        queue_position={
            **nullable(INT),
            "description": "Place in the model's line while none of the job's audio is being "
            "transcribed yet (1: next); null before it joins and once a worker has its first "
            "slice",
        },
    ),
    "ProgressEvent": event(
        "progress",
        "Progress over the whole job (conversion, then transcription); never goes back.",
        stage={"type": "string", "enum": STAGES},
        progress={"type": "number", "minimum": 0, "maximum": 1},
        chunks_done=INT,
        chunks_total=nullable(INT),
        audio_done_s=SECONDS,
        audio_total_s=SECONDS,
        eta_s=nullable(SECONDS),
    ),
    "SegmentEvent": event("segment", "A final segment, in file order.", segment=ref("Segment")),
    "CompletedEvent": event(
        "completed",
        "Terminal: the result, as GET /jobs/{job_id}/result returns it.",
        result=ref("TranscriptionResponse"),
    ),
    "FailedEvent": event("failed", "Terminal: the job failed.", error=obj(code=STR, message=STR)),
    "CancelledEvent": event("cancelled", "Terminal: the job was cancelled.", reason=STR),
}
JOB_EVENT: Schema = {
    "oneOf": [ref(name) for name in EVENTS],
    "discriminator": {"propertyName": "type"},
}

SCHEMAS: dict[str, Schema] = {
    "Error": ERROR,
    "OpenAIError": OPENAI_ERROR,
    "Word": WORD,
    "Segment": SEGMENT,
    "TranscriptionResponse": TRANSCRIPTION,
    "JobInfo": JOB_INFO,
    "JobAccepted": obj(job_id=STR, status={"type": "string", "const": "pending"}, message=STR),
    "CancelResponse": obj(message=STR, status={"type": "string", "enum": STATUSES}),
    "JobSummary": JOB_SUMMARY,
    "WebhookDelivery": WEBHOOK_DELIVERY,
    "WebhookPayload": WEBHOOK_PAYLOAD,
    "JobList": obj(
        jobs={"type": "array", "items": ref("JobSummary")},
        next_cursor={**nullable(STR), "description": "Pass as `cursor` for the next page"},
        next={**nullable(STR), "description": "The next page's URL (filters kept)"},
    ),
    "DeleteResponse": obj(
        job_id=STR,
        status={"type": "string", "enum": STATUSES, "description": "Its status when deleted"},
        deleted={"type": "boolean", "const": True},
        message=STR,
    ),
    "Health": obj(
        ["status", "model_loaded", "model_name"],
        status={"type": "string", "enum": ["healthy", "model_not_loaded"]},
        model_loaded=BOOL,
        model_name=STR,
        models={
            "type": "array",
            "items": obj(
                name=STR,
                state={
                    "type": "string",
                    "enum": ["loading", "ready", "restarting", "failed", "stopped"],
                },
                error=nullable(STR),
                device=nullable(STR),
                capabilities=nullable(ref("Capabilities")),
                queued_slices=INT,
                workers={
                    "type": "array",
                    "description": "One per worker process (--workers, --device list)",
                    "items": obj(
                        worker=INT,
                        device=STR,
                        state={
                            "type": "string",
                            "enum": ["loading", "ready", "restarting", "failed", "stopped"],
                        },
                    ),
                },
            ),
        },
    ),
    "Ready": obj(
        ready=BOOL,
        draining=BOOL,
        models={"type": "object", "additionalProperties": STR},
    ),
    "Capabilities": CAPABILITIES,
    "Usage": USAGE,
    "OpenAITranscription": obj(["text"], text=STR, usage=ref("Usage")),
    "VerboseSegment": VERBOSE_SEGMENT,
    "VerboseTranscription": VERBOSE,
    "ModelList": obj(
        object={"type": "string", "const": "list"},
        data={
            "type": "array",
            "items": obj(
                id=STR,
                object={"type": "string", "const": "model"},
                created=INT,
                owned_by=STR,
                state={"type": "string", "enum": ["loading", "ready", "failed", "stopped"]},
                capabilities=nullable(ref("Capabilities")),
            ),
        },
    ),
    "TranscriptStreamEvent": {
        "description": "One server-sent event's `data` (stream=true).",
        "oneOf": [
            obj(
                type={"type": "string", "const": "transcript.text.delta"},
                delta={"type": "string", "description": "Text to append (one segment)"},
            ),
            obj(
                type={"type": "string", "const": "transcript.text.done"},
                text={"type": "string", "description": "The whole transcript"},
            ),
            {
                "type": "object",
                "required": ["type", "error"],
                "properties": {
                    "type": {"type": "string", "const": "error"},
                    "error": OPENAI_ERROR["properties"]["error"],
                },
            },
        ],
    },
    **EVENTS,
    "JobEvent": JOB_EVENT,
}

# -- request bodies -------------------------------------------------------------------------

DECODING_FIELDS: dict[str, Schema] = {
    "language": {
        "type": "string",
        "description": "ISO 639-1 code of the speech, e.g. `en`: Canary's source language; "
        "a hint (recorded in the result) for models that take no language. One the model "
        "cannot do is 400 `unsupported_language`.",
    },
    "task": {
        "type": "string",
        "enum": ["transcribe", "translate"],
        "default": "transcribe",
        "description": "Models that cannot translate answer 400 `unsupported_task`",
    },
    "target_language": {
        "type": "string",
        "description": "Language of the text when translating (default `en`)",
    },
    "punctuation": {
        "type": "boolean",
        "description": "Canary's punctuation and capitalisation (default: the model's)",
    },
}
URL_FIELDS: dict[str, Schema] = {
    "audio_url": {
        "type": "string",
        "maxLength": 2048,
        "description": "Instead of `file`: an http(s) URL the server fetches (same size cap "
        "and checks as an upload). Loopback, private and link-local addresses are refused "
        "(400 `url_forbidden`) unless the server allows them; 422 `url_unreachable` when it "
        "cannot be fetched; `s3://` is 400 `url_unsupported` (use a presigned https URL).",
    },
    "callback_url": {
        "type": "string",
        "maxLength": 2048,
        "description": "An http(s) URL that gets a signed POST (`WebhookPayload`) when the "
        "job ends; its delivery state is the job status's `webhook`. 400 `url_forbidden` "
        "for addresses the server may not reach.",
    },
}
SEED_FORM: Schema = {
    "type": "object",
    "description": "Send exactly one of `file` and `audio_url`.",
    "properties": {
        "file": {
            "type": "string",
            "format": "binary",
            "contentMediaType": "application/octet-stream",
        },
        "model": {
            "type": "string",
            "description": "A served model's name (GET /health lists them); default: the "
            "first. With one model served, `parakeet` and `canary` also name it.",
        },
        **DECODING_FIELDS,
        "include_timestamps": {
            "type": "boolean",
            "default": True,
            "description": "Word timestamps in each segment",
        },
        **URL_FIELDS,
    },
}
OPENAI_FORM: Schema = {
    "type": "object",
    "description": "Send exactly one of `file` and `audio_url` (an extension, as is "
    "`callback_url`).",
    "properties": {
        "file": {
            "type": "string",
            "format": "binary",
            "contentMediaType": "application/octet-stream",
        },
        "model": {
            "type": "string",
            "description": "A served model's name (GET /v1/models), or `whisper-1` for the "
            "default model. Default: the default model.",
        },
        **DECODING_FIELDS,
        "prompt": {"type": "string", "description": "Accepted for compatibility; unused"},
        "response_format": {"type": "string", "enum": list(FORMATS), "default": "json"},
        "temperature": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "Accepted for compatibility; decoding is greedy",
        },
        "timestamp_granularities[]": {
            "type": "array",
            "items": {"type": "string", "enum": ["word", "segment"]},
            "description": "Only with `verbose_json` (else 400). Default: segment.",
        },
        "stream": {
            "type": "boolean",
            "default": False,
            "description": "Answer as server-sent events (`response_format` is then unused)",
        },
        **URL_FIELDS,
    },
}


# How OpenAPI 3.2 describes a server-sent event, which tools read in 3.1 documents too.
SSE_EVENT: Schema = {
    "type": "object",
    "description": "One server-sent event: a delta per segment, then the whole text",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": ref("TranscriptStreamEvent"),
        },
        "event": STR,
    },
}


def form(schema: Schema) -> Schema:
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": schema,
                "encoding": {"file": {"contentType": AUDIO_TYPES}},
            }
        },
    }


# -- responses -----------------------------------------------------------------------------

RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}
}
ERROR_TEXT = {
    400: "Bad request (a form field, a multipart body that is not one, or a URL the server "
    "will not use)",
    404: "No such job (unknown, or expired)",
    409: "The job is not in a state that allows this",
    413: "The upload, or its audio, is longer than this server accepts",
    415: "The file is not audio this server accepts",
    422: "The audio could not be decoded, or `audio_url` could not be fetched",
    500: "The transcription failed",
    503: "No model can take work now (loading, queue full, draining or restarting)",
}


def errors(*statuses: int, schema: str = "Error") -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for status in statuses:
        answer: Schema = {
            "description": ERROR_TEXT[status],
            "content": {"application/json": {"schema": ref(schema)}},
        }
        if status == 503:
            answer["headers"] = RETRY_AFTER
        out[str(status)] = answer
    return out


def json_ok(schema: Schema, description: str = "OK") -> dict[str, Schema]:
    content = {"application/json": {"schema": schema}}
    return {"200": {"description": description, "content": content}}


def text_ok(media: str, description: str) -> dict[str, Schema]:
    return {"200": {"description": description, "content": {media: {"schema": STR}}}}


UPLOAD_ERRORS = (400, 413, 415, 422, 500, 503)
JOB_PARAM = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": JOB_ID},
}


def query_param(name: str, schema: Schema, description: str = "") -> Schema:
    param: Schema = {"name": name, "in": "query", "schema": schema}
    return {**param, "description": description} if description else param


RENDERED = {
    "application/x-subrip": {"schema": STR},
    "text/vtt": {"schema": STR},
    "text/plain": {"schema": STR},
}


def websocket_description() -> str:
    lines = [
        "A WebSocket (upgrade this GET) of the job's events, one JSON object per text frame.",
        "",
        "The subscriber first receives the job's history (or what follows `?after=SEQ`), then",
        "live events; after a terminal event (`completed`, `failed`, `cancelled`) the server",
        "closes with 1000. When the server stops first it closes with 1012 (service restart):",
        "the job is kept; reconnect with `?after=<last seq>` once it is back. A consumer that",
        "stops reading is closed with 1008. Every event has `type`, `job_id`, `seq` (1, 2,",
        "3, ... per job) and `ts`.",
        "",
        "| type | extra fields |",
        "|---|---|",
    ]
    for schema in EVENTS.values():
        type_ = schema["properties"]["type"]["const"]
        extra = [f"`{k}`" for k in schema["properties"] if k not in ("type", "job_id", "seq", "ts")]
        lines.append(f"| `{type_}` | {', '.join(extra)}: {schema['description']} |")
    lines += ["", "JSON schemas of the events (also under `components/schemas`):", ""]
    for name, schema in EVENTS.items():
        lines += [f"**{name}**", "", "```json", json.dumps(schema, indent=2), "```", ""]
    return "\n".join(lines)


def openai_audio(summary: str, operation: str, intro: str) -> Schema:
    """OpenAI's transcription and translation routes: one form, one answer shape."""
    return {
        "post": {
            "tags": ["openai"],
            "summary": summary,
            "description": f"{intro} Errors use OpenAI's shape. With `stream=true` the answer "
            "is server-sent events whose `data` is a `TranscriptStreamEvent`: a "
            "`transcript.text.delta` per segment, then `transcript.text.done`. A client that "
            "disconnects cancels its job.",
            "operationId": operation,
            "requestBody": form(OPENAI_FORM),
            "responses": {
                "200": {
                    "description": "The transcript in the asked format",
                    "headers": {
                        "X-Job-ID": {
                            "description": "The job (also at /jobs/{job_id}/...)",
                            "schema": STR,
                        }
                    },
                    "content": {
                        "application/json": {
                            "schema": {
                                "anyOf": [ref("OpenAITranscription"), ref("VerboseTranscription")]
                            }
                        },
                        **RENDERED,
                        "text/event-stream": {"schema": SSE_EVENT},
                    },
                },
                **errors(409, *UPLOAD_ERRORS, schema="OpenAIError"),
            },
        }
    }


def paths() -> dict[str, Schema]:
    return {
        "/transcribe": {
            "post": {
                "tags": ["transcription"],
                "summary": "Transcribe an upload and wait for the result",
                "description": "For short files: the answer comes when the job is done. Long "
                "files should use `/transcribe/async`.",
                "operationId": "transcribe",
                "requestBody": form(SEED_FORM),
                "responses": {
                    **json_ok(ref("TranscriptionResponse")),
                    **errors(409, *UPLOAD_ERRORS),
                },
            }
        },
        "/transcribe/async": {
            "post": {
                "tags": ["transcription"],
                "summary": "Start a transcription job",
                "description": "Follow it with `GET /jobs/{job_id}/events` (WebSocket) or poll "
                "`GET /jobs/{job_id}/status`.",
                "operationId": "transcribeAsync",
                "requestBody": form(SEED_FORM),
                "responses": {**json_ok(ref("JobAccepted")), **errors(*UPLOAD_ERRORS)},
            }
        },
        "/jobs/{job_id}/status": {
            "get": {
                "tags": ["jobs"],
                "summary": "A job's status (and result once completed)",
                "operationId": "jobStatus",
                "parameters": [JOB_PARAM],
                "responses": {**json_ok(ref("JobInfo")), **errors(404)},
            }
        },
        "/jobs/{job_id}/result": {
            "get": {
                "tags": ["jobs"],
                "summary": "A completed job's result, in one of five formats",
                "operationId": "jobResult",
                "parameters": [
                    JOB_PARAM,
                    {
                        "name": "format",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(FORMATS), "default": "json"},
                        "description": "`verbose_json` is OpenAI's verbose shape",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The result",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "anyOf": [
                                        ref("TranscriptionResponse"),
                                        ref("VerboseTranscription"),
                                    ]
                                }
                            },
                            **RENDERED,
                        },
                    },
                    **errors(400, 404, 409, 413, 415, 422, 500, 503),
                },
            }
        },
        "/jobs/{job_id}/cancel": {
            "post": {
                "tags": ["jobs"],
                "summary": "Cancel a job",
                "operationId": "cancelJob",
                "parameters": [JOB_PARAM],
                "responses": {**json_ok(ref("CancelResponse")), **errors(404)},
            }
        },
        "/jobs": {
            "get": {
                "tags": ["jobs"],
                "summary": "This API key's jobs, newest first, a page at a time",
                "description": "Summaries with links, no results. Pages follow `next` (or pass "
                "`next_cursor` as `cursor` with the same filters); each holds only jobs older "
                "than the last, so paging returns every job once while new ones arrive.",
                "operationId": "listJobs",
                "parameters": [
                    query_param("status", {"type": "string", "enum": STATUSES}, "Only these"),
                    query_param("model", STR, "Only jobs of this model"),
                    query_param(
                        "since",
                        STR,
                        "Only jobs created then or later: ISO 8601 (UTC without an offset) "
                        "or Unix seconds",
                    ),
                    query_param(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": LIMIT},
                    ),
                    query_param("cursor", STR, "`next_cursor` of the previous page"),
                ],
                "responses": {**json_ok(ref("JobList")), **errors(400)},
            }
        },
        "/jobs/{job_id}": {
            "delete": {
                "tags": ["jobs"],
                "summary": "Delete a job and its data (a running one is cancelled first)",
                "description": "Answers once the job, its events and files are gone; "
                "every `/jobs/{job_id}/...` route then answers 404.",
                "operationId": "deleteJob",
                "parameters": [JOB_PARAM],
                "responses": {**json_ok(ref("DeleteResponse")), **errors(404, 409)},
            }
        },
        "/jobs/{job_id}/events": {
            "get": {
                "tags": ["jobs"],
                "summary": "Live job events (WebSocket)",
                "description": websocket_description(),
                "operationId": "jobEvents",
                "parameters": [
                    JOB_PARAM,
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "default": 0},
                        "description": "Resume: only events with a greater `seq`",
                    },
                ],
                "responses": {
                    "101": {
                        "description": "Switching to the WebSocket protocol; frames are "
                        "`JobEvent`s",
                        "content": {"application/json": {"schema": ref("JobEvent")}},
                    },
                    **errors(400, 404),
                },
            }
        },
        "/v1/audio/transcriptions": openai_audio(
            "OpenAI-compatible transcription",
            "createTranscription",
            "Compatible with OpenAI's `audio.transcriptions.create`.",
        ),
        "/v1/audio/translations": openai_audio(
            "OpenAI-compatible translation (into English)",
            "createTranslation",
            "Compatible with OpenAI's `audio.translations.create`: text in English (or "
            "`target_language`); 400 `unsupported_task` when the model cannot translate.",
        ),
        "/v1/models": {
            "get": {
                "tags": ["openai"],
                "summary": "The served models, in OpenAI's list shape",
                "operationId": "listModels",
                "responses": json_ok(ref("ModelList")),
            }
        },
        "/health": {
            "get": {
                "tags": ["operations"],
                "summary": "Liveness and model state (answers at once, even while loading)",
                "operationId": "health",
                "responses": json_ok(ref("Health")),
            }
        },
        "/ready": {
            "get": {
                "tags": ["operations"],
                "summary": "Readiness: 200 only when every model is loaded and not draining",
                "operationId": "ready",
                "responses": {
                    **json_ok(ref("Ready"), "Ready"),
                    "503": {
                        "description": "Not ready",
                        "content": {"application/json": {"schema": ref("Ready")}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["operations"],
                "summary": "Prometheus metrics (text exposition format)",
                "operationId": "metrics",
                "responses": text_ok("text/plain", "Metrics"),
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["docs"],
                "summary": "This document",
                "operationId": "openapi",
                "responses": json_ok({"type": "object"}),
            }
        },
        "/docs": {
            "get": {
                "tags": ["docs"],
                "summary": "This document, rendered (Swagger UI, served from here)",
                "operationId": "docs",
                "responses": text_ok("text/html", "An HTML page"),
            }
        },
        "/": {
            "get": {
                "tags": ["ui"],
                "summary": "The web UI",
                "operationId": "home",
                "responses": {
                    **text_ok("text/html", "The web UI's page"),
                    "404": {
                        "description": "The web UI is not installed",
                        "content": {"application/json": {"schema": ref("Error")}},
                    },
                },
            }
        },
        "/static/{path}": {
            "get": {
                "tags": ["ui"],
                "summary": "The web UI's files",
                "operationId": "static",
                "parameters": [
                    {"name": "path", "in": "path", "required": True, "schema": STR},
                ],
                "responses": {
                    "200": {"description": "The file", "content": {"*/*": {"schema": STR}}},
                    "403": {
                        "description": "Not a file that is served",
                        "content": {"application/json": {"schema": ref("Error")}},
                    },
                    "404": {
                        "description": "No such file (an empty body, or an `Error`)",
                        "content": {"*/*": {"schema": {}}},
                    },
                },
            }
        },
    }


@cache
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aiotranscribe",
            "version": __version__,
            "description": "Speech-to-text for NVIDIA NeMo ASR models: the seed clients' "
            "routes, jobs with live WebSocket events, and OpenAI's audio API. Errors are "
            '`{"detail", "code"}`, under `/v1/` OpenAI\'s `{"error": {...}}`.',
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "transcription", "description": "The seed clients' upload routes"},
            {"name": "jobs", "description": "Job status, results, cancel and live events"},
            {"name": "openai", "description": "OpenAI-compatible audio API"},
            {"name": "operations", "description": "Health, readiness and metrics"},
            {"name": "docs", "description": "This document"},
            {"name": "ui", "description": "The web UI"},
        ],
        "paths": paths(),
        "webhooks": {
            "jobEnded": {
                "post": {
                    "summary": "A job with a `callback_url` ended",
                    "description": "Signed per the Standard Webhooks spec: `webhook-id` "
                    "(`msg_<job_id>`, the same on retries), `webhook-timestamp` (Unix "
                    "seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of "
                    '"{id}.{timestamp}.{body}">` with the server\'s `--webhook-secret`. '
                    "Answer 2xx; 5xx, 429 and network errors are retried with back-off, "
                    "other answers are not.",
                    "operationId": "jobEnded",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("WebhookPayload")}},
                    },
                    "responses": {"2XX": {"description": "Delivered"}},
                }
            }
        },
        "components": {"schemas": SCHEMAS},
    }
