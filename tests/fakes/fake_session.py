"""An in-process stand-in for `RouterSession` that keeps a mapping table, for unit tests of the engine.

It answers in microseconds and can fail on demand (a delete that is never confirmed, a request whose
answer is lost after the router acted on it), which is what the engine's bookkeeping must survive. What
only a network shows (loss, a real router's table, its restart) is proven in tests/lab against miniupnpd.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from autonat.aio.route import RouterLocation
from autonat.aio.router import ProbeResult
from autonat.errors import RouterTimeout
from autonat.mapper import Mapping, MappingRequest, ProtocolStatus
from autonat.proto.types import Transport

GATEWAY = IPv4Address("192.168.77.1")
LOCAL = IPv4Address("192.168.77.10")
EXTERNAL = IPv4Address("203.0.113.1")


class _Epochs:
    def reset(self) -> None:
        pass


@dataclass
class FakeMapper:
    """One protocol client; `table` is the router's state for our host, by (transport, internal port)."""

    name: str
    table: dict[tuple[Transport, int], Mapping] = field(default_factory=dict)
    fail_deletes: bool = False  # the router never confirms a delete (a timeout), and keeps the mapping
    lose_add_answers: bool = False  # the router makes the mapping but its answer never arrives
    delay: float = 0.0
    adds: int = 0
    deletes: int = 0
    router_rebooted: bool = False
    epochs: _Epochs = field(default_factory=_Epochs)
    max_table: int = 0  # the most mappings the table ever held
    before_add: Any = None  # called with each MappingRequest as it reaches the router (a test's probe)

    async def probe(self) -> ProtocolStatus:
        return ProtocolStatus(self.name, True, "fake", EXTERNAL, 1)

    async def add(self, request: MappingRequest) -> Mapping:
        self.adds += 1
        if self.before_add is not None:
            self.before_add(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        mapping = Mapping(
            self.name,
            request.transport,
            LOCAL,
            request.internal_port,
            EXTERNAL,
            request.external_port or request.internal_port,
            request.lifetime,
        )
        self.table[(request.transport, request.internal_port)] = mapping
        self.max_table = max(self.max_table, len(self.table))
        if self.lose_add_answers:
            raise RouterTimeout("fake router: answer lost")
        return mapping

    async def delete(self, transport: Transport, internal_port: int) -> None:
        self.deletes += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_deletes:
            raise RouterTimeout("fake router: delete not confirmed")
        self.table.pop((transport, internal_port), None)

    async def delete_external(self, transport: Transport, external_port: int) -> None:
        for key, mapping in list(self.table.items()):
            if mapping.transport is transport and mapping.external_port == external_port:
                await self.delete(*key)
                return
        await self.delete(transport, 0)  # counts, and fails like any delete when told to

    async def external_address(self) -> Any:
        class Answer:
            external_address = EXTERNAL

        return Answer()


@dataclass
class FakeSession:
    pcp: FakeMapper = field(default_factory=lambda: FakeMapper("pcp"))
    natpmp: FakeMapper = field(default_factory=lambda: FakeMapper("natpmp"))
    upnp: FakeMapper = field(default_factory=lambda: FakeMapper("upnp"))
    location: RouterLocation = field(default_factory=lambda: RouterLocation(GATEWAY, LOCAL, "lan0"))
    closed: bool = False

    async def probe(self, protocol: str = "auto") -> ProbeResult:
        statuses = {name: ProtocolStatus(name, True, "fake", EXTERNAL, 1) for name in ("pcp", "natpmp", "upnp")}
        return ProbeResult(self.location, statuses, "pcp", EXTERNAL, False, 0.1, {})

    def close(self) -> None:
        self.closed = True

    def router_errors(self) -> dict[tuple[str, int], int]:
        return {}


def factory_for(session: FakeSession) -> Any:
    async def factory(*_: Any, **__: Any) -> FakeSession:
        return session

    return factory
