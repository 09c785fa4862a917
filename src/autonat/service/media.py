"""Media: an RTP echo for the echo test and an RTP relay for bridged calls, both answering to packet sources.

Symmetric RTP (RFC 4961; latching, RFC 7362): behind a NAT the address in the peer's SDP is often private or
wrong; the packets' source is what reaches the peer, so replies go there. Lost BYEs must not leak ports or router
mappings: a session ends itself after `inactivity` seconds without a packet, or after `max_duration`.

Per-datagram cost matters (a B2BUA anchors hundreds of calls): the receive paths allocate nothing of their own
(no tuples, no timestamps, no log lines). Activity is a flag the watchdog samples a few times per inactivity
period instead of a clock read or an event wake-up per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Literal, cast

MAX_PACKET = 2048  # RTP over UDP stays under the path MTU; anything larger is not ours to echo or relay
MIN_RTP = 12  # fixed RTP header, RFC 3550 §5.1
MIN_RTCP = 8  # RTCP common header plus the sender SSRC, RFC 3550 §6.4
RELATCH_AFTER = 2.0  # seconds of silence from the latched source before another source may take over
_MAX_TICK = 60.0  # keeps the watchdog's sleeps finite even for absurd (infinite) timeouts


def _factory(protocol: asyncio.DatagramProtocol) -> Callable[[], asyncio.DatagramProtocol]:
    return lambda: protocol


class _Lifetime:
    """What RtpEcho and RtpRelay share: their sockets, and the watchdog that ends them when idle or too old.

    Receive paths set `active = True` per accepted packet (no allocation, no wake-up); the watchdog samples and
    clears it every `tick` seconds. An activity seen at a sample is dated at that sample, which is never earlier
    than the packet itself, so the session ends no sooner than `inactivity` seconds after its last packet and at
    most one tick later. `on_tick(now)` runs at every sample for owners that need a coarse clock.
    """

    def __init__(
        self,
        inactivity: float,
        max_duration: float,
        tick: float,
        ended: asyncio.Event,
        on_end: Callable[[str], None],
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        self.active = False
        self.ended = ended
        self._inactivity = inactivity
        self._max_duration = max_duration
        self._tick = min(tick, _MAX_TICK) if tick > 0 else _MAX_TICK
        self._on_end = on_end
        self._on_tick = on_tick
        self._transports: list[asyncio.DatagramTransport] = []
        self._watch: asyncio.Task[None] | None = None
        self._started = False

    async def start(self, endpoints: Sequence[tuple[IPv4Address | IPv6Address, int, asyncio.DatagramProtocol]]) -> None:
        """Bind every (address, port, protocol), then start the watchdog; on any failure nothing stays bound."""
        if self._started or self.ended.is_set():
            raise RuntimeError("media session already started or ended")
        self._started = True
        # Bound synchronously with plain sockets so a failure can close the earlier ones at once: transports only
        # release their socket on a later loop iteration, which would leave the port pair briefly taken.
        socks: list[socket.socket] = []
        try:
            for local, port, _ in endpoints:
                family = socket.AF_INET6 if local.version == 6 else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind((str(local), port))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        loop = asyncio.get_running_loop()
        try:
            for sock, (_, _, protocol) in zip(socks, endpoints, strict=True):
                transport, _ = await loop.create_datagram_endpoint(_factory(protocol), sock=sock)
                self._transports.append(transport)
        except BaseException:
            for transport in self._transports:
                transport.abort()
            self._transports.clear()
            for sock in socks:
                sock.close()
            raise
        self._watch = loop.create_task(self._watchdog())

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        started = last = loop.time()
        while True:
            now = loop.time()
            if self.active:
                self.active = False
                last = now
            if now - started >= self._max_duration:
                self.end("max duration")
                return
            if now - last >= self._inactivity:
                self.end("inactivity")
                return
            if self._on_tick is not None:
                self._on_tick(now)
            await asyncio.sleep(min(self._tick, started + self._max_duration - now, last + self._inactivity - now))

    def end(self, reason: str) -> None:
        """Close the sockets and set `ended`; idempotent, the first reason wins."""
        if self.ended.is_set():
            return
        for transport in self._transports:
            transport.close()
        self._transports.clear()
        self._on_end(reason)
        self.ended.set()

    async def close(self) -> None:
        self.end("closed")
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        # Transports release their sockets on the next loop iteration; after close() the ports are free again.
        await asyncio.sleep(0)


@dataclass
class EchoStats:
    received: int = 0
    sent: int = 0
    dropped: int = 0
    last_source: tuple[str, int] | None = None
    reason: str | None = None  # why it ended: "inactivity", "max duration", "closed"


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, stats: EchoStats, life: _Lifetime) -> None:
        self.stats = stats
        self.life = life
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # RTP version 2 (RFC 3550 §5.1) in the first two bits; anything else (STUN, garbage) is not echoed.
        if len(data) < MIN_RTP or len(data) > MAX_PACKET or data[0] >> 6 != 2:
            self.stats.dropped += 1
            return
        self.stats.received += 1
        if addr != self.stats.last_source:
            self.stats.last_source = (addr[0], addr[1])
        self.life.active = True
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
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _life: _Lifetime = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._life = _Lifetime(self.inactivity, self.max_duration, self.inactivity / 4, self.ended, self._on_end)

    def _on_end(self, reason: str) -> None:
        if self.stats.reason is None:
            self.stats.reason = reason

    async def start(self) -> None:
        """Bind RTP (and RTCP) on `local`; OSError propagates and leaves nothing bound."""
        ports = (self.port, self.port + 1) if self.rtcp else (self.port,)
        await self._life.start([(self.local, port, _Echo(self.stats, self._life)) for port in ports])

    async def close(self) -> None:
        await self._life.close()


@dataclass
class LegStats:
    """Counters of one call leg.

    `received`: packets from this leg forwarded to the other; `sent`: packets sent to this leg's peer;
    `dropped`: packets arriving on this leg's sockets and not forwarded (not RTP/RTCP, wrong size, from a source
    other than the latched one, or the other leg has nowhere to send yet). Every datagram arriving on a leg is
    counted once, in `received` or `dropped`, so `a.received == b.sent` and `b.received == a.sent`.
    `peer`: the latched RTP source, None until this leg's first packet (or after `set_peer` changed the address).
    """

    received: int = 0
    sent: int = 0
    dropped: int = 0
    peer: tuple[str, int] | None = None


class _Path(asyncio.DatagramProtocol):
    """One socket of one leg (its RTP or its RTCP) with that socket's latching state.

    `target` is where packets *to* this leg are sent from this socket; `twin` is the other leg's socket of the
    same kind, which forwards what arrives here. `heard` counts packets from the latched `source`; (`mark_heard`,
    `mark_time`) says "`heard` had this value at that time", so an unchanged `heard` proves the source has been
    silent since `mark_time` without reading the clock per packet. Marks are refreshed by the watchdog tick and by
    packets from other sources.
    """

    __slots__ = (
        "heard",
        "life",
        "mark_heard",
        "mark_time",
        "min_len",
        "on_latch",
        "relatch_after",
        "source",
        "stats",
        "target",
        "transport",
        "twin",
    )

    def __init__(
        self,
        stats: LegStats,
        min_len: int,
        life: _Lifetime,
        relatch_after: float,
        on_latch: Callable[[tuple[Any, ...]], None] | None,
    ) -> None:
        self.stats = stats
        self.min_len = min_len
        self.life = life
        self.relatch_after = relatch_after
        self.on_latch = on_latch
        self.transport: asyncio.DatagramTransport | None = None
        self.twin: _Path = self
        self.target: tuple[Any, ...] | None = None
        self.source: tuple[Any, ...] | None = None
        self.heard = 0
        self.mark_heard = 0
        self.mark_time = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # The hot path: a length check, one byte, one tuple comparison, counters and a sendto.
        stats = self.stats
        # RTP and RTCP are both version 2 in the first two bits (RFC 3550 §5.1, §6.4); STUN, DTLS and garbage
        # are not (RFC 7983 §7 demultiplexes on the same byte).
        if not self.min_len <= len(data) <= MAX_PACKET or data[0] >> 6 != 2:
            stats.dropped += 1
            return
        if addr != self.source and not self._latch(addr):
            stats.dropped += 1
            return
        self.heard += 1
        self.life.active = True
        twin = self.twin
        target = twin.target
        transport = twin.transport
        if target is None or transport is None:
            stats.dropped += 1
            return
        transport.sendto(data, target)
        stats.received += 1
        twin.stats.sent += 1

    def _latch(self, addr: tuple[Any, ...]) -> bool:
        """Take `addr` as this socket's source (RFC 7362 latching) unless the current source is still talking."""
        now = asyncio.get_running_loop().time()
        if self.source is not None:
            if self.heard != self.mark_heard:
                # The source spoke since the last mark: it is alive, and silence is only measured from now.
                self.mark_heard = self.heard
                self.mark_time = now
                return False
            if now - self.mark_time < self.relatch_after:
                return False
        self.source = self.target = addr
        self.heard = self.mark_heard = 0
        self.mark_time = now
        if self.on_latch is not None:
            self.on_latch(addr)
        return True

    def tick(self, now: float) -> None:
        if self.heard != self.mark_heard:
            self.mark_heard = self.heard
            self.mark_time = now

    def reset(self, target: tuple[Any, ...] | None) -> None:
        self.target = target
        self.source = None
        self.heard = self.mark_heard = 0


