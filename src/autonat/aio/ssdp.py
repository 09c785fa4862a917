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
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from autonat.aio import trace as wiretrace
from autonat.aio.route import RouterLocation
from autonat.aio.ssdp_socket import gateway_refused, offer_of, search_burst, search_socket
from autonat.aio.upnp_core import SEARCH_SCHEDULE, Offer, Offers, RefusedOffer
from autonat.proto import ssdp
from autonat.proto.errors import DecodeError


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
        offer = offer_of(self.offers, data, addr)
        if offer is not None:
            self.found.put_nowait(offer)

    def error_received(self, exc: Exception) -> None:
        if self.sock is not None:
            self._read_error_queue()  # whatever the error: an undrained queue keeps epoll reporting it
            return
        self.drops[f"socket error: {exc}"] += 1

    def _read_error_queue(self) -> None:
        """Drain the socket's error queue (IP_RECVERR): a port unreachable from the gateway's SSDP port is
        news (once), any other error only a drop (aio/ssdp_socket.py)."""
        assert self.sock is not None
        refused = gateway_refused(self.sock, self.where, self.drops, wiretrace if wiretrace.ON else None)
        if refused and not self.unreachable:
            self.unreachable = True
            self.found.put_nowait(Unreachable(self.where.gateway))


@contextlib.asynccontextmanager
async def search(
    where: RouterLocation, targets: tuple[str, ...] = ssdp.DEFAULT_SEARCH_TARGETS
) -> AsyncIterator[_SearchProtocol]:
    """Run the search burst in the background while the caller reads `protocol.found`.

    IPv4: unicast to the gateway and multicast to 239.255.255.250. IPv6: unicast to the gateway and
    multicast to FF02::C and FF05::C (UPnP DA 1.1 §1.1.2), from our own (stable) address; replies from a
    link-local address carry the zone they arrived on, which is the only zone a link-local LOCATION
    can get (proto/ssdp.py `validate_location`)."""
    try:
        sock, recverr = search_socket(where)  # not connected to the gateway: docs/QUIRKS.md S2
    except OSError as exc:
        raise DecodeError(f"cannot open the SSDP search socket on {where.local_address}: {exc.strerror}") from None
    loop = asyncio.get_running_loop()
    datagram_transport, protocol = await loop.create_datagram_endpoint(
        lambda: _SearchProtocol(where, sock if recverr else None), sock=sock
    )
    burst = search_burst(where, targets)

    def send_all() -> None:
        for message, peer in burst:
            datagram_transport.sendto(message, peer)
            if wiretrace.ON:
                wiretrace.ssdp_sent(message, peer)

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
