"""Which "external" addresses count as public (issue: reject private/CGNAT, report double NAT)."""

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.addresses import AddressKind, classify, is_public, parse_address


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.1.2.3", AddressKind.PRIVATE),
        ("172.16.0.1", AddressKind.PRIVATE),
        ("172.31.255.255", AddressKind.PRIVATE),
        ("192.168.77.2", AddressKind.PRIVATE),
        ("100.64.0.1", AddressKind.SHARED),
        ("100.127.255.254", AddressKind.SHARED),
        ("127.0.0.1", AddressKind.LOOPBACK),
        ("169.254.1.1", AddressKind.LINK_LOCAL),
        ("0.0.0.0", AddressKind.UNSPECIFIED),
        ("0.1.2.3", AddressKind.RESERVED),
        ("224.0.0.1", AddressKind.MULTICAST),
        ("255.255.255.255", AddressKind.RESERVED),
        ("::", AddressKind.UNSPECIFIED),
        ("::1", AddressKind.LOOPBACK),
        ("fd00::1", AddressKind.PRIVATE),
        ("fe80::1", AddressKind.LINK_LOCAL),
        ("ff02::1", AddressKind.MULTICAST),
        ("::ffff:192.168.1.1", AddressKind.PRIVATE),
        ("::ffff:100.64.1.1", AddressKind.SHARED),
    ],
)
def test_not_public(address: str, kind: AddressKind) -> None:
    assert classify(address) is kind
    assert not is_public(address)


@pytest.mark.parametrize(
    "address",
    [
        "203.0.113.1",
        "198.51.100.7",
        "8.8.8.8",
        "100.63.255.255",
        "100.128.0.0",
        "172.32.0.1",
        "2001:db8::1",
        "2a00:1450::1",
        "::ffff:203.0.113.1",
    ],
)
def test_public(address: str) -> None:
    # TEST-NETs are public for this purpose: the lab's WAN is 203.0.113.0/24 (LAB-NOTES gotcha 2).
    assert is_public(address)


def test_mapped_ipv6_becomes_ipv4() -> None:
    assert parse_address("::ffff:10.0.0.1") == IPv4Address("10.0.0.1")
    assert parse_address(IPv6Address("2001:db8::1")) == IPv6Address("2001:db8::1")


@given(st.ip_addresses())
def test_classify_is_total_and_consistent(address: IPv4Address | IPv6Address) -> None:
    kind = classify(address)
    assert (kind is AddressKind.PUBLIC) == is_public(address)
    if isinstance(address, IPv4Address) and address.is_private and not address.is_global:
        # Everything Python calls private except documentation/benchmark ranges must be non-public here.
        documentation = any(address in n for n in _DOC_NETS)
        assert documentation or kind is not AddressKind.PUBLIC


_DOC_NETS = [
    __import__("ipaddress").ip_network(n)
    for n in ("192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24")
]
