"""Outbound HTTP on a client's behalf (webhooks, audio by URL), under one set of SSRF rules.

A client names the URL, so the server must not become its way into the server's own
network. The rules, for every request and every redirect hop:

- only ``http`` and ``https``; no other scheme ever reaches a socket;
- the host is resolved here (``getaddrinfo``, under the connect deadline) and *every*
  address it resolves to must be public: loopback, private, link-local (cloud metadata at
  169.254.169.254), shared (100.64/10), multicast, reserved, unspecified and documentation
  ranges are refused, for IPv4 and IPv6 alike, including IPv4 addresses carried inside IPv6
  (mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4, Teredo) unless
  ``allow_private`` (``--allow-private-urls``) or the address is in one of the networks
  an operator exempted (``--allow-network 10.1.2.3/32``);
- the connection goes to an address that was checked: the session's resolver returns only
  the vetted addresses (``PinnedResolver``), so a DNS answer that changes between the check
  and the connect (rebinding) cannot redirect it;
- redirects are never followed by the HTTP client: ``open_url`` follows at most
  ``max_redirects`` hops itself, checking each target like the first URL;
- short connect deadline; callers add their own total deadline.

A refused URL raises ``UrlError`` before any connection is made.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from aiotranscribe.config import Settings

SCHEMES = ("http", "https")
MAX_URL_CHARS = 2048
REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# NAT64's well-known prefix: the last 32 bits are an IPv4 address the gateway connects to.
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UrlError(Exception):
    """A URL the server will not use or could not reach; ``code`` is the client's answer:
    ``bad_request`` (not a URL), ``url_forbidden`` (the SSRF rules refuse it),
    ``url_unsupported`` (a scheme this server cannot fetch), ``url_unreachable``."""

    def __init__(self, status: int, code: str, detail: str, param: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.param = status, code, detail, param


class Unreachable(Exception):
    """The network failed (DNS, connect, reset, deadline): worth trying again later."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class UrlPolicy:
    allow_private: bool = False
    """Allow loopback, private and link-local addresses (a receiver on this host or LAN)."""
    exempt: tuple[Network, ...] = ()
    """Networks allowed even though the rules would refuse them (one internal host)."""
    connect_timeout_s: float = 5.0
    """Name resolution plus TCP (and TLS) connect, per hop."""
    max_redirects: int = 0
    """Redirect hops followed (each checked like the first URL); 0: a 3xx is the answer."""

    @classmethod
    def of(cls, settings: Settings, max_redirects: int = 0) -> UrlPolicy:
        """The settings' policy; ValueError for a network that is not one."""
        exempt = tuple(ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks)
        return cls(
            settings.allow_private_urls,
            exempt,
            settings.url_connect_timeout_s,
            max_redirects,
        )

    def allows(self, ip: IPAddress) -> bool:
        if any(ip in net for net in self.exempt):
            return True
        return address_allowed(ip, self.allow_private)


def forbidden(detail: str, param: str | None) -> UrlError:
    return UrlError(400, "url_forbidden", detail, param)


