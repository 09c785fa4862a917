"""The RTP pool with a fake engine: pairs handed out at once, and the reserve a flooding source cannot take."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

from autonat.engine.lifecycle import Key, MappingStatus, State, Wanted
from autonat.engine.pool import RESERVE_PAIRS, RtpPool
from autonat.proto.types import Transport

EXTERNAL = IPv4Address("203.0.113.1")


class FakeEngine:
    """Grants every mapping at once (external port = internal + 10,000) within `budget` new mappings."""

    mapping_enabled = True

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.mappings: dict[Key, MappingStatus] = {}
        self.added = 0

    def lookup(self, key: Key) -> MappingStatus | None:
        return self.mappings.get(key)

    def relabel(self, transport: Transport, internal_port: int, owner: str) -> None:
        pass

    async def add(self, wanted: Wanted, wait: float | None = None) -> MappingStatus:
        self.budget -= 1
        self.added += 1
        status = MappingStatus(wanted.transport, wanted.internal_port, wanted.owner, False, State.ACTIVE, "pcp",
                               EXTERNAL, wanted.internal_port + 10_000, 3600, 3600.0, None)  # fmt: skip
        self.mappings[status.key] = status
        return status

    async def delete(self, transport: Transport, internal_port: int) -> bool:
        return self.mappings.pop((transport, internal_port), None) is not None

    def map_budget(self) -> float:
        return self.budget

    async def wait_ready(self, timeout: float) -> bool:
        return True


async def filled(pool: RtpPool) -> None:
    await pool.start()
    async with asyncio.timeout(2):
        while pool.ready < pool.size:
            await asyncio.sleep(0.01)


async def test_the_last_ready_pair_is_kept_for_a_call_that_may_use_the_reserve() -> None:
    engine = FakeEngine(budget=100)
    pool = RtpPool(engine, range(20000, 20010), size=2, refill_rate=0)
    await filled(pool)
    try:
        first = pool.take("flood-1", reserve=False)
        assert first is not None and first.external_rtp == first.rtp + 10_000
        assert pool.ready == RESERVE_PAIRS
        assert pool.take("flood-2", reserve=False) is None  # only the reserve is left: not for a flooding source
        person = pool.take("person")
        assert person is not None and person.rtp != first.rtp and pool.ready == 0
    finally:
        await pool.stop()


async def test_mapping_on_demand_leaves_a_pairs_worth_of_map_rate_to_the_reserve() -> None:
    engine = FakeEngine(budget=2 * (1 + RESERVE_PAIRS) - 1)
    pool = RtpPool(engine, range(20000, 20010), size=0)
    assert await pool.map_now("flood", reserve=False) is None and engine.added == 0  # would eat into the reserve
    mapped = await pool.map_now("person")
    assert mapped is not None and engine.added == 2
    engine.budget = 2 * (1 + RESERVE_PAIRS)
    assert await pool.map_now("flood", reserve=False) is not None
