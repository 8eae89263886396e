"""Who may use the server, from where: one middleware, so handlers never check keys.

In the order they run:
1. ``Host`` must be one this server answers to (a DNS-rebinding page reaches a loopback
   server under its own name): 421 otherwise.
2. CORS: a preflight from an allowed origin is answered here; answers to allowed origins
   carry ``Access-Control-Allow-Origin`` with that origin (never ``*``, never credentials:
   keys travel in headers, not cookies).
3. A browser request from another site (``Origin`` neither this server nor allowed) may not
   change anything (form posts, cancels) nor open an event WebSocket: 403.
4. API keys, when configured: ``Authorization: Bearer``, ``X-API-Key``, the WebSocket
   subprotocol ``key.<key>`` (browsers cannot set headers on a WebSocket), or ``?api_key=``;
   compared in constant time; 401 with ``WWW-Authenticate`` otherwise. A key's tenant is put
   on the request; jobs of other tenants are invisible to it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from aiotranscribe.api.errors import Handler, error_response
from aiotranscribe.config import Settings

TENANT = web.RequestKey("tenant", str)
DEFAULT_TENANT = "default"
WS_KEY_PREFIX = "key."
WS_PROTOCOL = "aiotranscribe"
# Probes must work without a key; the page and its files hold no data and must load so the
# page can ask for one.
OPEN_PATHS = frozenset({"/health", "/ready", "/", "/openapi.json", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, X-API-Key, Content-Type, X-Request-ID"
CORS_EXPOSE = "X-Request-ID, Retry-After"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class KeysFileError(ValueError):
    """The keys file cannot be read or has a malformed line."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Keys:
    """API keys (as digests) and the tenant each belongs to."""

    entries: tuple[tuple[bytes, str], ...]

    @property
    def required(self) -> bool:
        return bool(self.entries)

    def tenant_of(self, candidate: str) -> str | None:
        """The tenant of ``candidate``, or None. Every key is compared, each in constant
        time, so the answer's timing says nothing about which key came close."""
        given = _digest(candidate)
        found = None
        for digest, tenant in self.entries:
            if hmac.compare_digest(given, digest):
                found = tenant
        return found


def parse_key(spec: str) -> tuple[str, str]:
    """``key`` or ``tenant=key`` -> (tenant, key)."""
    tenant, sep, key = spec.partition("=")
    return (tenant.strip(), key.strip()) if sep else (DEFAULT_TENANT, spec.strip())


def load_keys(api_keys: Iterable[str], keys_file: Path | None) -> Keys:
    pairs = [parse_key(spec) for spec in api_keys]
    if keys_file is not None:
        try:
            lines = keys_file.read_text().splitlines()
        except OSError as exc:
            raise KeysFileError(f"cannot read the API keys file: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 2:
                raise KeysFileError(f"keys file line {number}: expected 'tenant key'")
            pairs.append((parts[0], parts[1]))
    if any(not tenant or not key for tenant, key in pairs):
        raise KeysFileError("an API key or its tenant is empty")
    return Keys(tuple((_digest(key), tenant) for tenant, key in pairs))


def default_hosts(bind: str) -> frozenset[str] | None:
    """Host names accepted when none are configured; None means any (a wildcard bind: the
    names it is reached by cannot be known here)."""
    if bind in ("0.0.0.0", "::", ""):
        return None
    hosts = {bind.lower().strip("[]")}
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        hosts.update(LOOPBACK_NAMES)
    return frozenset(hosts)


def host_name(host: str) -> str:
    """``Host`` without its port, lower-case, without a trailing dot or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host[1:]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".")


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass(frozen=True)
class Access:
    keys: Keys
    hosts: frozenset[str] | None
    origins: frozenset[str]
    metrics_open: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        configured = frozenset(host_name(h) for h in settings.allowed_hosts)
        hosts = None if "*" in configured else (configured or default_hosts(settings.host))
        return cls(
            keys=load_keys(settings.api_keys, settings.api_keys_file),
            hosts=hosts,
            origins=frozenset(origin_of(o) for o in settings.cors_origins),
            metrics_open=settings.metrics_access == "open",
        )

    def host_allowed(self, request: web.Request) -> bool:
        return self.hosts is None or host_name(request.host) in self.hosts

    def same_origin(self, request: web.Request, origin: str) -> bool:
        return urlsplit(origin).netloc.lower() == request.host.lower()

    def key_of(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        if key := request.headers.get("X-API-Key"):
            return key.strip()
        for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
            if proto.strip().startswith(WS_KEY_PREFIX):
                return proto.strip()[len(WS_KEY_PREFIX) :]
        return request.query.get("api_key")

    def is_open(self, path: str) -> bool:
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return True
        return path == "/metrics" and self.metrics_open

    def middleware(self) -> Middleware:
        @web.middleware
        async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not self.host_allowed(request):
                return error_response(
                    421, "host_not_allowed", "this server does not answer to that Host name"
                )
            origin = request.headers.get("Origin")
            allowed = origin is not None and origin_of(origin) in self.origins
            if origin is not None and not allowed and not self.same_origin(request, origin):
                if request.method not in SAFE_METHODS or _is_upgrade(request):
                    return error_response(
                        403, "origin_not_allowed", "requests from that web site are not allowed"
                    )
            if allowed and request.method == "OPTIONS" and _is_preflight(request):
                return self._cors(web.Response(status=204), origin, preflight=True)
            if self.keys.required and not self.is_open(request.path):
                tenant = self.keys.tenant_of(self.key_of(request) or "")
                if tenant is None:
                    return self._cors(_unauthorized(request), origin if allowed else None)
                request[TENANT] = tenant
            response = await handler(request)
            return self._cors(response, origin if allowed else None)

        return access_middleware

    @staticmethod
    def _cors(
        response: web.StreamResponse, origin: str | None, preflight: bool = False
    ) -> web.StreamResponse:
        if origin is None or response.prepared:
            return response
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        if preflight:
            response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
        return response


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def _is_preflight(request: web.Request) -> bool:
    return "Access-Control-Request-Method" in request.headers


def _unauthorized(request: web.Request) -> web.Response:
    given = "Authorization" in request.headers or "X-API-Key" in request.headers
    detail = "the API key is not valid" if given else "an API key is required"
    headers = {"WWW-Authenticate": 'Bearer realm="aiotranscribe"'}
    if request.path.startswith("/v1/"):
        # OpenAI's error shape, so its SDKs raise AuthenticationError with this message.
        body = {
            "error": {
                "message": detail,
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        return web.json_response(body, status=401, headers=headers)
    return error_response(401, "unauthorized", detail, headers)
