"""Media: an RTP echo for the echo test and an RTP relay for bridged calls, both answering to packet sources, and
the test call's signal (`ProbeMedia`).

The echo is an endpoint of its own (autonat.sip.rtp.EchoStream): what it sends back is its own stream (own SSRC,
sequence numbers and timestamps), with its own RTCP, and the caller's RTCP is never reflected. With rtcp-mux
(RFC 5761) it uses one port. A phone doing ICE gets answers to its connectivity checks (autonat.sip.ice, ICE-lite)
on the echo's ports and on leg a of a relay. On hold the silence of the held side does not end the call.

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
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Literal, cast

from autonat.engine.engine import NatEngine
from autonat.engine.pool import PortPairs, RtpPool, RtpPorts
from autonat.proto.types import Transport
from autonat.sip.core import (
    AcquirePorts,
    DropRtcp,
    ProbeAnswered,
    ReleaseMedia,
    SipCore,
    StartEcho,
    StartProbe,
    StartRelay,
    UpdateMedia,
)
from autonat.sip.core import Action as CoreAction
from autonat.sip.dialog import Ports
from autonat.sip.ice import IceResponder, is_stun
from autonat.sip.probecall import PTIME, Signal
from autonat.sip.rtp import NTP_EPOCH_OFFSET, EchoStream, is_rtcp

MAX_PACKET = 2048  # RTP over UDP stays under the path MTU; anything larger is not ours to echo or relay
MIN_RTP = 12  # fixed RTP header, RFC 3550 §5.1
MIN_RTCP = 8  # RTCP common header plus the sender SSRC, RFC 3550 §6.4
RELATCH_AFTER = 2.0  # seconds of silence from the latched source before another source may take over
RTCP_INTERVAL = 5.0  # RFC 3550 §6.2: the minimum between our compound RTCP packets
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
        self.held = False  # on hold (RFC 3264 §8.4): silence is expected, only max_duration ends the session
        self.ended = ended
        self._inactivity = inactivity
        self._max_duration = max_duration
        self._tick = min(tick, _MAX_TICK) if tick > 0 else _MAX_TICK
        self._on_end = on_end
        self._on_tick = on_tick
        self._transports: list[asyncio.DatagramTransport] = []
        self._bound: list[tuple[socket.socket, asyncio.DatagramProtocol]] = []  # bound, not yet attached
        self._watch: asyncio.Task[None] | None = None
        self._started = False

    def bind(self, endpoints: Sequence[tuple[IPv4Address | IPv6Address, int, asyncio.DatagramProtocol]]) -> None:
        """Bind every (address, port, protocol), synchronously; on any failure nothing stays bound.

        Plain sockets, so a failure can close the earlier ones at once (transports only release their socket on
        a later loop iteration, which would leave the port pair briefly taken), and so the caller can answer the
        call the moment the ports are certainly ours: what arrives before `attach` waits in the kernel."""
        if self._started or self.ended.is_set():
            raise RuntimeError("media session already started or ended")
        self._started = True
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
        self._bound = [(sock, protocol) for sock, (_, _, protocol) in zip(socks, endpoints, strict=True)]

    async def attach(self) -> None:
        """Hand the bound sockets to the event loop and start the watchdog (nothing to do once ended)."""
        loop = asyncio.get_running_loop()
        bound, self._bound = self._bound, []
        try:
            for sock, protocol in bound:
                if self.ended.is_set():
                    sock.close()
                    continue
                transport, _ = await loop.create_datagram_endpoint(_factory(protocol), sock=sock)
                self._transports.append(transport)
        except BaseException:
            for transport in self._transports:
                transport.abort()
            self._transports.clear()
            for sock, _ in bound:
                sock.close()
            raise
        if self.ended.is_set():
            for transport in self._transports:
                transport.close()
            self._transports.clear()
            return
        self._watch = loop.create_task(self._watchdog())

    async def start(self, endpoints: Sequence[tuple[IPv4Address | IPv6Address, int, asyncio.DatagramProtocol]]) -> None:
        """`bind`, then `attach`: on any failure nothing stays bound."""
        self.bind(endpoints)
        await self.attach()

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
            if self.held:
                last = now
            elif now - last >= self._inactivity:
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
        for sock, _ in self._bound:  # bound, never attached
            sock.close()
        self._bound = []
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
    rtcp_received: int = 0  # the caller's RTCP: read, never reflected
    rtcp_sent: int = 0  # our own reports
    stun_answered: int = 0  # ICE connectivity checks answered (ICE-lite)
    last_source: tuple[str, int] | None = None
    rtcp_source: tuple[str, int] | None = None
    reason: str | None = None  # why it ended: "inactivity", "max duration", "closed"


class _Echo(asyncio.DatagramProtocol):
    """One socket of the echo: the RTP port (RTCP too with rtcp-mux), or the RTCP port."""

    def __init__(self, owner: RtpEcho, rtp: bool) -> None:
        self.owner = owner
        self.stats = owner.stats
        self.life = owner._life
        self.rtp = rtp
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # RTP and RTCP are version 2 in the first two bits (RFC 3550 §5.1, §6.4); STUN starts with 0-3
        # (RFC 7983 §7); anything else is not ours.
        owner = self.owner
        if MIN_RTCP <= len(data) <= MAX_PACKET and data[0] >> 6 == 2:
            # RTCP arriving on the RTP port is told apart by its packet type (RFC 5761 §4), mux agreed or not: a
            # phone that multiplexes anyway must not hear its own reports echoed.
            if not self.rtp or is_rtcp(data):
                self.stats.rtcp_received += 1  # the caller's RTCP: its reports, its BYE; never reflected
                if addr != self.stats.rtcp_source:
                    self.stats.rtcp_source = (addr[0], addr[1])
                self.life.active = True
                return
            if len(data) < MIN_RTP:
                self.stats.dropped += 1
                return
            self.stats.received += 1
            if addr != self.stats.last_source:
                self.stats.last_source = (addr[0], addr[1])
            self.life.active = True
            if owner.sending and self.transport is not None:
                out = owner.stream.rewrite(data)
                if out is not None:
                    self.transport.sendto(out, addr)
                    self.stats.sent += 1
            return
        responder = owner.responder
        if responder is not None and is_stun(data):
            answered = responder.answer(data, (addr[0], addr[1]))
            if answered is not None and self.transport is not None:
                self.transport.sendto(answered[0], addr)
                self.stats.stun_answered += 1
                return
        self.stats.dropped += 1


@dataclass
class RtpEcho:
    """Echo RTP on `port` (RTCP on `port + 1` unless `rtcp` is False: rtcp-mux or no RTCP at all) until
    closed, idle or too old. `sending` False (our answer said recvonly/inactive) stops the echo; `hold` keeps
    the silence of a held call from ending it; `ice` (ufrag, pwd) answers ICE connectivity checks."""

    local: IPv4Address | IPv6Address
    port: int
    inactivity: float = 30.0
    max_duration: float = 4 * 3600.0
    rtcp: bool = True
    ice: tuple[str, str] | None = None
    sending: bool = True
    hold: bool = False
    stats: EchoStats = field(default_factory=EchoStats)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    stream: EchoStream = field(default_factory=EchoStream)
    responder: IceResponder | None = field(init=False, default=None)
    _life: _Lifetime = field(init=False, repr=False, compare=False)
    _sockets: list[_Echo] = field(init=False, repr=False, compare=False, default_factory=list)
    _last_report: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        tick = min(self.inactivity / 4, RTCP_INTERVAL)
        self._life = _Lifetime(self.inactivity, self.max_duration, tick, self.ended, self._on_end, self._tick)
        self.update(ice=self.ice, hold=self.hold)

    @property
    def mux(self) -> bool:
        return not self.rtcp

    def update(
        self, *, sending: bool | None = None, hold: bool | None = None, ice: tuple[str, str] | None = None
    ) -> None:
        """What the latest offer/answer changed: whether we send, whether the call is on hold, ICE credentials."""
        if sending is not None:
            self.sending = sending
        if hold is not None:
            self.hold = self._life.held = hold
        if ice is not None:
            self.ice = ice
            self.responder = IceResponder(*ice)

    def _on_end(self, reason: str) -> None:
        if self.stats.reason is None:
            self.stats.reason = reason

    def _target(self) -> tuple[str, int] | None:
        """Where our RTCP goes: where the caller's RTCP comes from, else its RTP port (+1 without mux)."""
        if self.stats.rtcp_source is not None:
            return self.stats.rtcp_source
        source = self.stats.last_source
        if source is None:
            return None
        return source if self.mux else (source[0], source[1] + 1)

    def _send_rtcp(self, packet: bytes) -> None:
        target = self._target()
        sock = self._sockets[-1] if self._sockets else None  # the RTCP socket, or the one socket with mux
        if target is not None and sock is not None and sock.transport is not None:
            sock.transport.sendto(packet, target)
            self.stats.rtcp_sent += 1

    def _tick(self, now: float) -> None:
        if now - self._last_report >= RTCP_INTERVAL and self.stream.packets:
            self._last_report = now
            self._send_rtcp(self.stream.report(time.time() + NTP_EPOCH_OFFSET))

    def bind(self) -> None:
        """Bind RTP (and RTCP) on `local`, synchronously; OSError propagates and leaves nothing bound."""
        self._sockets = [_Echo(self, True)] + ([_Echo(self, False)] if self.rtcp else [])
        ports = (self.port, self.port + 1) if self.rtcp else (self.port,)
        self._life.bind([(self.local, port, sock) for port, sock in zip(ports, self._sockets, strict=True)])

    async def attach(self) -> None:
        """After `bind`: the sockets to the event loop, the watchdog started."""
        await self._life.attach()

    def fail(self, reason: str) -> None:
        """End it now with `reason` (its sockets closed)."""
        self._life.end(reason)

    async def start(self) -> None:
        """`bind` and `attach`; OSError propagates and leaves nothing bound."""
        self.bind()
        await self.attach()

    async def close(self) -> None:
        """End the echo; an established stream says goodbye with its own RTCP BYE (RFC 3550 §6.6)."""
        if not self.ended.is_set() and self.stream.packets:
            self._send_rtcp(self.stream.bye())
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
        "responder",
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
        self.responder: IceResponder | None = None  # leg a of a call whose phone does ICE (we are ICE-lite)
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
            responder = self.responder
            if responder is not None and is_stun(data) and self.transport is not None:
                answered = responder.answer(data, (addr[0], addr[1]))
                if answered is not None:
                    self.transport.sendto(answered[0], addr)
                    return
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
    ice_a: tuple[str, str] | None = None  # leg a's phone does ICE: answer its checks with these credentials
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
        if self.ice_a is not None:
            self.set_ice("a", self.ice_a)

    def set_ice(self, leg: Literal["a", "b"], credentials: tuple[str, str]) -> None:
        """Answer the ICE connectivity checks `leg`'s phone sends with our `credentials` (ufrag, pwd)."""
        responder = IceResponder(*credentials)
        self._rtp[leg].responder = self._rtcp[leg].responder = responder

    def set_hold(self, held: bool) -> None:
        """On hold the relay may go silent both ways without the call ending (only max_duration then)."""
        self._life.held = held

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

    def bind(self) -> None:
        """Bind all sockets, synchronously; OSError (e.g. port in use) propagates with nothing bound."""
        endpoints: list[tuple[IPv4Address | IPv6Address, int, asyncio.DatagramProtocol]] = [
            (self.local_a, self.port_a, self._rtp["a"]),
            (self.local_b, self.port_b, self._rtp["b"]),
        ]
        if self.rtcp:
            endpoints += [
                (self.local_a, self.port_a + 1, self._rtcp["a"]),
                (self.local_b, self.port_b + 1, self._rtcp["b"]),
            ]
        self._life.bind(endpoints)

    async def attach(self) -> None:
        """After `bind`: the sockets to the event loop, the watchdog started."""
        await self._life.attach()

    def fail(self, reason: str) -> None:
        """End it now with `reason` (its sockets closed)."""
        self._life.end(reason)

    async def start(self) -> None:
        """`bind` and `attach`; OSError propagates with nothing bound."""
        self.bind()
        await self.attach()

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


