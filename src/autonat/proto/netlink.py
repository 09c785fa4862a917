"""rtnetlink route lookup codec (Linux): "which route would a packet to X take?".

Asking the kernel with RTM_GETROUTE (rtnetlink(7), RFC 3549 §2.3.3.2) gives the gateway, output interface
and source address of the route actually used, policy routing included, without sending a packet and
without parsing `ip` output. This module only builds and parses the messages; the socket lives in
`autonat.aio.route`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from autonat.proto.errors import DecodeError
from autonat.proto.record import Record, init_fields

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


class RouteInfo(Record):
    """The kernel's answer: where a packet to `destination` would go."""

    _fields = ("destination", "gateway", "source", "interface_index")
    __slots__ = _fields
    destination: IPv4Address | IPv6Address
    gateway: IPv4Address | IPv6Address | None
    source: IPv4Address | IPv6Address | None
    interface_index: int | None

    def __init__(
        self,
        destination: IPv4Address | IPv6Address,
        gateway: IPv4Address | IPv6Address | None,
        source: IPv4Address | IPv6Address | None,
        interface_index: int | None,
    ) -> None:
        init_fields(self, destination, gateway, source, interface_index)


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


def iter_messages(data: bytes, seq: int) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each message answering request `seq` in one netlink datagram; messages of
    other requests are skipped; DecodeError for lengths that do not fit (rtnetlink(7), netlink(7))."""
    if len(data) > MAX_REPLY_SIZE:
        raise DecodeError("netlink reply too large")
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, reply_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise DecodeError("netlink message length out of bounds")
        payload = data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)
        if reply_seq == seq:
            yield kind, payload


def iter_attributes(payload: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each rtattr from `start` on; DecodeError for lengths that do not fit."""
    offset = start
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size or offset + length > len(payload):
            raise DecodeError("netlink attribute length out of bounds")
        yield kind, payload[offset + _RTATTR.size : offset + length]
        offset += _align(length)


def _kernel_error(payload: bytes) -> int:
    if len(payload) < 4:
        raise DecodeError("truncated netlink error")
    (error,) = struct.unpack_from("=i", payload)
    return int(-error)


def parse_route_reply(data: bytes, seq: int, destination: IPv4Address | IPv6Address) -> RouteInfo:
    """Parse the kernel's reply to `build_route_get(destination, seq)`.

    Raises DecodeError for a malformed reply, and for a kernel error (e.g. "network unreachable") with
    the errno text, so callers report one line.
    """
    for kind, payload in iter_messages(data, seq):
        if kind == NLMSG_ERROR:
            raise DecodeError(f"kernel has no route to {destination} (errno {_kernel_error(payload)})")
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
    for kind, value in iter_attributes(payload, _RTMSG.size):
        if kind == RTA_GATEWAY:
            gateway = _ip(family, value)
        elif kind == RTA_PREFSRC:
            source = _ip(family, value)
        elif kind == RTA_OIF:
            if len(value) != 4:
                raise DecodeError("bad RTA_OIF length")
            (interface_index,) = struct.unpack("=I", value)
    return RouteInfo(destination, gateway, source, interface_index)


# --- every address of every interface (RTM_GETADDR dump) --------------------------------------------

RTM_NEWADDR = 20
RTM_GETADDR = 22
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
IFA_CACHEINFO = 6
IFA_FLAGS = 8
# linux/if_addr.h: the 8 flag bits of ifaddrmsg, extended to 32 by the IFA_FLAGS attribute.
IFA_F_TEMPORARY = 0x01  # an RFC 8981 temporary (privacy) address
IFA_F_OPTIMISTIC = 0x04
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20  # its preferred lifetime is over: not to be used for new connections
IFA_F_TENTATIVE = 0x40  # duplicate address detection still running
IFA_F_PERMANENT = 0x80  # configured by hand, no lifetime
IFA_F_MANAGETEMPADDR = 0x100  # the stable address temporaries are made from (RFC 8981 §3.3)
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_CACHEINFO = struct.Struct("=IIII")  # preferred, valid, created, updated
INFINITY_LIFE_TIME = 0xFFFF_FFFF
AddressEntry = tuple[int, str | None, IPv4Interface | IPv6Interface]


class AddressInfo(Record):
    """One address of the RTM_GETADDR dump with what tells a stable address from a temporary one:
    the kernel's flags (IFA_F_*), its scope (RT_SCOPE_*), and its lifetimes in seconds (None: forever)."""

    _fields = ("index", "label", "interface", "flags", "scope", "preferred", "valid")
    __slots__ = _fields
    index: int
    label: str | None
    interface: IPv4Interface | IPv6Interface
    flags: int
    scope: int
    preferred: int | None
    valid: int | None

    def __init__(
        self,
        index: int,
        label: str | None,
        interface: IPv4Interface | IPv6Interface,
        flags: int,
        scope: int,
        preferred: int | None,
        valid: int | None,
    ) -> None:
        init_fields(self, index, label, interface, flags, scope, preferred, valid)


