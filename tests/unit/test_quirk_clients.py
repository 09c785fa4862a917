"""The client fixes the quirk profiles asked for, against the loopback PCP/NAT-PMP fake, and the count of
every error code the router answers (`autonat_router_errors_total`), with a fake session underneath.

The same quirks against a whole router (fake IGD and fake PCP/NAT-PMP server on a gateway of our own):
tests/fakeigd/test_quirk_profiles.py.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from autonat.aio.channel import DatagramChannel
from autonat.aio.natpmp import NatPmpClient
from autonat.aio.pcp import PcpClient
from autonat.aio.route import RouterLocation
from autonat.aio.router import RouterSession, reply_key
from autonat.engine.engine import NatEngine
from autonat.engine.lifecycle import Wanted
from autonat.engine.settings import NatSettings
from autonat.mapper import MappingRequest
from autonat.proto import natpmp, pcp
from autonat.proto.types import Transport
from autonat.web.metrics import MAX_CODE_LABELS, Metrics
from autonat.web.status import Sources
from tests.fakes.fake_session import FakeSession, factory_for
from tests.fakes.pcp_natpmp_router import start_fake_router

LOOPBACK = IPv4Address("127.0.0.1")


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTONAT_STATE_DIR", str(tmp_path))


async def session_on(port: int) -> RouterSession:
    channel = await DatagramChannel.open(LOOPBACK, reply_key)
    return RouterSession(RouterLocation(LOOPBACK, LOOPBACK, "lo"), channel, 1.0, server_port=port)


async def test_natpmp_suggests_the_internal_port_where_routeros_refuses_0() -> None:
    """MikroTik RouterOS refuses a suggested external port of 0 (docs/QUIRKS.md P5)."""
    router, port = await start_fake_router(natpmp_only=True, refuse_anonymous=natpmp.ResultCode.OUT_OF_RESOURCES)
    session = await session_on(port)
    try:
        mapping = await session.natpmp.add(MappingRequest(Transport.UDP, 5060, lifetime=600))
        assert mapping.external_port == 5060
        sent = [natpmp.parse_request(data) for data in router.received if data[:1] == b"\x00"]
        assert natpmp.MapRequest(Transport.UDP, 5060, 5060, 600) in sent
        # Asked for on purpose (what `autonat doctor` does), 0 is refused and counted.
        assert await session.natpmp.anonymous_port(Transport.UDP, 5060, 600) == natpmp.ResultCode.OUT_OF_RESOURCES
        assert session.router_errors() == {("natpmp", natpmp.ResultCode.OUT_OF_RESOURCES): 1}
        explicit = await session.natpmp.add(MappingRequest(Transport.UDP, 5061, external_port=6000, lifetime=600))
        assert explicit.external_port == 6000  # a port asked for is still what is suggested
    finally:
        session.close()


@pytest.mark.parametrize("attempt", range(5))
async def test_a_natpmp_only_router_is_selected_by_the_one_burst_probe(attempt: int) -> None:
    """Its UNSUPPORTED_VERSION answer to the PCP ANNOUNCE has the bytes of an answer to the NAT-PMP
    address request sent in the same burst (both opcode 0); NAT-PMP must still come out available."""
    _, port = await start_fake_router(natpmp_only=True)
    session = await session_on(port)
    try:
        probe = await session.probe()
        assert probe.protocols["natpmp"].available, probe.protocols["natpmp"].reason
        assert not probe.protocols["pcp"].available and probe.selected == "natpmp"
        assert probe.external_ip == IPv4Address("203.0.113.1")
    finally:
        session.close()


async def test_a_pcp_only_router_still_says_natpmp_is_unsupported() -> None:
    router, port = await start_fake_router(pcp_only=True)
    channel = await DatagramChannel.open(LOOPBACK, reply_key)
    client = NatPmpClient(channel, LOOPBACK, LOOPBACK, deadline=1.0, port=port)
    try:
        status = await client.probe()
        assert not status.available and status.details["result"] == natpmp.ResultCode.UNSUPPORTED_VERSION
        assert sum(data[:1] == b"\x00" for data in router.received) == 2  # asked once more, no more
    finally:
        channel.close()


async def test_pcp_delete_refused_with_a_private_address_means_nothing_to_delete() -> None:
    """miniupnpd behind another NAT refuses every MAP with NO_RESOURCES and its private WAN address (P1)."""
    _, port = await start_fake_router(pcp_refused_address=IPv4Address("10.0.0.2"))
    channel = await DatagramChannel.open(LOOPBACK, reply_key)
    client = PcpClient(channel, LOOPBACK, LOOPBACK, b"s" * 32, deadline=1.0, port=port)
    try:
        await client.delete(Transport.UDP, 5060)  # no error: there is nothing on the router
        assert client.router_codes == {pcp.ResultCode.NO_RESOURCES: 1}
    finally:
        channel.close()


@dataclass
class CodesSession(FakeSession):
    """A fake session whose router answered some error codes (handled or not)."""

    codes: dict[tuple[str, int], int] = field(default_factory=dict)

    def router_errors(self) -> dict[tuple[str, int], int]:
        return dict(self.codes)


def sample(text: str, **labels: str) -> float | None:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"autonat_router_errors_total\{(.*)\} (\S+)", line)
        if match and ",".join(sorted(match[1].split(","))) == wanted:
            return float(match[2])
    return None


async def test_every_error_code_the_router_answered_is_a_series_that_survives_the_session() -> None:
    session = CodesSession()
    session.codes = {("upnp", 725): 2, ("upnp", 402): 1, ("natpmp", 3): 4}
    engine = NatEngine(NatSettings(protocol="pcp", verify_interval=3600), None, session_factory=factory_for(session))
    metrics = Metrics(Sources(engine), {}, lambda: 0)
    assert sample(metrics.render("")[0].decode(), protocol="upnp", code="725") is None  # no session yet
    await engine.start([Wanted(Transport.UDP, 5060)])
    assert await engine.wait_ready(2)
    text = metrics.render("")[0].decode()
    assert sample(text, protocol="upnp", code="725") == 2
    assert sample(text, protocol="upnp", code="402") == 1
    assert sample(text, protocol="natpmp", code="3") == 4
    session.codes = {("upnp", 725): 3, ("upnp", 402): 1, ("natpmp", 3): 4}
    assert sample(metrics.render("")[0].decode(), protocol="upnp", code="725") == 3  # it increments
    await engine.stop()  # the session goes; its counts stay (a counter never goes down)
    await asyncio.sleep(0)
    assert engine.session is None
    assert sample(metrics.render("")[0].decode(), protocol="upnp", code="725") == 3
    openmetrics = metrics.render("application/openmetrics-text")[0].decode()
    assert 'autonat_router_errors_total{code="725",protocol="upnp"} 3.0' in openmetrics


async def test_router_error_series_are_bounded() -> None:
    session = CodesSession()
    session.codes = {("upnp", 600 + n): 1 for n in range(MAX_CODE_LABELS + 10)}
    engine = NatEngine(NatSettings(protocol="pcp", verify_interval=3600), None, session_factory=factory_for(session))
    metrics = Metrics(Sources(engine), {}, lambda: 0)
    await engine.start([])
    assert await engine.wait_ready(2)
    text = metrics.render("")[0].decode()
    series = [line for line in text.splitlines() if line.startswith("autonat_router_errors_total{")]
    assert len(series) == MAX_CODE_LABELS + 1
    assert sample(text, protocol="upnp", code="other") == 10
    await engine.stop()
