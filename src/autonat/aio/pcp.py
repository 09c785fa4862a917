"""PCP client (RFC 6887) over a `DatagramChannel`: ANNOUNCE, MAP, delete.

As in `autonat.aio.natpmp`, the module-level functions build the exchanges and read the replies for
both shells (`PcpClient` here, `autonat.aio.blocking` without an event loop); no asyncio import.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv6Address

from autonat.addresses import is_public
from autonat.errors import NotPublic, RouterNotFound, RouterRefused, RouterTimeout
from autonat.mapper import (
    MAX_GRANTED_LIFETIME,
    Mapping,
    MappingRequest,
    ProtocolStatus,
    cap_grant,
    check_max_lifetime,
)
from autonat.proto import pcp
from autonat.proto.errors import DecodeError
from autonat.proto.exchange import DEFAULT_DEADLINE, PCP_SCHEDULE, Exchange
from autonat.proto.record import from_wire
from autonat.proto.types import Transport
from autonat.state import NonceDeriver

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the cold path: proto/record.py)
if TYPE_CHECKING:
    from autonat.aio.channel import DatagramChannel

NAME = "pcp"
MAX_CODES = 32  # distinct result codes counted per client
NONCE_CACHE = 4096  # nonces remembered per client (an HMAC each otherwise); a daemon maps far fewer ports
PcpReply = pcp.Response | pcp.VersionNotSupported
_SUCCESS = pcp.ResultCode.SUCCESS


def _expect(opcode: int, map_data: pcp.MapData | None) -> Callable[[bytes], PcpReply]:
    """RFC 6887 §8.3 / §11.4: a reply answers our request only if opcode (and for MAP the nonce,
    protocol and internal port) match."""

    if map_data is not None:  # what a MAP reply must echo, read once
        nonce, protocol, internal_port = map_data.nonce, map_data.protocol, map_data.internal_port

    def parse(data: bytes) -> PcpReply:
        reply = pcp.parse_response(data)
        if isinstance(reply, pcp.VersionNotSupported):
            return reply
        if reply.opcode != opcode:
            raise DecodeError("reply to another PCP opcode")
        if map_data is not None:
            answer = reply.map
            if answer is None:
                raise DecodeError("PCP MAP reply without MAP data")
            if answer.nonce != nonce:
                raise DecodeError("PCP reply with another nonce")
            if reply.result == _SUCCESS and (answer.protocol != protocol or answer.internal_port != internal_port):
                raise DecodeError("PCP reply for another mapping")
        return reply

    return parse


def exchange_for(
    request: pcp.Request, server: tuple[IPv4Address | IPv6Address, int], now: float, deadline: float
) -> Exchange[PcpReply]:
    return Exchange(
        request.encode(),
        server,
        _expect(request.opcode, request.map),
        now=now,
        deadline=deadline,
        schedule=PCP_SCHEDULE,
        key=pcp.request_key(request),
    )


def check(reply: PcpReply) -> pcp.Response:
    """The reply if it is a SUCCESS; else RouterRefused, or NotPublic when the router refused and
    reports a private external address (RFC 6887 §7.4, §11.4)."""
    if isinstance(reply, pcp.VersionNotSupported):
        raise RouterRefused(
            f"router does not speak PCP (it answered with version {reply.server_version}"
            f"{', i.e. NAT-PMP only' if reply.server_version == 0 else ''})",
            protocol=NAME,
            code=pcp.ResultCode.UNSUPP_VERSION,
        )
    if reply.result != pcp.ResultCode.SUCCESS:
        external = reply.map.external_address if reply.map is not None else None
        if external is not None and not external.is_unspecified and not is_public(external):
            # miniupnpd behind another NAT refuses with its own private WAN address here.
            raise NotPublic(
                f"router refused ({pcp.describe_result(reply.result)}) and reports the private"
                f" external address {external}: double NAT, no mapping from the internet is possible"
            )
        raise RouterRefused(f"router refused: {pcp.describe_result(reply.result)}", protocol=NAME, code=reply.result)
    return reply


def map_request(local: IPv4Address | IPv6Address, nonce: bytes, request: MappingRequest) -> pcp.Request:
    """RFC 6887 §11: MAP for our own address (no THIRD_PARTY). For an IPv6 address it is a pinhole
    (§11.1 on a firewall): the suggested external address is `::` and the suggested external port the
    internal one, which is what a firewall grants (miniupnpd echoes the suggestion on a refresh:
    docs/QUIRKS.md P6)."""
    if isinstance(local, IPv6Address):
        return pcp.Request.new_map(
            local,
            nonce,
            request.transport,
            request.internal_port,
            request.lifetime,
            suggested_external_port=request.internal_port,
            suggested_external_address=pcp.UNSPECIFIED_IPV6,
        )
    return pcp.Request.new_map(
        local,
        nonce,
        request.transport,
        request.internal_port,
        request.lifetime,
        suggested_external_port=request.external_port,
    )


def mapping_from(
    reply: pcp.Response, request: MappingRequest, local: IPv4Address | IPv6Address, max_lifetime: int
) -> Mapping:
    data = reply.map
    assert data is not None
    # Mapping's __init__ only stores its fields: built as a decoded value is (natpmp.mapping_from too).
    mapping = from_wire(
        Mapping, NAME, request.transport, local, data.internal_port, data.external_address, data.external_port,
        reply.lifetime, reply.epoch, None,
    )  # fmt: skip
    return cap_grant(mapping, max_lifetime)


def deleted(exc: RouterRefused) -> bool:
    """miniupnpd answers NO_RESOURCES when it holds no such mapping (measured in the lab); deleting
    consumes no resources, so that answer means "not there", which is what a delete wants."""
    return exc.code == pcp.ResultCode.NO_RESOURCES


class Nonces:
    """Each mapping's nonce (RFC 6887 §11.1), derived from the host secret (autonat.state), remembered."""

    __slots__ = ("_cache", "_derive")

    def __init__(self, secret: bytes, local: IPv4Address | IPv6Address) -> None:
        # derive_nonce(secret, "pcp", local, transport, port), the common prefix hashed once
        self._derive = NonceDeriver(secret, f"pcp|{local}|")
        self._cache: dict[tuple[Transport, int], bytes] = {}

    def __call__(self, transport: Transport, internal_port: int) -> bytes:
        nonce = self._cache.get((transport, internal_port))
        if nonce is None:
            nonce = self._derive(f"{transport}|{internal_port}")
            if len(self._cache) < NONCE_CACHE:
                self._cache[(transport, internal_port)] = nonce
        return nonce


