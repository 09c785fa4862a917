"""The blocking session (aio/blocking.py) and the connected channel against the fake router on loopback:
the same exchanges as the asyncio clients, ICMP port unreachable ends a request at once, silence waits
for the deadline. The fake router serves on the test's event loop while the blocking calls run in a
thread."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.aio import blocking
from autonat.aio import natpmp as natpmp_client
from autonat.aio.blocking import BlockingSession
from autonat.aio.channel import DatagramChannel
from autonat.aio.natpmp import NatPmpClient
from autonat.aio.route import RouterLocation
from autonat.aio.router import reply_key
from autonat.aio.udp import open_socket
from autonat.errors import RouterRefused, RouterTimeout, RouterUnreachable
from autonat.mapper import MappingRequest
from autonat.proto import natpmp, pcp
from autonat.proto.types import Transport
from tests.fakes.pcp_natpmp_router import start_fake_router
from tests.helpers import free_port

LOOPBACK = IPv4Address("127.0.0.1")
LOCATION = RouterLocation(LOOPBACK, LOOPBACK, "lo")


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTONAT_STATE_DIR", str(tmp_path))


def session(port: int, deadline: float = 1.0) -> BlockingSession:
    return BlockingSession(LOCATION, open_socket(LOOPBACK, (LOOPBACK, port)), deadline, server_port=port)


async def test_external_address_and_both_protocols_map_and_delete() -> None:
    router, port = await start_fake_router()
    with session(port) as blocking:
        assert await asyncio.to_thread(blocking.external_address) == router.external
        for protocol in ("pcp", "natpmp"):
            request = MappingRequest(Transport.UDP, 5060, lifetime=600)
            mapping = await asyncio.to_thread(blocking.add, request, protocol)
            assert (mapping.protocol, mapping.external_ip, mapping.external_port) == (protocol, router.external, 5060)
            await asyncio.to_thread(blocking.remove, mapping)
    deletes = [
        data
        for data in router.received
        if data[:1] == b"\x00" and natpmp.parse_request(data) != natpmp.ExternalAddressRequest()
    ]
    assert natpmp.parse_request(deletes[-1]) == natpmp.MapRequest.delete(Transport.UDP, 5060)
    assert pcp.parse_request(next(d for d in reversed(router.received) if d[:1] == b"\x02")).lifetime == 0


async def test_auto_picks_pcp_when_it_answers_and_natpmp_when_only_it_does() -> None:
    _, port = await start_fake_router()
    with session(port) as blocking:
        mapping = await asyncio.to_thread(blocking.add, MappingRequest(Transport.TCP, 5061), "auto")
    assert mapping.protocol == "pcp"
    _, natpmp_only = await start_fake_router(natpmp_only=True)
    with session(natpmp_only) as blocking:
        mapping = await asyncio.to_thread(blocking.add, MappingRequest(Transport.TCP, 5061), "auto")
    assert mapping.protocol == "natpmp"


async def test_a_natpmp_map_reuses_a_fresh_external_address_instead_of_asking_again() -> None:
    router, port = await start_fake_router()
    with session(port) as blocking:
        await asyncio.to_thread(blocking.external_address)
        before = len(router.received)
        mapping = await asyncio.to_thread(blocking.add, MappingRequest(Transport.UDP, 5062), "natpmp")
    assert mapping.external_ip == router.external
    assert len(router.received) == before + 1  # the map request alone (RFC 6886 §3.3 + ADDRESS_TRUST)


async def test_the_asyncio_natpmp_client_reuses_it_too_and_asks_after_a_reboot() -> None:
    router, port = await start_fake_router()
    channel = await DatagramChannel.open(LOOPBACK, reply_key, remote=(LOOPBACK, port))
    client = NatPmpClient(channel, LOOPBACK, LOOPBACK, deadline=1.0, port=port)
    await client.external_address()
    before = len(router.received)
    await client.add(MappingRequest(Transport.UDP, 5063))
    assert len(router.received) == before + 1
    router.epoch = 0  # the gateway rebooted: its epoch went back (§3.6), so the address is asked again
    router.started = time.monotonic()
    before = len(router.received)
    mapping = await client.add(MappingRequest(Transport.UDP, 5063))
    assert len(router.received) == before + 2 and mapping.external_ip == router.external
    channel.close()


async def test_a_refusal_is_one_line() -> None:
    router, port = await start_fake_router()
    router.script = lambda data: [router.pcp_reply(pcp.parse_request(data), pcp.ResultCode.NOT_AUTHORIZED)]
    with session(port) as blocking, pytest.raises(RouterRefused, match="router refused"):
        await asyncio.to_thread(blocking.add, MappingRequest(Transport.UDP, 5064), "pcp")


async def test_silence_waits_for_the_deadline_with_the_rfc_retransmissions() -> None:
    _, port = await start_fake_router(silent=True)
    with session(port, deadline=0.6) as blocking:
        started = time.monotonic()
        with pytest.raises(RouterTimeout) as info:
            await asyncio.to_thread(blocking.external_address)
        elapsed = time.monotonic() - started
    assert not isinstance(info.value, RouterUnreachable)
    assert str(info.value) == f"no answer from NAT-PMP at 127.0.0.1:{port} within 0.6 s (2 tries)"  # 0, 0.25 s
    assert 0.55 <= elapsed < 1.5


async def test_port_unreachable_ends_at_once_blocking_and_asyncio() -> None:
    port = free_port()  # nothing listens: the kernel answers ICMP port unreachable
    with session(port, deadline=2.0) as blocking:
        started = time.monotonic()
        with pytest.raises(RouterUnreachable) as info:
            await asyncio.to_thread(blocking.external_address)
        assert time.monotonic() - started < 0.5  # generous: the deadline is 2 s
    assert str(info.value) == f"NAT-PMP at 127.0.0.1:{port} is unreachable: the router answered ICMP port unreachable"
    channel = await DatagramChannel.open(LOOPBACK, reply_key, remote=(LOOPBACK, port))
    client = NatPmpClient(channel, LOOPBACK, LOOPBACK, deadline=2.0, port=port)
    started = time.monotonic()
    with pytest.raises(RouterUnreachable):
        await client.add(MappingRequest(Transport.UDP, 5065))
    assert time.monotonic() - started < 0.5
    assert channel.drops["ICMP port unreachable"] >= 1
    channel.close()


def test_port_unreachable_during_a_burst_of_two_ends_both_without_a_traceback() -> None:
    """The probe burst (PCP ANNOUNCE + NAT-PMP address at once): the ICMP error of the first can surface on
    the second's send, which must end both (it raised ValueError from min() of nothing before)."""
    port = free_port()
    with session(port, deadline=2.0) as blocking:
        for _ in range(20):  # the ICMP error lands on whichever operation comes next: many tries
            exchanges = [
                (natpmp_client.external_address_exchange((LOOPBACK, port), time.monotonic(), 2.0), what)
                for what in ("NAT-PMP", "NAT-PMP again")
            ]
            started = time.monotonic()
            blocking._run(exchanges, grace=0.25)
            assert time.monotonic() - started < 0.5
            assert all(exchange.refused for exchange, _ in exchanges)


