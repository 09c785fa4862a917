"""Dual-stack SIP profiles (issue 15): the address decision per family, and the call core with IPv6 peers.

An IPv6 peer of a dual-stack profile is told our global IPv6 address in Via/Contact and SDP (`IN IP6`, RFC 4566
§5.2/§5.7; IPv6 references in brackets, RFC 3261 §19.1.1 / RFC 5118 §4), with no ext-sip-ip / ext-rtp-ip
rewriting; its media ports get firewall pinholes (`AcquirePorts(family=6, mapped=True)`) when it is outside the
local network. An IPv4 peer gets exactly what it got before. The profile manager is driven by a fake engine
that honours the engine's IPv6 API (`settings.ipv6`, `ipv6_local_address`); the core by the fake clock and
shell of tests/unit/test_sip_harness.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_address
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.acl import AclSet
from autonat.addresses import IPAddress
from autonat.advertise import Addressing, parse_ext_value
from autonat.aio.route import RouterLocation
from autonat.engine.bus import EventBus
from autonat.engine.engine import NatEngine
from autonat.engine.settings import NatSettings
from autonat.errors import RouterNotFound
from autonat.proto.sdp import parse_sdp_addresses
from autonat.service import profiles as profiles_module
from autonat.service.profiles import ProfileError, ProfileManager
from autonat.service.settings import ProfileSettings, ProfileSip
from autonat.sip import core
from autonat.sip.message import Request, Response
from autonat.sip.peer import Peer
from autonat.sip.session import anchor_sdp, describe, echo_answer, echo_offer
from tests.unit.test_sip_harness import OUTSIDE, US, US6, Addresses, Net, Phone, echo_profile, offer, register

LAN = "192.168.77.10"
LAN6 = "2001:db8:0:77::10"  # the host's stable global address (the engine's)
OTHER6 = "2001:db8:0:77::99"  # another address of ours, for sip-ip6
ROUTER_WAN = "203.0.113.1"
INTERNET6 = "2001:db8:0:1::100"  # an IPv6 peer on the internet
NEIGHBOUR6 = "2001:db8:0:77::20"  # an IPv6 peer on our LAN (localnet.auto)


# --------------------------------------------------------------------------------------------- the decision


@dataclass
class FakeEngine:
    """What the profile manager reads of NatEngine, IPv6 part included (the contract of engine/engine.py)."""

    settings: NatSettings = field(default_factory=lambda: NatSettings(ipv6=True))
    external_ip: IPAddress | None = field(default_factory=lambda: IPv4Address(ROUTER_WAN))
    ipv6_local_address: str | None = LAN6
    session: Any = None
    events: EventBus = field(default_factory=EventBus)


def manager(engine: FakeEngine | None = None, **sip: Any) -> ProfileManager:
    """Profile "p": sip-ip LAN, ext-sip-ip auto-nat, ext-rtp-ip autonat:198.51.100.7, localnet.auto; `sip`
    are its ProfileSip fields (ipv6=True by default)."""
    addressing = Addressing(
        sip_ip=IPv4Address(LAN),
        ext_sip_ip=parse_ext_value("auto-nat"),
        ext_rtp_ip=parse_ext_value("autonat:198.51.100.7"),
    )
    profile = ProfileSettings("p", addressing, ProfileSip(**{"ipv6": True, **sip}))
    acls = AclSet(interfaces=[("eth0", IPv4Interface(f"{LAN}/24")), ("eth0", IPv6Interface(f"{LAN6}/64"))])
    return ProfileManager((profile,), acls, cast(NatEngine, engine or FakeEngine()))


def test_an_ipv6_peer_gets_our_global_address_and_an_ipv4_peer_what_it_got_before() -> None:
    profiles = manager()
    for media in (False, True):
        assert profiles.advertise("p", INTERNET6, media) == IPv6Address(LAN6)  # no ext-* rewriting on IPv6
        assert profiles.advertise("p", NEIGHBOUR6, media) == IPv6Address(LAN6)
        assert profiles.advertise("p", "192.168.77.20", media) == IPv4Address(LAN)
        # An IPv4-mapped source is an IPv4 peer (as the ACLs judge it).
        assert profiles.advertise("p", "::ffff:198.51.100.50", media) == profiles.advertise("p", "198.51.100.50", media)
    assert profiles.advertise("p", "198.51.100.50", media=False) == IPv4Address(ROUTER_WAN)
    assert profiles.advertise("p", "198.51.100.50", media=True) == IPv4Address(ROUTER_WAN)
    assert profiles.serves_over_ipv6("p", INTERNET6) and not profiles.serves_over_ipv6("p", "198.51.100.50")


def test_a_profile_without_ipv6_decides_as_before_whatever_the_peer() -> None:
    profiles = manager(ipv6=False)
    assert profiles.advertise("p", INTERNET6, media=False) == IPv4Address(ROUTER_WAN)
    assert profiles.ipv6_address("p") is None
    assert not profiles.pinhole("p", INTERNET6) and not profiles.serves_over_ipv6("p", INTERNET6)


def test_sip_ip6_and_the_bound_address_win_over_the_engines() -> None:
    profiles = manager(sip_ip6=IPv6Address(OTHER6))
    assert profiles.advertise("p", INTERNET6, media=True) == IPv6Address(OTHER6)
    profiles.bound6["p"] = IPv6Address("2001:db8:0:77::42")  # what the service bound
    assert profiles.advertise("p", INTERNET6, media=False) == IPv6Address("2001:db8:0:77::42")


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (INTERNET6, True),
        ("2001:db8:ffff::1", True),
        (NEIGHBOUR6, False),  # in localnet.auto: on our side of the router's firewall
        ("::1", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("198.51.100.50", False),  # IPv4: mapped (or not) as before, never a pinhole
        ("::ffff:198.51.100.50", False),
        ("not an address", False),
    ],
)
def test_which_peers_need_a_pinhole(peer: str, expected: bool) -> None:
    assert manager().pinhole("p", peer) is expected


def test_no_pinholes_without_the_engines_ipv6_or_with_mapping_off() -> None:
    for settings in (NatSettings(ipv6=False), NatSettings(ipv6=True, mapping=False), NatSettings(enabled=False)):
        profiles = manager(FakeEngine(settings=settings))
        assert not profiles.pinhole("p", INTERNET6)
        assert profiles.advertise("p", INTERNET6, media=True) == IPv6Address(LAN6)  # still told our address


def test_with_local_network_acl_none_every_ipv6_peer_but_loopback_gets_pinholes() -> None:
    profiles = manager()
    profile = profiles.profiles["p"]
    addressing = Addressing(
        sip_ip=profile.addressing.sip_ip, ext_sip_ip=profile.addressing.ext_sip_ip, local_network_acl=None
    )
    profiles.update((ProfileSettings("p", addressing, profile.sip),))
    assert profiles.pinhole("p", NEIGHBOUR6) and not profiles.pinhole("p", "::1")


def test_before_ipv6_discovery_the_kernel_route_gives_the_stable_address(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str | None, ...]] = []

    def locate(gateway: str | None, interface: str | None, local: str | None) -> RouterLocation:
        asked.append((gateway, interface, local))
        return RouterLocation(IPv6Address("2001:db8:0:77::1"), IPv6Address(OTHER6), "eth0", None, pinned=False)

    monkeypatch.setattr(profiles_module, "locate_router6", locate)
    settings = NatSettings(ipv6=True, ipv6_gateway="2001:db8:0:77::1", ipv6_address=OTHER6)
    profiles = manager(FakeEngine(settings=settings, ipv6_local_address=None))
    assert profiles.ipv6_address("p") == IPv6Address(OTHER6)
    assert profiles.advertise("p", INTERNET6, media=False) == IPv6Address(OTHER6)
    assert asked == [("2001:db8:0:77::1", None, OTHER6)]  # looked up once, then kept
    assert not profiles.pinhole("p", INTERNET6)  # no IPv6 router found (yet): calls go ahead without pinholes


def test_no_ipv6_route_is_one_line_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    def locate(gateway: str | None, interface: str | None, local: str | None) -> RouterLocation:
        raise RouterNotFound("no IPv6 default gateway: the route to the internet has none")

    monkeypatch.setattr(profiles_module, "locate_router6", locate)
    profiles = manager(FakeEngine(ipv6_local_address=None))
    with pytest.raises(ProfileError) as caught:
        profiles.ipv6_address("p")
    assert str(caught.value) == (
        "no IPv6 address to listen on: no IPv6 default gateway: the route to the internet has none (set sip-ip6)"
    )


# --------------------------------------------------------------------------------------------- the call core


class DualStack(Addresses):
    """The harness' decision, dual-stack: IPv6 peers get US6; those outside 2001:db8:0:77::/64 need pinholes."""

    def sip_address(self, profile: str, peer_ip: str) -> Any:
        return IPv6Address(US6) if ":" in peer_ip else super().sip_address(profile, peer_ip)

    def media_address(self, profile: str, peer_ip: str) -> Any:
        return IPv6Address(US6) if ":" in peer_ip else super().media_address(profile, peer_ip)

    def rtp_local(self, profile: str, peer_ip: str) -> Any:
        return IPv6Address(US6) if ":" in peer_ip else IPv4Address(US)

    def pinhole(self, profile: str, peer_ip: str) -> bool:
        return ":" in peer_ip and not peer_ip.startswith("2001:db8:0:77:")