def check_syntax(raw: str, param: str | None = None) -> URL:
    """``raw`` as an absolute http(s) URL with a host; 400 ``bad_request`` when it is not
    a URL at all, ``url_forbidden`` for any other scheme."""
    if not raw or len(raw) > MAX_URL_CHARS or any(c.isspace() for c in raw):
        raise UrlError(400, "bad_request", f"{param or 'url'} is not a URL", param)
    try:
        url = URL(raw)
        host = url.raw_host
    except (ValueError, TypeError):
        raise UrlError(400, "bad_request", f"{param or 'url'} is not a URL", param) from None
    if url.scheme and url.scheme not in SCHEMES:
        raise forbidden(f"{param or 'url'}: only http and https URLs are allowed", param)
    if not url.scheme or not url.absolute:
        raise UrlError(400, "bad_request", f"{param or 'url'} must be an absolute URL", param)
    if not host:
        raise UrlError(400, "bad_request", f"{param or 'url'} has no host", param)
    return url


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address an IPv6 one carries to another network."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]  # a dual-stack socket connects to the IPv4 address itself
    found: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip.teredo is not None:
            found.extend(ip.teredo)
        if ip in NAT64:
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def address_allowed(ip: IPAddress, allow_private: bool) -> bool:
    """Whether a connection to ``ip`` is allowed (see the module's rules)."""
    if allow_private:
        return not any(a.is_unspecified or a.is_multicast for a in _embedded(ip))
    return all(
        a.is_global
        and not (a.is_multicast or a.is_reserved or a.is_unspecified or a.is_link_local)
        and not (a.is_private or a.is_loopback)
        for a in _embedded(ip)
    )


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def vet(url: URL, policy: UrlPolicy, param: str | None = None) -> list[ResolveResult]:
    """Resolve ``url``'s host and check every address; the addresses to connect to.

    Raises UrlError (``url_forbidden``) for a refused address, Unreachable when the name
    does not resolve in time."""
    host = url.raw_host or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    literal = _literal(host)
    if literal is not None:
        infos = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
    else:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(policy.connect_timeout_s):
                found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            raise Unreachable(f"cannot resolve {host}: {exc or 'timed out'}") from None
        infos = [(family, str(sockaddr[0])) for family, _, _, _, sockaddr in found]
        if not infos:
            raise Unreachable(f"{host} has no address")
    out: list[ResolveResult] = []
    for family, address in infos:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not policy.allows(ip):
            raise forbidden(
                f"{param or 'the URL'} points to an address this server may not connect to "
                "(loopback, private, link-local or reserved); an operator can allow such "
                "addresses with --allow-private-urls",
                param,
            )
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        out.append(
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": family,
                "proto": 0,
                "flags": flags,
            }
        )
    return out


class PinnedResolver(AbstractResolver):
    """Answers only with addresses ``vet`` checked: it never asks DNS itself."""

    def __init__(self) -> None:
        self._pins: dict[tuple[str, int], list[ResolveResult]] = {}

    def pin(self, addresses: list[ResolveResult]) -> None:
        for entry in addresses:
            self._pins.setdefault((entry["hostname"], entry["port"]), []).append(entry)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        pinned = self._pins.get((host, port))
        if not pinned:
            raise OSError(f"{host}:{port} was not checked")  # cannot happen: open_url pins first
        return list(pinned)

    async def close(self) -> None:
        self._pins.clear()


@asynccontextmanager
async def open_url(
    method: str,
    url: URL,
    policy: UrlPolicy,
    *,
    param: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The response to ``method url`` (redirects followed per ``policy``, each target
    checked), from a session of its own whose connections go only to vetted addresses.

    Raises UrlError (refused, before connecting) or Unreachable (network failure). The
    caller reads the body under its own total deadline."""
    resolver = PinnedResolver()
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=1)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=policy.connect_timeout_s, sock_connect=policy.connect_timeout_s
    )
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,  # never through an environment proxy, which would pick the address
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        for hop in range(policy.max_redirects + 1):
            resolver.pin(await vet(url, policy, param))
            try:
                response = await session.request(method, url, allow_redirects=False, **kwargs)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise Unreachable(describe(exc)) from None
            async with response:
                location = response.headers.get("Location")
                if response.status in REDIRECTS and location and hop < policy.max_redirects:
                    try:
                        url = check_syntax(str(url.join(URL(location))), param)
                    except UrlError as exc:
                        raise forbidden(f"a redirect was refused: {exc.detail}", param) from None
                    if response.status == 303 or method == "POST":
                        method, kwargs = "GET", {k: v for k, v in kwargs.items() if k != "data"}
                    continue
                yield response
                return


def describe(exc: BaseException) -> str:
    """A short reason for a network failure (no traceback, no internal paths)."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
