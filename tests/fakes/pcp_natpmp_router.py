"""A scriptable NAT-PMP + PCP server on loopback, for what the real router cannot be made to do:
hostile or wrong replies, silence, error results, an epoch that jumps back. Built on the project's own
codecs; the real behaviour is tested against miniupnpd in tests/lab."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, cast

from autonat.proto import natpmp, pcp

Reply = Callable[[bytes], list[bytes]]


@dataclass
class FakeRouter(asyncio.DatagramProtocol):
    """Answers like a well-behaved router unless a test sets `script` (request bytes -> datagrams)."""

    external: IPv4Address = field(default_factory=lambda: IPv4Address("203.0.113.1"))
    epoch: int = 1000
    natpmp_only: bool = False
    pcp_only: bool = False  # NAT-PMP requests get UNSUPPORTED_VERSION (RFC 6887 §9), as a PCP-only server sends
    silent: bool = False
    pcp_silent: bool = False
    granted_lifetime: int | None = None  # grant this instead of what was asked (deletes stay 0)
    script: Reply | None = None
    received: list[bytes] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None
    started: float = field(default_factory=time.monotonic)

    def now_epoch(self) -> int:
        """Seconds since the (fake) start, as a real server counts them (RFC 6886 §3.6); a test
        that sets `epoch` lower simulates a reboot."""
        return self.epoch + int(time.monotonic() - self.started)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.append(data)
        if self.silent or (self.pcp_silent and data[:1] == b"\x02"):
            return
        replies = self.script(data) if self.script else self.answer(data)
        assert self.transport is not None
        for reply in replies:
            self.transport.sendto(reply, addr)

    def answer(self, data: bytes) -> list[bytes]:
        if data[:1] == b"\x00" and self.pcp_only:
            return [natpmp.ErrorResponse(data[1], natpmp.ResultCode.UNSUPPORTED_VERSION, self.now_epoch()).encode()]
        if data[:1] == b"\x00":
            request = natpmp.parse_request(data)
            if isinstance(request, natpmp.ExternalAddressRequest):
                return [natpmp.ExternalAddressResponse(0, self.now_epoch(), self.external).encode()]
            external = request.external_port or request.internal_port
            return [
                natpmp.MapResponse(
                    request.transport,
                    0,
                    self.now_epoch(),
                    request.internal_port,
                    0 if request.lifetime == 0 else external,
                    self.grant(request.lifetime),
                ).encode()
            ]
        if self.natpmp_only:
            return [
                natpmp.ErrorResponse(data[1] & 0x7F, natpmp.ResultCode.UNSUPPORTED_VERSION, self.now_epoch()).encode()
            ]
        request_pcp = pcp.parse_request(data)
        return [self.pcp_reply(request_pcp, result=0)]

    def pcp_reply(self, request: pcp.Request, result: int, nonce: bytes | None = None) -> bytes:
        map_data = None
        if request.map is not None:
            map_data = pcp.MapData(
                nonce or request.map.nonce,
                request.map.protocol,
                request.map.internal_port,
                request.map.external_port or request.map.internal_port,
                self.external,
            )
        lifetime = self.grant(request.lifetime)
        return pcp.Response(2, request.opcode, result, lifetime, self.now_epoch(), map_data, ()).encode()

    def grant(self, asked: int) -> int:
        return asked if asked == 0 or self.granted_lifetime is None else self.granted_lifetime


async def start_fake_router(**kwargs: Any) -> tuple[FakeRouter, int]:
    loop = asyncio.get_running_loop()
    _, router = await loop.create_datagram_endpoint(lambda: FakeRouter(**kwargs), local_addr=("127.0.0.1", 0))
    assert router.transport is not None
    return router, router.transport.get_extra_info("sockname")[1]
