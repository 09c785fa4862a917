"""SIP transports for one profile: UDP, TCP and (with a certificate) TLS listeners, asyncio.

RFC 3261 §18 with the NAT rules of SIP-NOTES: every message is handed up with the `Peer` it came from
(transport, source address and port, and for streams the connection), and the service replies to that
peer: over UDP to the packet's source, over TCP/TLS on the same connection (§18.2.2). Requests we
originate over a stream reuse an open connection to the target when there is one (§18.1.1), else
connect.

A dual-stack profile (`host6`) has the same listeners on its IPv6 address too: a datagram is answered from
the socket of the peer's family, and a stream we open to an IPv6 peer leaves from `host6` (RFC 5118 §4: the
address in our Via and Contact must be one the peer can reach us at; left to the kernel the source would be
a temporary address, RFC 8981, which the router's pinholes are not for).

Hostile input is bounded here: datagrams and stream messages go through the codec's caps, a stream
that sends garbage or more than `MAX_TCP_MESSAGE` bytes unframed is closed, at most `max_connections`
streams are open (more are refused at accept), and an idle stream is closed after `idle_timeout`. A
request the codec cannot parse but which can be answered (autonat.sip.message.BadRequest: 400 with the
defect named, 505, 501, 513) is handed up like a message, for the call core to answer; a stream reads on
after it when its framing held, and is closed after the answer when it did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from autonat.aio import trace as wiretrace
from autonat.proto.errors import DecodeError
from autonat.sip.message import BadRequest, KeepAlive, Request, Response, StreamParser, parse_message
from autonat.sip.peer import Peer

log = logging.getLogger("autonat.sip")

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_IDLE_TIMEOUT = 900.0  # > the longest registration refresh we grant (3600 s / 2 ... phones ping sooner)
CONNECT_TIMEOUT = 5.0
UDP_RECEIVE_BUFFER = 1024 * 1024  # ~0.5 s of INVITEs at 700/s; more only delays past T1 (bufferbloat)


__all__ = ["Handler", "Peer", "SipTransport", "TransportStats"]

Handler = Callable[[Request | Response | BadRequest, Peer], None]


@dataclass
class TransportStats:
    received: int = 0
    sent: int = 0
    malformed: int = 0
    refused_connections: int = 0


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if wiretrace.ON:
            wiretrace.sip_received(data, "udp", addr)
        owner = self.owner
        try:
            message = parse_message(data)
        except BadRequest as bad:
            owner.stats.malformed += 1
            owner.handler(bad, Peer("udp", addr[0], addr[1]))  # a request that is answered all the same
            return
        except DecodeError as exc:
            owner.stats.malformed += 1
            log.debug("malformed datagram from %s:%s: %s", addr[0], addr[1], exc)
            return
        if isinstance(message, KeepAlive):
            return
        owner.stats.received += 1
        owner.handler(message, Peer("udp", addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that went away: nothing to do but note it.
        log.debug("UDP error: %s", exc)


class _Stream(asyncio.Protocol):
    def __init__(self, owner: SipTransport, kind: str) -> None:
        self.owner = owner
        self.kind = kind
        self.parser = StreamParser()
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        owner = self.owner
        if len(owner._streams) >= owner.max_connections:
            owner.stats.refused_connections += 1
            self.transport.close()
            return
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = Peer(self.kind, host, port, next(owner._ids))
        owner._streams[self.peer.connection] = self
        owner._by_address.setdefault((self.kind, host, port), self.peer.connection)

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.transport is None:
            return
        self.last_active = time.monotonic()
        try:
            messages = self.parser.feed(data)
        except DecodeError as exc:
            if wiretrace.ON:
                wiretrace.sip_received(exc, self.kind, (self.peer.ip, self.peer.port))
            self.owner.stats.malformed += 1
            log.debug("closing %s: %s", self.peer, exc)
            if isinstance(exc, BadRequest):
                self.owner.handler(exc, self.peer)  # answered (513) before the connection goes
            self.transport.close()
            return
        for message in messages:
            if wiretrace.ON:
                wiretrace.sip_received(message, self.kind, (self.peer.ip, self.peer.port))
            if isinstance(message, KeepAlive):
                self.transport.write(b"\r\n")  # RFC 5626 §3.5.1 pong
                continue
            if isinstance(message, BadRequest):
                self.owner.stats.malformed += 1
            else:
                self.owner.stats.received += 1
            self.owner.handler(message, self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            owner = self.owner
            owner._streams.pop(self.peer.connection, None)
            key = (self.kind, self.peer.ip, self.peer.port)
            if owner._by_address.get(key) == self.peer.connection:
                del owner._by_address[key]


class SipTransport:
    """The listeners of one profile on `host` (and `host6`): UDP and TCP on `port`, TLS on `tls_port` with `tls`."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        tcp: bool = True,
        tls_port: int | None = None,
        tls: ssl.SSLContext | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        host6: str | None = None,
    ) -> None:
        self.host = host
        self.host6 = host6
        self.port = port
        self.handler = handler
        self.tcp = tcp
        self.tls_port = tls_port if tls is not None else None
        self.tls = tls
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.stats = TransportStats()
        self._udp: asyncio.DatagramTransport | None = None
        self._udp6: asyncio.DatagramTransport | None = None
        self._servers: list[asyncio.Server] = []
        self._streams: dict[int, _Stream] = {}
        self._by_address: dict[tuple[str, str, int], int] = {}
        self._ids = itertools.count(1)
        self._reaper: asyncio.Task[None] | None = None

    @property
    def transports(self) -> tuple[str, ...]:
        return ("udp",) + (("tcp",) if self.tcp else ()) + (("tls",) if self.tls_port else ())

    @property
    def connections(self) -> int:
        return len(self._streams)

    async def start(self) -> None:
        """Bind every listener; OSError (port in use, address not here) after closing what was bound."""
        loop = asyncio.get_running_loop()
        try:
            self._udp = await self._bind_udp(self.host)
            if self.host6 is not None:
                self._udp6 = await self._bind_udp(self.host6)
            for host in (self.host,) if self.host6 is None else (self.host, self.host6):
                if self.tcp:
                    self._servers.append(
                        await loop.create_server(lambda: _Stream(self, "tcp"), host, self.port, reuse_address=True)
                    )
                if self.tls_port and self.tls is not None:
                    self._servers.append(
                        await loop.create_server(
                            lambda: _Stream(self, "tls"), host, self.tls_port, ssl=self.tls, reuse_address=True
                        )
                    )
        except OSError:
            await self.stop()
            raise
        self._reaper = loop.create_task(self._reap_idle())

    async def _bind_udp(self, host: str) -> asyncio.DatagramTransport:
        udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Datagram(self), local_addr=(host, self.port)
        )
        sock = udp.get_extra_info("socket")
        with contextlib.suppress(OSError):
            # A burst of INVITEs must queue, not drop: the kernel default (~200 KiB) overflows near
            # 700 calls/s. The kernel caps this at net.core.rmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        return udp

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for udp in (self._udp, self._udp6):
            if udp is not None:
                udp.close()
        self._udp = self._udp6 = None
        for server in self._servers:
            server.close()
        for stream in list(self._streams.values()):
            if stream.transport is not None:
                stream.transport.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._servers.clear()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.idle_timeout))
            limit = time.monotonic() - self.idle_timeout
            for stream in list(self._streams.values()):
                if stream.last_active < limit and stream.transport is not None:
                    stream.transport.close()

    def send(self, message: Request | Response, peer: Peer) -> bool:
        """Send over UDP to `peer`, or on its stream; False when the stream is gone."""
        data = message.serialize()
        if peer.transport == "udp":
            udp = self._udp6 if ":" in peer.ip and self._udp6 is not None else self._udp
            if udp is None:
                return False
            udp.sendto(data, (peer.ip, peer.port))
            if wiretrace.ON:
                wiretrace.sip_sent(message, "udp", (peer.ip, peer.port))
            self.stats.sent += 1
            return True
        stream = self._streams.get(peer.connection)
        if stream is None or stream.transport is None or stream.transport.is_closing():
            return False
        stream.transport.write(data)
        if wiretrace.ON:
            wiretrace.sip_sent(message, peer.transport, (peer.ip, peer.port))
        stream.last_active = time.monotonic()
        self.stats.sent += 1
        return True

    async def connect(self, transport: str, ip: str, port: int) -> Peer:
        """A stream to `ip`:`port`: an open one (§18.1.1) or a new one; OSError/TimeoutError on failure.
        For "udp" this just names the destination."""
        if transport == "udp":
            return Peer("udp", ip, port)
        known = self._by_address.get((transport, ip, port))
        if known is not None and known in self._streams:
            return self._streams[known].peer or Peer(transport, ip, port, known)
        loop = asyncio.get_running_loop()
        context = None
        if transport == "tls":
            context = ssl.create_default_context()
        source = (self.host6, 0) if self.host6 is not None and ":" in ip else None
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, protocol = await loop.create_connection(
                lambda: _Stream(self, transport), ip, port, ssl=context, local_addr=source
            )
        stream = protocol
        if stream.peer is None:
            raise OSError("too many SIP connections")
        return stream.peer

    async def send_request(self, request: Request, transport: str, ip: str, port: int) -> Peer | None:
        """Send a request we originate; returns the peer it went to (None: could not connect)."""
        try:
            peer = await self.connect(transport, ip, port)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot reach %s:%s over %s: %s", ip, port, transport, exc)
            return None
        return peer if self.send(request, peer) else None
