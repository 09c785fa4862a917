"""Listening for the router telling us something changed.

- NAT-PMP address announcements (RFC 6886 §3.2.1) and unsolicited PCP ANNOUNCE (RFC 6887 §14.1.3)
  arrive on 224.0.0.1:5350. miniupnpd sends one at start (epoch 0) and a burst on a WAN address
  change, the first of which still carries the *old* address; so an announcement is treated as
  "go and ask", never as the answer itself.
- SSDP NOTIFY (UPnP DA §1.2): ssdp:byebye / ssdp:alive from the gateway around a restart.

Only datagrams from the gateway count; everything else is dropped and counted.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from autonat.proto import natpmp, pcp, ssdp
from autonat.proto.errors import DecodeError

ALL_HOSTS = "224.0.0.1"


class _Listener(asyncio.DatagramProtocol):
    def __init__(
        self, gateway: IPv4Address | IPv6Address, parse: Callable[[bytes], object], on_message: Callable[[object], None]
    ) -> None:
        self.gateway = gateway
        self.parse = parse
        self.on_message = on_message
        self.drops: Counter[str] = Counter()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if ip_address(addr[0]) != self.gateway:
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
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # other listeners on this host
    sock.bind((group, port))
    membership = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(str(local)))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
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


async def listen(
    group: str,
    port: int,
    local: IPv4Address | IPv6Address,
    gateway: IPv4Address | IPv6Address,
    parse: Callable[[bytes], object],
    on_message: Callable[[object], None],
) -> tuple[asyncio.BaseTransport, _Listener]:
    """Start a listener; close the returned transport to stop it. OSError if the group can't be joined."""
    if not isinstance(local, IPv4Address):
        raise OSError("multicast listeners need an IPv4 local address")
    loop = asyncio.get_running_loop()
    sock = _multicast_socket(group, port, local)
    return await loop.create_datagram_endpoint(lambda: _Listener(gateway, parse, on_message), sock=sock)


async def listen_announcements(
    local: IPv4Address | IPv6Address, gateway: IPv4Address | IPv6Address, on_message: Callable[[object], None]
) -> tuple[asyncio.BaseTransport, _Listener]:
    return await listen(ALL_HOSTS, natpmp.CLIENT_PORT, local, gateway, parse_announcement, on_message)


async def listen_notify(
    local: IPv4Address | IPv6Address, gateway: IPv4Address | IPv6Address, on_message: Callable[[object], None]
) -> tuple[asyncio.BaseTransport, _Listener]:
    return await listen(str(ssdp.MULTICAST_ADDRESS), ssdp.PORT, local, gateway, parse_notify, on_message)