CALLER6 = Peer("udp", INTERNET6, 5070)
NEIGHBOUR = Peer("udp", NEIGHBOUR6, 5070)
CALLER4 = Peer("udp", "198.51.100.7", 5070)
CALLEE4 = Peer("udp", "203.0.113.100", 5062)


def net() -> Net:
    return Net(echo_profile(), addresses=DualStack())


def test_an_ipv6_caller_outside_gets_bracketed_via_contact_sdp_in_ip6_and_pinholed_ports() -> None:
    n = net()
    phone = Phone(n, CALLER6)
    phone.call(body=offer(40000, address=INTERNET6))
    ok = phone.answered()
    via = ok.top_via()
    assert (via.host, via.rport) == (INTERNET6, 5070)  # RFC 3581 on IPv6: the source, no brackets in params
    assert f"Via: SIP/2.0/UDP [{INTERNET6}]:5070;" in ok.serialize().decode()
    assert ok.headers.get("Contact") == f"<sip:9196@[{US6}]:5060>"
    sdp = parse_sdp_addresses(ok.body.decode())
    assert sdp.connection is not None and (sdp.connection.addrtype, sdp.connection.address) == ("IP6", US6)
    assert sdp.origin is not None and (sdp.origin.addrtype, sdp.origin.address) == ("IP6", US6)
    [acquire] = n.of(core.AcquirePorts)
    assert (acquire.family, acquire.mapped) == (6, True)
    [echo] = n.of(core.StartEcho)
    assert echo.local == IPv6Address(US6)
    answer = describe(ok.body)
    assert answer is not None and answer.audio.port == echo.port  # no NAT: the pinholed port is the bound one
    phone.ack(ok)
    bye = phone.request("BYE", "9196")
    n.deliver(bye, CALLER6)
    assert isinstance(n.take(CALLER6, "200"), Response)
    [released] = n.released
    assert [ports.handle for ports in released.ports] == [("pool6", echo.port)]  # the pinholes are closed


