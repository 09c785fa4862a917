"""NAT-PMP client (RFC 6886) over a `DatagramChannel`: external address, map, unmap."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from autonat.aio.channel import DatagramChannel
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
from autonat.proto.errors import DecodeError
from autonat.proto.exchange import DEFAULT_DEADLINE, NATPMP_SCHEDULE, Exchange
from autonat.proto.types import Transport

NAME = "natpmp"


NatPmpReply = natpmp.ExternalAddressResponse | natpmp.MapResponse | natpmp.ErrorResponse


def _opcode(reply: NatPmpReply) -> int:
    if isinstance(reply, natpmp.ExternalAddressResponse):
        return natpmp.Opcode.EXTERNAL_ADDRESS
    if isinstance(reply, natpmp.MapResponse):
        return natpmp.Opcode.for_transport(reply.transport)
    return reply.opcode


def _expect_external_address(data: bytes) -> natpmp.ExternalAddressResponse | natpmp.ErrorResponse:
    """RFC 6886 §3.2: only a reply with opcode 128 answers an external-address request."""
    reply = natpmp.parse_response(data)
    if isinstance(reply, natpmp.MapResponse) or _opcode(reply) != natpmp.Opcode.EXTERNAL_ADDRESS:
        raise DecodeError("reply to another NAT-PMP request")
    return reply


def _expect_map(
    transport: Transport, internal_port: int
) -> Callable[[bytes], natpmp.MapResponse | natpmp.ErrorResponse]:
    opcode = natpmp.Opcode.for_transport(transport)

    def parse(data: bytes) -> natpmp.MapResponse | natpmp.ErrorResponse:
        reply = natpmp.parse_response(data)
        if isinstance(reply, natpmp.ExternalAddressResponse) or _opcode(reply) != opcode:
            raise DecodeError("reply to another NAT-PMP request")
        if isinstance(reply, natpmp.MapResponse) and reply.internal_port != internal_port:
            raise DecodeError("NAT-PMP reply for another internal port")
        return reply

    return parse


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

    async def _run(
        self, request: natpmp.ExternalAddressRequest | natpmp.MapRequest, parse: Callable[[bytes], object]
    ) -> object:
        if not isinstance(self._gateway, IPv4Address):
            raise RouterNotFound("NAT-PMP needs an IPv4 gateway")
        loop = asyncio.get_running_loop()
        exchange = Exchange(
            request.encode(),
            (self._gateway, self._port),
            parse,
            now=loop.time(),
            deadline=self._deadline,
            schedule=NATPMP_SCHEDULE,
            key=natpmp.request_key(request),
        )
        reply = await self._channel.request(exchange, self._what)
        return reply

    @staticmethod
    def _raise_for(reply: NatPmpReply) -> None:
        if reply.result != natpmp.ResultCode.SUCCESS:
            raise RouterRefused(
                f"router refused: {natpmp.describe_result(reply.result)}", protocol=NAME, code=reply.result
            )

    async def external_address(self) -> natpmp.ExternalAddressResponse:
        """RFC 6886 §3.2: the gateway's external IPv4 address and its epoch."""
        reply = await self._run(natpmp.ExternalAddressRequest(), _expect_external_address)
        assert isinstance(reply, natpmp.ExternalAddressResponse | natpmp.ErrorResponse)
        self._raise_for(reply)
        assert isinstance(reply, natpmp.ExternalAddressResponse)
        return reply

    async def probe(self) -> ProtocolStatus:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            reply = await self.external_address()
        except (RouterTimeout, RouterRefused, RouterNotFound) as exc:
            answered = isinstance(exc, RouterRefused)
            return ProtocolStatus(
                NAME,
                available=False,
                reason=str(exc),
                elapsed_ms=(loop.time() - started) * 1000,
                details={"answered": answered},
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
        """RFC 6886 §3.3. The external address comes from a concurrent §3.2 request on the same socket."""
        map_request = natpmp.MapRequest(
            request.transport, request.internal_port, request.external_port, request.lifetime
        )
        address_task = asyncio.ensure_future(self.external_address())
        try:
            reply = await self._run(map_request, _expect_map(request.transport, request.internal_port))
        except BaseException:
            address_task.cancel()
            raise
        assert isinstance(reply, natpmp.MapResponse | natpmp.ErrorResponse)
        try:
            self._raise_for(reply)
        except RouterRefused:
            address_task.cancel()
            raise
        assert isinstance(reply, natpmp.MapResponse)
        try:
            external: IPv4Address | None = (await address_task).external_address
        except (RouterTimeout, RouterRefused):
            external = None  # the mapping exists; an unknown address is reported, not fatal
        mapping = Mapping(
            protocol=NAME,
            transport=request.transport,
            internal_address=self._local,
            internal_port=reply.internal_port,
            external_ip=external,
            external_port=reply.external_port,
            lifetime=reply.lifetime,
            epoch=reply.epoch,
        )
        return cap_grant(mapping, self._max_lifetime)

    async def delete(self, transport: Transport, internal_port: int) -> None:
        """RFC 6886 §3.4: lifetime 0 and external port 0 remove our mapping of `internal_port`."""
        reply = await self._run(
            natpmp.MapRequest.delete(transport, internal_port), _expect_map(transport, internal_port)
        )
        assert isinstance(reply, natpmp.MapResponse | natpmp.ErrorResponse)
        self._raise_for(reply)