class _ProbeSocket(asyncio.DatagramProtocol):
    """One socket of the test call: RTP (the signal out, its echo in) or RTCP (counted)."""

    def __init__(self, owner: ProbeMedia, rtp: bool) -> None:
        self.signal = owner.signal
        self.rtp = rtp
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.rtp:
            self.signal.receive(data, (addr[0], addr[1]), asyncio.get_running_loop().time())
        else:
            self.signal.receive_rtcp()


class ProbeMedia:
    """The test call's media, the shell of autonat.sip.probecall.Signal: RTP on `port` and RTCP on `port + 1` (the
    pair the call advertised), the signal's packets sent to the answer's address when its one timer says, and
    every datagram on the RTP socket handed to it with its arrival time. It decides nothing: what to send, when,
    and what came back are the signal's. Like the echo it ends at `max_duration` at the latest (the call core
    hangs the test call up long before; this bounds sockets whose call was lost), never on silence: a peer that
    sends nothing back is what the test call is there to find."""

    def __init__(self, local: IPv4Address | IPv6Address, port: int, signal: Signal, max_duration: float) -> None:
        self.local, self.port, self.signal = local, port, signal
        self.reason: str | None = None  # why it ended: "closed", "max duration", a socket failure
        self.ended = asyncio.Event()
        self._life = _Lifetime(math.inf, max_duration, _MAX_TICK, self.ended, self._on_end)
        self._sockets = [_ProbeSocket(self, True), _ProbeSocket(self, False)]
        self._timer: asyncio.TimerHandle | None = None
        self._remote: tuple[str, int] | None = None

    def _on_end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop_sending()

    def bind(self) -> None:
        """Bind RTP and RTCP on `local`, synchronously; OSError propagates and leaves nothing bound."""
        self._life.bind([(self.local, self.port + n, sock) for n, sock in enumerate(self._sockets)])

    async def attach(self) -> None:
        await self._life.attach()

    def fail(self, reason: str) -> None:
        self._life.end(reason)

    def play(self, remote: tuple[str, int], payload_type: int) -> None:
        """The call is answered: the signal starts now, towards `remote`."""
        if self.ended.is_set() or self._remote is not None:
            return
        self._remote = remote
        self.signal.start(asyncio.get_running_loop().time(), payload_type)
        self._send()

    def _send(self) -> None:
        self._timer = None
        remote, transport = self._remote, self._sockets[0].transport
        loop = asyncio.get_running_loop()
        if remote is None or self.ended.is_set():
            return
        if transport is None:  # still being handed to the loop: the signal's schedule waits one packet time
            self._timer = loop.call_later(PTIME, self._send)
            return
        for packet in self.signal.due(loop.time()):
            transport.sendto(packet, remote)
        when = self.signal.timer()
        if when is not None:
            self._timer = loop.call_at(when, self._send)

    def stop_sending(self) -> None:
        """No more packets (the call is over); what still arrives is counted until the sockets close."""
        self.signal.stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def close(self) -> None:
        await self._life.close()