class PcpClient:
    """Implements `PortMapper` with PCP MAP requests for our own address (no THIRD_PARTY)."""

    name = NAME

    def __init__(
        self,
        channel: DatagramChannel,
        gateway: IPv4Address | IPv6Address,
        local_address: IPv4Address | IPv6Address,
        secret: bytes,
        *,
        deadline: float = DEFAULT_DEADLINE,
        port: int = pcp.SERVER_PORT,
        max_lifetime: int = MAX_GRANTED_LIFETIME,
    ) -> None:
        self._channel = channel
        self._gateway = gateway
        self._local = local_address
        self._secret = secret
        self._deadline = deadline
        self._port = port
        self._max_lifetime = check_max_lifetime(max_lifetime)
        self._what = f"PCP at {gateway}:{port}"
        self._nonces = Nonces(secret, local_address)
        # Every non-zero result the server answered (handled or final), by code.
        self.router_codes: Counter[int] = Counter()

    def nonce_for(self, transport: Transport, internal_port: int) -> bytes:
        """Stable per mapping, so a later process (or a restarted daemon) can refresh or delete it."""
        return self._nonces(transport, internal_port)

    async def _exchange(self, request: pcp.Request) -> PcpReply:
        loop = self._channel.loop
        exchange = exchange_for(request, (self._gateway, self._port), loop.time(), self._deadline)
        reply = await self._channel.request(exchange, self._what)
        code = reply.result if isinstance(reply, pcp.Response) else pcp.ResultCode.UNSUPP_VERSION
        if code != pcp.ResultCode.SUCCESS and (code in self.router_codes or len(self.router_codes) < MAX_CODES):
            self.router_codes[int(code)] += 1
        return reply

    async def _run(self, request: pcp.Request) -> pcp.Response:
        return check(await self._exchange(request))

    async def probe(self) -> ProtocolStatus:
        """RFC 6887 §14.1: an ANNOUNCE request tells whether a PCP server is there, without mapping."""
        loop = self._channel.loop
        started = loop.time()
        try:
            reply = await self._run(pcp.Request.announce(self._local))
        except (RouterTimeout, RouterRefused, RouterNotFound, NotPublic) as exc:
            return ProtocolStatus(
                NAME,
                available=False,
                reason=str(exc),
                elapsed_ms=(loop.time() - started) * 1000,
                details={"answered": isinstance(exc, RouterRefused)},
            )
        return ProtocolStatus(
            NAME,
            available=True,
            reason="ANNOUNCE answered",
            epoch=reply.epoch,
            elapsed_ms=(loop.time() - started) * 1000,
            details={"answered": True},
        )

    async def add(self, request: MappingRequest) -> Mapping:
        """RFC 6887 §11: MAP for our own address; the reply carries the external address and port."""
        nonce = self._nonces(request.transport, request.internal_port)
        reply = await self._run(map_request(self._local, nonce, request))
        return mapping_from(reply, request, self._local, self._max_lifetime)

    async def delete(self, transport: Transport, internal_port: int) -> None:
        """RFC 6887 §15: MAP with lifetime 0 and the mapping's nonce (see `deleted` for NO_RESOURCES)."""
        request = pcp.Request.delete(self._local, self._nonces(transport, internal_port), transport, internal_port)
        reply = await self._exchange(request)
        if isinstance(reply, pcp.Response) and reply.result == pcp.ResultCode.NO_RESOURCES:
            # Whatever address it carries: miniupnpd behind another NAT refuses every MAP so, with its
            # private WAN address (docs/QUIRKS.md P1), and so holds nothing to delete.
            return
        try:
            check(reply)
        except RouterRefused as exc:
            if not deleted(exc):
                raise


