"""IPv6 discovery cores: the address dump with flags and lifetimes, the stable-address choice (proto/netlink.py),
and the SSDP LOCATION guard for link-local IPv6 routers (proto/ssdp.py), with property tests."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address, IPv6Interface, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.proto import netlink, ssdp
from autonat.proto.errors import DecodeError
from tests.unit.test_acl import done, newaddr, rtattr

STABLE = IPv6Address("2001:db8:0:77::10")
TEMPORARY = IPv6Address("2001:db8:0:77:5eed:1:2:3")


def address6(
    index: int, address: IPv6Address, flags: int = 0, scope: int = 0, cache: tuple[int, int] | None = None
) -> bytes:
    attrs = rtattr(netlink.IFA_ADDRESS, address.packed) + rtattr(netlink.IFA_FLAGS, struct.pack("=I", flags))
    if cache is not None:
        attrs += rtattr(netlink.IFA_CACHEINFO, struct.pack("=IIII", *cache, 0, 0))
    body = struct.pack("=BBBBI", socket.AF_INET6, 64, flags & 0xFF, scope, index) + attrs
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 7, 0) + body


def info(address: str, index: int = 2, flags: int = 0, scope: int = 0) -> netlink.AddressInfo:
    return netlink.AddressInfo(index, None, IPv6Interface(f"{address}/64"), flags, scope, None, None)


def test_the_dump_carries_flags_scope_and_lifetimes() -> None:
    data = (
        address6(2, STABLE, netlink.IFA_F_MANAGETEMPADDR, cache=(0xFFFFFFFF, 0xFFFFFFFF))
        + address6(2, TEMPORARY, netlink.IFA_F_TEMPORARY, cache=(3600, 86400))
        + address6(2, IPv6Address("fe80::1"), netlink.IFA_F_PERMANENT, scope=netlink.RT_SCOPE_LINK)
        + newaddr(7, socket.AF_INET, 24, 2, rtattr(2, bytes([192, 168, 77, 10])))
        + done(7)
    )
    found, finished = netlink.parse_getaddr_details(data, 7)
    assert finished
    assert [(str(i.interface.ip), i.flags, i.scope, i.preferred, i.valid) for i in found] == [
        (str(STABLE), netlink.IFA_F_MANAGETEMPADDR, 0, None, None),  # 0xffffffff: forever
        (str(TEMPORARY), netlink.IFA_F_TEMPORARY, 0, 3600, 86400),
        ("fe80::1", netlink.IFA_F_PERMANENT, netlink.RT_SCOPE_LINK, None, None),
        ("192.168.77.10", 0, 0, None, None),
    ]
    # The old shape is unchanged for the ACL code.
    entries, _ = netlink.parse_getaddr_reply(data, 7)
    assert entries[0] == (2, None, IPv6Interface(f"{STABLE}/64"))


def test_a_short_flags_or_cacheinfo_attribute_is_ignored_not_trusted() -> None:
    attrs = rtattr(netlink.IFA_ADDRESS, STABLE.packed) + rtattr(netlink.IFA_FLAGS, b"\x01\x00")
    attrs += rtattr(netlink.IFA_CACHEINFO, b"\0" * 8)
    body = struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 2) + attrs
    found, _ = netlink.parse_getaddr_details(struct.pack("=IHHII", 16 + len(body), 20, 2, 7, 0) + body, 7)
    assert (found[0].flags, found[0].preferred) == (0, None)


def test_the_stable_address_wins_over_the_kernels_temporary_choice() -> None:
    addresses = [
        info(str(TEMPORARY), flags=netlink.IFA_F_TEMPORARY),
        info(str(STABLE), flags=netlink.IFA_F_MANAGETEMPADDR),
        info("fe80::10", scope=netlink.RT_SCOPE_LINK),
        info("2001:db8:0:99::10", index=3),  # another interface
    ]
    chosen = netlink.stable_ipv6(addresses, 2, TEMPORARY)
    assert chosen is not None and chosen.interface.ip == STABLE
    # Without privacy addresses (no MANAGETEMPADDR), the kernel's own choice among stable ones.
    plain = [info("2001:db8:0:77::5"), info("2001:db8:0:77::9")]
    assert netlink.stable_ipv6(plain, 2, IPv6Address("2001:db8:0:77::9")).interface.ip == IPv6Address(  # type: ignore[union-attr]
        "2001:db8:0:77::9"
    )
    assert netlink.stable_ipv6(plain, 2).interface.ip == IPv6Address("2001:db8:0:77::5")  # type: ignore[union-attr]
    # A public address beats a unique-local one; deprecated, tentative and failed ones never count.
    mixed = [info("fd00::1"), info("2001:db8::1", flags=netlink.IFA_F_DEPRECATED), info("2001:db8::2")]
    assert netlink.stable_ipv6(mixed, 2).interface.ip == IPv6Address("2001:db8::2")  # type: ignore[union-attr]
    for flag in (netlink.IFA_F_TEMPORARY, netlink.IFA_F_TENTATIVE, netlink.IFA_F_DADFAILED):
        assert netlink.stable_ipv6([info("2001:db8::3", flags=flag)], 2) is None
    assert netlink.stable_ipv6([info("fe80::1", scope=netlink.RT_SCOPE_LINK)], 2) is None


_FLAGS = st.sampled_from(
    [0, netlink.IFA_F_TEMPORARY, netlink.IFA_F_MANAGETEMPADDR, netlink.IFA_F_DEPRECATED, netlink.IFA_F_PERMANENT]
)
_INFOS = st.builds(
    lambda ip, index, flags, scope: netlink.AddressInfo(
        index, None, IPv6Interface((IPv6Address(ip), 64)), flags, scope, None, None
    ),
    st.integers(0, 2**128 - 1),
    st.integers(1, 3),
    _FLAGS,
    st.sampled_from([0, netlink.RT_SCOPE_LINK]),
)


@given(st.lists(_INFOS, max_size=8), st.integers(1, 3))
def test_stable_ipv6_only_ever_picks_a_usable_global_address_of_the_interface(
    addresses: list[netlink.AddressInfo], index: int
) -> None:
    chosen = netlink.stable_ipv6(addresses, index)
    if chosen is None:
        return
    assert chosen in addresses and chosen.index == index and chosen.scope == netlink.RT_SCOPE_UNIVERSE
    assert not chosen.flags & (netlink.IFA_F_TEMPORARY | netlink.IFA_F_DEPRECATED)
    assert not chosen.interface.ip.is_link_local and not chosen.interface.ip.is_multicast


@given(st.binary(max_size=300))
def test_getaddr_details_take_any_bytes(data: bytes) -> None:
    try:
        found, _ = netlink.parse_getaddr_details(data, 7)
    except DecodeError:
        return
    assert all(isinstance(item, netlink.AddressInfo) for item in found)


# --- SSDP on IPv6: the link-local LOCATION guard ----------------------------------------------------------

LAN6 = IPv6Network("2001:db8:0:77::/64")
ROUTER_LL = IPv6Address("fe80::1%eth0")  # the responder, as the search socket reports it (zone = arrival)


def validate(location: str, responder: IPv6Address = ROUTER_LL, gateway: IPv6Address = ROUTER_LL) -> ssdp.Location:
    return ssdp.validate_location(location, responder=responder, gateway=gateway, local_network=LAN6)


def test_the_ipv6_groups() -> None:
    assert IPv6Address("ff02::c") == ssdp.MULTICAST_ADDRESS6_LINK
    assert IPv6Address("ff05::c") == ssdp.MULTICAST_ADDRESS6_SITE


def test_a_link_local_location_gets_the_zone_of_the_reply() -> None:
    location = validate("http://[fe80::1]:5000/rootDesc.xml")
    assert location.url == "http://[fe80::1%25eth0]:5000/rootDesc.xml"  # RFC 6874
    assert location.host == ROUTER_LL and location.host.scope_id == "eth0"
    # A global gateway answering with its link-local address still may point at itself.
    assert validate("http://[fe80::1]/d.xml", gateway=IPv6Address("2001:db8:0:77::1")).port == 80


@pytest.mark.parametrize(
    ("location", "responder", "gateway", "reason"),
    [
        ("http://[fe80::2]:5000/", ROUTER_LL, ROUTER_LL, "neither the responder nor the gateway"),
        ("http://[fe80::1]:5000/", IPv6Address("fe80::1"), ROUTER_LL, "did not come from that link"),
        ("http://[fe80::1]:5000/", IPv6Address("2001:db8:0:77::1"), ROUTER_LL, "did not come from that link"),
        ("http://[fe80::1%25eth1]:5000/", ROUTER_LL, ROUTER_LL, "must not carry an IPv6 zone"),  # never taken
        # The gateway's address, named by a host on another link: fe80::1%eth1 is not fe80::1%eth0.
        ("http://[fe80::1]:5000/", IPv6Address("fe80::2%eth1"), IPv6Address("fe80::1%eth0"), "neither"),
        ("http://[2001:db8:0:99::1]:5000/", ROUTER_LL, ROUTER_LL, "outside the local network"),
    ],
)
def test_link_local_locations_are_as_strict_as_ipv4(
    location: str, responder: IPv6Address, gateway: IPv6Address, reason: str
) -> None:
    with pytest.raises(DecodeError, match=reason):
        validate(location, responder, gateway)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.sampled_from(["eth0", "eth1", "3"]))
def test_a_link_local_location_is_accepted_only_for_its_own_responder(host: int, sender: int, zone: str) -> None:
    host_ip = IPv6Address((0xFE80 << 112) | host)
    responder = IPv6Address(f"{IPv6Address((0xFE80 << 112) | sender)}%{zone}")
    try:
        location = validate(f"http://[{host_ip}]:5000/x", responder, IPv6Address("2001:db8:0:77::1"))
    except DecodeError:
        assert host != sender
    else:
        assert host == sender and location.host == responder and f"%25{zone}]" in location.url


def test_an_ipv4_responder_never_passes_a_link_local_location() -> None:
    with pytest.raises(DecodeError):
        ssdp.validate_location(
            "http://[fe80::1]:5000/",
            responder=IPv4Address("192.168.77.1"),
            gateway=IPv4Address("192.168.77.1"),
            local_network=LAN6,
        )
