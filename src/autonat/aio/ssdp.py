"""SSDP discovery of the Internet Gateway Device (UPnP DA 1.1 §1.3), fast.

miniupnpc waits out the whole MX window (2 s); FreeSWITCH up to 12 s. We send the M-SEARCH unicast to
the gateway (which answers in about a millisecond) and to the multicast group at once (Eero answers
only the multicast one: docs/QUIRKS.md S1), retransmit a few times in case of loss, and hand every
new, safe LOCATION to the caller as it arrives, so the caller can stop as soon as one IGD is usable.

Anything on the LAN can answer, so what one host can make us do is bounded: at most
`MAX_LOCATIONS_PER_RESPONDER` distinct LOCATIONs from one address and `MAX_CANDIDATES` in all are
handed on (each costs the caller a TCP connection), and a refused LOCATION is handed on too, as a
`Refused` with its reason, so the caller can say why discovery found nothing usable.

A gateway whose SSDP port is closed answers the unicast search with ICMP port unreachable (a router
whose UPnP daemon is stopped). The search socket cannot be connected (the S2 quirk below), so it asks
the kernel for those errors (Linux IP_RECVERR) and hands on an `Unreachable`; the caller ends the
discovery after a 50 ms grace (for a stack bound to the multicast group only, whose multicast answer
follows the ICMP within milliseconds) unless another candidate is already being inspected, instead of
waiting out its deadline. The trade: an IGD elsewhere on the LAN that would answer only the multicast
search, later, is not waited for once the gateway itself said no; in every home network we know the
router is the IGD.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from autonat.addresses import uri_host
from autonat.aio import trace as wiretrace
from autonat.aio.route import RouterLocation, source_address
from autonat.aio.udp import IP_RECVERR, IPV6_RECVERR
from autonat.aio.upnp_core import MULTICAST_TTL, SEARCH_SCHEDULE, Offer, Offers, RefusedOffer
from autonat.proto import ssdp
from autonat.proto.errors import DecodeError

# IPv6 (UPnP DA 1.1 §1.1.2): the link-local group reaches the router on our link; the site-local one is
# where miniupnpd also answers and advertises from its global address (docs/QUIRKS.md S7).
MULTICAST6_GROUPS = (ssdp.MULTICAST_ADDRESS6_LINK, ssdp.MULTICAST_ADDRESS6_SITE)


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The gateway answered the unicast search with ICMP port unreachable: no SSDP server there."""

    responder: IPv4Address | IPv6Address


# What a search reply offers, read by the sans-IO core both UPnP shells share (aio/upnp_core.py: the caps
# on LOCATIONs per responder and in all, the LOCATION checks); these names are the asyncio shell's own.
Found = Offer
Refused = RefusedOffer


class _SearchProtocol(asyncio.DatagramProtocol):
    def __init__(self, where: RouterLocation, sock: socket.socket | None = None) -> None:
        self.where = where
        self.sock = sock
        self.unreachable = False
        self.found: asyncio.Queue[Found | Refused | Unreachable] = asyncio.Queue()
        self.offers = Offers(where.gateway, where.local_network, where.pinned)
        self.drops = self.offers.drops  # socket errors counted beside the replies the core dropped

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if wiretrace.ON:
            wiretrace.ssdp_received(data, addr)
        try:
            responder = source_address(addr)
        except ValueError as exc:
            self.drops[str(exc)] += 1
            return
        offer = self.offers.received(data, responder)
        if offer is not None:
            self.found.put_nowait(offer)

    def error_received(self, exc: Exception) -> None:
        if self.sock is not None:
            self._read_error_queue()  # whatever the error: an undrained queue keeps epoll reporting it
            return
        self.drops[f"socket error: {exc}"] += 1

    def _read_error_queue(self) -> None:
        """Drain the socket's error queue (IP_RECVERR); a port unreachable for the datagram sent to
        the gateway's SSDP port is news, any other error only a drop."""
        assert self.sock is not None
        gateway = (str(_unscoped(self.where.gateway)), ssdp.PORT)
        for _ in range(64):
            try:
                _, ancillary, _, destination = self.sock.recvmsg(1, 512, socket.MSG_ERRQUEUE)
            except OSError:  # empty (BlockingIOError) or gone
                return
            # struct sock_extended_err (<linux/errqueue.h>) starts with the errno, native order.
            error = next((struct.unpack_from("=I", data)[0] for _, _, data in ancillary if len(data) >= 4), 0)
            refused = error == errno.ECONNREFUSED
            self.drops["ICMP port unreachable" if refused else f"ICMP error: {os.strerror(error)}"] += 1
            if refused and wiretrace.ON:
                wiretrace.unreachable(destination, "upnp")
            if refused and destination is not None and tuple(destination[:2]) == gateway and not self.unreachable:
                self.unreachable = True
                self.found.put_nowait(Unreachable(self.where.gateway))


