"""SSDP discovery of the Internet Gateway Device (UPnP DA 1.1 §1.3), fast.

miniupnpc waits out the whole MX window (2 s); FreeSWITCH up to 12 s. We send the M-SEARCH unicast to
the gateway (which answers in about a millisecond) and to the multicast group at once, retransmit a
few times in case of loss, and hand every new, safe LOCATION to the caller as it arrives, so the
caller can stop as soon as one IGD is usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from autonat.aio.route import RouterLocation
from autonat.proto import ssdp
from autonat.proto.errors import DecodeError

# When to (re)send the search burst, in seconds from the start; unicast replies come back in ~1 ms.
SEARCH_SCHEDULE = (0.0, 0.1, 0.3, 0.7, 1.5)  # the first burst goes out at once
MULTICAST_TTL = 2  # one router hop beyond us is plenty; never flood further (UPnP DA §1.1.2 suggests 2)


@dataclass(frozen=True, slots=True)
class Found:
    """A safe LOCATION from a search response, and who sent it."""

    location: ssdp.Location
    responder: IPv4Address | IPv6Address
    search_target: str
    server: str | None


class _SearchProtocol(asyncio.DatagramProtocol):
    def __init__(self, where: RouterLocation) -> None:
        self.where = where
        self.found: asyncio.Queue[Found] = asyncio.Queue()
        self.seen: set[str] = set()
        self.drops: Counter[str] = Counter()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            responder = ip_address(addr[0])
            message = ssdp.parse_datagram(data)
            if not isinstance(message, ssdp.SearchResponse):
                raise DecodeError("a NOTIFY, not a search response")
            location = ssdp.validate_location(
                message.location,
                responder=responder,
                gateway=self.where.gateway,
                local_network=self.where.local_network,
            )
        except (DecodeError, ValueError) as exc:
            self.drops[str(exc)] += 1
            return
        if location.url not in self.seen:
            self.seen.add(location.url)
            self.found.put_nowait(Found(location, responder, message.search_target, message.server))

    def error_received(self, exc: Exception) -> None:
        self.drops[f"socket error: {exc}"] += 1


@contextlib.asynccontextmanager
async def search(
    where: RouterLocation, targets: tuple[str, ...] = ssdp.DEFAULT_SEARCH_TARGETS
) -> AsyncIterator[_SearchProtocol]:
    """Run the search burst in the background while the caller reads `protocol.found`."""
    if not isinstance(where.local_address, IPv4Address):
        raise DecodeError("SSDP discovery needs an IPv4 local address")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(str(where.local_address)))
    sock.bind((str(where.local_address), 0))
    loop = asyncio.get_running_loop()
    datagram_transport, protocol = await loop.create_datagram_endpoint(lambda: _SearchProtocol(where), sock=sock)
    unicast = [(ssdp.build_msearch(t, mx=1, host=f"{where.gateway}:{ssdp.PORT}"), str(where.gateway)) for t in targets]
    # On loopback (tests, or a router reached through a tunnel) multicast has nowhere sensible to go.
    multicast = (
        []
        if where.local_address.is_loopback
        else [(ssdp.build_msearch(t, mx=1), str(ssdp.MULTICAST_ADDRESS)) for t in targets]
    )

    def send_all() -> None:
        for message, host in unicast + multicast:
            datagram_transport.sendto(message, (host, ssdp.PORT))

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
