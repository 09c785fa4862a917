"""RTP port pairs mapped before calls need them, so call set-up never waits on the router.

SIP-NOTES: the RTP mapping must exist before the 200 OK leaves, because the caller's first RTP packet
follows it at once. Asking the router at that moment costs a round trip at best and the whole deadline
at worst, so the pool keeps `size` pairs (RTP on an even port, RTCP on the next one) mapped ahead;
`take()` hands one out at once, `release()` deletes its mappings at hang-up, and the pool refills in
the background. The mappings are ordinary engine mappings (owner "rtp-pool", "call:<id>" once taken):
renewed, verified, journalled and cleaned after a crash like every other.

Bounded under a flood of calls: the pool refills at most `refill_rate` pairs a second, and `map_now`
maps on demand only while the engine's `map_rate` allows (else it returns None at once and the call is
refused without a new hole). And one source must not take it all: the last ready pair and the last
pair's worth of `map_rate` (RESERVE_PAIRS) go only to a call whose `reserve` flag says its source is
not flooding (autonat.sip.admission decides), so a person dialling in during a flood still gets a
mapped pair.

A pair whose delete the router did not confirm goes back to the range at once: the engine keeps the one
mapping object for that port, retries its delete, and simply wants it again if a later call takes the
port.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Protocol

from autonat.addresses import IPAddress
from autonat.engine.engine import MappingStatus, Wanted
from autonat.engine.lifecycle import Key
from autonat.limits import TokenBucket
from autonat.proto.types import Transport

log = logging.getLogger("autonat.pool")
REFILL_RETRY = 5.0  # after a refill that could not complete (router busy, ports taken)
REFILL_DELAY = 0.2  # after a take(), before refilling
RESERVE_PAIRS = 1  # ready pairs, and pairs' worth of map_rate, held back for calls with `reserve`


@dataclass(frozen=True, slots=True)
class RtpPorts:
    """One call's media ports: local RTP/RTCP and what the router maps them to."""

    rtp: int
    rtcp: int
    external_ip: IPAddress | None
    external_rtp: int
    external_rtcp: int


class PortPairs:
    """The RTP range as even/odd pairs (RTP on the even port, RTCP on the next, RFC 3550 §11), shared by
    the pool (pairs mapped on the router) and calls that need no mapping (peers on the local network)."""

    def __init__(self, ports: range) -> None:
        if ports.step != 1 or len(ports) < 2:
            raise ValueError("the RTP port range needs at least two consecutive ports")
        self._free = collections.deque(port for port in ports if port % 2 == 0 and port + 1 in ports)
        self.total = len(self._free)

    def acquire(self) -> int | None:
        """The RTP port of a free pair, or None when every pair is in use."""
        return self._free.popleft() if self._free else None

    def release(self, port: int) -> None:
        self._free.append(port)

    def __len__(self) -> int:
        return len(self._free)


class PoolEngine(Protocol):
    """What the pool asks of its engine: a NatEngine for port mappings, or
    autonat.service.pinholes.FamilyEngine for the same engine's IPv6 pinholes."""

    @property
    def mapping_enabled(self) -> bool: ...

    def lookup(self, key: Key) -> MappingStatus | None: ...

    def relabel(self, transport: Transport, internal_port: int, owner: str) -> None: ...

    async def add(self, wanted: Wanted, wait: float | None = None) -> MappingStatus: ...

    async def delete(self, transport: Transport, internal_port: int) -> bool: ...

    def map_budget(self) -> float: ...

    async def wait_ready(self, timeout: float) -> bool: ...