def _unscoped(address: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    return IPv6Address(address.packed) if isinstance(address, IPv6Address) else address


def _ipv6_socket(where: RouterLocation) -> socket.socket:
    """The IPv6 search socket: bound to our (stable) address, multicast out of the route's interface."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, MULTICAST_TTL)
        if where.interface:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex(where.interface))
        sock.bind((str(where.local_address), 0))
    except OSError:
        sock.close()
        raise
    return sock


def _ipv4_socket(where: RouterLocation) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(str(where.local_address)))
        sock.bind((str(where.local_address), 0))
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def search(
    where: RouterLocation, targets: tuple[str, ...] = ssdp.DEFAULT_SEARCH_TARGETS
) -> AsyncIterator[_SearchProtocol]:
    """Run the search burst in the background while the caller reads `protocol.found`.

    IPv4: unicast to the gateway and multicast to 239.255.255.250. IPv6: unicast to the gateway and
    multicast to FF02::C and FF05::C (UPnP DA 1.1 §1.1.2), from our own (stable) address; replies from a
    link-local address carry the zone they arrived on, which is the only zone a link-local LOCATION
    can get (proto/ssdp.py `validate_location`)."""
    v6 = isinstance(where.local_address, IPv6Address)
    # Not connected to the gateway: TP-Link ER605 and Sagemcom Home Hub 3000 answer from an ephemeral
    # source port, not 1900 (docs/QUIRKS.md S2).
    try:
        sock = _ipv6_socket(where) if v6 else _ipv4_socket(where)
    except OSError as exc:
        raise DecodeError(f"cannot open the SSDP search socket on {where.local_address}: {exc.strerror}") from None
    recverr = (IPV6_RECVERR if v6 else IP_RECVERR) if sys.platform == "linux" else None
    if recverr is not None:  # ICMP errors of an unconnected socket
        sock.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP, recverr, 1)
    loop = asyncio.get_running_loop()
    datagram_transport, protocol = await loop.create_datagram_endpoint(
        lambda: _SearchProtocol(where, sock if recverr is not None else None), sock=sock
    )
    gateway_host = uri_host(_unscoped(where.gateway))
    unicast = [(ssdp.build_msearch(t, mx=1, host=f"{gateway_host}:{ssdp.PORT}"), str(where.gateway)) for t in targets]
    # On loopback (tests, or a router reached through a tunnel) multicast has nowhere sensible to go.
    groups: tuple[IPv4Address | IPv6Address, ...] = MULTICAST6_GROUPS if v6 else (ssdp.MULTICAST_ADDRESS,)
    multicast = (
        []
        if where.local_address.is_loopback
        else [
            (ssdp.build_msearch(t, mx=1, host=f"{uri_host(group).upper()}:{ssdp.PORT}"), str(group))
            for group in groups
            for t in targets
        ]
    )

    def send_all() -> None:
        for message, host in unicast + multicast:
            datagram_transport.sendto(message, (host, ssdp.PORT))
            if wiretrace.ON:
                wiretrace.ssdp_sent(message, (host, ssdp.PORT))

    async def retransmit() -> None:
        started = loop.time()
        for at in SEARCH_SCHEDULE[1:]:
            await asyncio.sleep(max(0.0, started + at - loop.time()))
            send_all()

    send_all()  # now, not when a task first runs: the caller may do blocking work next
    sender = asyncio.ensure_future(retransmit())
    try:
        yield protocol
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        datagram_transport.close()
