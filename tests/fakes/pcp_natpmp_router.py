"""A scriptable NAT-PMP + PCP server on loopback, for what the real router cannot be made to do:
hostile or wrong replies, silence, error results, an epoch that jumps back. Built on the project's own
codecs; the real behaviour is tested against miniupnpd in tests/lab.

The quirk profiles (tests/fakes/quirks.py) run it inside a test namespace on the gateway's port 5351:
`python pcp_natpmp_router.py ADDRESS JSON`, JSON being `FakeRouter`'s keyword arguments (addresses as
strings); it prints "ready" once it listens.
"""

from __future__ import annotations

import asyncio
import json
import sys
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
    # miniupnpd behind another NAT (docs/QUIRKS.md P1): every NAT-PMP request answered with this result
    # and 0.0.0.0, every PCP MAP with NO_RESOURCES carrying `pcp_refused_address`.
    natpmp_result: int = 0
    pcp_refused_address: IPv4Address | None = None
    # MikroTik RouterOS (docs/QUIRKS.md P5): a NAT-PMP map with suggested external port 0 gets this result.
    refuse_anonymous: int = 0
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
                if self.natpmp_result:
                    zero = IPv4Address("0.0.0.0")
                    return [natpmp.ExternalAddressResponse(self.natpmp_result, self.now_epoch(), zero).encode()]
                return [natpmp.ExternalAddressResponse(0, self.now_epoch(), self.external).encode()]
            external = request.external_port or request.internal_port
            result = self.natpmp_result
            if not result and self.refuse_anonymous and request.lifetime and not request.external_port:
                result = self.refuse_anonymous  # "unable to allocate port for mapping *:0"
            if result:
                return [
                    natpmp.MapResponse(
                        request.transport, result, self.now_epoch(), request.internal_port, 0, 0
                    ).encode()
                ]
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
        if request_pcp.map is not None and self.pcp_refused_address is not None:
            return [self.pcp_reply(request_pcp, pcp.ResultCode.NO_RESOURCES, address=self.pcp_refused_address)]
        return [self.pcp_reply(request_pcp, result=0)]

    def pcp_reply(
        self, request: pcp.Request, result: int, nonce: bytes | None = None, address: IPv4Address | None = None
    ) -> bytes:
        map_data = None
        if request.map is not None:
            map_data = pcp.MapData(
                nonce or request.map.nonce,
                request.map.protocol,
                request.map.internal_port,
                request.map.external_port or request.map.internal_port,
                address or self.external,
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


async def main(address: str, config: dict[str, Any]) -> None:
    """Serve on ADDRESS:5351 (the NAT-PMP and PCP port) until killed, 600 s at most."""
    for key in ("external", "pcp_refused_address"):
        if config.get(key) is not None:
            config[key] = IPv4Address(config[key])
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: FakeRouter(**config), local_addr=(address, natpmp.SERVER_PORT))
    print("ready", flush=True)
    await asyncio.sleep(600)  # the test kills us long before; this bounds a forgotten server


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
