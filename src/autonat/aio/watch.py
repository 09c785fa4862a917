"""Listening for the router telling us something changed.

- NAT-PMP address announcements (RFC 6886 §3.2.1) and unsolicited PCP ANNOUNCE (RFC 6887 §14.1.3)
  arrive on 224.0.0.1:5350 (and, for PCP over IPv6, [ff02::1]:5350). miniupnpd sends one at start
  (epoch 0) and a burst on a WAN address change, the first of which still carries the *old* address;
  so an announcement is treated as "go and ask", never as the answer itself. (miniupnpd 2.3.1 sends no
  IPv6 ANNOUNCE at all: docs/QUIRKS.md P9.)
- SSDP NOTIFY (UPnP DA §1.2): ssdp:byebye / ssdp:alive from the gateway around a restart, on
  239.255.255.250:1900, and for IPv6 on [FF02::C]:1900 and [FF05::C]:1900.

Only datagrams from the gateway count (a link-local gateway with its zone: the interface they came in
on); everything else is dropped and counted. Every datagram is traced first, when the wire trace is on
(aio/trace.py), as aio/channel.py traces what it receives.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from autonat.aio import trace as wiretrace
from autonat.aio.route import source_address
from autonat.proto import natpmp, pcp, ssdp
from autonat.proto.errors import DecodeError

ALL_HOSTS = "224.0.0.1"
ALL_NODES6 = "ff02::1"  # RFC 6887 §14.1.3: the IPv6 ANNOUNCE goes to all nodes on the link


class _Listener(asyncio.DatagramProtocol):
    def __init__(
        self,
        gateway: IPv4Address | IPv6Address,
        parse: Callable[[bytes], object],
        on_message: Callable[[object], None],
        trace: Callable[[bytes, tuple[Any, ...]], None],
    ) -> None:
        self.gateway = gateway
        self.parse = parse
        self.on_message = on_message
        self.trace = trace
        self.drops: Counter[str] = Counter()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if wiretrace.ON:
            self.trace(data, addr)
        try:
            source = source_address(addr)
        except ValueError:
            source = None
        if source != self.gateway:
            self.drops["not from the gateway"] += 1
            return
        try:
            message = self.parse(data)
        except DecodeError as exc:
            self.drops[exc.reason] += 1
            return
        self.on_message(message)


def _multicast_socket(group: str, port: int, local: IPv4Address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # other listeners on this host
        sock.bind((group, port))
        membership = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(str(local)))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    except OSError:
        sock.close()
        raise
    return sock


def _multicast_socket6(group: str, port: int, interface: str | None) -> socket.socket:
    """Bound to the group itself (so only datagrams to it arrive) on the route's interface."""
    index = socket.if_nametoindex(interface) if interface else 0
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((group, port, 0, index))
        membership = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, membership)
    except OSError:
        sock.close()
        raise
    return sock


def parse_announcement(data: bytes) -> object:
    """A NAT-PMP address announcement or a PCP ANNOUNCE response, whichever the datagram is."""
    if data[:1] == b"\x00":
        reply = natpmp.parse_response(data)
        if not isinstance(reply, natpmp.ExternalAddressResponse):
            raise DecodeError("NAT-PMP multicast that is not an address announcement")
        return reply
    response = pcp.parse_response(data)
    if isinstance(response, pcp.VersionNotSupported) or response.opcode != pcp.Opcode.ANNOUNCE:
        raise DecodeError("PCP multicast that is not an ANNOUNCE")
    return response


def parse_notify(data: bytes) -> object:
    message = ssdp.parse_datagram(data)
    if not isinstance(message, ssdp.Notify):
        raise DecodeError("not a NOTIFY")
    return message


def _trace_datagram(data: bytes, addr: tuple[Any, ...]) -> None:
    wiretrace.datagram_received(data, addr)


def _trace_ssdp(data: bytes, addr: tuple[Any, ...]) -> None:
    wiretrace.ssdp_received(data, addr)


async def listen(
    group: str,
    port: int,
    local: IPv4Address | IPv6Address,
    gateway: IPv4Address | IPv6Address,
    parse: Callable[[bytes], object],
    on_message: Callable[[object], None],
    *,
    interface: str | None = None,
    trace: Callable[[bytes, tuple[Any, ...]], None] = _trace_datagram,
) -> tuple[asyncio.BaseTransport, _Listener]:
    """Start a listener; close the returned transport to stop it. OSError if the group can't be joined.
    An IPv6 group is joined on `interface` (the route's)."""
    if ip_address(group).version != local.version:
        raise OSError(f"group {group} and local address {local} are not of one family")
    loop = asyncio.get_running_loop()
    if isinstance(local, IPv4Address):
        sock = _multicast_socket(group, port, local)
    else:
        sock = _multicast_socket6(group, port, interface)
    return await loop.create_datagram_endpoint(lambda: _Listener(gateway, parse, on_message, trace), sock=sock)


async def listen_announcements(
    local: IPv4Address | IPv6Address,
    gateway: IPv4Address | IPv6Address,
    on_message: Callable[[object], None],
    *,
    interface: str | None = None,
) -> tuple[asyncio.BaseTransport, _Listener]:
    group = ALL_HOSTS if isinstance(local, IPv4Address) else ALL_NODES6
    return await listen(group, natpmp.CLIENT_PORT, local, gateway, parse_announcement, on_message, interface=interface)


async def listen_notify(
    local: IPv4Address | IPv6Address,
    gateway: IPv4Address | IPv6Address,
    on_message: Callable[[object], None],
    *,
    interface: str | None = None,
) -> tuple[asyncio.BaseTransport, _Listener]:
    """The SSDP NOTIFY listener (IPv4), or the first of IPv6's two (`listen_notify6` has both)."""
    group = str(ssdp.MULTICAST_ADDRESS) if isinstance(local, IPv4Address) else str(ssdp.MULTICAST_ADDRESS6_LINK)
    return await listen(
        group, ssdp.PORT, local, gateway, parse_notify, on_message, interface=interface, trace=_trace_ssdp
    )


async def listen_notify6(
    local: IPv6Address, gateway: IPv6Address, on_message: Callable[[object], None], *, interface: str | None
) -> list[asyncio.BaseTransport]:
    """SSDP NOTIFY on both IPv6 groups: miniupnpd advertises from its link-local address on FF02::C and
    from its global one on FF05::C (docs/QUIRKS.md P9), so whichever the gateway is, one of them counts."""
    transports: list[asyncio.BaseTransport] = []
    try:
        for group in (ssdp.MULTICAST_ADDRESS6_LINK, ssdp.MULTICAST_ADDRESS6_SITE):
            transport, _ = await listen(
                str(group), ssdp.PORT, local, gateway, parse_notify, on_message, interface=interface, trace=_trace_ssdp
            )
            transports.append(transport)
    except OSError:
        for transport in transports:
            transport.close()
        raise
    return transports
