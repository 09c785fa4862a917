"""PCP, NAT-PMP and UPnP IGD without an event loop: the same exchanges as the asyncio session, blocking.

For a one-shot script, or a program that has no event loop, this shell drives the sans-IO `Exchange`
core with `socket.settimeout` instead of asyncio timers; the requests and the reading of the replies
are the very functions the asyncio clients use (`autonat.aio.natpmp`, `autonat.aio.pcp`). UPnP IGD is
`autonat.aio.blocking_upnp` (the same sans-IO core as the asyncio client), loaded only when a call
needs it. Importing this module loads neither asyncio nor the UPnP/HTTP/XML modules, and logging only
when a hole is opened or closed, so `import autonat; autonat.external_address()` costs a few
milliseconds above the bare interpreter (bench/peers.py has the figures).

    with autonat.open_router() as router:
        mapping = router.add(MappingRequest(Transport.UDP, 5060, lifetime=3600))
        router.remove(mapping)

As in the asyncio session the socket is connected to the gateway's port 5351, so a router without the
service is known at once (ICMP port unreachable) and silence waits for the deadline.
"""

from __future__ import annotations

import socket
import sys
import time
from ipaddress import IPv4Address

from autonat.aio import natpmp as natpmp_client
from autonat.aio.route import RouterLocation, locate_router
from autonat.aio.udp import MAX_DATAGRAM, open_socket
from autonat.errors import ProtocolUnavailable, RouterRefused, RouterTimeout
from autonat.mapper import MAX_GRANTED_LIFETIME, Mapping, MappingRequest, check_max_lifetime, hole_logger
from autonat.proto import natpmp
from autonat.proto.exchange import DEFAULT_DEADLINE, Exchange

# PCP is imported where it is used (with the host secret: hashlib, pathlib): an external-address
# request or a NAT-PMP mapping does without it. typing, likewise, only for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ipaddress import IPv6Address
    from types import TracebackType
    from typing import Any, Literal

    from autonat.aio import pcp as pcp_client
    from autonat.aio.blocking_upnp import BlockingUpnp
    from autonat.proto.types import Transport

    BlockingChoice = Literal["auto", "pcp", "natpmp", "upnp"]
PROBE_GRACE = 0.25  # as router.PROBE_GRACE: once one protocol answered, how long the other may take
WAIT_STEP = 0.2
"""The longest one wait on the socket. `settimeout` is a system call every time (ioctl FIONBIO on Linux),
so the socket keeps this timeout while the next due time is further away (a warm request sets none: the
first retransmission is 225 ms or more away, exchange.py), and only a nearer due time gets its own. A
request that goes unanswered wakes once more per retransmission, to no effect: the exchange decides
from the clock."""
MIN_WAIT = 0.0001  # a due time already reached still gets a wait: recv on a socket with timeout 0 raises
_TRACE_MODULE = "autonat.aio.trace"
"""The wire trace (aio/trace.py), looked up in sys.modules, never imported here: it loads `logging`,
which a blocking session does without, and whoever turns the trace on has imported it. Every use tests
its ON flag, so with the trace off (or never loaded) the cost is the lookup and one test per datagram."""


def _wait_at_most(sock: socket.socket, seconds: float) -> None:
    """Let the next `recv` on `sock` wait at most `seconds` (> 0), WAIT_STEP at the longest; reading the
    current timeout costs no system call, setting it does."""
    seconds = min(max(seconds, MIN_WAIT), WAIT_STEP)  # 0 would make the socket non-blocking
    if sock.gettimeout() != seconds:
        sock.settimeout(seconds)


