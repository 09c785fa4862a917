"""An in-process stand-in for `PinholeSession` (aio/pinhole.py): a firewall that keeps pinholes by UniqueID,
for unit tests of the engine's IPv6 side. What only a network shows is proven in tests/lab/test_ipv6_pinholes.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv6Address, IPv6Network
from typing import Any

from autonat.aio.pinhole import PinholeProbe
from autonat.aio.route import RouterLocation
from autonat.errors import RouterTimeout
from autonat.mapper import Mapping, MappingRequest, ProtocolStatus
from autonat.proto.types import Transport

GATEWAY6 = IPv6Address("2001:db8:0:77::1")
LOCAL6 = IPv6Address("2001:db8:0:77::10")


@dataclass
class FakeFirewall:
    """One pinhole protocol; `holes` is the router's state: UniqueID -> (transport, port)."""

    name: str
    holes: dict[int, tuple[Transport, int]] = field(default_factory=dict)
    next_id: int = 1
    fail_deletes: bool = False
    adds: int = 0
    updates: int = 0
    deletes: int = 0

    async def probe(self) -> ProtocolStatus:
        return ProtocolStatus(self.name, True, "fake", None, 1 if self.name == "pcp" else None)

    def _grant(self, request: MappingRequest, unique_id: int) -> Mapping:
        return Mapping(
            self.name,
            request.transport,
            LOCAL6,
            request.internal_port,
            LOCAL6,
            request.internal_port,
            request.lifetime,
            None,
            unique_id if self.name == "upnp" else None,
        )

    async def add(self, request: MappingRequest, unique_id: int | None = None) -> Mapping:
        key = (request.transport, request.internal_port)
        if unique_id is not None and self.holes.get(unique_id) == key:
            self.updates += 1  # UpdatePinhole
            return self._grant(request, unique_id)
        for known, held in self.holes.items():  # AddPinhole of one it holds: its ID (U19)
            if held == key:
                self.adds += 1
                return self._grant(request, known)
        self.adds += 1
        unique_id, self.next_id = self.next_id, self.next_id + 1
        self.holes[unique_id] = key
        return self._grant(request, unique_id)

    async def delete(self, transport: Transport, internal_port: int) -> None:
        self.deletes += 1
        if self.fail_deletes:
            raise RouterTimeout("fake firewall: delete not confirmed")
        for known, held in list(self.holes.items()):
            if held == (transport, internal_port):
                del self.holes[known]

    async def delete_pinhole(self, unique_id: int) -> None:
        self.deletes += 1
        if self.fail_deletes:
            raise RouterTimeout("fake firewall: delete not confirmed")
        self.holes.pop(unique_id, None)

    def ports(self) -> set[int]:
        return {port for _, port in self.holes.values()}


@dataclass
class FakePinholeSession:
    pcp: FakeFirewall = field(default_factory=lambda: FakeFirewall("pcp"))
    upnp: FakeFirewall = field(default_factory=lambda: FakeFirewall("upnp"))
    selected: str = "upnp"
    location: RouterLocation = field(
        default_factory=lambda: RouterLocation(GATEWAY6, LOCAL6, "lan0", IPv6Network("2001:db8:0:77::/64"))
    )
    closed: bool = False

    @property
    def local_address(self) -> IPv6Address:
        return LOCAL6

    async def probe(self, only: str = "auto") -> PinholeProbe:
        statuses = {name: ProtocolStatus(name, True, "fake") for name in ("pcp", "upnp")}
        return PinholeProbe(self.location, statuses, self.selected if only == "auto" else only, 0.1)

    def close(self) -> None:
        self.closed = True

    def router_errors(self) -> dict[tuple[str, int], int]:
        return {}


def pinhole_factory_for(session: FakePinholeSession) -> Any:
    async def factory(*_: Any, **__: Any) -> FakePinholeSession:
        session.closed = False
        return session

    return factory
