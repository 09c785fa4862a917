"""Where is the router: the default gateway and our local address, from the route actually used.

Linux asks the kernel over rtnetlink (see `autonat.proto.netlink`); other platforms need `--gateway` for
now, and get their local address from the connected-UDP-socket trick, which works everywhere. A new
platform plugs in by adding a lookup to `_PLATFORM_LOOKUPS`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from autonat.errors import RouterNotFound
from autonat.proto import netlink
from autonat.proto.errors import DecodeError

# Any address routed like "the internet"; only looked up in the routing table, never sent to.
# A documentation address (RFC 5737) so that a misbehaving lookup can't reach a real host.
INTERNET_PROBE_DESTINATION = IPv4Address("198.51.100.1")
_NETLINK_TIMEOUT = 1.0
_seq = itertools.count(1)


@dataclass(frozen=True, slots=True)
class RouterLocation:
    """The gateway to talk to, the address it sees us as, and the LAN they share."""

    gateway: IPv4Address | IPv6Address
    local_address: IPv4Address | IPv6Address
    interface: str | None
    network: IPv4Network | IPv6Network | None = None
    pinned: bool = False  # the user named the gateway (--gateway): no other host may stand in for it

    @property
    def local_network(self) -> IPv4Network | IPv6Network:
        """The LAN: the interface's own prefix, else the smallest prefix holding us and the gateway."""
        if self.network is not None:
            return self.network
        return covering_network(self.local_address, self.gateway)


def covering_network(a: IPv4Address | IPv6Address, b: IPv4Address | IPv6Address) -> IPv4Network | IPv6Network:
    if a.version != b.version:
        return ip_network(f"{a}/{a.max_prefixlen}")
    differing = (int(a) ^ int(b)).bit_length()
    return ip_network(f"{a}/{a.max_prefixlen - differing}", strict=False)


def _interface_network(name: str | None, local: IPv4Address | IPv6Address) -> IPv4Network | IPv6Network | None:
    """The IPv4 prefix configured on `name` (Linux SIOCGIFNETMASK); None where that can't be read."""
    if name is None or not isinstance(local, IPv4Address) or sys.platform != "linux":
        return None
    siocgifnetmask = 0x891B
    request = struct.pack("16sH14s", name.encode()[:15], socket.AF_INET, bytes(14))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            reply = fcntl.ioctl(sock.fileno(), siocgifnetmask, request)
    except OSError:
        return None
    mask = socket.inet_ntoa(reply[20:24])
    return ip_network(f"{local}/{mask}", strict=False)


def _netlink_route_get(destination: IPv4Address | IPv6Address, interface_index: int | None) -> netlink.RouteInfo:
    seq = next(_seq)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(_NETLINK_TIMEOUT)
        sock.sendto(netlink.build_route_get(destination, seq, interface_index), (0, 0))
        try:
            reply = sock.recv(netlink.MAX_REPLY_SIZE)
        except TimeoutError:
            raise RouterNotFound("the kernel did not answer the route lookup") from None
    try:
        return netlink.parse_route_reply(reply, seq, destination)
    except DecodeError as exc:
        raise RouterNotFound(exc.reason) from None


def _linux_lookup(
    gateway: IPv4Address | IPv6Address | None, interface: str | None
) -> tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address | None, str | None]:
    index = _interface_index(interface) if interface else None
    route = _netlink_route_get(gateway or INTERNET_PROBE_DESTINATION, index)
    found_gateway = gateway or route.gateway
    if found_gateway is None:
        where = f" on {interface}" if interface else ""
        raise RouterNotFound(f"no default gateway{where}: the route to the internet has none; use --gateway")
    name = interface
    if name is None and route.interface_index is not None:
        with contextlib.suppress(OSError):
            name = socket.if_indextoname(route.interface_index)
    return found_gateway, route.source, name


_PLATFORM_LOOKUPS: dict[
    str,
    Callable[
        [IPv4Address | IPv6Address | None, str | None],
        tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address | None, str | None],
    ],
] = {"linux": _linux_lookup}


def _interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise RouterNotFound(f"no network interface named {name!r}") from None


def _local_address_towards(gateway: IPv4Address | IPv6Address, interface: str | None) -> IPv4Address | IPv6Address:
    """The source address the kernel picks for packets to the gateway (connect() on UDP sends nothing)."""
    family = socket.AF_INET if isinstance(gateway, IPv4Address) else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if interface:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            except (OSError, AttributeError):
                raise RouterNotFound(f"cannot use interface {interface!r}") from None
        try:
            sock.connect((str(gateway), 5351))
        except OSError as exc:
            reason = "unreachable" if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH) else exc.strerror
            raise RouterNotFound(f"gateway {gateway} is {reason}") from None
        return ip_address(sock.getsockname()[0])


def parse_gateway(text: str) -> IPv4Address | IPv6Address:
    """Validate a --gateway value: an IP literal, nothing else (no name resolution for the router)."""
    try:
        return ip_address(text)
    except ValueError:
        raise RouterNotFound(f"--gateway must be an IP address, not {text!r}") from None


def locate_router(gateway: str | None = None, interface: str | None = None) -> RouterLocation:
    """Find the gateway and our local address, honouring the --gateway / --interface overrides."""
    wanted = parse_gateway(gateway) if gateway else None
    lookup = _PLATFORM_LOOKUPS.get(sys.platform)
    if lookup is None:
        if wanted is None:
            raise RouterNotFound(f"finding the gateway is not supported on {sys.platform} yet; use --gateway")
        local = _local_address_towards(wanted, interface)
        return RouterLocation(wanted, local, interface, _interface_network(interface, local), pinned=True)
    found, source, name = lookup(wanted, interface)
    local = source or _local_address_towards(found, interface)
    return RouterLocation(found, local, name, _interface_network(name, local), pinned=wanted is not None)
