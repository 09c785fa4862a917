"""The one small interface every port-mapping protocol sits behind.

A mapper talks to one gateway on behalf of one local address. The engine (and the one-shot CLI) only
ever see `PortMapper`; whether PCP, NAT-PMP or UPnP IGD is underneath is a detail of construction. It
lives apart from the values it speaks in (autonat.mapper) because a `typing.Protocol` needs `typing`,
which a one-shot blocking request does without.
"""

from __future__ import annotations

from typing import Protocol

from autonat.mapper import Mapping, MappingRequest, ProtocolStatus
from autonat.proto.types import Transport


class PortMapper(Protocol):
    """A port-mapping protocol client bound to one gateway and one local address."""

    name: str

    async def probe(self) -> ProtocolStatus:
        """Ask the gateway whether this protocol works; never raises for a silent or refusing router."""
        ...

    async def add(self, request: MappingRequest) -> Mapping:
        """Create or refresh a mapping. Raises RouterRefused / RouterTimeout with a one-line reason."""
        ...

    async def delete(self, transport: Transport, internal_port: int) -> None:
        """Remove our mapping of `internal_port`; deleting one that is not there is success."""
        ...