class CallMedia:
    """The media side of the SIP shell: performs the call core's media actions and reports back to it.

    Ports come from the RTP pool (mapped ahead, `map_now` when it is empty), for an IPv6 peer from the pool of
    pinholes (`pool6`, autonat.service.pinholes), or the range; the echo and the relay run here; at a call's
    end its media closes before its ports go back (a start still binding is waited for first, so no socket
    outlives its call). What the core must hear comes back through `report`
    (the shell's perform loop, with the clock)."""

    def __init__(
        self,
        core: SipCore,
        pairs: PortPairs,
        engine: NatEngine,
        *,
        inactivity: float,
        max_duration: float,
        report: Callable[[list[CoreAction]], None],
        spawn: Callable[[Coroutine[Any, Any, Any], str], Any],
    ) -> None:
        self.core, self.pairs, self.engine = core, pairs, engine
        self.pool: RtpPool | None = None
        self.pool6: RtpPool | None = None  # RTP pairs with IPv6 firewall pinholes (dual-stack profiles)
        self.inactivity, self.max_duration = inactivity, max_duration
        self.media: dict[str, RtpEcho | RtpRelay | ProbeMedia] = {}
        self._report, self._spawn = report, spawn
        self._starting: dict[str, asyncio.Event] = {}  # media being bound, by call

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def acquire(self, action: AcquirePorts) -> list[CoreAction]:
        """Ports at once when the pool (of the peer's family) has a pair or the range a free one; else mapped in
        the background."""
        pool = self.pool if action.family == 4 else self.pool6
        if action.mapped and pool is not None:
            taken = pool.take(action.owner, reserve=action.reserve)
            if taken is None:
                self._spawn(self._map_now(action, pool), "map")
                return []
            return self.core.ports_ready(action.call, action.leg, _ports(pool, taken), self._now())
        port = None if action.mapped else self.pairs.acquire()
        return self.core.ports_ready(action.call, action.leg, None if port is None else Ports(port), self._now())

    async def _map_now(self, action: AcquirePorts, pool: RtpPool) -> None:
        mapped = await pool.map_now(action.owner, reserve=action.reserve)
        self._report(
            self.core.ports_ready(
                action.call, action.leg, None if mapped is None else _ports(pool, mapped), self._now()
            )
        )

    def start(self, action: StartEcho | StartRelay | StartProbe) -> list[CoreAction]:
        """Bind the media at once (the call is answered the moment its ports are certainly ours), then hand
        the sockets to the event loop in the background."""
        media: RtpEcho | RtpRelay | ProbeMedia
        if isinstance(action, StartEcho):
            media = RtpEcho(action.local, action.port, self.inactivity, self.max_duration, action.rtcp, action.ice,
                            action.sending, action.hold)  # fmt: skip
        elif isinstance(action, StartProbe):
            media = ProbeMedia(action.local, action.port, Signal(action.seconds), self.max_duration)
        else:
            media = RtpRelay(action.local, action.port_a, action.local_b or action.local, action.port_b,
                             self.inactivity, self.max_duration, ice_a=action.ice_a)  # fmt: skip
            with contextlib.suppress(ValueError):
                media.set_peer("a", action.peer_a)
        try:
            media.bind()
        except OSError as exc:
            return self.core.media_started(action.call, str(exc.strerror or exc), self._now())
        self.media[action.call] = media
        self._starting[action.call] = asyncio.Event()
        self._spawn(self._run(action.call, media), "media")
        return self.core.media_started(action.call, None, self._now())

    async def _run(self, call: str, media: RtpEcho | RtpRelay | ProbeMedia) -> None:
        try:
            await media.attach()
        except OSError as exc:
            media.fail(f"media failed: {exc.strerror or exc}")  # ends it: the call is hung up below
        finally:
            self._starting.pop(call).set()
        await media.ended.wait()
        reason = media.stats.reason if isinstance(media, RtpEcho) else media.reason
        self._report(self.core.media_ended(call, reason or "closed", self._now()))

    def play(self, action: ProbeAnswered) -> None:
        media = self.media.get(action.call)
        if isinstance(media, ProbeMedia):
            media.play(action.remote, action.payload_type)

    def update(self, action: UpdateMedia) -> None:
        media = self.media.get(action.call)
        if isinstance(media, RtpEcho):
            media.update(sending=action.sending, hold=action.hold, ice=action.ice)
        elif isinstance(media, RtpRelay):
            if action.leg in ("a", "b") and action.peer is not None:
                with contextlib.suppress(ValueError):
                    media.set_peer("a" if action.leg == "a" else "b", action.peer)
            if action.ice is not None and action.leg == "a":
                media.set_ice("a", action.ice)
            if action.hold is not None:
                media.set_hold(action.hold)

    def drop_rtcp(self, action: DropRtcp) -> None:
        held = action.ports.handle
        if isinstance(held, _Held):  # the pool's engine: the pinholes' for a pair of the IPv6 pool
            self._spawn(held.pool.engine.delete(Transport.UDP, held.ports.rtcp), "drop rtcp")

    async def release(self, action: ReleaseMedia) -> None:
        """Close the media (after its start, if that is still under way), then give the ports back."""
        starting = self._starting.get(action.call)
        if starting is not None:
            await starting.wait()
        media = self.media.pop(action.call, None)
        if media is not None:
            await media.close()
        for ports in action.ports:
            held = ports.handle
            if isinstance(held, _Held):
                await held.pool.release(held.ports)
            else:
                self.pairs.release(ports.local)


@dataclass(frozen=True, slots=True)
class _Held:
    """A mapped pair (`Ports.handle`) and the pool it goes back to: the IPv4 mappings' or the IPv6 pinholes'."""

    pool: RtpPool
    ports: RtpPorts


def _ports(pool: RtpPool, mapped: RtpPorts) -> Ports:
    return Ports(mapped.rtp, mapped.external_ip, mapped.external_rtp, mapped.external_rtcp, True, _Held(pool, mapped))