def test_an_ipv6_caller_on_the_lan_gets_our_address_and_no_pinholes() -> None:
    n = net()
    phone = Phone(n, NEIGHBOUR)
    phone.call(body=offer(40000, address=NEIGHBOUR6))
    ok = phone.answered()
    assert ok.headers.get("Contact") == f"<sip:9196@[{US6}]:5060>"
    [acquire] = n.of(core.AcquirePorts)
    assert not acquire.mapped  # a pair of the range: no hole of either kind
    assert n.of(core.StartEcho)[0].local == IPv6Address(US6)
    assert b"c=IN IP6 " + US6.encode() in ok.body


def test_an_ipv4_caller_of_a_dual_stack_profile_is_answered_as_before() -> None:
    n = net()
    phone = Phone(n, CALLER4)
    phone.call()
    ok = phone.answered()
    assert ok.headers.get("Contact") == f"<sip:9196@{OUTSIDE}:5060>"
    assert b"c=IN IP4 " + OUTSIDE.encode() in ok.body
    [acquire] = n.of(core.AcquirePorts)
    assert (acquire.family, acquire.mapped) == (4, True)
    assert n.of(core.StartEcho)[0].local == IPv4Address(US)


def test_an_ipv6_caller_rings_an_ipv4_phone_through_a_relay_with_one_socket_per_family() -> None:
    n = Net(echo_profile(), addresses=DualStack(), users=(("105", "pw105"),))
    register(n, CALLEE4)
    caller = Phone(n, CALLER6)
    callee = Phone(n, CALLEE4, user="105")
    caller.call("105", body=offer(40000, address=INTERNET6))
    incoming = n.take(CALLEE4, "INVITE")
    assert isinstance(incoming, Request)
    assert b"c=IN IP4 " + OUTSIDE.encode() in incoming.body  # leg b: IPv4, anchored on the router's address
    assert incoming.top_via().host == OUTSIDE
    callee.call_id, callee.remote_tag = incoming.call_id(), incoming.from_tag()
    callee.respond(incoming, 200, body=offer(7000, address=CALLEE4.ip))
    ok = caller.answered()
    assert b"c=IN IP6 " + US6.encode() in ok.body and ok.headers.get("Contact") == f"<sip:105@[{US6}]:5060>"
    [relay] = n.of(core.StartRelay)
    assert relay.local == IPv6Address(US6) and relay.local_b == IPv4Address(US)
    assert relay.peer_a == (INTERNET6, 40000)
    assert {(a.leg, a.family, a.mapped) for a in n.of(core.AcquirePorts)} == {("a", 6, True), ("b", 4, True)}


