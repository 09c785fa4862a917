"""Is this address public? The test every "external" address a router reports must pass.

A router behind another NAT (double NAT, carrier-grade NAT) happily reports its own WAN address, which is
private or shared. Advertising it to the internet breaks every call, so such an address is never treated
as public; the caller reports double NAT instead.

Deliberately narrower than `ipaddress.is_private`: documentation ranges (RFC 5737 TEST-NETs such as
203.0.113.0/24, RFC 3849) and benchmarking ranges are reachable in labs and some real deployments and
are not "behind a NAT" by nature, so they count as public here. miniupnpc calls them reserved; we don't.
"""

from __future__ import annotations

import enum
import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address


class AddressKind(enum.StrEnum):
    """What `classify` says an address is; only PUBLIC is reachable from the internet without another NAT."""

    PUBLIC = "public"
    PRIVATE = "private"  # RFC 1918 / RFC 4193 unique local
    SHARED = "shared"  # RFC 6598 carrier-grade NAT space, 100.64.0.0/10
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"
    UNSPECIFIED = "unspecified"
    MULTICAST = "multicast"
    RESERVED = "reserved"  # "this network" 0/8, 240/4 and broadcast, IPv6 site-local


_V4_RANGES: tuple[tuple[IPv4Network, AddressKind], ...] = (
    (IPv4Network("0.0.0.0/32"), AddressKind.UNSPECIFIED),
    (IPv4Network("0.0.0.0/8"), AddressKind.RESERVED),  # RFC 1122 "this network"
    (IPv4Network("10.0.0.0/8"), AddressKind.PRIVATE),  # RFC 1918
    (IPv4Network("172.16.0.0/12"), AddressKind.PRIVATE),
    (IPv4Network("192.168.0.0/16"), AddressKind.PRIVATE),
    (IPv4Network("100.64.0.0/10"), AddressKind.SHARED),  # RFC 6598
    (IPv4Network("127.0.0.0/8"), AddressKind.LOOPBACK),
    (IPv4Network("169.254.0.0/16"), AddressKind.LINK_LOCAL),  # RFC 3927
    (IPv4Network("224.0.0.0/4"), AddressKind.MULTICAST),
    (IPv4Network("240.0.0.0/4"), AddressKind.RESERVED),  # includes 255.255.255.255
)

_V6_RANGES: tuple[tuple[IPv6Network, AddressKind], ...] = (
    (IPv6Network("::/128"), AddressKind.UNSPECIFIED),
    (IPv6Network("::1/128"), AddressKind.LOOPBACK),
    (IPv6Network("fc00::/7"), AddressKind.PRIVATE),  # RFC 4193 unique local
    (IPv6Network("fe80::/10"), AddressKind.LINK_LOCAL),
    (IPv6Network("fec0::/10"), AddressKind.RESERVED),  # deprecated site-local (RFC 3879)
    (IPv6Network("ff00::/8"), AddressKind.MULTICAST),
)


# Every range that is not public, family by family: the one list `is_public` and the ACL engine's
# wan.auto lists are both built from, so they cannot disagree.
NOT_PUBLIC_V4: tuple[IPv4Network, ...] = tuple(network for network, _ in _V4_RANGES)
NOT_PUBLIC_V6: tuple[IPv6Network, ...] = tuple(network for network, _ in _V6_RANGES)


def uri_host(address: IPAddress) -> str:
    """An address as the host part of a URI: IPv6 in brackets (RFC 3986 §3.2.2, RFC 3261 §25.1)."""
    return f"[{address}]" if address.version == 6 else str(address)


def parse_address(text: str | IPAddress) -> IPAddress:
    """Parse an IP literal; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes the IPv4 address it carries."""
    address = ipaddress.ip_address(text) if isinstance(text, str) else text
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def classify(address: str | IPAddress) -> AddressKind:
    """Say what kind of address this is, most specific range first."""
    ip = parse_address(address)
    if isinstance(ip, IPv4Address):
        for network4, kind in _V4_RANGES:
            if ip in network4:
                return kind
    else:
        for network6, kind in _V6_RANGES:
            if ip in network6:
                return kind
    return AddressKind.PUBLIC


def is_public(address: str | IPAddress) -> bool:
    """True when a peer on the internet could reach us at this address (no further NAT in between)."""
    return classify(address) is AddressKind.PUBLIC