async def test_an_unconnected_channel_still_waits_for_the_deadline_on_port_unreachable() -> None:
    """Only a connected socket hears ICMP errors; an unconnected channel (several servers) cannot."""
    port = free_port()
    channel = await DatagramChannel.open(LOOPBACK, reply_key)
    client = NatPmpClient(channel, LOOPBACK, LOOPBACK, deadline=0.4, port=port)
    with pytest.raises(RouterTimeout) as info:
        await client.external_address()
    assert not isinstance(info.value, RouterUnreachable)
    channel.close()


async def test_many_requests_in_flight_share_the_channel_s_one_timer() -> None:
    router, port = await start_fake_router()
    channel = await DatagramChannel.open(LOOPBACK, reply_key, remote=(LOOPBACK, port))
    client = NatPmpClient(channel, LOOPBACK, LOOPBACK, deadline=1.0, port=port)
    mappings = await asyncio.gather(*(client.add(MappingRequest(Transport.UDP, 7000 + i)) for i in range(50)))
    assert sorted(m.external_port for m in mappings) == list(range(7000, 7050))
    assert not channel.drops
    channel.close()
    assert router.received


class _CountingSocket:
    """Records every settimeout: each one is a system call on a real socket."""

    def __init__(self) -> None:
        self.timeout: float | None = None
        self.set: list[float] = []

    def gettimeout(self) -> float | None:
        return self.timeout

    def settimeout(self, value: float) -> None:
        self.timeout = value
        self.set.append(value)


