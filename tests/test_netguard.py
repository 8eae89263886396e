"""The SSRF guard on its own: which addresses pass, and that the connection goes to the
address that was checked even when DNS answers differently a moment later (rebinding)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from aiotranscribe.netguard import UrlError, UrlPolicy, address_allowed, open_url
from tests.origins import Canary

REFUSED = [
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
]
ALLOWED = ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_private_and_special_addresses_are_refused(address):
    ip = ipaddress.ip_address(address)
    assert not address_allowed(ip, allow_private=False)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass(address):
    assert address_allowed(ipaddress.ip_address(address), allow_private=False)


def test_allow_private_and_exempt_networks():
    assert address_allowed(ipaddress.ip_address("127.0.0.1"), allow_private=True)
    assert not address_allowed(ipaddress.ip_address("224.0.0.1"), allow_private=True)
    policy = UrlPolicy(exempt=(ipaddress.ip_network("127.0.0.2/32"),))
    assert policy.allows(ipaddress.ip_address("127.0.0.2"))
    assert not policy.allows(ipaddress.ip_address("127.0.0.1"))


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    server = await Canary().start("127.0.0.1")
    yield server
    await server.close()


async def test_a_rebinding_name_still_reaches_the_checked_address(monkeypatch, canary):
    """DNS says 127.0.0.2 (exempted) when checked, then 127.0.0.1 (refused) to anyone who
    asks again: the request must go to 127.0.0.2 and the canary see nothing. The two
    servers share a port, so only the address tells them apart."""
    port = canary.port("127.0.0.1")

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="from the checked address")

    app = web.Application()
    app.router.add_get("/", hello)
    server = TestServer(app, host="127.0.0.2", port=port)
    await server.start_server()
    asked: list[str] = []

    async def rebinding(host, port_, *args, **kwargs):
        asked.append(host)
        address = "127.0.0.2" if len(asked) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", rebinding)
    policy = UrlPolicy(exempt=(ipaddress.ip_network("127.0.0.2/32"),), connect_timeout_s=2)
    try:
        async with open_url("GET", URL(f"http://rebind.test:{port}/"), policy) as response:
            assert response.status == 200
            assert await response.text() == "from the checked address"
    finally:
        await server.close()
    assert asked == ["rebind.test"]  # asked once, by the check
    assert canary.connections == 0


async def test_a_refused_name_makes_no_connection(canary):
    port = canary.port("127.0.0.1")
    with pytest.raises(UrlError) as refused:
        async with open_url("GET", URL(f"http://localhost:{port}/"), UrlPolicy()):
            pass
    assert refused.value.code == "url_forbidden"
    assert canary.connections == 0
