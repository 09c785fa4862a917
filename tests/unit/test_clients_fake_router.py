"""NAT-PMP/PCP clients and the probe against a fake router on loopback: the hostile and odd cases."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from autonat.aio.channel import DatagramChannel
from autonat.aio.natpmp import NatPmpClient
from autonat.aio.pcp import PcpClient
from autonat.aio.route import RouterLocation
from autonat.aio.router import ProtocolChoice, RouterSession, reply_key
from autonat.errors import RouterRefused, RouterTimeout
from autonat.mapper import MAX_GRANTED_LIFETIME, MappingRequest
from autonat.proto import natpmp, pcp
from autonat.proto.types import Transport
from tests.fakes.pcp_natpmp_router import start_fake_router

LOOPBACK = IPv4Address("127.0.0.1")


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTONAT_STATE_DIR", str(tmp_path))


async def clients(port: int, deadline: float = 1.0) -> tuple[DatagramChannel, NatPmpClient, PcpClient]:
    channel = await DatagramChannel.open(LOOPBACK, reply_key)
    return (
        channel,
        NatPmpClient(channel, LOOPBACK, LOOPBACK, deadline=deadline, port=port),
        PcpClient(channel, LOOPBACK, LOOPBACK, b"s" * 32, deadline=deadline, port=port),
    )


async def test_natpmp_map_and_external_address() -> None:
    router, port = await start_fake_router()
    channel, client, _ = await clients(port)
    mapping = await client.add(MappingRequest(Transport.TCP, 5062, lifetime=600))
    assert (mapping.external_ip, mapping.external_port, mapping.lifetime) == (router.external, 5062, 600)
    await client.delete(Transport.TCP, 5062)
    assert natpmp.parse_request(router.received[-1]) == natpmp.MapRequest.delete(Transport.TCP, 5062)
    channel.close()


async def test_garbage_and_wrong_replies_are_dropped_then_the_right_one_wins() -> None:
    router, port = await start_fake_router()

    def hostile(data: bytes) -> list[bytes]:
        request = pcp.parse_request(data)
        return [
            b"\xff" * 7,  # garbage
            router.pcp_reply(request, 0, nonce=b"x" * 12),  # someone else's nonce
            pcp.Response(2, pcp.Opcode.ANNOUNCE, 0, 0, 5, None, ()).encode(),  # another opcode
            router.pcp_reply(request, 0),
        ]

    router.script = hostile
    channel, _, client = await clients(port)
    mapping = await client.add(MappingRequest(Transport.UDP, 5060))
    assert mapping.external_port == 5060 and mapping.protocol == "pcp"
    assert sum(channel.drops.values()) == 3
    assert channel.drops["PCP reply with another nonce"] == 1
    channel.close()


async def test_reply_from_another_port_is_dropped() -> None:
    router, port = await start_fake_router()
    impostor, _ = await start_fake_router()  # a second socket: same host, other port

    def from_elsewhere(data: bytes) -> list[bytes]:
        assert impostor.transport is not None and router.transport is not None
        reply = natpmp.ExternalAddressResponse(0, 1, IPv4Address("6.6.6.6")).encode()
        impostor.transport.sendto(reply, router_client_addr[0])
        return []

    router_client_addr: list[tuple[str, int]] = []
    channel, client, _ = await clients(port, deadline=0.3)
    router_client_addr.append(channel.sockname)
    router.script = from_elsewhere
    with pytest.raises(RouterTimeout):
        await client.external_address()
    assert channel.drops["reply from another address"] >= 1
    channel.close()


async def test_silent_router_times_out_within_the_deadline_with_one_line() -> None:
    _, port = await start_fake_router(silent=True)
    channel, client, _ = await clients(port, deadline=0.6)
    started = time.monotonic()
    with pytest.raises(RouterTimeout) as info:
        await client.external_address()
    elapsed = time.monotonic() - started
    assert 0.55 <= elapsed < 0.9
    assert "no answer from NAT-PMP at 127.0.0.1" in str(info.value) and "(2 tries)" in str(
        info.value
    )  # at 0 and 0.25 s
    assert "\n" not in str(info.value)
    channel.close()


async def test_error_results_become_router_refused() -> None:
    router, port = await start_fake_router()
    router.script = lambda data: [router.pcp_reply(pcp.parse_request(data), pcp.ResultCode.ADDRESS_MISMATCH)]
    channel, _, client = await clients(port)
    with pytest.raises(RouterRefused) as info:
        await client.add(MappingRequest(Transport.UDP, 5060))
    assert info.value.code == pcp.ResultCode.ADDRESS_MISMATCH and "ADDRESS_MISMATCH" in str(info.value)
    router.script = lambda data: [natpmp.MapResponse(Transport.UDP, 2, 1, 5060, 0, 0).encode()]
    _, natpmp_client, _ = await clients(port)
    with pytest.raises(RouterRefused, match="NAT-PMP result 2"):
        await natpmp_client.add(MappingRequest(Transport.UDP, 5060))
    channel.close()


async def test_natpmp_only_server_answers_pcp_with_version_0() -> None:
    _, port = await start_fake_router(natpmp_only=True)
    channel, _, client = await clients(port)
    status = await client.probe()
    assert not status.available and "NAT-PMP only" in status.reason
    channel.close()


async def test_every_answer_carries_the_epoch_up_to_the_engine() -> None:
    """The clients keep no epoch state (the engine's lifecycle core owns it): they hand each epoch up."""
    router, port = await start_fake_router(epoch=5000)
    channel, natpmp_client, pcp_client = await clients(port)
    first = await natpmp_client.external_address()
    router.epoch = 3
    second = await natpmp_client.external_address()
    assert first.epoch >= 5000 and second.epoch < 10
    granted = await pcp_client.add(MappingRequest(Transport.UDP, 5060))
    assert granted.epoch is not None and granted.epoch < 10
    assert (await pcp_client.probe()).epoch is not None
    channel.close()


async def test_pcp_nonce_is_stable_for_a_mapping_across_clients() -> None:
    router, port = await start_fake_router()
    channel, _, first = await clients(port)
    await first.add(MappingRequest(Transport.UDP, 5060))
    _, _, second = await clients(port)
    await second.delete(Transport.UDP, 5060)
    add, delete = (pcp.parse_request(d) for d in router.received[-2:])
    assert add.map is not None and delete.map is not None
    assert add.map.nonce == delete.map.nonce and delete.lifetime == 0
    channel.close()


@pytest.fixture
async def session_factory() -> AsyncIterator[list[RouterSession]]:
    sessions: list[RouterSession] = []
    yield sessions
    for session in sessions:
        await session.aclose()


async def open_session(port: int, sessions: list[RouterSession], deadline: float = 2.0) -> RouterSession:
    location = RouterLocation(LOOPBACK, LOOPBACK, "lo")
    session = RouterSession(location, await DatagramChannel.open(LOOPBACK), deadline, server_port=port)
    sessions.append(session)
    return session


async def test_probe_selects_pcp_and_takes_external_ip_from_natpmp(
    session_factory: list[RouterSession],
) -> None:
    _, port = await start_fake_router()
    result = await (await open_session(port, session_factory)).probe()
    assert result.selected == "pcp"
    assert str(result.external_ip) == "203.0.113.1" and not result.double_nat
    assert result.protocols["natpmp"].available and result.protocols["pcp"].available
    assert result.protocols["upnp"].available is False
    assert set(result.to_dict()) >= {
        "gateway",
        "local_address",
        "external_ip",
        "selected",
        "double_nat",
        "protocols",
    }


async def test_probe_does_not_wait_out_the_deadline_for_a_silent_protocol(
    session_factory: list[RouterSession],
) -> None:
    _, port = await start_fake_router(pcp_silent=True)
    started = time.monotonic()
    result = await (await open_session(port, session_factory, deadline=2.0)).probe()
    assert time.monotonic() - started < 0.6
    assert result.selected == "natpmp"
    assert "no answer within 250 ms after natpmp answered" in result.protocols["pcp"].reason


async def test_private_external_address_is_double_nat(session_factory: list[RouterSession]) -> None:
    _, port = await start_fake_router(external=IPv4Address("100.64.3.4"))
    result = await (await open_session(port, session_factory)).probe()
    assert result.double_nat and result.to_dict()["external_ip_kind"] == "shared"


async def test_concurrent_exchanges_share_one_socket() -> None:
    _, port = await start_fake_router()
    channel, client, pcp_client = await clients(port)
    results = await asyncio.gather(
        *(client.add(MappingRequest(Transport.UDP, p)) for p in range(6000, 6010)),
        *(pcp_client.add(MappingRequest(Transport.TCP, p)) for p in range(6000, 6010)),
    )
    assert [m.internal_port for m in results] == list(range(6000, 6010)) * 2
    assert not channel.drops
    channel.close()


async def test_a_short_error_reply_without_the_full_key_still_reaches_its_request() -> None:
    router, port = await start_fake_router()
    router.script = lambda data: [natpmp.ErrorResponse(data[1], natpmp.ResultCode.OUT_OF_RESOURCES, 7).encode()]
    channel, client, _ = await clients(port)
    with pytest.raises(RouterRefused, match="NAT-PMP result 4"):
        await client.add(MappingRequest(Transport.UDP, 5060))
    channel.close()


async def test_many_exchanges_in_flight_are_each_answered_once() -> None:
    _, port = await start_fake_router()
    channel, _, pcp_client = await clients(port, deadline=5)
    results = await asyncio.gather(*(pcp_client.add(MappingRequest(Transport.UDP, p)) for p in range(20000, 20500)))
    assert sorted(m.internal_port for m in results) == list(range(20000, 20500))
    assert not channel.drops
    channel.close()


# --- lease cap: a grant above max_lifetime is treated as max_lifetime, with a warning ----------------

HUGE = 0xFFFFFFFF  # 4,294,967,295 s: 136 years


@pytest.mark.parametrize("protocol", ["natpmp", "pcp"])
async def test_a_huge_grant_is_treated_as_a_day_with_a_warning(
    protocol: ProtocolChoice, session_factory: list[RouterSession], caplog: pytest.LogCaptureFixture
) -> None:
    _, port = await start_fake_router(granted_lifetime=HUGE)
    session = await open_session(port, session_factory)
    with caplog.at_level(logging.INFO, logger="autonat.holes"):
        mapping = await session.add(MappingRequest(Transport.UDP, 5060, lifetime=7200), protocol)
    assert mapping.lifetime == MAX_GRANTED_LIFETIME == 86400
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        f"router granted a {HUGE} s lease for udp 203.0.113.1:5060 via {protocol}; treating it as 86400 s"
        " (renewed accordingly)"
    )
    assert "lease 86400 s" in caplog.records[-1].getMessage()  # the "opened" line reports the cap