def test_the_socket_timeout_is_set_only_when_it_changes_and_never_above_the_wait_step() -> None:
    sock = _CountingSocket()
    for seconds in (0.25, 0.3, 1.7, 0.2):  # every warm request's first wait: the step, set once
        blocking._wait_at_most(sock, seconds)  # type: ignore[arg-type]
    assert sock.set == [blocking.WAIT_STEP]
    blocking._wait_at_most(sock, 0.05)  # a nearer due time (the last wait before a retransmission) is exact
    blocking._wait_at_most(sock, 0.5)
    assert sock.set == [blocking.WAIT_STEP, 0.05, blocking.WAIT_STEP]


async def test_a_lost_request_is_still_resent_on_time_with_the_capped_wait() -> None:
    """With waits of at most WAIT_STEP the retransmissions keep RFC 6887 §8.1.1's schedule: a PCP map to a
    silent router is sent at 0 and after ~0.25 s and ~0.75 s (±10 %), then times out at the deadline."""
    router, port = await start_fake_router(silent=True)
    with session(port, deadline=1.0) as blocking_session:
        started = time.monotonic()
        with pytest.raises(RouterTimeout, match=r"within 1 s \(3 tries\)"):
            await asyncio.to_thread(blocking_session.add, MappingRequest(Transport.UDP, 5066), "pcp")
        assert 0.95 <= time.monotonic() - started < 1.5
    assert len(router.received) == 3


@given(
    st.sampled_from(list(Transport)),
    st.integers(1, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF_FFFF),
    st.integers(0, 0xFFFF_FFFF),
    st.integers(1, 100_000),
)
def test_a_mapping_read_from_a_reply_is_the_one_its_constructor_builds(
    transport: Transport, internal: int, external: int, lifetime: int, epoch: int, cap: int
) -> None:
    """Both clients build the Mapping as a decoded value (from_wire): field for field what Mapping(...)
    gives, the lease capped as before (mapper.cap_grant)."""
    from autonat.aio import pcp as pcp_client
    from autonat.mapper import Mapping

    request = MappingRequest(transport, internal)
    address = IPv4Address("203.0.113.1")
    pcp_reply = pcp.Response(
        2, pcp.Opcode.MAP, 0, lifetime, epoch, pcp.MapData(bytes(12), 17, internal, external, address)
    )
    natpmp_reply = natpmp.MapResponse(transport, 0, epoch, internal, external, lifetime)
    for protocol, mapping in (
        ("pcp", pcp_client.mapping_from(pcp_reply, request, LOOPBACK, cap)),
        ("natpmp", natpmp_client.mapping_from(natpmp_reply, request, LOOPBACK, address, cap)),
    ):
        expected = Mapping(
            protocol=protocol,
            transport=transport,
            internal_address=LOOPBACK,
            internal_port=internal,
            external_ip=address,
            external_port=external,
            lifetime=min(lifetime, cap),
            epoch=epoch,
        )
        assert mapping == expected and repr(mapping) == repr(expected)
