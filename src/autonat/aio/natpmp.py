"""NAT-PMP client (RFC 6886) over a `DatagramChannel`: external address, map, unmap.

The module-level functions build the exchanges and read the replies; `NatPmpClient` (asyncio) and
`autonat.aio.blocking` (no event loop) both drive them, so the two shells decide nothing on their own.
This module imports no asyncio itself: the blocking shell uses it without loading an event loop.

A map request with no external port in mind suggests the internal port, as §3.3 says a client
normally does, never 0: MikroTik RouterOS refuses a suggested port of 0 ("unable to allocate port for
mapping *:0", docs/QUIRKS.md P5).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from autonat.errors import RouterNotFound, RouterRefused, RouterTimeout
from autonat.mapper import (
    MAX_GRANTED_LIFETIME,
    Mapping,
    MappingRequest,
    ProtocolStatus,
    cap_grant,
    check_max_lifetime,
)
from autonat.proto import natpmp
from autonat.proto.epoch import natpmp_epoch_valid
from autonat.proto.errors import DecodeError
from autonat.proto.exchange import DEFAULT_DEADLINE, NATPMP_SCHEDULE, Exchange
from autonat.proto.record import from_wire
from autonat.proto.types import Transport

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the cold path: proto/record.py)
if TYPE_CHECKING:
    from autonat.aio.channel import DatagramChannel

NAME = "natpmp"
ADDRESS_TRUST = 30.0
"""How long an external address learned from the gateway (RFC 6886 §3.2) is reused for the Mapping a
later map request returns, instead of asking again beside every map (§3.3's reply carries no address).
Only while the map reply's epoch shows no loss of state (§3.6): a rebooted gateway is asked again. An
address change without a reboot is multicast by the gateway (§3.2.1), which the engine listens for; a
one-shot caller sees it at most this late, the same trust a probe's choice gets (router.PROBE_TRUST)."""

MAX_CODES = 32  # distinct result codes counted per client (the field is a byte: 256 at most anyway)

NatPmpReply = natpmp.ExternalAddressResponse | natpmp.MapResponse | natpmp.ErrorResponse

_EXTERNAL_ADDRESS_REQUEST = natpmp.ExternalAddressRequest()
_EXTERNAL_ADDRESS_BYTES = _EXTERNAL_ADDRESS_REQUEST.encode()
_EXTERNAL_ADDRESS_KEY = natpmp.request_key(_EXTERNAL_ADDRESS_REQUEST)


def _opcode(reply: NatPmpReply) -> int:
    if isinstance(reply, natpmp.ExternalAddressResponse):
        return natpmp.Opcode.EXTERNAL_ADDRESS
    if isinstance(reply, natpmp.MapResponse):
        return natpmp.Opcode.for_transport(reply.transport)
    return reply.opcode


def _expect_external_address(data: bytes) -> natpmp.ExternalAddressResponse | natpmp.ErrorResponse:
    """RFC 6886 §3.2: only a reply with opcode 128 answers an external-address request."""
    reply = natpmp.parse_response(data)
    if type(reply) is natpmp.ExternalAddressResponse:  # the answer: asked first
        return reply
    if isinstance(reply, natpmp.MapResponse) or _opcode(reply) != natpmp.Opcode.EXTERNAL_ADDRESS:
        raise DecodeError("reply to another NAT-PMP request")
    return reply


def _expect_map(
    transport: Transport, internal_port: int
) -> Callable[[bytes], natpmp.MapResponse | natpmp.ErrorResponse]:
    """RFC 6886 §3.3: a reply answers a mapping request only with its opcode (+128: its transport) and,
    in the full form, its internal port."""

    def parse(data: bytes) -> natpmp.MapResponse | natpmp.ErrorResponse:
        reply = natpmp.parse_response(data)
        if type(reply) is natpmp.MapResponse:  # the full form, the answer: asked first
            if reply.transport is not transport:
                raise DecodeError("reply to another NAT-PMP request")
            if reply.internal_port != internal_port:
                raise DecodeError("NAT-PMP reply for another internal port")
            return reply
        if isinstance(reply, natpmp.ErrorResponse) and reply.opcode == natpmp.Opcode.for_transport(transport):
            return reply  # the short error form (§3.5) of our opcode
        raise DecodeError("reply to another NAT-PMP request")

    return parse


def check_gateway(gateway: IPv4Address | IPv6Address) -> IPv4Address:
    if not isinstance(gateway, IPv4Address):
        raise RouterNotFound("NAT-PMP needs an IPv4 gateway")
    return gateway


def external_address_exchange(
    server: tuple[IPv4Address, int], now: float, deadline: float
) -> Exchange[natpmp.ExternalAddressResponse | natpmp.ErrorResponse]:
    """RFC 6886 §3.2, the request is two constant bytes: built once for the process."""
    return Exchange(
        _EXTERNAL_ADDRESS_BYTES,
        server,
        _expect_external_address,
        now=now,
        deadline=deadline,
        schedule=NATPMP_SCHEDULE,
        key=_EXTERNAL_ADDRESS_KEY,
    )


def map_exchange(
    server: tuple[IPv4Address, int], request: natpmp.MapRequest, now: float, deadline: float
) -> Exchange[natpmp.MapResponse | natpmp.ErrorResponse]:
    """RFC 6886 §3.3 (and §3.4, lifetime 0: delete)."""
    return Exchange(
        request.encode(),
        server,
        _expect_map(request.transport, request.internal_port),
        now=now,
        deadline=deadline,
        schedule=NATPMP_SCHEDULE,
        key=natpmp.request_key(request),
    )


def map_request(request: MappingRequest) -> natpmp.MapRequest:
    """RFC 6886 §3.3. No external port asked for: suggest the internal port ("the client normally
    requests the external port matching the internal port"); the gateway still picks another when that
    one is taken. Not 0: MikroTik RouterOS 7.14 refuses it (docs/QUIRKS.md P5)."""
    suggested = request.external_port or request.internal_port
    return natpmp.MapRequest(request.transport, request.internal_port, suggested, request.lifetime)


def check(reply: NatPmpReply) -> None:
    """RouterRefused for any result but SUCCESS (RFC 6886 §3.5)."""
    if reply.result != natpmp.ResultCode.SUCCESS:
        raise RouterRefused(f"router refused: {natpmp.describe_result(reply.result)}", protocol=NAME, code=reply.result)


def mapping_from(
    reply: natpmp.MapResponse,
    request: MappingRequest,
    local: IPv4Address | IPv6Address,
    external: IPv4Address | None,
    max_lifetime: int,
) -> Mapping:
    # Mapping's __init__ only stores its fields: built as a decoded value is, in field order (unique_id
    # None), with the from_wire the reply was just decoded with.
    mapping = from_wire(
        Mapping, NAME, request.transport, local, reply.internal_port, external, reply.external_port,
        reply.lifetime, reply.epoch, None,
    )  # fmt: skip
    return cap_grant(mapping, max_lifetime)


class KnownAddress:
    """The external address last learned from one gateway, with the epoch and time it came with."""

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: tuple[IPv4Address, int, float] | None = None

    def learned(self, reply: natpmp.ExternalAddressResponse, now: float) -> None:
        self._known = (reply.external_address, reply.epoch, now)

    def fresh(self, now: float) -> bool:
        return self._known is not None and now - self._known[2] <= ADDRESS_TRUST

    def still_valid(self, epoch: int, now: float) -> IPv4Address | None:
        """The address, if it is fresh and `epoch` (from a later reply) shows no reboot (§3.6)."""
        known = self._known
        if known is None or now - known[2] > ADDRESS_TRUST:
            return None
        if not natpmp_epoch_valid(known[1], known[2], epoch, now):
            self._known = None
            return None
        return known[0]


class NatPmpClient:
    """Implements `PortMapper` with NAT-PMP; the gateway must be IPv4 (RFC 6886 is IPv4-only)."""

    name = NAME

    def __init__(
        self,
        channel: DatagramChannel,
        gateway: IPv4Address | IPv6Address,
        local_address: IPv4Address | IPv6Address,
        *,
        deadline: float = DEFAULT_DEADLINE,
        port: int = natpmp.SERVER_PORT,
        max_lifetime: int = MAX_GRANTED_LIFETIME,
    ) -> None:
        self._channel = channel
        self._gateway = gateway
        self._local = local_address
        self._deadline = deadline
        self._port = port
        self._max_lifetime = check_max_lifetime(max_lifetime)
        self._what = f"NAT-PMP at {gateway}:{port}"
        self._address = KnownAddress()
        # Every non-zero result the gateway answered (handled or final), by code.
        self.router_codes: Counter[int] = Counter()

    def _check(self, reply: NatPmpReply) -> None:
        if reply.result != natpmp.ResultCode.SUCCESS and (
            reply.result in self.router_codes or len(self.router_codes) < MAX_CODES
        ):
            self.router_codes[reply.result] += 1
        check(reply)

    def _server(self) -> tuple[IPv4Address, int]:
        return check_gateway(self._gateway), self._port

    async def external_address(self) -> natpmp.ExternalAddressResponse:
        """RFC 6886 §3.2: the gateway's external IPv4 address and its epoch.

        UNSUPPORTED_VERSION in answer is asked again once. A NAT-PMP-only gateway (MikroTik RouterOS,
        docs/QUIRKS.md P5) answers the PCP ANNOUNCE of the same probe burst with exactly those 8 bytes
        (RFC 6886 §3.5: version 0, opcode 128, result 1), which cannot be told from an answer to this
        request; its real answer to ours, or to the second asking, follows. A PCP-only gateway says
        UNSUPPORTED_VERSION twice (RFC 6887 §9), which is its true answer."""
        loop = self._channel.loop
        exchange = external_address_exchange(self._server(), loop.time(), self._deadline)
        reply = await self._channel.request(exchange, self._what)
        if reply.result == natpmp.ResultCode.UNSUPPORTED_VERSION:
            exchange = external_address_exchange(self._server(), loop.time(), self._deadline)
            reply = await self._channel.request(exchange, self._what)
        self._check(reply)
        assert isinstance(reply, natpmp.ExternalAddressResponse)
        self._address.learned(reply, loop.time())
        return reply

    async def probe(self) -> ProtocolStatus:
        loop = self._channel.loop
        started = loop.time()
        try:
            reply = await self.external_address()
        except (RouterTimeout, RouterRefused, RouterNotFound) as exc:
            answered = isinstance(exc, RouterRefused)
            # The result code tells a router without a WAN address (3 with 0.0.0.0, docs/QUIRKS.md P1).
            result = {"result": exc.code} if isinstance(exc, RouterRefused) else {}
            return ProtocolStatus(
                NAME,
                available=False,
                reason=str(exc),
                elapsed_ms=(loop.time() - started) * 1000,
                details={"answered": answered, **result},
            )
        return ProtocolStatus(
            NAME,
            available=True,
            reason="external address request answered",
            external_ip=reply.external_address,
            epoch=reply.epoch,
            elapsed_ms=(loop.time() - started) * 1000,
            details={"answered": True},
        )

    async def add(self, request: MappingRequest) -> Mapping:
        """RFC 6886 §3.3. The external address comes from a §3.2 request on the same socket, sent
        beside the map request unless one answered within ADDRESS_TRUST (see there)."""
        import asyncio

        loop = self._channel.loop
        exchange = map_exchange(self._server(), map_request(request), loop.time(), self._deadline)
        address_task = None if self._address.fresh(loop.time()) else asyncio.ensure_future(self.external_address())
        try:
            reply = await self._channel.request(exchange, self._what)
            self._check(reply)
        except BaseException:
            if address_task is not None:
                address_task.cancel()
            raise
        assert isinstance(reply, natpmp.MapResponse)
        external = None if address_task is not None else self._address.still_valid(reply.epoch, loop.time())
        if external is None:
            try:
                answer = await (address_task or asyncio.ensure_future(self.external_address()))
                external = answer.external_address
            except (RouterTimeout, RouterRefused):
                external = None  # the mapping exists; an unknown address is reported, not fatal
        return mapping_from(reply, request, self._local, external, self._max_lifetime)

    async def anonymous_port(self, transport: Transport, internal_port: int, lifetime: int) -> int:
        """The result code (0: granted) of RFC 6886 §3.3's request for an "anonymous" port (suggested
        external port 0) for `internal_port`. `add` never sends one (docs/QUIRKS.md P5); `autonat doctor`
        asks with this whether the gateway refuses it. A grant is the mapping of `internal_port` itself
        (§3.3: one mapping per internal port), so deleting that port removes it."""
        loop = self._channel.loop
        request = natpmp.MapRequest(transport, internal_port, 0, lifetime)
        exchange = map_exchange(self._server(), request, loop.time(), self._deadline)
        reply = await self._channel.request(exchange, self._what)
        try:
            self._check(reply)
        except RouterRefused as exc:
            return exc.code
        return 0

    async def delete(self, transport: Transport, internal_port: int) -> None:
        """RFC 6886 §3.4: lifetime 0 and external port 0 remove our mapping of `internal_port`."""
        loop = self._channel.loop
        exchange = map_exchange(
            self._server(), natpmp.MapRequest.delete(transport, internal_port), loop.time(), self._deadline
        )
        reply = await self._channel.request(exchange, self._what)
        self._check(reply)