class BlockingSession:
    """One gateway, one local address, one blocking UDP socket for NAT-PMP and PCP.

    Open it with `BlockingSession.open()` (or `autonat.open_router()`) and use it as a context
    manager, which closes the socket; mappings stay on the router until deleted or expired.
    """

    def __init__(
        self,
        location: RouterLocation,
        sock: socket.socket,
        deadline: float = DEFAULT_DEADLINE,
        *,
        server_port: int = natpmp.SERVER_PORT,
        max_lifetime: int = MAX_GRANTED_LIFETIME,
    ) -> None:
        self.location = location
        self.deadline = deadline
        self._sock = sock
        self._server = (location.gateway, server_port)
        # Built once: every exchange names its server in a possible error, and NAT-PMP checks the family.
        self._natpmp_what = f"NAT-PMP at {location.gateway}:{server_port}"
        self._pcp_what = f"PCP at {location.gateway}:{server_port}"
        self._natpmp_at: tuple[IPv4Address, int] | None = None
        self._max_lifetime = check_max_lifetime(max_lifetime)
        self._address = natpmp_client.KnownAddress()
        self._nonces: pcp_client.Nonces | None = None
        self._selected: str | None = None
        self._upnp: BlockingUpnp | None = None

    @classmethod
    def open(
        cls,
        gateway: str | None = None,
        interface: str | None = None,
        deadline: float = DEFAULT_DEADLINE,
        *,
        max_lifetime: int = MAX_GRANTED_LIFETIME,
    ) -> BlockingSession:
        """Locate the router as `RouterSession.open` does and open the session's socket.
        Raises RouterNotFound when there is no gateway to talk to."""
        check_max_lifetime(max_lifetime)
        location = locate_router(gateway, interface)
        sock = open_socket(location.local_address, (location.gateway, natpmp.SERVER_PORT))
        return cls(location, sock, deadline, max_lifetime=max_lifetime)

    def close(self) -> None:
        """Close the socket (and any HTTP connection a UPnP router kept open); idempotent."""
        self._sock.close()
        if self._upnp is not None:
            self._upnp.close()

    @property
    def upnp(self) -> BlockingUpnp:
        """The UPnP IGD client (SSDP discovery on first use, within the deadline), made when first asked for."""
        if self._upnp is None:
            from autonat.aio.blocking_upnp import BlockingUpnp
            from autonat.state import host_secret

            self._upnp = BlockingUpnp(self.location, host_secret(), deadline=self.deadline)
        return self._upnp

    def __enter__(self) -> BlockingSession:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # --- driving exchanges ------------------------------------------------------------------------------

    def _run(self, exchanges: list[tuple[Exchange[Any], str]], grace: float | None = None) -> None:
        """Drive `exchanges` (all to our server, on our socket) until each is done, or until `grace`
        seconds after the first answer. A datagram goes to the first exchange that accepts it, as in
        DatagramChannel. (One exchange alone: `_one`.)"""
        sock = self._sock
        server = self._server
        trace: Any = sys.modules.get(_TRACE_MODULE)
        cutoff: float | None = None
        while True:
            now = time.monotonic()
            for exchange, _ in exchanges:
                exchange.handle_timer(now)
                if self._send_due(exchange, now, trace):
                    self._unreachable([exchange for exchange, _ in exchanges], trace)
            # After all the sends: an ICMP port unreachable reported on a later send ends earlier ones too.
            waiting = [exchange for exchange, _ in exchanges if not exchange.done]
            if grace is not None and cutoff is None and any(e.done and not e.failed for e, _ in exchanges):
                cutoff = now + grace
            if not waiting or (cutoff is not None and now >= cutoff):
                return
            due = min(t for exchange in waiting if (t := exchange.timer()) is not None)
            if cutoff is not None:
                due = min(due, cutoff)
            _wait_at_most(sock, due - now)
            try:
                data = sock.recv(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                self._unreachable([exchange for exchange, _ in exchanges], trace)
                continue
            now = time.monotonic()
            if trace is not None and trace.ON:
                trace.datagram_received(data, server, now)
            if len(data) > MAX_DATAGRAM:
                continue
            for exchange in waiting:
                if exchange.receive(data, server, now) is None:
                    break

    def _one(self, exchange: Exchange[Any], what: str) -> Any:
        """Drive `exchange`, made just now (its first transmission is due at its `started`), alone to its
        end: its reply, or its one-line failure raised (`what` names the server). `_run` for the common
        case, with nothing on the way between the socket and the exchange: what runs between the reply's
        arrival and the caller's return is the cost a warm request adds to the router's own time
        (bench/peers.py)."""
        sock = self._sock
        server = self._server
        trace: Any = sys.modules.get(_TRACE_MODULE)
        now = exchange.started  # the caller read the clock to make it: no second read
        while True:
            if self._send_due(exchange, now, trace):
                self._unreachable([exchange], trace)
            due = exchange.timer()
            if due is None:
                break  # timed out, or refused on the send
            _wait_at_most(sock, due - now)
            try:
                data = sock.recv(MAX_DATAGRAM + 1)
            except TimeoutError:
                data = None
            except ConnectionRefusedError:
                self._unreachable([exchange], trace)
                break
            now = time.monotonic()
            if data is not None:
                if trace is not None and trace.ON:
                    trace.datagram_received(data, server, now)
                if len(data) <= MAX_DATAGRAM and exchange.receive(data, server, now) is None:
                    return exchange.result
            exchange.handle_timer(now)  # not answered yet: the deadline may have passed meanwhile
        failure = exchange.failure(what)
        assert failure is not None  # ended without an answer: timed out or refused
        raise failure

    def _send_due(self, exchange: Exchange[Any], now: float, trace: Any) -> bool:
        """Send what `exchange` has due at `now` (its `handle_timer(now)` called first, when `now` is
        not when it was made). True if the send reported an ICMP port unreachable, which ends every
        exchange of the caller (the socket is connected to the one server they all talk to)."""
        refused = False
        for datagram in exchange.datagrams_to_send(now):
            if trace is not None and trace.ON:
                trace.datagram_sent(datagram, self._server, exchange.started, exchange.transmissions)
            try:
                self._sock.send(datagram)
            except ConnectionRefusedError:
                refused = True
            except OSError:
                pass  # lost, as a datagram can be: retransmission covers it
        return refused

    def _unreachable(self, exchanges: list[Exchange[Any]], trace: Any = None) -> None:
        """ICMP port unreachable from the server (the socket is connected to it): every exchange ends."""
        if trace is not None and trace.ON:
            trace.unreachable(self._server)
        for exchange in exchanges:
            exchange.unreachable()

    def _natpmp_server(self) -> tuple[IPv4Address, int]:
        if self._natpmp_at is None:
            self._natpmp_at = natpmp_client.check_gateway(self._server[0]), self._server[1]
        return self._natpmp_at

    def _pcp_nonces(self) -> pcp_client.Nonces:
        """The session's PCP nonces (RFC 6887 §11.1), made on the first PCP request: the host secret is
        read then, not for a NAT-PMP-only session."""
        if self._nonces is None:
            from autonat.aio.pcp import Nonces
            from autonat.state import host_secret

            self._nonces = Nonces(host_secret(), self.location.local_address)
        return self._nonces

    # --- NAT-PMP and PCP ------------------------------------------------------------------------------

    def external_address(self) -> IPv4Address:
        """RFC 6886 §3.2 (NAT-PMP): the gateway's external IPv4 address. RouterTimeout,
        RouterUnreachable or RouterRefused with a one-line reason."""
        server = self._natpmp_at or self._natpmp_server()
        exchange = natpmp_client.external_address_exchange(server, time.monotonic(), self.deadline)
        reply = self._one(exchange, self._natpmp_what)
        natpmp_client.check(reply)
        self._address.learned(reply, time.monotonic())
        address: IPv4Address = reply.external_address
        return address

    def _select(self) -> str:
        """The protocol "auto" means: PCP if the gateway answers an ANNOUNCE (RFC 6887 §14.1), else
        NAT-PMP if it answers an external-address request, both asked at once; kept for the session."""
        if self._selected is not None:
            return self._selected
        from autonat.aio import pcp as pcp_client
        from autonat.proto import pcp

        now = time.monotonic()
        local = self.location.local_address
        announce = pcp_client.exchange_for(pcp.Request.announce(local), self._server, now, self.deadline)
        exchanges: list[tuple[Exchange[Any], str]] = [(announce, self._pcp_what)]
        address = None
        if isinstance(self._server[0], IPv4Address):
            address = natpmp_client.external_address_exchange(self._natpmp_server(), now, self.deadline)
            exchanges.append((address, self._natpmp_what))
        self._run(exchanges, grace=PROBE_GRACE)
        reasons = []
        try:
            pcp_client.check(self._finish(announce, self._pcp_what))
            self._selected = "pcp"
        except (RouterTimeout, RouterRefused) as exc:
            reasons.append(f"pcp: {exc}")
        if address is not None:
            try:
                reply = self._finish(address, self._natpmp_what)
                natpmp_client.check(reply)
                self._address.learned(reply, time.monotonic())
                self._selected = self._selected or "natpmp"
            except (RouterTimeout, RouterRefused) as exc:
                reasons.append(f"natpmp: {exc}")
        if self._selected is None:
            # Neither answered on port 5351: UPnP IGD, the slower discovery, only now (RouterSession's
            # burst asks all three at once; a blocking session asks in turn).
            try:
                self.upnp.discover()
                self._selected = "upnp"
            except (RouterTimeout, RouterRefused, ProtocolUnavailable) as exc:
                reasons.append(f"upnp: {exc}")
        if self._selected is None:
            raise ProtocolUnavailable(f"no port-mapping protocol works with {self._server[0]} ({'; '.join(reasons)})")
        return self._selected

    @staticmethod
    def _finish(exchange: Exchange[Any], what: str) -> Any:
        failure = exchange.failure(what)
        if failure is not None:
            raise failure
        if not exchange.done:
            raise RouterTimeout(f"no answer from {what} within {PROBE_GRACE * 1000:.0f} ms after the other protocol")
        return exchange.result

    def add(self, request: MappingRequest, protocol: BlockingChoice = "auto") -> Mapping:
        """Map `request` through PCP, NAT-PMP or UPnP IGD ("auto": PCP if the gateway speaks it, else
        NAT-PMP, else UPnP). Logs the hole on the `autonat.holes` logger. Raises RouterRefused /
        RouterTimeout / ProtocolUnavailable."""
        chosen = self._select() if protocol == "auto" else protocol
        local = self.location.local_address
        if chosen == "pcp":
            # From the module itself, not `from autonat.aio import pcp`: a package's fromlist goes through
            # importlib's Python code on every call, a module's does not.
            from autonat.aio.pcp import check, exchange_for, map_request, mapping_from

            nonce = (self._nonces or self._pcp_nonces())(request.transport, request.internal_port)
            exchange = exchange_for(map_request(local, nonce, request), self._server, time.monotonic(), self.deadline)
            reply = check(self._one(exchange, self._pcp_what))
            mapping = mapping_from(reply, request, local, self._max_lifetime)
        elif chosen == "natpmp":
            mapping = self._natpmp_add(request, local)
        elif chosen == "upnp":
            return self.upnp.add(request)  # logs its hole itself
        else:
            raise ValueError(f"protocol must be auto, pcp, natpmp or upnp, not {protocol!r}")
        holes = hole_logger()
        if holes is not None:
            holes.info("opened %s", mapping.describe())
        return mapping

    def _natpmp_add(self, request: MappingRequest, local: IPv4Address | IPv6Address) -> Mapping:
        """RFC 6886 §3.3, with the external address as `NatPmpClient.add` gets it (ADDRESS_TRUST)."""
        now = time.monotonic()
        server = self._natpmp_at or self._natpmp_server()
        exchange = natpmp_client.map_exchange(server, natpmp_client.map_request(request), now, self.deadline)
        address = None
        if self._address.fresh(now):
            reply = self._one(exchange, self._natpmp_what)
        else:
            address = natpmp_client.external_address_exchange(server, now, self.deadline)
            self._run([(exchange, self._natpmp_what), (address, self._natpmp_what)])
            reply = self._finish(exchange, self._natpmp_what)
        natpmp_client.check(reply)
        external = None
        if address is not None and not address.failed:
            answer = address.result
            if isinstance(answer, natpmp.ExternalAddressResponse) and answer.result == natpmp.ResultCode.SUCCESS:
                self._address.learned(answer, time.monotonic())
                external = answer.external_address
        else:
            external = self._address.still_valid(reply.epoch, time.monotonic())
            if external is None:
                try:
                    external = self.external_address()
                except (RouterTimeout, RouterRefused):
                    external = None  # the mapping exists; an unknown address is reported, not fatal
        return natpmp_client.mapping_from(reply, request, local, external, self._max_lifetime)

    def delete(self, transport: Transport, internal_port: int, protocol: BlockingChoice = "auto") -> str:
        """Delete our mapping of `internal_port`; one that is not there is success. Returns the
        protocol used."""
        chosen = self._select() if protocol == "auto" else protocol
        local = self.location.local_address
        if chosen == "pcp":
            from autonat.aio.pcp import check, deleted, exchange_for  # modules, not packages: see add
            from autonat.proto.pcp import Request

            nonce = (self._nonces or self._pcp_nonces())(transport, internal_port)
            request = Request.delete(local, nonce, transport, internal_port)
            exchange = exchange_for(request, self._server, time.monotonic(), self.deadline)
            try:
                check(self._one(exchange, self._pcp_what))
            except RouterRefused as exc:
                if not deleted(exc):
                    raise
        elif chosen == "natpmp":
            unmap = natpmp_client.map_exchange(
                self._natpmp_at or self._natpmp_server(),
                natpmp.MapRequest.delete(transport, internal_port),
                time.monotonic(),
                self.deadline,
            )
            natpmp_client.check(self._one(unmap, self._natpmp_what))
        elif chosen == "upnp":
            self.upnp.delete(transport, internal_port)  # logs its hole itself
            return chosen
        else:
            raise ValueError(f"protocol must be auto, pcp, natpmp or upnp, not {protocol!r}")
        holes = hole_logger()
        if holes is not None:
            holes.info("closed %s %s:%d via %s", transport, local, internal_port, chosen)
        return chosen

    def remove(self, mapping: Mapping) -> None:
        """Delete a mapping `add` returned, through the protocol that made it (UPnP: by its external
        port, one call)."""
        if mapping.protocol == "upnp":
            self.upnp.remove(mapping)
        elif mapping.protocol in ("pcp", "natpmp"):
            self.delete(mapping.transport, mapping.internal_port, "pcp" if mapping.protocol == "pcp" else "natpmp")
        else:
            raise ValueError(f"not a mapping made by a BlockingSession: protocol {mapping.protocol!r}")


def external_address(
    gateway: str | None = None, interface: str | None = None, timeout: float = DEFAULT_DEADLINE
) -> IPv4Address:
    """The router's external IPv4 address, asked once over NAT-PMP (RFC 6886 §3.2), no event loop."""
    with BlockingSession.open(gateway, interface, timeout) as router:
        return router.external_address()


def open_router(
    gateway: str | None = None,
    interface: str | None = None,
    timeout: float = DEFAULT_DEADLINE,
    *,
    max_lifetime: int = MAX_GRANTED_LIFETIME,
) -> BlockingSession:
    """A `BlockingSession` with the router (a context manager): PCP, NAT-PMP and UPnP IGD without an event
    loop."""
    return BlockingSession.open(gateway, interface, timeout, max_lifetime=max_lifetime)