@pytest.mark.parametrize("protocol", ["natpmp", "pcp"])
async def test_the_cap_is_the_session_s_max_lifetime_and_grants_below_it_are_kept(
    protocol: ProtocolChoice, session_factory: list[RouterSession], caplog: pytest.LogCaptureFixture
) -> None:
    router, port = await start_fake_router(granted_lifetime=3601)
    location = RouterLocation(LOOPBACK, LOOPBACK, "lo")
    session = RouterSession(location, await DatagramChannel.open(LOOPBACK), 2.0, server_port=port, max_lifetime=3600)
    session_factory.append(session)
    with caplog.at_level(logging.WARNING, logger="autonat.holes"):
        capped = await session.add(MappingRequest(Transport.UDP, 5060, lifetime=600), protocol)
        router.granted_lifetime = 3600
        kept = await session.add(MappingRequest(Transport.UDP, 5062, lifetime=600), protocol)
    assert (capped.lifetime, kept.lifetime) == (3600, 3600)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


async def test_a_cap_below_one_second_is_refused_before_any_socket() -> None:
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="max_lifetime must be a positive number of seconds"):
            await RouterSession.open(gateway="127.0.0.1", max_lifetime=bad)
    channel = await DatagramChannel.open(LOOPBACK, reply_key)
    with pytest.raises(ValueError, match="max_lifetime"):
        PcpClient(channel, LOOPBACK, LOOPBACK, b"s" * 32, max_lifetime=0)
    channel.close()
