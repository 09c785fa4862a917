"""rtnetlink route lookup codec (Linux): "which route would a packet to X take?".

Asking the kernel with RTM_GETROUTE (rtnetlink(7), RFC 3549 §2.3.3.2) gives the gateway, output interface
and source address of the route actually used, policy routing included, without sending a packet and
without parsing `ip` output. This module only builds and parses the messages; the socket lives in
`autonat.aio.route`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from autonat.proto.errors import DecodeError

# linux/netlink.h, linux/rtnetlink.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
NLM_F_REQUEST = 0x1
AF_INET = 2
AF_INET6 = 10
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")  # length, type
MAX_REPLY_SIZE = 65536


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """The kernel's answer: where a packet to `destination` would go."""

    destination: IPv4Address | IPv6Address
    gateway: IPv4Address | IPv6Address | None
    source: IPv4Address | IPv6Address | None
    interface_index: int | None


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attribute(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def build_route_get(destination: IPv4Address | IPv6Address, seq: int, interface_index: int | None = None) -> bytes:
    """An RTM_GETROUTE request for one destination, optionally forced out of one interface."""
    family = AF_INET if isinstance(destination, IPv4Address) else AF_INET6
    body = _RTMSG.pack(family, destination.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
    body += _attribute(RTA_DST, destination.packed)
    if interface_index is not None:
        body += _attribute(RTA_OIF, struct.pack("=I", interface_index))
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0)
    return header + body


def _ip(family: int, raw: bytes) -> IPv4Address | IPv6Address:
    if family == AF_INET and len(raw) == 4:
        return IPv4Address(raw)
    if family == AF_INET6 and len(raw) == 16:
        return IPv6Address(raw)
    raise DecodeError(f"address attribute of {len(raw)} bytes for family {family}")


def parse_route_reply(data: bytes, seq: int, destination: IPv4Address | IPv6Address) -> RouteInfo:
    """Parse the kernel's reply to `build_route_get(destination, seq)`.

    Raises DecodeError for a malformed reply, and for a kernel error (e.g. "network unreachable") with
    the errno text, so callers report one line.
    """
    if len(data) > MAX_REPLY_SIZE:
        raise DecodeError("netlink reply too large")
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, reply_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise DecodeError("netlink message length out of bounds")
        payload = data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)
        if reply_seq != seq:
            continue
        if kind == NLMSG_ERROR:
            if len(payload) < 4:
                raise DecodeError("truncated netlink error")
            (error,) = struct.unpack_from("=i", payload)
            raise DecodeError(f"kernel has no route to {destination} (errno {-error})")
        if kind == RTM_NEWROUTE:
            return _parse_route(payload, destination)
        if kind == NLMSG_DONE:
            break
    raise DecodeError("no route in the netlink reply")


def _parse_route(payload: bytes, destination: IPv4Address | IPv6Address) -> RouteInfo:
    if len(payload) < _RTMSG.size:
        raise DecodeError("truncated rtmsg")
    family = payload[0]
    gateway: IPv4Address | IPv6Address | None = None
    source: IPv4Address | IPv6Address | None = None
    interface_index: int | None = None
    offset = _RTMSG.size
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size or offset + length > len(payload):
            raise DecodeError("route attribute length out of bounds")
        value = payload[offset + _RTATTR.size : offset + length]
        offset += _align(length)
        if kind == RTA_GATEWAY:
            gateway = _ip(family, value)
        elif kind == RTA_PREFSRC:
            source = _ip(family, value)
        elif kind == RTA_OIF:
            if len(value) != 4:
                raise DecodeError("bad RTA_OIF length")
            (interface_index,) = struct.unpack("=I", value)
    return RouteInfo(destination, gateway, source, interface_index)