def build_getaddr_dump(seq: int) -> bytes:
    """An RTM_GETADDR dump request for every address of every family (rtnetlink(7))."""
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_getaddr_reply(data: bytes, seq: int) -> tuple[list[AddressEntry], bool]:
    """The addresses in one datagram of the dump as (interface index, label, interface), and whether
    it was the last. IPv4 point-to-point links carry the peer in IFA_ADDRESS, ours in IFA_LOCAL."""
    found, done = parse_getaddr_details(data, seq)
    return [(info.index, info.label, info.interface) for info in found], done


def parse_getaddr_details(data: bytes, seq: int) -> tuple[list[AddressInfo], bool]:
    """As `parse_getaddr_reply`, each address with its flags, scope and lifetimes (rtnetlink(7),
    linux/if_addr.h): what picks the stable IPv6 address a pinhole is for."""
    found: list[AddressInfo] = []
    for kind, payload in iter_messages(data, seq):
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            raise DecodeError(f"netlink address dump refused (errno {_kernel_error(payload)})")
        if kind == RTM_NEWADDR and len(payload) >= _IFADDRMSG.size:
            entry = _parse_address(payload)
            if entry is not None:
                found.append(entry)
    return found, False


def _lifetime(seconds: int) -> int | None:
    return None if seconds == INFINITY_LIFE_TIME else seconds


def _parse_address(payload: bytes) -> AddressInfo | None:
    family, prefix, flags, scope, index = _IFADDRMSG.unpack_from(payload)
    attributes = dict(iter_attributes(payload, _IFADDRMSG.size))
    raw = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
    label = attributes[IFA_LABEL].split(b"\0", 1)[0].decode(errors="replace") if IFA_LABEL in attributes else None
    extended = attributes.get(IFA_FLAGS)
    if extended is not None and len(extended) == 4:
        (flags,) = struct.unpack("=I", extended)  # the full set; the header's byte is its low 8 bits
    preferred = valid = None
    cache = attributes.get(IFA_CACHEINFO)
    if cache is not None and len(cache) == _CACHEINFO.size:
        left, total, _, _ = _CACHEINFO.unpack(cache)
        preferred, valid = _lifetime(left), _lifetime(total)
    interface: IPv4Interface | IPv6Interface
    if family == socket.AF_INET and raw is not None and len(raw) == 4 and prefix <= 32:
        interface = IPv4Interface((IPv4Address(raw), prefix))
    elif family == socket.AF_INET6 and raw is not None and len(raw) == 16 and prefix <= 128:
        interface = IPv6Interface((IPv6Address(raw), prefix))
    else:
        return None  # another family (or a malformed entry): not an address an ACL can hold
    return AddressInfo(index, label, interface, flags, scope, preferred, valid)


# --- the host's stable IPv6 address ------------------------------------------------------------------

_UNUSABLE = IFA_F_TEMPORARY | IFA_F_DEPRECATED | IFA_F_TENTATIVE | IFA_F_DADFAILED


def stable_ipv6(
    addresses: list[AddressInfo], interface_index: int | None, kernel_source: IPv6Address | None = None
) -> AddressInfo | None:
    """The address an IPv6 pinhole is for: the host's stable global address on the route's interface.

    A pinhole must outlive the address it opens, and a router grants it only for the address the
    request comes from (docs/QUIRKS.md U16), so both the pinhole and its requests use the stable
    address, never a temporary one (RFC 8981), which the kernel prefers as the source of new
    connections on desktops (`use_tempaddr=2`) and which is gone within a day. Candidates: global scope,
    neither temporary, deprecated, tentative nor failed duplicate detection. Best first: a public address
    (a unique local one cannot be reached from the internet), the one the kernel makes temporaries from
    (IFA_F_MANAGETEMPADDR, RFC 8981 §3.3: stable by definition), the kernel's own source choice (for a
    host without privacy addresses that is the stable one), then the lowest address. None when the
    interface has no usable global address.
    """
    from autonat.addresses import is_public

    candidates = [
        info
        for info in addresses
        if isinstance(info.interface, IPv6Interface)
        and (interface_index is None or info.index == interface_index)
        and info.scope == RT_SCOPE_UNIVERSE
        and not info.flags & _UNUSABLE
        and not (info.interface.ip.is_link_local or info.interface.ip.is_loopback or info.interface.ip.is_multicast)
        and info.interface.ip.ipv4_mapped is None
    ]

    def rank(info: AddressInfo) -> tuple[bool, bool, bool, int]:
        ip = info.interface.ip
        return (not is_public(ip), not info.flags & IFA_F_MANAGETEMPADDR, ip != kernel_source, int(ip))

    return min(candidates, key=rank, default=None)
