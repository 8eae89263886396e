"""``/openapi.json`` documents every route and validates; ``/docs`` renders it from here;
schemathesis finds no server error and no answer the document does not allow."""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

import hypothesis
import requests
import schemathesis
from aiohttp import web
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.serialization import Binary

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
WEBSOCKET = "/jobs/{job_id}/events"
EXAMPLES_PER_OPERATION = 25


def registered_operations(app: web.Application) -> set[tuple[str, str]]:
    """``(path template, method)`` for every route (HEAD is GET's implicit twin)."""
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or f"{info['prefix']}/{{path}}"
        out.add((path, route.method.lower()))
    return out


async def test_document_covers_every_route_and_validates(client):
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    validate(doc)  # OpenAPI 3.1, with every $ref resolvable
    assert doc["openapi"].startswith("3.1")

    documented = {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }
    assert registered_operations(client.app) == documented

    # The WebSocket's events are described, each with its JSON schema.
    described = doc["paths"][WEBSOCKET]["get"]["description"]
    for event in ("status", "progress", "segment", "completed", "failed", "cancelled"):
        assert f"| `{event}` |" in described and f'"const": "{event}"' in described

    # Multipart bodies and the OpenAI fields are there.
    body = doc["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]
    fields = body["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"file", "model", "response_format", "timestamp_granularities[]", "stream"} <= set(
        fields
    )


async def test_docs_page_uses_only_files_from_this_server(client):
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the viewer must not use a CDN"
    assets = re.findall(r"(?:src|href)=\"(?!data:)([^\"]+)\"", page)
    assert len(assets) == 2
    for asset in assets:
        got = await client.get(f"/{asset}")
        assert got.status == 200, asset
        assert len(await got.read()) > 10_000


def with_speech(
    drawn: tuple[schemathesis.Case, bool], declared: set[str], audio: bytes
) -> schemathesis.Case:
    case, real = drawn
    if real and isinstance(case.body, dict) and "file" in case.body:
        case.body = {k: v for k, v in case.body.items() if k in declared}
        case.body["file"] = Binary(audio)
    return case


def fuzz(doc: dict[str, Any], base_url: str, audio: bytes) -> list[str]:
    """Run schemathesis over every operation but the WebSocket; the failures, as text.

    Random bytes are never audio, so three uploads in four carry real speech and only the
    declared fields: the answers of jobs that ran are checked too, not only the refusals."""
    schema = schemathesis.openapi.from_dict(doc).exclude(path=WEBSOCKET)
    failures = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            body = operation.body[0].definition if operation.body else {}
            declared = set(body.get("schema", {}).get("properties", {}))
            real = st.integers(0, 3).map(bool)
            speech = functools.partial(with_speech, declared=declared, audio=audio)
            cases = st.tuples(operation.as_strategy(), real).map(speech)

            @hypothesis.settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @hypothesis.given(case=cases)
            def run(case: schemathesis.Case) -> None:
                response = case.call(base_url=base_url, session=session, timeout=30)
                case.validate_response(response, checks=CHECKS)

            try:
                run()
            except (Exception, FailureGroup) as exc:  # FailureGroup is a BaseExceptionGroup
                failures.append(f"{operation.label}: {exc}")
    return failures


async def test_schemathesis_finds_no_error(client, voices):
    doc = await (await client.get("/openapi.json")).json()
    audio = voices["hello"].read_bytes()
    failures = await asyncio.to_thread(fuzz, doc, str(client.make_url("")), audio)
    assert failures == [], "\n\n".join(failures)
