"""The blocking UPnP client (aio/blocking_upnp.py) against tests/fakes/igd_server.py's IGD on loopback.

The fake runs in the test's event loop; the client, which has none, runs in a thread. The LOCATION guard
refuses loopback by design, so `_given_root` is patched to take the fake's root URL as it is (as
tests/unit/test_claims.py does for the asyncio client). Discovery over SSDP is in
tests/fakeigd/test_blocking_discovery.py (a gateway of our own) and tests/lab/test_blocking_upnp.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

import pytest

from autonat.aio.blocking_upnp import BlockingUpnp
from autonat.aio.route import RouterLocation
from autonat.errors import RouterRefused, RouterTimeout
from autonat.mapper import HOLES_LOGGER, MappingRequest
from autonat.proto.types import Transport
from tests.fakes.igd_server import FakeIgd

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
WHERE = RouterLocation(IPv4Address(LOOPBACK), IPv4Address(LOOPBACK), "lo")
SECRET = b"k" * 32


@pytest.fixture(autouse=True)
def _loopback_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BlockingUpnp, "_given_root", lambda self: self._root_url)


@contextlib.asynccontextmanager
async def fake_igd(tmp_path: Path, scenario: str = "normal") -> AsyncIterator[FakeIgd]:
    igd = FakeIgd(scenario, LOOPBACK, str(tmp_path / f"igd-{scenario}.log"))
    server = await asyncio.start_server(igd.http, LOOPBACK, 0)
    igd.port = server.sockets[0].getsockname()[1]
    try:
        yield igd
    finally:
        server.close()
        await server.wait_closed()


def client(igd: FakeIgd | int, deadline: float = 2.0) -> BlockingUpnp:
    port = igd if isinstance(igd, int) else igd.port
    return BlockingUpnp(WHERE, SECRET, deadline=deadline, root_url=f"http://{LOOPBACK}:{port}/rootDesc.xml")


async def blocking(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


async def test_discover_external_ip_add_list_and_delete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=HOLES_LOGGER)
    async with fake_igd(tmp_path) as igd:
        with client(igd) as upnp:
            found = await blocking(upnp.discover)
            assert found.connected and found.external_ip == IPv4Address("203.0.113.9")
            assert await blocking(upnp.external_ip) == IPv4Address("203.0.113.9")
            mapping = await blocking(lambda: upnp.add(MappingRequest(Transport.UDP, 5000, lifetime=600)))
            assert (mapping.protocol, mapping.external_port, mapping.lifetime) == ("upnp", 5000, 600)
            assert igd.mappings[("UDP", 5000)]["NewInternalClient"] == LOOPBACK
            [entry] = await blocking(upnp.list_mappings)
            assert (entry.external_port, entry.internal_client) == (5000, LOOPBACK)
            assert entry.description == f"autonat:{upnp.tag} 5000/udp"
            await blocking(lambda: upnp.remove(mapping))
            assert igd.mappings == {} and await blocking(upnp.list_mappings) == []
            # Another process's mapping of our port, deleted by internal port: looked up, then deleted.
            igd.mappings[("TCP", 7000)] = {"NewInternalClient": LOOPBACK, "NewInternalPort": "7000",
                                            "NewEnabled": "1", "NewPortMappingDescription": "other",
                                            "NewLeaseDuration": "600"}  # fmt: skip
            await blocking(lambda: upnp.delete(Transport.TCP, 7000))
            assert igd.mappings == {}
    assert [r.getMessage() for r in caplog.records if r.name == HOLES_LOGGER] == [
        f"opened udp 203.0.113.9:5000 -> {LOOPBACK}:5000 via upnp, lease 600 s",
        "closed udp external port 5000 via upnp",
        f"closed tcp {LOOPBACK}:7000 via upnp",
    ]


@pytest.mark.parametrize(
    ("scenario", "port", "lease"),
    [("conflict_718_twice", None, 7200), ("only_permanent", 5001, 0), ("same_port_724", 5001, 7200)],
)
async def test_the_asyncio_client_s_quirk_handling_is_the_same(
    tmp_path: Path, scenario: str, port: int | None, lease: int
) -> None:
    async with fake_igd(tmp_path, scenario) as igd:
        with client(igd) as upnp:
            request = MappingRequest(Transport.UDP, 5001)
            mapping = await blocking(lambda: upnp.add(request))
            assert mapping.lifetime == lease
            if port is not None:
                assert mapping.external_port == port
            assert ("UDP", mapping.external_port) in igd.mappings
            await blocking(lambda: upnp.delete(Transport.UDP, 5001))  # one call: a mapping it made
            assert igd.mappings == {}


HOSTILE = [
    ("huge_header_line", RouterRefused, "reply headers from {url} exceed 16384 bytes"),
    ("many_headers", RouterRefused, "more than 100 header lines"),
    ("chunked_flood", RouterRefused, "on the wire (chunk framing and trailers included)"),
    ("entity_bomb", RouterRefused, "description is unusable"),
    ("header_drip", RouterTimeout, "within 1 s ({url}: reply headers incomplete ("),
    ("drip", RouterTimeout, "within 1 s ({url}: reply body incomplete ("),
    ("chunked_drip", RouterTimeout, "within 1 s ({url}: reply body incomplete ("),
    ("hang", RouterTimeout, "within 1 s ({url}: connected, request sent, no reply"),
]


@pytest.mark.parametrize(("scenario", "kind", "fragment"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_a_hostile_igd_ends_in_time_with_its_reason_on_one_line(
    tmp_path: Path, scenario: str, kind: type[Exception], fragment: str
) -> None:
    async with fake_igd(tmp_path, scenario) as igd:
        upnp = client(igd, deadline=1.0)
        url = f"http://{LOOPBACK}:{igd.port}/rootDesc.xml"
        started = time.monotonic()
        with pytest.raises(kind) as info:
            await blocking(upnp.discover)
        elapsed = time.monotonic() - started
    assert elapsed <= 1.0 * 1.10 + 0.1  # the deadline (+10 %), whatever the router does
    message = str(info.value)
    assert fragment.format(url=url) in message and "\n" not in message, message
    [candidate] = upnp.candidates
    assert candidate.outcome == ("unfinished" if kind is RouterTimeout else "failed")


async def test_a_refused_connection_and_a_reset_end_at_once() -> None:
    with socket.socket() as closed:
        closed.bind((LOOPBACK, 0))
        port = closed.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(RouterRefused, match=r"UPnP: the router refused the connection to http://127\.0\.0\.1:"):
        await blocking(client(port, deadline=5.0).discover)
    assert time.monotonic() - started < 1.0

    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)

    def reset() -> None:
        conn, _ = listener.accept()
        conn.recv(1000)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
        conn.close()

    server = asyncio.create_task(asyncio.to_thread(reset))
    started = time.monotonic()
    try:
        with pytest.raises(RouterRefused, match=r"failed: Connection reset by peer$"):
            await blocking(client(listener.getsockname()[1], deadline=5.0).discover)
        assert time.monotonic() - started < 1.0
    finally:
        await server
        listener.close()


async def test_error_codes_are_counted_and_the_refusal_is_one_line(tmp_path: Path) -> None:
    async with fake_igd(tmp_path, "policy_606") as igd:
        upnp = client(igd)
        with pytest.raises(RouterRefused, match="policy forbids this mapping") as info:
            await blocking(lambda: upnp.add(MappingRequest(Transport.TCP, 22)))
        assert info.value.code == 606 and upnp.router_codes == {606: 1}


def test_importing_it_loads_neither_asyncio_nor_logging() -> None:
    code = (
        "import sys, autonat.aio.blocking_upnp\n"
        "print(sorted(m for m in sys.modules if m in ('asyncio', 'logging') or m.startswith('autonat.aio.trace')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "[]"


def test_a_root_url_off_the_lan_is_refused_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real guard
    where = RouterLocation(IPv4Address("192.168.77.1"), IPv4Address("192.168.77.10"), "eth0")
    upnp = BlockingUpnp(where, SECRET, deadline=1.0, root_url="http://198.51.100.1/rootDesc.xml")
    with pytest.raises(Exception, match=r"^--root-url refused: ") as info:
        upnp.discover()
    assert type(info.value).__name__ == "ProtocolUnavailable"