# --------------------------------------------------------------------------------------------- SDP IN IP6

addresses6 = st.builds(IPv6Address, st.integers(min_value=1, max_value=2**128 - 1)).filter(
    lambda a: a.ipv4_mapped is None
)
ports = st.integers(min_value=1, max_value=65534).map(lambda p: p & ~1 or 2)


@given(ours=addresses6, theirs=st.one_of(addresses6, st.builds(IPv4Address, st.integers(1, 2**32 - 1))), port=ports)
def test_sdp_in_ip6_round_trips_through_offer_answer_and_anchoring(
    ours: IPv6Address, theirs: IPv4Address | IPv6Address, port: int
) -> None:
    """RFC 4566 §5.2/§5.7 (RFC 8866): what we write for an IPv6 address is `IN IP6 <address>`, and our own parser
    reads back exactly the address and port we wrote, whatever the offer's family."""
    offered = offer(40000, address=str(theirs)).decode()
    for text in (
        echo_answer(offered, address=ours, port=port, rtcp_port=port + 1, session_id=7),
        echo_offer(address=ours, port=port, rtcp_port=port + 1, session_id=7, version=7),
        anchor_sdp(offered, address=ours, port=port, rtcp_port=port + 1),
    ):
        assert text is not None
        described = describe(text)
        assert described is not None
        assert (described.audio.address, described.audio.port) == (ours, port)
        summary = parse_sdp_addresses(text)
        assert summary.origin is not None and summary.connection is not None
        assert {(c.addrtype, ip_address(c.address)) for c in (summary.origin, summary.connection)} == {("IP6", ours)}
