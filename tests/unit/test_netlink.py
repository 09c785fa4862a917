"""rtnetlink route-lookup codec: known answers and hostile replies."""

import contextlib
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.proto import netlink
from autonat.proto.errors import DecodeError

DEST = IPv4Address("198.51.100.1")


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((-length) % 4)


def reply(seq: int, attrs: bytes, family: int = netlink.AF_INET, kind: int = netlink.RTM_NEWROUTE) -> bytes:
    body = struct.pack("=BBBBBBBBI", family, 32, 0, 0, 254, 0, 0, 1, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def test_request_layout() -> None:
    request = netlink.build_route_get(DEST, seq=7, interface_index=3)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq) == (len(request), netlink.RTM_GETROUTE, netlink.NLM_F_REQUEST, 7)
    assert DEST.packed in request
    assert struct.pack("=I", 3) in request


def test_parse_default_route() -> None:
    data = reply(
        5,
        attr(netlink.RTA_DST, DEST.packed)
        + attr(netlink.RTA_OIF, struct.pack("=I", 2))
        + attr(netlink.RTA_GATEWAY, IPv4Address("192.168.77.1").packed)
        + attr(netlink.RTA_PREFSRC, IPv4Address("192.168.77.10").packed),
    )
    route = netlink.parse_route_reply(data, 5, DEST)
    assert route.gateway == IPv4Address("192.168.77.1")
    assert route.source == IPv4Address("192.168.77.10")
    assert route.interface_index == 2


def test_parse_ipv6_and_on_link() -> None:
    dest = IPv6Address("2001:db8::1")
    data = reply(1, attr(netlink.RTA_PREFSRC, IPv6Address("2001:db8::10").packed), family=netlink.AF_INET6)
    route = netlink.parse_route_reply(data, 1, dest)
    assert route.gateway is None
    assert route.source == IPv6Address("2001:db8::10")


def test_kernel_error_is_one_line() -> None:
    error = struct.pack("=IHHII", 36, netlink.NLMSG_ERROR, 0, 9, 0) + struct.pack("=i", -101) + b"\0" * 16
    with pytest.raises(DecodeError, match=r"no route to 198\.51\.100\.1 \(errno 101\)"):
        netlink.parse_route_reply(error, 9, DEST)


def test_other_sequence_numbers_are_skipped() -> None:
    data = reply(1, attr(netlink.RTA_GATEWAY, b"\1\2\3\4")) + reply(2, attr(netlink.RTA_GATEWAY, b"\5\6\7\x08"))
    assert netlink.parse_route_reply(data, 2, DEST).gateway == IPv4Address("5.6.7.8")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        struct.pack("=IHHII", 8, netlink.RTM_NEWROUTE, 0, 1, 0),
        struct.pack("=IHHII", 400, netlink.RTM_NEWROUTE, 0, 1, 0),
        reply(1, attr(netlink.RTA_GATEWAY, b"\1\2\3")),
        reply(1, struct.pack("=HH", 200, netlink.RTA_GATEWAY)),
        reply(1, attr(netlink.RTA_OIF, b"\1")),
    ],
)
def test_malformed_replies(data: bytes) -> None:
    with pytest.raises(DecodeError):
        netlink.parse_route_reply(data, 1, DEST)


@given(st.binary(max_size=600), st.integers(min_value=0, max_value=3))
def test_random_bytes_never_escape_as_other_errors(data: bytes, seq: int) -> None:
    with contextlib.suppress(DecodeError):
        netlink.parse_route_reply(data, seq, DEST)


@given(st.lists(st.tuples(st.integers(0, 20), st.binary(max_size=20)), max_size=8))
def test_random_attributes_parse_or_fail_cleanly(attrs: list[tuple[int, bytes]]) -> None:
    data = reply(3, b"".join(attr(kind, payload) for kind, payload in attrs))
    try:
        route = netlink.parse_route_reply(data, 3, DEST)
    except DecodeError:
        return
    assert route.destination == DEST
