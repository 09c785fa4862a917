"""Where is the router: the default gateway and our local address, from the route actually used.

Linux asks the kernel over rtnetlink (see `autonat.proto.netlink`); other platforms need `--gateway` for
now, and get their local address from the connected-UDP-socket trick, which works everywhere. A new
platform plugs in by adding a lookup to `_PLATFORM_LOOKUPS`.

IPv6 (`locate_router6`, Linux only) looks up the IPv6 default route the same way, but its local address
is not the kernel's source choice: a pinhole is for the host's stable address (and must be asked for
from it: docs/QUIRKS.md U16), while the kernel prefers a temporary one where privacy extensions are on
(`netlink.stable_ipv6` picks it from the interface's addresses). A link-local gateway, the usual IPv6
default router, carries its zone (the interface name) so that sockets and URLs reach it.
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
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from autonat.errors import RouterNotFound
from autonat.proto import netlink
from autonat.proto.errors import DecodeError
from autonat.proto.record import Record, init_fields

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the cold path: proto/record.py)
if TYPE_CHECKING:
    from typing import Any

# Any address routed like "the internet"; only looked up in the routing table, never sent to.
# A documentation address (RFC 5737) so that a misbehaving lookup can't reach a real host.
INTERNET_PROBE_DESTINATION = IPv4Address("198.51.100.1")
# The same for IPv6: a documentation address (RFC 3849) outside every prefix the lab puts on a link.
INTERNET6_PROBE_DESTINATION = IPv6Address("2001:db8:ffff:ffff::1")
_NETLINK_TIMEOUT = 1.0
_seq = itertools.count(1)


class RouterLocation(Record):
    """The gateway to talk to, the address it sees us as, and the LAN they share."""

    _fields = ("gateway", "local_address", "interface", "network", "pinned", "kernel_source")
    __slots__ = _fields
    gateway: IPv4Address | IPv6Address
    local_address: IPv4Address | IPv6Address
    interface: str | None
    network: IPv4Network | IPv6Network | None
    pinned: bool  # the user named the gateway (--gateway): no other host may stand in for it
    kernel_source: IPv4Address | IPv6Address | None  # IPv6: the source the kernel would pick itself

    def __init__(
        self,
        gateway: IPv4Address | IPv6Address,
        local_address: IPv4Address | IPv6Address,
        interface: str | None,
        network: IPv4Network | IPv6Network | None = None,
        pinned: bool = False,
        kernel_source: IPv4Address | IPv6Address | None = None,
    ) -> None:
        init_fields(self, gateway, local_address, interface, network, pinned, kernel_source)

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


def scoped(address: IPv6Address, index: int | None) -> IPv6Address:
    """A link-local address with its zone (the interface's name, else its index), which sockets and
    URLs need to reach it; any other address as it is."""
    if not address.is_link_local or address.scope_id or index is None:
        return address
    try:
        zone = socket.if_indextoname(index)
    except OSError:
        zone = str(index)
    return IPv6Address(f"{address}%{zone}")


def _zone_index(address: IPv6Address) -> int | None:
    if not address.scope_id:
        return None
    if address.scope_id.isdigit():
        return int(address.scope_id)
    return _interface_index(address.scope_id)


def locate_router6(
    gateway: str | None = None, interface: str | None = None, local_address: str | None = None
) -> RouterLocation:
    """The IPv6 gateway (the default route's, unless `gateway` says otherwise) and the host's stable
    IPv6 address on its interface (or `local_address`, which must be one of the host's). Raises
    RouterNotFound with one line: no IPv6 default route, no global address, an unknown interface."""
    if sys.platform != "linux":
        raise RouterNotFound(f"finding the IPv6 gateway is not supported on {sys.platform} yet")
    from autonat.aio.interfaces import host_addresses

    wanted: IPv6Address | None = None
    if gateway:
        parsed = parse_gateway(gateway)
        if not isinstance(parsed, IPv6Address):
            raise RouterNotFound(f"the IPv6 gateway must be an IPv6 address, not {gateway}")
        wanted = parsed
    index = _interface_index(interface) if interface else None
    if wanted is not None and wanted.is_link_local:
        index = _zone_index(wanted) or index
        if index is None:
            raise RouterNotFound(f"a link-local gateway needs its interface: {wanted}%IFACE, or --interface")
    destination = IPv6Address(wanted.packed) if wanted is not None else INTERNET6_PROBE_DESTINATION
    route = _netlink_route_get(destination, index)
    found = wanted or route.gateway
    if found is None or not isinstance(found, IPv6Address):
        where = f" on {interface}" if interface else ""
        raise RouterNotFound(f"no IPv6 default gateway{where}: the route to the internet has none")
    out = index if index is not None else route.interface_index
    found = scoped(found, out)
    name = interface
    if name is None and out is not None:
        with contextlib.suppress(OSError):
            name = socket.if_indextoname(out)
    try:
        addresses = host_addresses()
    except OSError as exc:
        raise RouterNotFound(str(exc)) from None
    source = route.source if isinstance(route.source, IPv6Address) else None
    if local_address:
        try:
            local = IPv6Address(local_address)
        except ValueError:
            raise RouterNotFound(f"the IPv6 local address must be an IPv6 address, not {local_address!r}") from None
        info = next((a for a in addresses if a.interface.ip == local), None)
        if info is None:
            raise RouterNotFound(f"{local} is not an address of this host")
    else:
        info = netlink.stable_ipv6(addresses, out, source)
        if info is None:
            raise RouterNotFound(f"no stable global IPv6 address on {name or 'the default route'}'s interface")
    return RouterLocation(
        found, info.interface.ip, name, info.interface.network, pinned=wanted is not None, kernel_source=source
    )


def source_address(addr: tuple[Any, ...]) -> IPv4Address | IPv6Address:
    """The sender of a datagram (a socket address as recvfrom gives it) as an address: an IPv6
    link-local one with its zone, the interface it arrived on (the scope id), which is what tells one
    link's fe80::1 from another's. ValueError for a host that is not an address."""
    host = str(addr[0]).partition("%")[0]
    address = ip_address(host)
    if isinstance(address, IPv6Address) and address.is_link_local and len(addr) >= 4 and addr[3]:
        return scoped(address, int(addr[3]))
    return address