def _rtcp_of(address: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """RTCP goes to the RTP port + 1 (RFC 3550 §11) unless latched separately; none above port 65534."""
    if address[1] >= 65535:
        return None
    return (address[0], address[1] + 1, *address[2:])


@dataclass
class RtpRelay:
    """Relay RTP (and RTCP) between two call legs: B2BUA media anchoring, so each leg works through its NAT.

    Leg A's sockets are `local_a`:`port_a` (RTP) and `port_a + 1` (RTCP, if `rtcp`), leg B's likewise. A packet
    arriving on leg A's RTP socket is sent from leg B's RTP socket to leg B's peer, and the other way round;
    RTCP likewise between the +1 sockets. Ports are fixed (no port 0) because the pair is advertised in SDP and
    RTCP must sit on RTP + 1; callers pick free pairs.

    Symmetric latching (RFC 7362): the first valid packet arriving on a leg's socket, from anywhere, makes its
    source that leg's peer, whatever `set_peer` said: behind a NAT the SDP address is often private, and the
    source is what reaches the endpoint. RTP and RTCP latch separately; until RTCP latches it goes to the RTP
    peer's port + 1. Once latched, another source is taken only after the current one has sent nothing for
    `relatch_after` (2) seconds, which lets a NAT rebinding mid-call recover while a third party spraying packets
    at the port cannot take over a stream that is still flowing.

    That defence is mild, and latching is inherently weak (RFC 7362 discusses it at length): whoever sends first
    wins the initial latch (an attacker who guesses the port before the endpoint's first packet gets the media
    meant for that leg); any silence of `relatch_after` seconds (hold, DTX/VAD with no comfort noise, a phone
    that never sends) opens the same window mid-call; sources are not authenticated, so a spoofed source address
    defeats it, and an on-path attacker is not slowed at all. Only SRTP protects the content. Packets from other
    sources are dropped and do not count as activity, so they cannot keep an abandoned relay alive past
    `inactivity` (they can still make a live call silent for one leg by winning a latch as described).

    Ends itself after `inactivity` seconds with no accepted packet on either leg (reason "inactivity"), after
    `max_duration` ("max duration"), or on `close()` ("closed"); `reason` says which and `ended` is set.
    """

    local_a: IPv4Address | IPv6Address
    port_a: int
    local_b: IPv4Address | IPv6Address
    port_b: int
    inactivity: float = 30.0
    max_duration: float = 4 * 3600.0
    rtcp: bool = True
    relatch_after: float = RELATCH_AFTER
    a: LegStats = field(default_factory=LegStats)
    b: LegStats = field(default_factory=LegStats)
    reason: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _life: _Lifetime = field(init=False, repr=False, compare=False)
    _rtp: dict[str, _Path] = field(init=False, repr=False, compare=False)
    _rtcp: dict[str, _Path] = field(init=False, repr=False, compare=False)
    _given: dict[str, tuple[str, int] | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, port in (("port_a", self.port_a), ("port_b", self.port_b)):
            if not 0 < port <= (65534 if self.rtcp else 65535):
                raise ValueError(f"{name} out of range: {port}")
        for name, value in (("inactivity", self.inactivity), ("max_duration", self.max_duration)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds: {value}")
        if not self.relatch_after >= 0:
            raise ValueError(f"relatch_after must be >= 0: {self.relatch_after}")
        # Sampling at half the re-latch delay bounds how late a silent source is noticed (see _Path).
        tick = min(self.inactivity / 4, self.relatch_after / 2) if self.relatch_after > 0 else self.inactivity / 4
        self._life = _Lifetime(self.inactivity, self.max_duration, tick, self.ended, self._on_end, self._tick)
        self._rtp, self._rtcp, self._given = {}, {}, {"a": None, "b": None}
        for leg, stats in (("a", self.a), ("b", self.b)):
            self._rtp[leg] = _Path(stats, MIN_RTP, self._life, self.relatch_after, self._latched(leg))
            self._rtcp[leg] = _Path(stats, MIN_RTCP, self._life, self.relatch_after, None)
        for paths in (self._rtp, self._rtcp):
            paths["a"].twin, paths["b"].twin = paths["b"], paths["a"]

    def _latched(self, leg: str) -> Callable[[tuple[Any, ...]], None]:
        stats = self.a if leg == "a" else self.b
        rtcp = self._rtcp

        def on_latch(addr: tuple[Any, ...]) -> None:
            stats.peer = (addr[0], addr[1])
            if rtcp[leg].source is None:
                rtcp[leg].target = _rtcp_of(addr)

        return on_latch

    def _on_end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _tick(self, now: float) -> None:
        for paths in (self._rtp, self._rtcp):
            paths["a"].tick(now)
            paths["b"].tick(now)

    async def start(self) -> None:
        """Bind all sockets and start the watchdog; OSError (e.g. port in use) propagates with nothing bound."""
        endpoints: list[tuple[IPv4Address | IPv6Address, int, asyncio.DatagramProtocol]] = [
            (self.local_a, self.port_a, self._rtp["a"]),
            (self.local_b, self.port_b, self._rtp["b"]),
        ]
        if self.rtcp:
            endpoints += [
                (self.local_a, self.port_a + 1, self._rtcp["a"]),
                (self.local_b, self.port_b + 1, self._rtcp["b"]),
            ]
        await self._life.start(endpoints)

    def set_peer(self, leg: Literal["a", "b"], address: tuple[str, int] | None) -> None:
        """Where to send to `leg` until its first packet latches (the address from that leg's SDP).

        `address` must be an (IP literal, port) pair, else ValueError: a host name would make every sendto
        resolve it. Addresses straight from SDP that cannot be sent to count as None rather than raising: port 0
        (a rejected stream, RFC 3264 §6), the unspecified address (old-style hold, RFC 3264 §8.4; Linux would
        deliver 0.0.0.0 to this very host), and the wrong IP family for the leg's socket.
        A different address (a re-INVITE moved the stream) forgets the leg's latched sources so the next packet
        latches again; the same address again is a no-op; None stops sending to the leg until it latches.
        """
        if leg not in ("a", "b"):
            raise ValueError(f"no such leg: {leg!r}")
        if address is not None:
            address = self._checked(leg, address)
        if address == self._given[leg]:
            return
        self._given[leg] = address
        self._rtp[leg].reset(address)
        self._rtcp[leg].reset(None if address is None else _rtcp_of(address))
        (self.a if leg == "a" else self.b).peer = None

    def _checked(self, leg: str, address: tuple[str, int]) -> tuple[str, int] | None:
        local = self.local_a if leg == "a" else self.local_b
        try:
            host, port = address
            ip = ip_address(host)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"peer must be (IP literal, port): {address!r}") from exc
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"peer port out of range: {port!r}")
        if port == 0 or ip.is_unspecified or ip.version != local.version:
            return None
        return (host, port)

    async def close(self) -> None:
        """End the relay ("closed" unless it already ended) and free its ports; idempotent."""
        await self._life.close()
