"""The SSDP search socket and its datagrams, for both search shells (aio/ssdp.py over asyncio,
aio/blocking_upnp.py without an event loop); no asyncio here, so the blocking shell can import it.

- `search_socket`: bound to our address, multicast out of it (TTL 2), ICMP errors queued on Linux.
  Not connected to the gateway: TP-Link ER605 and Sagemcom Home Hub 3000 answer from an ephemeral
  source port, not 1900 (docs/QUIRKS.md S2), so the kernel's ICMP errors come through the error queue.
- `search_burst`: each search target unicast to the gateway and to the multicast group(s) (UPnP DA 1.1
  §1.1.2, §1.3.2; Eero answers only the multicast one: docs/QUIRKS.md S1); no multicast on loopback.
- `gateway_refused`: drains the error queue; True when the gateway's SSDP port answered ICMP port
  unreachable (a router whose UPnP daemon is stopped).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections import Counter
from ipaddress import IPv4Address, IPv6Address

from autonat.addresses import uri_host
from autonat.aio.route import RouterLocation, source_address
from autonat.aio.udp import IP_RECVERR, IPV6_RECVERR
from autonat.aio.upnp_core import MULTICAST_TTL, Offer, Offers, RefusedOffer
from autonat.proto import ssdp

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# IPv6 (UPnP DA 1.1 §1.1.2): the link-local group reaches the router on our link; the site-local one is
# where miniupnpd also answers and advertises from its global address (docs/QUIRKS.md S7).
MULTICAST6_GROUPS = (ssdp.MULTICAST_ADDRESS6_LINK, ssdp.MULTICAST_ADDRESS6_SITE)
MAX_ERRORS_READ = 64  # queued ICMP errors drained per call


def search_socket(where: RouterLocation) -> tuple[socket.socket, bool]:
    """The search socket and whether ICMP errors are queued on it (Linux IP_RECVERR/IPV6_RECVERR).
    Raises OSError (the socket closed) when it cannot be made."""
    v6 = isinstance(where.local_address, IPv6Address)
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, MULTICAST_TTL)
            if where.interface:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex(where.interface))
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(str(where.local_address)))
        sock.bind((str(where.local_address), 0))
        recverr = sys.platform == "linux"
        if recverr:
            sock.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP, IPV6_RECVERR if v6 else IP_RECVERR, 1)
    except OSError:
        sock.close()
        raise
    return sock, recverr


def unscoped(address: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """`address` without an IPv6 zone (the Host header and the error queue name it without one)."""
    return IPv6Address(address.packed) if isinstance(address, IPv6Address) else address


def search_burst(
    where: RouterLocation, targets: tuple[str, ...] = ssdp.DEFAULT_SEARCH_TARGETS
) -> list[tuple[bytes, tuple[str, int]]]:
    """Every M-SEARCH of one burst with where it goes: unicast to the gateway, then the multicast group(s)."""
    gateway_host = uri_host(unscoped(where.gateway))
    burst = [
        (ssdp.build_msearch(t, mx=1, host=f"{gateway_host}:{ssdp.PORT}"), (str(where.gateway), ssdp.PORT))
        for t in targets
    ]
    if where.local_address.is_loopback:  # tests, or a router through a tunnel: multicast has nowhere to go
        return burst
    groups: tuple[IPv4Address | IPv6Address, ...] = (
        MULTICAST6_GROUPS if isinstance(where.local_address, IPv6Address) else (ssdp.MULTICAST_ADDRESS,)
    )
    for group in groups:
        burst += [
            (ssdp.build_msearch(t, mx=1, host=f"{uri_host(group).upper()}:{ssdp.PORT}"), (str(group), ssdp.PORT))
            for t in targets
        ]
    return burst


def gateway_refused(sock: socket.socket, where: RouterLocation, drops: Counter[str], trace: Any = None) -> bool:
    """Drain the socket's error queue: each error counted in `drops` (and an ICMP port unreachable told to
    `trace`, the wire trace when on); True if the gateway's SSDP port was among the unreachable."""
    gateway = (str(unscoped(where.gateway)), ssdp.PORT)
    refused_by_gateway = False
    for _ in range(MAX_ERRORS_READ):
        try:
            _, ancillary, _, destination = sock.recvmsg(1, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except OSError:  # empty (BlockingIOError) or gone
            break
        # struct sock_extended_err (<linux/errqueue.h>) starts with the errno, native order.
        error = next((struct.unpack_from("=I", data)[0] for _, _, data in ancillary if len(data) >= 4), 0)
        refused = error == errno.ECONNREFUSED
        drops["ICMP port unreachable" if refused else f"ICMP error: {os.strerror(error)}"] += 1
        if refused and trace is not None:
            trace.unreachable(destination, "upnp")
        if refused and destination is not None and tuple(destination[:2]) == gateway:
            refused_by_gateway = True
    return refused_by_gateway


def offer_of(offers: Offers, data: bytes, addr: tuple[Any, ...]) -> Offer | RefusedOffer | None:
    """What a search reply from `addr` (as recvfrom gives it) offers (upnp_core.Offers.received); a sender
    that is not an address is dropped and counted in `offers.drops`."""
    try:
        responder = source_address(addr)
    except ValueError as exc:
        offers.drops[str(exc)] += 1
        return None
    return offers.received(data, responder)
