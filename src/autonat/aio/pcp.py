"""PCP client (RFC 6887) over a `DatagramChannel`: ANNOUNCE, MAP, delete."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from autonat.addresses import is_public
from autonat.aio.channel import DatagramChannel
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
from autonat.proto.types import Transport
from autonat.state import derive_nonce

NAME = "pcp"
PcpReply = pcp.Response | pcp.VersionNotSupported


def _expect(opcode: int, map_data: pcp.MapData | None) -> Callable[[bytes], PcpReply]:
    """RFC 6887 §8.3 / §11.4: a reply answers our request only if opcode (and for MAP the nonce,
    protocol and internal port) match."""

    def parse(data: bytes) -> PcpReply:
        reply = pcp.parse_response(data)
        if isinstance(reply, pcp.VersionNotSupported):
            return reply
        if reply.opcode != opcode:
            raise DecodeError("reply to another PCP opcode")
        if map_data is not None:
            if reply.map is None:
                raise DecodeError("PCP MAP reply without MAP data")
            if reply.map.nonce != map_data.nonce:
                raise DecodeError("PCP reply with another nonce")
            if reply.result == pcp.ResultCode.SUCCESS and (
                reply.map.protocol != map_data.protocol or reply.map.internal_port != map_data.internal_port
            ):
                raise DecodeError("PCP reply for another mapping")
        return reply

    return parse


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

    def nonce_for(self, transport: Transport, internal_port: int) -> bytes:
        """Stable per mapping, so a later process (or a restarted daemon) can refresh or delete it."""
        return derive_nonce(self._secret, "pcp", self._local, transport, internal_port)

    async def _run(self, request: pcp.Request) -> PcpReply:
        loop = asyncio.get_running_loop()
        exchange = Exchange(
            request.encode(),
            (self._gateway, self._port),
            _expect(request.opcode, request.map),
            now=loop.time(),
            deadline=self._deadline,
            schedule=PCP_SCHEDULE,
            key=pcp.request_key(request),
        )
        reply = await self._channel.request(exchange, self._what)
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
            raise RouterRefused(
                f"router refused: {pcp.describe_result(reply.result)}", protocol=NAME, code=reply.result
            )
        return reply

    async def probe(self) -> ProtocolStatus:
        """RFC 6887 §14.1: an ANNOUNCE request tells whether a PCP server is there, without mapping."""
        loop = asyncio.get_running_loop()
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
        assert isinstance(reply, pcp.Response)
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
        reply = await self._run(
            pcp.Request.new_map(
                self._local,
                self.nonce_for(request.transport, request.internal_port),
                request.transport,
                request.internal_port,
                request.lifetime,
                suggested_external_port=request.external_port,
            )
        )
        assert isinstance(reply, pcp.Response) and reply.map is not None
        mapping = Mapping(
            protocol=NAME,
            transport=request.transport,
            internal_address=self._local,
            internal_port=reply.map.internal_port,
            external_ip=reply.map.external_address,
            external_port=reply.map.external_port,
            lifetime=reply.lifetime,
            epoch=reply.epoch,
        )
        return cap_grant(mapping, self._max_lifetime)

    async def delete(self, transport: Transport, internal_port: int) -> None:
        """RFC 6887 §15: MAP with lifetime 0 and the mapping's nonce.

        miniupnpd answers NO_RESOURCES when it holds no such mapping (measured in the lab); deleting
        consumes no resources, so that answer means "not there", which is what a delete wants.
        """
        request = pcp.Request.delete(self._local, self.nonce_for(transport, internal_port), transport, internal_port)
        try:
            await self._run(request)
        except RouterRefused as exc:
            if exc.code != pcp.ResultCode.NO_RESOURCES:
                raise
