"""RTP pinholes for IPv6 calls: the RTP pool (autonat.engine.pool.RtpPool), run on the engine's IPv6 pinholes.

On IPv6 there is no NAT, but the home router's firewall drops unsolicited inbound packets, so the media
ports of a call with an IPv6 peer outside must be opened (PCP MAP on IPv6, RFC 6887 §11; UPnP IGD:2
WANIPv6FirewallControl AddPinhole) before the 200 OK leaves, exactly as an IPv4 call's ports must be
mapped: the caller's first RTP packet follows the answer at once. So IPv6 calls take their pairs from the
same pool mechanism (pairs opened ahead, `take()` at once, `map_now()` on demand within `map_rate`,
`release()` at hang-up, refilled in the background), over the same RTP range (`PortPairs`, shared with
the IPv4 pool: one port pair is one call's, whatever its family).

The pool speaks to its engine through `autonat.engine.pool.PoolEngine` (five calls and two readiness
questions); `FamilyEngine` answers them for family 6, so the pool needs no second copy.
"""

from __future__ import annotations

from dataclasses import replace

from autonat.engine.engine import MappingStatus, NatEngine, Wanted
from autonat.engine.lifecycle import Key
from autonat.engine.pool import PortPairs, RtpPool
from autonat.proto.types import Transport

__all__ = ["FamilyEngine", "pinhole_pool"]


class FamilyEngine:
    """The part of NatEngine the RTP pool uses, on the engine's IPv6 pinholes (`family` 6)."""

    family = 6

    def __init__(self, engine: NatEngine) -> None:
        self.engine = engine

    def lookup(self, key: Key) -> MappingStatus | None:
        return self.engine.lookup(key, family=self.family)

    def relabel(self, transport: Transport, internal_port: int, owner: str) -> None:
        self.engine.relabel(transport, internal_port, owner, family=self.family)

    async def add(self, wanted: Wanted, wait: float | None = None) -> MappingStatus:
        return await self.engine.add(replace(wanted, family=self.family), wait)

    async def delete(self, transport: Transport, internal_port: int) -> bool:
        return await self.engine.delete(transport, internal_port, family=self.family)

    def map_budget(self) -> float:
        return self.engine.map_budget()  # one `map_rate` bucket for mappings and pinholes together

    @property
    def mapping_enabled(self) -> bool:
        return self.engine.mapping_enabled

    async def wait_ready(self, timeout: float) -> bool:
        """Until the IPv6 gateway is found (the engine knows the stable address its pinholes are for)."""
        return await self.engine.wait_ready(timeout, family=self.family)


def pinhole_pool(engine: NatEngine, pairs: PortPairs, *, size: int, refill_rate: float) -> RtpPool:
    """An RTP pool whose pairs are IPv6 pinholes (owner "rtp-pool", then "call:<id>", like the IPv4 pool's)."""
    return RtpPool(FamilyEngine(engine), pairs, size=size, refill_rate=refill_rate)
