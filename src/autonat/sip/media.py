"""Media for the echo test: an RTP (and RTCP) echo that answers to where packets come from.

Symmetric RTP (SIP-NOTES): behind a NAT the address in the peer's SDP is often private or wrong; the
packets' source is what reaches the peer, so echoes go there. Lost BYEs must not leak ports or router
mappings: the echo ends itself after `inactivity` seconds without a packet, or after `max_duration`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any, cast

MAX_PACKET = 2048  # RTP over UDP stays under the path MTU; anything larger is not ours to echo


@dataclass
class EchoStats:
    received: int = 0
    sent: int = 0
    dropped: int = 0
    last_source: tuple[str, int] | None = None
    reason: str | None = None  # why it ended: "inactivity", "max duration", "closed"


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, stats: EchoStats, touched: asyncio.Event) -> None:
        self.stats = stats
        self.touched = touched
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # RTP version 2 (RFC 3550 §5.1) in the first two bits; anything else (STUN, garbage) is not echoed.
        if len(data) < 12 or len(data) > MAX_PACKET or data[0] >> 6 != 2:
            self.stats.dropped += 1
            return
        self.stats.received += 1
        self.stats.last_source = (addr[0], addr[1])
        self.touched.set()
        if self.transport is not None:
            self.transport.sendto(data, addr)
            self.stats.sent += 1


@dataclass
class RtpEcho:
    """Echo RTP on `port` (and RTCP on `port + 1`) until closed, idle or too old."""

    local: IPv4Address | IPv6Address
    port: int
    inactivity: float = 30.0
    max_duration: float = 4 * 3600.0
    rtcp: bool = True
    stats: EchoStats = field(default_factory=EchoStats)
    _transports: list[asyncio.BaseTransport] = field(default_factory=list)
    _watch: asyncio.Task[None] | None = None
    _touched: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port in (self.port, self.port + 1) if self.rtcp else (self.port,):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Echo(self.stats, self._touched), local_addr=(str(self.local), port)
            )
            self._transports.append(transport)
        self._watch = loop.create_task(self._watchdog())

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            self._touched.clear()
            remaining = self.max_duration - (loop.time() - started)
            if remaining <= 0:
                self._end("max duration")
                return
            try:
                async with asyncio.timeout(min(self.inactivity, remaining)):
                    await self._touched.wait()
            except TimeoutError:
                self._end("inactivity" if remaining > self.inactivity else "max duration")
                return

    def _end(self, reason: str) -> None:
        if self.stats.reason is None:
            self.stats.reason = reason
        for transport in self._transports:
            transport.close()
        self._transports.clear()
        self.ended.set()

    async def close(self) -> None:
        self._end("closed")
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