class PcpPinholeClient(PcpClient):
    """PCP MAP for our own IPv6 address: a firewall pinhole (RFC 6887 §11 on a firewall, §11.1: the
    "external" address and port are the internal ones). The channel must be bound to that address: the
    server checks the client-IP field against the source (§8.2; ADDRESS_MISMATCH otherwise, docs/QUIRKS.md
    U16).

    Two miniupnpd 2.3.1 quirks, measured in the lab, are handled here:
    - after its pinhole rule vanished (a flushed ruleset), the first refresh is answered NO_RESOURCES and
      the router forgets the pinhole; the next MAP makes it again, so that MAP is sent at once (P7);
    - a delete with a nonce other than the one that made the pinhole (made by another program, or before
      the host secret was reset) is refused NOT_AUTHORIZED (RFC 6887 §11.3), and nothing else can close
      it over PCP, so `fallback_delete` (the session's UPnP DeletePinhole, when the router speaks IGD:2)
      closes it instead; without one the refusal stands and the engine retries until the lease is over (P8).
    """

    def __init__(
        self,
        channel: DatagramChannel,
        gateway: IPv4Address | IPv6Address,
        local_address: IPv4Address | IPv6Address,
        secret: bytes,
        *,
        deadline: float = DEFAULT_DEADLINE,
        port: int = pcp.SERVER_PORT,
        max_lifetime: int = MAX_GRANTED_LIFETIME,
    ) -> None:
        if not isinstance(local_address, IPv6Address):
            raise ValueError(f"pinholes are for an IPv6 address, not {local_address}")
        super().__init__(
            channel, gateway, local_address, secret, deadline=deadline, port=port, max_lifetime=max_lifetime
        )
        self.fallback_delete: Callable[[Transport, int], Awaitable[None]] | None = None

    async def add(self, request: MappingRequest) -> Mapping:
        nonce = self._nonces(request.transport, request.internal_port)
        mapping_request = map_request(self._local, nonce, request)
        reply = await self._exchange(mapping_request)
        if isinstance(reply, pcp.Response) and reply.result == pcp.ResultCode.NO_RESOURCES:
            reply = await self._exchange(mapping_request)  # P7: the second MAP makes it again
        granted = mapping_from(check(reply), request, self._local, self._max_lifetime)
        # §11.1 on a firewall: the pinhole is our own address and port, whatever the answer echoed (P6).
        return granted.replace(external_ip=self._local, external_port=request.internal_port)

    async def delete(self, transport: Transport, internal_port: int) -> None:
        request = pcp.Request.delete(self._local, self._nonces(transport, internal_port), transport, internal_port)
        reply = await self._exchange(request)
        if isinstance(reply, pcp.Response):
            if reply.result == pcp.ResultCode.NO_RESOURCES:
                return  # nothing held (P2)
            if reply.result == pcp.ResultCode.NOT_AUTHORIZED and self.fallback_delete is not None:
                await self.fallback_delete(transport, internal_port)  # P8
                return
        check(reply)