class RtpPool:
    def __init__(
        self,
        engine: PoolEngine,
        ports: range | PortPairs,
        size: int = 4,
        transport: Transport = Transport.UDP,
        *,
        refill_rate: float = 2.0,
    ) -> None:
        if size < 0:
            raise ValueError("the pool size must be 0 or more")
        if refill_rate < 0:
            raise ValueError("the refill rate must be 0 (no limit) or more")
        self.engine = engine
        self._refills = TokenBucket(refill_rate, max(1.0, refill_rate))
        self.transport = transport
        self.size = size
        self.pairs = ports if isinstance(ports, PortPairs) else PortPairs(ports)
        self._ready: list[int] = []  # RTP ports whose pair is mapped and waiting for a call
        self._in_use: dict[int, str] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.size:  # size 0: nothing mapped ahead, every call maps on demand (map_now)
            self._task = asyncio.get_running_loop().create_task(self._refill_forever())

    async def stop(self) -> None:
        """Stop refilling; the engine removes the mappings with everything else at its own stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def ready(self) -> int:
        return len(self._ready)

    def _mapping(self, port: int) -> MappingStatus | None:
        return self.engine.lookup((self.transport, port))

    def _pair_active(self, port: int) -> bool:
        return all((m := self._mapping(p)) is not None and m.active for p in (port, port + 1))

    def take(self, call_id: str, *, reserve: bool = True) -> RtpPorts | None:
        """A mapped pair for a call, at once; None when the pool is empty, or holds only the reserve and the
        call may not use it (`reserve` False: the SIP service's call from a source that is flooding; the
        caller may then map on demand)."""
        held_back = 0 if reserve else RESERVE_PAIRS
        while len(self._ready) > held_back:
            port = self._ready.pop(0)
            if not self._pair_active(port):  # lost since it was mapped: let the refill replace it
                self.pairs.release(port)
                continue
            self._in_use[port] = call_id
            # Refill after the answer has left: the refill writes the journal (an fsync) and talks to the
            # router on this event loop, which would otherwise delay the very 200 OK the pool exists for.
            asyncio.get_running_loop().call_later(REFILL_DELAY, self._wake.set)
            rtp, rtcp = self._mapping(port), self._mapping(port + 1)
            assert rtp is not None and rtcp is not None and rtp.external_port and rtcp.external_port
            for mapping in (rtp, rtcp):
                self.engine.relabel(self.transport, mapping.port, f"call:{call_id}")
            return RtpPorts(port, port + 1, rtp.external_ip, rtp.external_port, rtcp.external_port)
        self._wake.set()
        return None

    async def release(self, ports: RtpPorts) -> None:
        """Hang-up: remove the call's mappings from the router; the pair returns to the free list (a delete
        the router did not confirm is the engine's to retry)."""
        self._in_use.pop(ports.rtp, None)
        await asyncio.gather(
            self.engine.delete(self.transport, ports.rtp), self.engine.delete(self.transport, ports.rtcp)
        )
        self.pairs.release(ports.rtp)
        self._wake.set()

    async def map_now(self, call_id: str, *, reserve: bool = True) -> RtpPorts | None:
        """A pair mapped on demand, for when the pool is empty: the caller waits for the router (the
        latency the pool exists to avoid). None if no pair is free, the router refused, or `map_rate`
        allows no new mapping now (a flood must not turn into holes; the call is refused instead); without
        `reserve`, unless `map_rate` would still allow RESERVE_PAIRS more pairs after this one."""
        if self.engine.map_budget() < 2 * (1 if reserve else 1 + RESERVE_PAIRS):
            return None
        port = self.pairs.acquire()
        if port is None:
            return None
        added = await self._map_pair(port, f"call:{call_id}")
        if added is None:
            return None
        self._in_use[port] = call_id
        rtp, rtcp = added
        assert rtp.external_port and rtcp.external_port
        return RtpPorts(port, port + 1, rtp.external_ip, rtp.external_port, rtcp.external_port)

    async def _map_pair(self, port: int, owner: str) -> tuple[MappingStatus, MappingStatus] | None:
        """Map `port` and `port + 1` together; if the router grants not both, unmap them and give the pair
        back to the range (a call needs RTP and RTCP alike)."""
        rtp, rtcp = await asyncio.gather(
            *(self.engine.add(Wanted(self.transport, p, owner=owner)) for p in (port, port + 1))
        )
        if rtp.active and rtcp.active:
            return rtp, rtcp
        await asyncio.gather(*(self.engine.delete(self.transport, p) for p in (port, port + 1)))
        self.pairs.release(port)
        return None

    async def _refill_forever(self) -> None:
        while True:
            self._wake.clear()
            complete = await self._refill()
            if complete:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REFILL_RETRY):
                        await self._wake.wait()

    async def _refill(self) -> bool:
        """Map pairs until `size` are ready, at most `refill_rate` pairs a second; False if the router or the
        range could not provide them."""
        if not await self.engine.wait_ready(timeout=REFILL_RETRY) or not self.engine.mapping_enabled:
            return False
        loop = asyncio.get_running_loop()
        while len(self._ready) < self.size:
            while not self._refills.take(loop.time()):
                await asyncio.sleep(self._refills.wait(loop.time()))
            port = self.pairs.acquire()
            if port is None:
                log.warning("RTP port range exhausted: %d pairs in calls", len(self._in_use))
                return False
            if await self._map_pair(port, "rtp-pool") is None:
                return False
            self._ready.append(port)
        return True
