"""The NAT engine: the one owner of the discovery result and of every mapping we want.

What it promises, and how:
- Start-up never waits for the router: discovery runs in the background (retrying with back-off),
  mappings asked for meanwhile are kept and made as soon as a router is found.
- Every mapping is journalled *before* it is requested and forgotten only *after* the router
  confirmed its deletion, so a crash (even SIGKILL) leaves nothing in the router we no longer own:
  at the next start, leftovers are deleted, or adopted when still wanted.
- One object per (transport, internal port) for as long as anything may exist on the router under
  that key: a mapping being deleted stays here (state "removing", `doomed`) until the router
  confirmed, and a delete that failed is retried with back-off while the daemon runs, until the router
  confirms or the lease has certainly run out. Asking for the key again revives the same object. (Two
  objects for one key was how, under an INVITE flood, a late delete removed the journal row of a newer
  mapping of the same port and 267 mappings outlived the daemon unjournalled.)
- New mappings reach the router at most `map_rate` a second (renewals and re-creations after a router
  reboot are not new holes and are not held back).
- Finite leases, renewed per RFC 6887 §11.2.1, and a verification of every mapping each
  `verify_interval`: PCP/NAT-PMP re-send the idempotent MAP (which also re-installs rules a router
  silently flushed), UPnP asks GetSpecificPortMappingEntry and re-adds what is gone.
- The router losing its state is noticed from the epoch (RFC 6886 §3.6, RFC 6887 §8.5), from
  announcements on 224.0.0.1:5350 and SSDP NOTIFY, and from verification; all mappings are re-made.
- An external address change is an event (old and new), never a restart of anything.
- `reinit` builds a complete new discovery first and swaps it in atomically.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from autonat.addresses import IPAddress, is_public
from autonat.aio import watch
from autonat.aio.router import ProbeResult, RouterSession
from autonat.engine import schedule
from autonat.engine.events import EventBus, EventKind
from autonat.engine.journal import Journal, JournalEntry
from autonat.engine.settings import NatSettings
from autonat.errors import AutonatError
from autonat.limits import TokenBucket
from autonat.mapper import MappingRequest, PortMapper
from autonat.proto.types import Transport

log = logging.getLogger("autonat.engine")
holes = logging.getLogger("autonat.holes")

MappingKey = tuple[Transport, int]
T = TypeVar("T")
DISCOVERY_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
FAILED_RETRY = (2.0, 5.0, 15.0, 30.0, 60.0)
REMOVE_RETRY = (1.0, 2.0, 5.0, 15.0, 30.0, 60.0)  # a delete the router did not confirm, tried again
EXPIRY_MARGIN = 60.0  # past the lease's end by this much, a router has certainly dropped the mapping
RENEWAL_SHARE = 0.04  # at most 4 % of the mappings refreshed in any one second ...
MIN_REFRESHES_PER_SECOND = 5  # ... but never fewer than this, so small sets are not slowed down
CONCURRENCY = 16  # router requests in flight at once: enough for bursts, gentle on small routers
ANNOUNCE_SETTLE = 0.05  # miniupnpd's first announcement after a change is stale; the right one follows


@dataclass(frozen=True, slots=True)
class Wanted:
    """A mapping somebody asked for."""

    transport: Transport
    internal_port: int
    external_port: int = 0
    sticky: bool = False
    owner: str = "manual"


@dataclass(eq=False)
class ManagedMapping:
    wanted: Wanted
    state: str = "pending"  # pending | active | failed | disabled | removing
    protocol: str | None = None
    external_ip: IPAddress | None = None
    external_port: int | None = None
    lease: int | None = None
    granted_at: float | None = None  # loop clock
    expires_wall: float | None = None
    next_renewal: float = 0.0
    next_verify: float = 0.0
    failures: int = 0
    last_error: str | None = None
    busy: bool = False
    heap_seq: int = 0  # the scheduler's current queue entry for this mapping
    journalled: tuple[Any, ...] | None = None  # what the journal holds for it, to skip rewrites
    asked_via: str | None = None  # protocol of the last request sent, answered or not
    asked_until: float | None = None  # wall clock: where the lease of the last request would end if granted
    doomed: bool = False  # no longer wanted: being deleted, kept until the router confirms
    open_ended: bool = False  # granted permanent, or longer than max_lease (the router's own end is unknown)
    removal_failures: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> MappingKey:
        return self.wanted.transport, self.wanted.internal_port

    @property
    def due_at(self) -> float:
        if self.state == "active" and not self.doomed:
            return min(self.next_renewal, self.next_verify)
        return self.next_renewal  # pending/failed: when the next attempt is allowed; removing: the next delete

    @property
    def maybe_on_router(self) -> bool:
        """Something may exist on the router for it: granted, or asked for (the answer may have been lost)."""
        return self.protocol is not None or self.asked_via is not None

    def certainly_gone(self, now_wall: float) -> bool:
        """The lease of whatever we may have on the router has run out (by a margin): nothing to delete
        any more. A permanent lease (0) never runs out."""
        if self.protocol is not None and self.open_ended:
            return False  # granted permanent, or for longer than we took it as: its end is not ours to know
        ends = [end for end in (self.expires_wall, self.asked_until) if end is not None]
        return bool(ends) and now_wall > max(ends) + EXPIRY_MARGIN

    def to_dict(self) -> dict[str, Any]:
        transport, port = self.key
        return {
            "port": port,
            "proto": str(transport),
            "proto_num": 0 if transport is Transport.UDP else 1,  # FreeSWITCH's numbering
            "sticky": self.wanted.sticky,
            "owner": self.wanted.owner,
            "state": "removing" if self.doomed else self.state,
            "protocol": self.protocol,
            "external_ip": None if self.external_ip is None else str(self.external_ip),
            "external_port": self.external_port,
            "lease": self.lease,
            "expires_at": None if self.expires_wall is None else round(self.expires_wall, 3),
            "last_error": self.last_error,
        }


class NatEngine:
    """Owns the router session, the wanted mappings and the journal; use `start()` / `stop()`."""

    def __init__(
        self,
        settings: NatSettings,
        journal: Journal | None = None,
        *,
        rand: Callable[[], float] = random.random,
        session_factory: Callable[..., Any] = RouterSession.open,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.events = EventBus()
        self.mapping_enabled = settings.mapping
        self.state = "disabled" if not settings.enabled else "starting"
        self.session: RouterSession | None = None
        self.probe: ProbeResult | None = None
        self.external_ip: IPAddress | None = None
        self.last_error: str | None = None
        self.stun_result: dict[str, Any] | None = None
        self.mappings: dict[MappingKey, ManagedMapping] = {}
        self._rand = rand
        self._session_factory = session_factory
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[asyncio.BaseTransport] = []
        self._wake = asyncio.Event()
        self._check_now = asyncio.Event()
        self._ready = asyncio.Event()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._heap: list[tuple[float, int, ManagedMapping]] = []
        self._seq = 0
        self._recent: collections.deque[float] = collections.deque()  # refresh starts, last second
        self._loop = asyncio.get_running_loop()
        # A call needs two mappings (RTP, RTCP) at once; a burst smaller than that would starve it.
        self._new_holes = TokenBucket(settings.map_rate, max(4.0, settings.map_rate))

    # --- life cycle ----------------------------------------------------------------------------

    async def start(self, static: Iterable[Wanted] = ()) -> None:
        """Returns at once: discovery and mapping happen in the background."""
        for wanted in static:
            self.mappings[(wanted.transport, wanted.internal_port)] = ManagedMapping(wanted)
        if not self.settings.enabled:
            return
        self.state = "discovering"
        self._spawn(self._main())

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        return self._ready.is_set()

    async def stop(self) -> None:
        """Delete every non-sticky mapping within `shutdown_timeout`; sticky ones stay (and stay journalled)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._close_listeners()
        if self.session is not None:
            # Asked-for but unanswered ones too: the router may have made them before we stopped listening.
            doomed = [m for m in self.mappings.values() if (m.doomed or not m.wanted.sticky) and m.maybe_on_router]
            for mapping in doomed:
                mapping.doomed = True
            # Tombstoned first, in one transaction: whatever the deadline leaves undone, the next start deletes.
            self._tombstone(doomed)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_timeout):
                    await asyncio.gather(*(self._limited(self._remove(m)) for m in doomed), return_exceptions=True)
            left = [m for m in doomed if self.mappings.get(m.key) is m]
            if left:
                log.warning(
                    "%d mapping(s) not confirmed deleted within %g s; the journal keeps them and the next start"
                    " deletes them",
                    len(left),
                    self.settings.shutdown_timeout,
                )
            self.session.close()
            self.session = None
        self.state = "stopped"

    def _tombstone(self, mappings: list[ManagedMapping]) -> None:
        if self.journal is None or not mappings:
            return
        keys = [(self.gateway or "", m.key[0], m.key[1]) for m in mappings]
        self.journal.tombstone_many(keys, time.time())
        for mapping in mappings:
            mapping.journalled = None

    async def _limited(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """At most CONCURRENCY router requests in flight: a burst of a thousand datagrams overflows the
        router's socket buffer (measured: most of them were lost and retried)."""
        async with self._slots:
            return await coroutine

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug must be loud, not a silently dead background task.
            log.error("engine task %s failed: %r", task.get_coro(), task.exception())
            self.last_error = f"internal error: {task.exception()!r}"

    async def _main(self) -> None:
        await self._discover_until_found()
        await self._reconcile_journal()
        await self._start_listeners()
        self._spawn(self._external_ip_loop())
        await self._scheduler()

    # --- discovery -----------------------------------------------------------------------------

    async def _open_session(self) -> tuple[RouterSession, ProbeResult]:
        settings = self.settings
        session: RouterSession = await self._session_factory(
            settings.gateway, settings.interface, settings.timeout, settings.root_url, max_lifetime=settings.max_lease
        )
        try:
            probe = await session.probe(settings.protocol)
            if probe.selected is None:
                reasons = "; ".join(f"{name}: {status.reason}" for name, status in probe.protocols.items())
                raise AutonatError(f"no port-mapping protocol works with {session.location.gateway} ({reasons})")
        except BaseException:
            session.close()
            raise
        return session, probe

    async def _discover_until_found(self) -> None:
        attempt = 0
        while True:
            try:
                session, probe = await self._open_session()
            except AutonatError as exc:
                self.last_error = str(exc)
                delay = DISCOVERY_BACKOFF[min(attempt, len(DISCOVERY_BACKOFF) - 1)]
                log.warning("discovery failed (%s); retrying in %g s", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self._install(session, probe)
            return

    def _install(self, session: RouterSession, probe: ProbeResult) -> None:
        old_ip = self.external_ip
        self.session, self.probe = session, probe
        self.external_ip = probe.external_ip
        self.state = "ready"
        self.last_error = None
        self._ready.set()
        log.info("NAT detected type: %s, ExtIP: %s", probe.selected, probe.external_ip)
        self.events.publish(
            EventKind.DISCOVERED,
            protocol=probe.selected,
            gateway=str(session.location.gateway),
            external_ip=None if probe.external_ip is None else str(probe.external_ip),
        )
        if probe.double_nat:
            self.events.publish(EventKind.DOUBLE_NAT, external_ip=str(probe.external_ip))
        if self.settings.stun:
            self._spawn(self.stun_check())
        if old_ip is not None and old_ip != probe.external_ip:
            self._address_changed(old_ip, probe.external_ip)

    def _mapper(self, protocol: str | None = None) -> PortMapper:
        assert self.session is not None and self.probe is not None
        name = protocol or self.probe.selected
        clients: dict[str, PortMapper] = {
            "pcp": self.session.pcp,
            "natpmp": self.session.natpmp,
            "upnp": self.session.upnp,
        }
        return clients[name or "pcp"]

    @property
    def gateway(self) -> str | None:
        return None if self.session is None else str(self.session.location.gateway)

    # --- journal -------------------------------------------------------------------------------

    async def _reconcile_journal(self) -> None:
        """Adopt what an earlier run left and is still wanted; delete the rest on the router, through the
        same removal as any delete (in the background, retried until the router confirms)."""
        if self.journal is None or self.session is None:
            return
        now_wall, now = time.time(), self._loop.time()
        leftovers = 0
        for entry in self.journal.entries():
            key = (entry.transport, entry.internal_port)
            if entry.gateway != self.gateway:
                if entry.external_port is None or entry.updated_at + entry.lease < now_wall:
                    self.journal.remove(entry.gateway, entry.transport, entry.internal_port)  # expired there
                continue
            wanted = Wanted(
                entry.transport, entry.internal_port, entry.requested_external_port, entry.sticky, entry.owner
            )
            if entry.desired and entry.sticky and key not in self.mappings:
                self.mappings[key] = ManagedMapping(wanted)
            if key in self.mappings:
                continue  # adopted: the first establish refreshes it (same nonce, same rule)
            granted = entry.external_port is not None
            self.mappings[key] = ManagedMapping(
                wanted,
                state="removing",
                doomed=True,
                protocol=entry.protocol if granted else None,
                asked_via=entry.protocol,
                external_port=entry.external_port,
                lease=entry.lease,
                expires_wall=entry.updated_at + entry.lease if granted and entry.lease else None,
                asked_until=entry.updated_at + entry.lease,
                open_ended=entry.lease == 0 or (entry.protocol != "upnp" and entry.lease >= self.settings.max_lease),
                journalled=("leftover",),  # its row is there: tombstoned first
                next_renewal=now,
            )
            leftovers += 1
        if leftovers:
            log.info("deleting %d mapping(s) an earlier run left on the router", leftovers)

    # --- the scheduler ---------------------------------------------------------------------------

    async def _scheduler(self) -> None:
        """Start each mapping's work when it is due, from a heap: a thousand mappings cost a heap
        operation per renewal, not a scan per wake-up."""
        self._reschedule_all()
        while True:
            now = self._loop.time()
            while self._recent and self._recent[0] <= now - 1.0:
                self._recent.popleft()
            # Jitter spreads refreshes on average; this cap makes "no more than RENEWAL_SHARE of the
            # mappings in any one-second window" hold by construction. New mappings never wait.
            cap = max(MIN_REFRESHES_PER_SECOND, math.floor(len(self.mappings) * RENEWAL_SHARE))
            wake_at = None
            while self._heap and self._heap[0][0] <= now:
                _, seq, mapping = self._heap[0]
                if seq != mapping.heap_seq or mapping.busy or self.mappings.get(mapping.key) is not mapping:
                    heapq.heappop(self._heap)  # superseded, or running (requeued when done), or deleted
                    continue
                if not mapping.doomed and (not self.mapping_enabled or mapping.state == "disabled"):
                    heapq.heappop(self._heap)
                    continue
                if mapping.state == "active" and not mapping.doomed:
                    if len(self._recent) >= cap:
                        wake_at = self._recent[0] + 1.0  # full: nothing more starts before a slot frees
                        break
                    self._recent.append(now)
                heapq.heappop(self._heap)
                mapping.busy = True
                self._spawn(self._service(mapping))
            self._wake.clear()
            if wake_at is None and self._heap:
                wake_at = self._heap[0][0]
            timeout = None if wake_at is None else max(0.0, wake_at - self._loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _push(self, mapping: ManagedMapping, when: float) -> None:
        self._seq += 1
        mapping.heap_seq = self._seq
        heapq.heappush(self._heap, (when, self._seq, mapping))
        self._wake.set()

    def _schedule(self, mapping: ManagedMapping) -> None:
        """(Re)queue a mapping at its current due time; older queue entries for it become stale."""
        self._push(mapping, mapping.due_at)

    def _reschedule_all(self) -> None:
        for mapping in self.mappings.values():
            self._schedule(mapping)

    def _poke(self) -> None:
        self._wake.set()

    async def _service(self, mapping: ManagedMapping) -> None:
        try:
            async with self._slots:
                now = self._loop.time()
                if mapping.doomed:
                    await self._remove(mapping)
                elif mapping.state == "active" and now < mapping.next_renewal and mapping.protocol == "upnp":
                    await self._verify_upnp(mapping)
                else:
                    await self._establish(mapping)
        finally:
            mapping.busy = False
            if self.mappings.get(mapping.key) is mapping:
                self._schedule(mapping)

    # --- operations ------------------------------------------------------------------------------

    def _lease_for(self, protocol: str) -> int:
        return self.settings.upnp_lease if protocol == "upnp" else self.settings.lease

    def map_budget(self) -> float:
        """How many new mappings may go to the router right now (`map_rate`): a caller that cannot wait
        (a call being answered) checks this instead of queueing behind the limit."""
        return self._new_holes.available(self._loop.time())

    async def _establish(self, mapping: ManagedMapping) -> float:
        """Create or refresh one mapping: journal first, then the router. Returns 0, or the seconds to
        wait when a new mapping was held back by `map_rate` (it stays pending and is retried then)."""
        if self.session is None or not self.mapping_enabled:
            return 0.0
        async with mapping.lock:
            if mapping.doomed or self.mappings.get(mapping.key) is not mapping:
                return 0.0  # deleted meanwhile: never re-create what is being removed
            mapper = self._mapper()
            wanted = mapping.wanted
            lease = self._lease_for(mapper.name)
            if not mapping.maybe_on_router:  # a new hole, not a refresh: within the rate towards the router
                now = self._loop.time()
                if not self._new_holes.take(now):
                    delay = self._new_holes.wait(now)
                    mapping.next_renewal = now + delay
                    return delay
            # A refresh of what is already journalled writes nothing: renewals must not cost an fsync each.
            journal_key = (mapper.name, self.gateway, wanted)
            if self.journal is not None and mapping.journalled != journal_key:
                self.journal.record(self._journal_entry(mapping, mapper.name, mapping.external_port, lease))
            request = MappingRequest(
                wanted.transport, wanted.internal_port, mapping.external_port or wanted.external_port, lease
            )
            now = self._loop.time()
            mapping.asked_until = time.time() + lease  # a lost answer may still have (re)started a lease
            mapping.asked_via = mapper.name
            try:
                granted = await mapper.add(request)
            except AutonatError as exc:
                self._failed(mapping, exc, now)
                self._check_reboot()
                return 0.0
            first = mapping.state != "active" or mapping.protocol != mapper.name
            moved = mapping.external_port not in (None, granted.external_port)
            mapping.state = "active"
            mapping.protocol = mapper.name
            mapping.external_ip = granted.external_ip or self.external_ip
            mapping.external_port = granted.external_port
            mapping.lease = granted.lifetime
            mapping.granted_at = now
            mapping.failures = 0
            mapping.last_error = None
            lifetime = granted.lifetime
            mapping.expires_wall = None if lifetime == 0 else time.time() + lifetime
            # A grant at max_lease may have been cut down to it (mapper.cap_grant): the router's hold is longer.
            mapping.open_ended = lifetime == 0 or (mapper.name != "upnp" and lifetime >= self.settings.max_lease)
            mapping.next_renewal = float("inf") if lifetime == 0 else schedule.first_renewal(now, lifetime, self._rand)
            interval = self.settings.verify_interval
            mapping.next_verify = (
                schedule.first_verification(now, interval, self._rand)
                if first
                else schedule.next_verification(now, interval, self._rand)
            )
            if self.journal is not None and (mapping.journalled != journal_key or moved or first):
                self._journal_granted(mapping, mapper.name, granted.external_port, lifetime)
                mapping.journalled = journal_key
            data = mapping.to_dict()
            if first or moved:
                holes.info("opened %s", granted.describe())
                self.events.publish(EventKind.NAT_ADD, **data)
            else:
                self.events.publish(EventKind.NAT_RENEW, **data)
        self._check_reboot()
        return 0.0

    def _journal_granted(self, mapping: ManagedMapping, protocol: str, external_port: int, lease: int) -> None:
        assert self.journal is not None
        wanted = mapping.wanted
        try:
            self.journal.granted(
                self.gateway or "", wanted.transport, wanted.internal_port, external_port, lease, time.time()
            )
        except KeyError:  # the row went away under us (another process on the same journal): write it whole
            self.journal.record(self._journal_entry(mapping, protocol, external_port, lease))

    def _journal_entry(
        self, mapping: ManagedMapping, protocol: str, external_port: int | None, lease: int
    ) -> JournalEntry:
        assert self.session is not None
        wanted = mapping.wanted
        return JournalEntry(
            transport=wanted.transport,
            internal_port=wanted.internal_port,
            owner=wanted.owner,
            sticky=wanted.sticky,
            desired=True,
            protocol=protocol,
            gateway=self.gateway or "",
            internal_address=str(self.session.location.local_address),
            requested_external_port=wanted.external_port,
            external_port=external_port,
            lease=lease,
            updated_at=time.time(),
        )

    def _failed(self, mapping: ManagedMapping, error: AutonatError, now: float) -> None:
        mapping.failures += 1
        mapping.last_error = str(error)
        if mapping.state == "active" and mapping.granted_at is not None and mapping.lease:
            retry = schedule.retry_renewal(mapping.granted_at, mapping.lease, now)
            if retry is not None:
                mapping.next_renewal = retry
                mapping.next_verify = retry
                return
        mapping.state = "failed"
        mapping.next_renewal = now + FAILED_RETRY[min(mapping.failures - 1, len(FAILED_RETRY) - 1)]
        log.warning("mapping %s %d failed: %s", mapping.key[0], mapping.key[1], error)
        self.events.publish(EventKind.NAT_ERROR, **mapping.to_dict())

    async def _verify_upnp(self, mapping: ManagedMapping) -> None:
        assert self.session is not None and mapping.external_port is not None
        now = self._loop.time()
        try:
            entry = await self.session.upnp.entry(mapping.key[0], mapping.external_port)
        except AutonatError as exc:
            mapping.last_error = str(exc)
            mapping.next_verify = schedule.next_verification(now, self.settings.verify_interval, self._rand)
            return
        local = str(self.session.location.local_address)
        if entry is None or entry.internal_client != local or entry.internal_port != mapping.key[1]:
            self._lost(mapping, "the router no longer lists it")
            await self._establish(mapping)
            return
        mapping.next_verify = schedule.next_verification(now, self.settings.verify_interval, self._rand)

    def _lost(self, mapping: ManagedMapping, why: str) -> None:
        log.warning("mapping %s %d lost: %s", mapping.key[0], mapping.key[1], why)
        self.events.publish(EventKind.NAT_LOST, reason=why, **mapping.to_dict())
        mapping.state = "pending"
        mapping.next_renewal = self._loop.time()

    async def _delete_on_router(
        self, protocol: str, transport: Transport, internal_port: int, external_port: int | None
    ) -> None:
        assert self.session is not None
        if protocol == "upnp" and external_port:
            await self.session.upnp.delete_external(transport, external_port)
        else:
            await self._mapper(protocol).delete(transport, internal_port)

    async def _remove(self, mapping: ManagedMapping) -> bool:
        """Tombstone in the journal, delete on the router, then forget. False if the router did not
        confirm: the mapping stays (state "removing") and the scheduler tries again after a back-off,
        until the router confirms or the lease has certainly run out."""
        transport, port = mapping.key
        async with mapping.lock:
            if not mapping.doomed or self.mappings.get(mapping.key) is not mapping:
                return True  # revived by add() while we waited, or already forgotten
            if self.journal is not None and mapping.journalled is not None:
                with contextlib.suppress(KeyError):  # no row: never journalled, so never asked for
                    self.journal.tombstone(self.gateway or "", transport, port, time.time())
                mapping.journalled = None
            protocol = mapping.protocol or mapping.asked_via
            if protocol is not None:
                if mapping.certainly_gone(time.time()):
                    holes.info(
                        "closed %s %d via %s: its lease ran out before the router confirmed a delete",
                        transport,
                        port,
                        protocol,
                    )
                else:
                    error = await self._delete_and_log(mapping, protocol)
                    if error is not None:
                        self._retry_removal(mapping, error)
                        return False
            if self.journal is not None:
                self.journal.remove(self.gateway or "", transport, port)
            del self.mappings[mapping.key]
            self.events.publish(EventKind.NAT_DEL, port=port, proto=str(transport), owner=mapping.wanted.owner)
            return True

    async def _delete_and_log(self, mapping: ManagedMapping, protocol: str) -> str | None:
        """Delete on the router and log the closed hole; the error, one line, when the router did not confirm."""
        transport, port = mapping.key
        if self.session is None:
            return "no router session"
        try:
            await self._delete_on_router(protocol, transport, port, mapping.external_port)
        except AutonatError as exc:
            return str(exc)
        holes.info("closed %s %s:%d via %s", transport, self.session.location.local_address, port, protocol)
        return None

    def _retry_removal(self, mapping: ManagedMapping, error: str) -> None:
        mapping.state = "removing"
        mapping.last_error = error
        mapping.removal_failures += 1
        delay = REMOVE_RETRY[min(mapping.removal_failures - 1, len(REMOVE_RETRY) - 1)]
        mapping.next_renewal = self._loop.time() + delay * (0.9 + 0.2 * self._rand())
        transport, port = mapping.key
        log.warning("could not delete %s %d: %s (retrying in %.0f s)", transport, port, error, delay)
        # _service requeues it when it was the caller; delete() and stop() callers are not the scheduler.
        if not mapping.busy:
            self._schedule(mapping)

    # --- noticing changes ------------------------------------------------------------------------

    def _check_reboot(self) -> None:
        if self.session is None:
            return
        rebooted = False
        for client in (self.session.pcp, self.session.natpmp):
            if client.router_rebooted:
                client.router_rebooted = False
                rebooted = True
        if rebooted:
            self._router_rebooted("epoch went back")

    def _router_rebooted(self, why: str) -> None:
        assert self.session is not None
        # Each protocol client tracks the epoch on its own; one reboot must not be reported (and acted
        # on) once per client, so the others start afresh from their next answer.
        for client in (self.session.pcp, self.session.natpmp):
            client.epochs.reset()
            client.router_rebooted = False
        log.warning("router lost its state (%s): re-creating every mapping", why)
        self.events.publish(EventKind.ROUTER_REBOOT, reason=why, gateway=self.gateway)
        now = self._loop.time()
        for mapping in self.mappings.values():
            if mapping.state == "active":
                mapping.next_renewal = now
                mapping.state = "pending"
        self._check_now.set()
        self._reschedule_all()

    async def _start_listeners(self) -> None:
        if self.session is None:
            return
        local, gateway = self.session.location.local_address, self.session.location.gateway
        for start in (watch.listen_announcements, watch.listen_notify):
            try:
                transport, _ = await start(local, gateway, self._on_router_message)
            except OSError as exc:
                log.info("cannot listen for router announcements (%s); relying on periodic checks", exc)
                continue
            self._listeners.append(transport)

    def _close_listeners(self) -> None:
        for transport in self._listeners:
            transport.close()
        self._listeners.clear()

    def _on_router_message(self, message: object) -> None:
        # Never trust the content (the first announcement after a change is stale): go and ask.
        self._check_now.set()
        if self.probe is not None and self.probe.selected == "upnp":
            # UPnP has no epoch: a NOTIFY around a router restart is the cue to verify every mapping.
            now = self._loop.time()
            for mapping in self.mappings.values():
                mapping.next_verify = min(mapping.next_verify, now + ANNOUNCE_SETTLE)
            self._reschedule_all()

    async def _external_ip_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.external_ip_interval):
                    await self._check_now.wait()
            if self._check_now.is_set():
                await asyncio.sleep(ANNOUNCE_SETTLE)
            self._check_now.clear()
            await self.check_router()

    async def check_router(self) -> None:
        """Ask the router for its external address (and, through the epoch, whether it rebooted)."""
        if self.session is None or self.probe is None:
            return
        try:
            address = await self._query_external_ip()
        except AutonatError as exc:
            self.last_error = str(exc)
            return
        finally:
            self._check_reboot()
        if address is not None and address != self.external_ip:
            old, self.external_ip = self.external_ip, address
            self._address_changed(old, address)

    async def stun_check(self) -> None:
        """Ask a STUN server (RFC 8489) what it sees; if it is not the router's external address, there
        is another NAT beyond the router: double NAT, whatever the router says."""
        if not self.settings.stun or self.session is None:
            return
        from autonat.aio.stun import parse_stun_target, stun_binding

        local = self.session.location.local_address
        try:
            seen, _ = await stun_binding(
                parse_stun_target(self.settings.stun),
                local_address=local,
                deadline=max(self.settings.timeout, 2.0),
            )
        except AutonatError as exc:
            self.stun_result = {"server": self.settings.stun, "error": str(exc)}
            return
        matches = seen == self.external_ip
        self.stun_result = {"server": self.settings.stun, "address": str(seen), "matches_router": matches}
        if not matches:
            log.warning("STUN sees %s but the router says %s: double NAT", seen, self.external_ip)
            self.events.publish(
                EventKind.DOUBLE_NAT,
                external_ip=None if self.external_ip is None else str(self.external_ip),
                stun_address=str(seen),
                reason="STUN and the router disagree",
            )

    async def _query_external_ip(self) -> IPAddress | None:
        assert self.session is not None and self.probe is not None
        protocols = self.probe.protocols
        if "natpmp" in protocols and protocols["natpmp"].available:
            return (await self.session.natpmp.external_address()).external_address
        if self.probe.selected == "upnp":
            return await self.session.upnp.external_ip()
        await self.session.pcp.probe()  # epoch only; PCP tells the address in MAP replies
        return self.external_ip

    def _address_changed(self, old: IPAddress | None, new: IPAddress | None) -> None:
        log.warning("external address changed: %s -> %s", old, new)
        self.events.publish(
            EventKind.EXTERNAL_ADDRESS_CHANGE,
            old=None if old is None else str(old),
            new=None if new is None else str(new),
        )
        for mapping in self.mappings.values():
            if mapping.state == "active":
                mapping.external_ip = new
        if new is not None and not is_public(new):
            self.events.publish(EventKind.DOUBLE_NAT, external_ip=str(new))
        if self.settings.stun and self._tasks:
            self._spawn(self.stun_check())

    # --- commands (nat_map verbs) --------------------------------------------------------------

    async def add(self, wanted: Wanted, wait: float | None = None) -> ManagedMapping:
        """Want a mapping; with the router known, wait (up to `wait` s) for its first result. A mapping
        still being deleted under the same key is wanted again instead (the one object for that key)."""
        key = (wanted.transport, wanted.internal_port)
        mapping = self.mappings.get(key)
        if mapping is None:
            mapping = ManagedMapping(wanted, next_renewal=self._loop.time())
            self.mappings[key] = mapping
        else:
            mapping.wanted = wanted
            if mapping.doomed:
                mapping.doomed = False
                mapping.removal_failures = 0
                mapping.state = "pending" if mapping.state == "removing" else mapping.state
                mapping.next_renewal = self._loop.time()
        if self.session is not None and self.mapping_enabled:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait if wait is not None else self.settings.timeout * 3):
                    while (delay := await self._establish(mapping)) > 0:
                        await asyncio.sleep(delay)  # held back by map_rate: the timeout bounds the wait
        if self.mappings.get(key) is mapping:
            self._schedule(mapping)
        return mapping

    def relabel(self, transport: Transport, internal_port: int, owner: str) -> None:
        """Give a mapping a new owner (a pooled RTP pair taken by a call); journalled at its next refresh."""
        mapping = self.mappings.get((transport, internal_port))
        if mapping is not None and not mapping.doomed:
            old = mapping.wanted
            mapping.wanted = Wanted(transport, internal_port, old.external_port, old.sticky, owner)

    async def delete(self, transport: Transport, internal_port: int) -> bool:
        """Stop wanting a mapping and delete it on the router. Returns False if there is no such mapping;
        True once the delete is decided: if the router does not confirm it at once, the engine keeps
        trying in the background (the journal keeps it tombstoned meanwhile)."""
        mapping = self.mappings.get((transport, internal_port))
        if mapping is None or mapping.doomed:
            return mapping is not None
        mapping.doomed = True
        if not mapping.maybe_on_router:
            if self.journal is not None and mapping.journalled is not None:
                self.journal.remove(self.gateway or "", transport, internal_port)
            del self.mappings[mapping.key]
            return True
        await self._limited(self._remove(mapping))
        self._poke()
        return True

    @property
    def removing(self) -> int:
        """Mappings decided deleted whose deletion the router has not confirmed yet."""
        return sum(m.doomed for m in self.mappings.values())

    async def republish(self) -> None:
        """Re-send every mapping now (FreeSWITCH's `nat_map republish`)."""
        await asyncio.gather(*(self._limited(self._establish(m)) for m in list(self.mappings.values())))
        self._reschedule_all()

    async def reinit(self) -> ProbeResult:
        """Rediscover; swap the new router state in only once it is complete, then re-make the mappings."""
        session, probe = await self._open_session()
        old = self.session
        self._close_listeners()
        self._install(session, probe)
        if old is not None:
            old.close()
        for mapping in self.mappings.values():
            if mapping.state != "disabled" and not mapping.doomed:
                mapping.state = "pending"
        await self._start_listeners()
        await self.republish()
        return probe

    async def set_mapping_enabled(self, enabled: bool) -> None:
        """`nat_map mapping enable|disable`: disabling removes our mappings from the router but keeps
        them wanted, so enabling puts them back."""
        if enabled == self.mapping_enabled:
            return
        if not enabled:
            self.mapping_enabled = False  # first, so the scheduler does not re-make what we remove
            mapped = [m for m in self.mappings.values() if m.maybe_on_router and not m.doomed]
            await asyncio.gather(*(self._limited(self._unmap_kept(m)) for m in mapped))
            return
        self.mapping_enabled = True
        now = self._loop.time()
        for mapping in self.mappings.values():
            mapping.next_renewal = now
        self._reschedule_all()

    async def _unmap_kept(self, mapping: ManagedMapping) -> None:
        """`mapping disable`: delete on the router but keep wanting it. On failure it stays mapped (and
        listed as such); the user sees the error in its status."""
        transport, port = mapping.key
        async with mapping.lock:
            protocol = mapping.protocol or mapping.asked_via
            if protocol is None or mapping.doomed:
                return
            error = await self._delete_and_log(mapping, protocol)
            if error is not None:
                mapping.last_error = error
                log.warning("could not delete %s %d: %s", transport, port, error)
                return
            if self.journal is not None:
                self.journal.remove(self.gateway or "", transport, port)
            mapping.journalled = None
            self.events.publish(EventKind.NAT_DEL, port=port, proto=str(transport), owner=mapping.wanted.owner)
            mapping.state = "pending"
            mapping.protocol = mapping.asked_via = mapping.asked_until = None
            mapping.external_port = None

    def status(self) -> dict[str, Any]:
        return {
            "nat": "disabled" if not self.settings.enabled else "enabled",
            "state": self.state,
            "protocol": None if self.probe is None else self.probe.selected,
            "gateway": self.gateway,
            "external_ip": None if self.external_ip is None else str(self.external_ip),
            "double_nat": bool(self.probe and self.probe.double_nat)
            or bool(self.stun_result and self.stun_result.get("matches_router") is False),
            "stun": self.stun_result,
            "mapping_enabled": self.mapping_enabled,
            "last_error": self.last_error,
            "mappings": [m.to_dict() for m in sorted(self.mappings.values(), key=lambda m: (m.key[1], m.key[0]))],
        }
