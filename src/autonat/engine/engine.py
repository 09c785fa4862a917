"""The NAT engine: the asyncio driver of the mapping lifecycle (autonat.engine.lifecycle).

The lifecycle core decides everything (what to map, renew, verify, delete, when, and what the external
address is); this driver performs what it decides and feeds the results back, like aioquic's
`asyncio/protocol.py` around its connection: it writes the journal (consecutive writes in one
transaction), sends router requests through the protocol clients, publishes events, logs, and arms
*one* timer at the core's `timer()`. It makes no decision of its own.

What the whole promises:
- Start-up never waits for the router: discovery runs in the background (retrying with back-off),
  mappings asked for meanwhile are kept and made as soon as a router is found.
- Every mapping is journalled *before* it is requested and forgotten only *after* the router confirmed
  its deletion, so a crash (even SIGKILL) leaves nothing in the router we no longer own: at the next
  start, leftovers are deleted, or adopted when still wanted. A delete the router does not confirm is
  retried while the daemon runs, until it is or the lease has certainly run out.
- Finite leases, renewed per RFC 6887 §11.2.1, and a verification of every mapping each
  `verify_interval`: PCP/NAT-PMP re-send the idempotent MAP (which also re-installs rules a router
  silently flushed), UPnP asks GetSpecificPortMappingEntry and re-adds what is gone.
- The router losing its state is noticed from the epoch (RFC 6886 §3.6, RFC 6887 §8.5), from
  announcements on 224.0.0.1:5350 and SSDP NOTIFY, and from verification; all mappings are re-made.
- An external address change is an event (old and new), never a restart of anything.
- `reinit` builds a complete new discovery first and swaps it in atomically.
- With `settings.ipv6`, IPv6 firewall pinholes (`Wanted(..., family=6)`) are kept exactly so: a second
  lifecycle core (the same class, `family=6`) with its own router, the IPv6 gateway's PCP or UPnP IGD:2
  (aio/pinhole.py), discovered in the background beside the IPv4 one; the same journal (rows carry their
  family and a UPnP pinhole's UniqueID), the same events (with `family: 6`), the same `map_rate` bucket.
  The SIP service asks for an RTP pinhole as it asks for a mapping: `add(Wanted(UDP, port, owner=...,
  family=6))`, `delete(UDP, port, family=6)`, `lookup((UDP, port), family=6)` (or `(UDP, port) in
  engine.pinholes`), `relabel(..., family=6)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any

from autonat.addresses import IPAddress
from autonat.aio import watch
from autonat.aio.pinhole import PinholeProbe, PinholeSession
from autonat.aio.router import ProbeResult, RouterSession
from autonat.engine import lifecycle as lc
from autonat.engine.bus import EventBus
from autonat.engine.events import EventKind
from autonat.engine.journal import Journal, JournalEntry, JournalOp
from autonat.engine.lifecycle import Key, Lifecycle, MappingStatus, Router, State, Wanted
from autonat.engine.settings import NatSettings
from autonat.errors import AutonatError
from autonat.portmapper import PortMapper
from autonat.proto.types import Transport

__all__ = ["EngineStatus", "MappingStatus", "NatEngine", "PinholeStatus", "State", "Wanted"]

log = logging.getLogger("autonat.engine")
holes = logging.getLogger("autonat.holes")
_LOGGERS = {"holes": holes, "engine": log}
STATUS_SCHEMA = 2  # the `schema` key of the status JSON (2: typed states, FreeSWITCH's proto_num left to the CLI)


@dataclass(frozen=True, slots=True)
class PinholeStatus:
    """The IPv6 side of the status (`ipv6` in the status JSON): where pinholes are kept, and how."""

    state: str  # "disabled" | "starting" | "discovering" | "ready" | "stopped"
    protocol: str | None
    gateway: str | None
    local_address: str | None  # the stable address the pinholes are for
    last_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "protocol": self.protocol,
            "gateway": self.gateway,
            "local_address": self.local_address,
            "last_error": self.last_error,
        }


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """What `nat_map status --json` shows (schema `STATUS_SCHEMA`); the CLI renders FreeSWITCH's layout."""

    nat: str  # "enabled" | "disabled"
    state: str  # "disabled" | "starting" | "discovering" | "ready" | "stopped"
    protocol: str | None
    gateway: str | None
    external_ip: IPAddress | None
    double_nat: bool
    stun: dict[str, Any] | None
    mapping_enabled: bool
    last_error: str | None
    mappings: tuple[MappingStatus, ...]  # IPv4 mappings, then IPv6 pinholes (`family` 6)
    address_history: tuple[tuple[float, IPAddress | None], ...]  # (wall time, address), oldest first
    ipv6: PinholeStatus | None = None  # None unless `[nat] ipv6` is on

    def to_dict(self, wall: float) -> dict[str, Any]:
        return {
            "schema": STATUS_SCHEMA,
            "nat": self.nat,
            "state": self.state,
            "protocol": self.protocol,
            "gateway": self.gateway,
            "external_ip": None if self.external_ip is None else str(self.external_ip),
            "double_nat": self.double_nat,
            "stun": self.stun,
            "mapping_enabled": self.mapping_enabled,
            "last_error": self.last_error,
            "mappings": [m.to_dict(wall) for m in self.mappings],
            "address_history": [
                {"at": round(at, 3), "address": None if a is None else str(a)} for at, a in self.address_history
            ],
            "ipv6": None if self.ipv6 is None else self.ipv6.to_dict(),
        }


class _Mappings(MappingABC[Key, MappingStatus]):
    """A read-only view of the engine's mappings (or, `family` 6, its pinholes) as snapshots."""

    def __init__(self, engine: NatEngine, family: int = 4) -> None:
        self._engine = engine
        self._family = family

    def _records(self) -> dict[Key, lc.Record]:
        core = self._engine._core_of(self._family, required=False)
        return {} if core is None else core.records

    def __getitem__(self, key: Key) -> MappingStatus:
        status = self._engine.lookup(key, self._family)
        if status is None:
            raise KeyError(key)
        return status

    def __contains__(self, key: object) -> bool:
        return key in self._records()

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._records()))

    def __len__(self) -> int:
        return len(self._records())


class NatEngine:
    """Owns the router session and drives the lifecycle core; use `start()` / `stop()`."""

    def __init__(
        self,
        settings: NatSettings,
        journal: Journal | None = None,
        *,
        rand: Callable[[], float] = random.random,
        session_factory: Callable[..., Any] = RouterSession.open,
        pinhole_factory: Callable[..., Any] = PinholeSession.open,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.events = EventBus()
        self.session: RouterSession | None = None
        self.probe: ProbeResult | None = None
        self.stun_result: dict[str, Any] | None = None
        self._core = Lifecycle(settings, rand=rand)
        self._session_factory = session_factory
        # IPv6 pinholes: their own core (one map_rate bucket for both), session and probe.
        self._core6 = (
            Lifecycle(settings, rand=rand, family=6, new_holes=self._core.new_holes) if settings.ipv6 else None
        )
        self._pinhole_factory = pinhole_factory
        self.session6: PinholeSession | None = None
        self.probe6: PinholeProbe | None = None
        self._state6 = "disabled" if not (settings.enabled and settings.ipv6) else "starting"
        self._state = "disabled" if not settings.enabled else "starting"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[asyncio.BaseTransport] = []
        self._ready = asyncio.Event()
        self._ready6 = asyncio.Event()  # the IPv6 gateway found: pinholes have their stable address
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._waiters: dict[tuple[int, Key], list[asyncio.Future[None]]] = {}
        self._wall_offset = time.time() - time.monotonic()
        self._router_errors: dict[tuple[str, int], int] = {}  # of the sessions before the current one

    # --- what others read ------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def external_ip(self) -> IPAddress | None:
        return self._core.external_ip

    @property
    def mapping_enabled(self) -> bool:
        return self._core.mapping_enabled

    @property
    def last_error(self) -> str | None:
        return self._core.last_error

    @property
    def gateway(self) -> str | None:
        return None if self.session is None else str(self.session.location.gateway)

    @property
    def mappings(self) -> MappingABC[Key, MappingStatus]:
        return _Mappings(self)

    @property
    def pinholes(self) -> MappingABC[Key, MappingStatus]:
        """The IPv6 pinholes, by (transport, port): empty unless `settings.ipv6`."""
        return _Mappings(self, 6)

    @property
    def ipv6_local_address(self) -> str | None:
        """The stable IPv6 address pinholes are for (what an IPv6 peer is told), once discovered."""
        return None if self.session6 is None else str(self.session6.location.local_address)

    def _core_of(self, family: int, *, required: bool = True) -> Lifecycle | None:
        if family == 4:
            return self._core
        if family == 6 and self._core6 is not None:
            return self._core6
        if required:
            raise AutonatError("IPv6 pinholes are off ([nat] ipv6 = false)" if family == 6 else f"no family {family}")
        return None

    def _core_for(self, family: int) -> Lifecycle:
        core = self._core_of(family)
        assert core is not None
        return core

    def _cores(self) -> list[Lifecycle]:
        return [self._core] if self._core6 is None else [self._core, self._core6]

    def _has_session(self, family: int) -> bool:
        return (self.session if family == 4 else self.session6) is not None

    @property
    def removing(self) -> int:
        """Mappings decided deleted whose deletion the router has not confirmed yet."""
        return self._core.removing

    def router_errors(self) -> dict[tuple[str, int], int]:
        """Every error code the router answered since start, handled (a 725 answered with a permanent
        lease, docs/QUIRKS.md U1) or final, by (protocol, code); the metrics' autonat_router_errors_total."""
        counts = dict(self._router_errors)
        for session in (self.session, self.session6):
            if session is not None:
                for key, count in session.router_errors().items():
                    counts[key] = counts.get(key, 0) + count
        return counts

    def _retire(self, session: RouterSession | PinholeSession) -> None:
        """Keep a session's error counts before it goes (the counter must never go down)."""
        for key, count in session.router_errors().items():
            self._router_errors[key] = self._router_errors.get(key, 0) + count
        session.close()

    def lookup(self, key: Key, family: int = 4) -> MappingStatus | None:
        core = self._core_of(family, required=False)
        return None if core is None else core.status_of(key, self._now())

    def map_budget(self) -> float:
        """How many new mappings may go to the router right now (`map_rate`): a caller that cannot wait
        (a call being answered) checks this instead of queueing behind the limit."""
        return self._core.map_budget(self._now())

    def status_object(self) -> EngineStatus:
        core, now = self._core, self._now()
        probe = self.probe
        ipv6 = None
        mappings = core.statuses(now)
        if self._core6 is not None:
            mappings += self._core6.statuses(now)
            session6 = self.session6
            ipv6 = PinholeStatus(
                state=self._state6,
                protocol=None if self.probe6 is None else self.probe6.selected,
                gateway=None if session6 is None else str(session6.location.gateway),
                local_address=self.ipv6_local_address,
                last_error=self._core6.last_error,
            )
        return EngineStatus(
            nat="disabled" if not self.settings.enabled else "enabled",
            state=self._state,
            protocol=None if probe is None else probe.selected,
            gateway=self.gateway,
            external_ip=core.external_ip,
            double_nat=bool(probe and probe.double_nat)
            or bool(self.stun_result and self.stun_result.get("matches_router") is False),
            stun=self.stun_result,
            mapping_enabled=core.mapping_enabled,
            last_error=core.last_error,
            mappings=tuple(mappings),
            address_history=tuple((at + self._wall_offset, address) for at, address in core.address_history),
            ipv6=ipv6,
        )

    def status(self) -> dict[str, Any]:
        return self.status_object().to_dict(time.time())

    # --- life cycle ----------------------------------------------------------------------------------

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def start(self, static: Iterable[Wanted] = ()) -> None:
        """Returns at once: discovery and mapping happen in the background (for IPv6 pinholes too)."""
        wanted = list(static)
        for family in (6, 4):  # a family-6 wish without [nat] ipv6 fails before anything starts
            core = self._core_of(family, required=any(w.family == family for w in wanted))
            if core is not None:
                core.start([w for w in wanted if w.family == family], self._now())
        if self.settings.enabled:
            self._state = "discovering"
            if self._core6 is not None:
                self._state6 = "discovering"
        self._run()

    async def wait_ready(self, timeout: float, family: int = 4) -> bool:
        """Until the router is found (`family` 6: the IPv6 gateway, for pinholes), at most `timeout` s."""
        ready = self._ready6 if family == 6 else self._ready
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await ready.wait()
        return ready.is_set()

    async def stop(self) -> None:
        """Delete every non-sticky mapping within `shutdown_timeout`; sticky ones stay (and stay journalled).
        What the router did not confirm by then stays tombstoned in the journal: the next start deletes it."""
        self._close_listeners()
        now = self._now()
        doomed = [
            (core.family, key) for core in self._cores() for key in core.stop(now) if self._has_session(core.family)
        ]
        self._run()
        if doomed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_timeout):
                    while any(self._pending(item) for item in doomed):
                        await self._settled(doomed)
            left = sum(self._pending(item) for item in doomed)
            if left:
                log.warning(
                    "%d mapping(s) not confirmed deleted within %g s; the journal keeps them and the next start"
                    " deletes them",
                    left,
                    self.settings.shutdown_timeout,
                )
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._timer is not None:
            self._timer.cancel()
        if self.session is not None:
            self._retire(self.session)
            self.session = None
        if self.session6 is not None:
            self._retire(self.session6)
            self.session6 = None
            self._ready6.clear()
        self._state = "stopped"
        if self._core6 is not None:
            self._state6 = "stopped"

    def _pending(self, item: tuple[int, Key]) -> bool:
        """Is the mapping (family, key) still in its core (a delete not yet confirmed)?"""
        return item[1] in self._core_for(item[0]).records

    # --- commands (nat_map verbs) --------------------------------------------------------------------

    async def add(self, wanted: Wanted, wait: float | None = None) -> MappingStatus:
        """Want a mapping (`wanted.family` 6: an IPv6 pinhole); with the router known, wait (up to `wait` s)
        for its first result. AutonatError for a pinhole while `[nat] ipv6` is off."""
        family = wanted.family
        core = self._core_for(family)
        core.want(wanted, self._now())
        self._run()
        if self._has_session(family) and core.mapping_enabled:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait if wait is not None else self.settings.timeout * 3):
                    while (record := core.records.get(wanted.key)) is not None and (
                        record.inflight is not None or record.state in (State.PENDING,)
                    ):
                        await self._settled([(family, wanted.key)])
        status = self.lookup(wanted.key, family)
        assert status is not None
        return status

    def relabel(self, transport: Transport, internal_port: int, owner: str, family: int = 4) -> None:
        """Give a mapping a new owner (a pooled RTP pair taken by a call); journalled at its next refresh."""
        core = self._core_of(family, required=False)
        if core is not None:
            core.relabel((transport, internal_port), owner)

    async def delete(self, transport: Transport, internal_port: int, family: int = 4) -> bool:
        """Stop wanting a mapping (`family` 6: a pinhole) and delete it on the router. False if there is no
        such mapping; True once the delete is decided (and its first attempt has a result): if the router
        does not confirm, the engine keeps trying in the background, the journal keeping it tombstoned."""
        core = self._core_of(family, required=False)
        key = (transport, internal_port)
        if core is None or not core.unwant(key, self._now()):
            return False
        self._run()
        record = core.records.get(key)
        if record is not None and record.state is State.REMOVING and self._has_session(family):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.timeout * 3):
                    while (record := core.records.get(key)) is not None and record.inflight is not None:
                        await self._settled([(family, key)])
        return True

    async def republish(self) -> None:
        """Re-send every mapping (and pinhole) now (FreeSWITCH's `nat_map republish`)."""
        now = self._now()
        for core in self._cores():
            core.republish(now)
        self._run()
        await self._until_settled()

    async def _until_settled(self) -> None:
        """Until every mapping's request now out (or about to be) has its answer, within 3 timeouts."""
        items = [(core.family, key) for core in self._cores() for key in core.records]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.timeout * 3):
                while any(self._core_for(family).settling([key]) for family, key in items):
                    await self._settled(items)

    async def reinit(self) -> ProbeResult:
        """Rediscover; swap the new router state in only once it is complete, then re-make the mappings.
        The IPv6 side too, when on: a rediscovery that fails there leaves its old state (and says why)."""
        session, probe = await self._open_session()
        session6: tuple[PinholeSession, PinholeProbe] | None = None
        if self._core6 is not None:
            try:
                session6 = await self._open_session6()
            except AutonatError as exc:
                self._core6.last_error = str(exc)
        old, old6 = self.session, self.session6
        self._close_listeners()
        self._install(session, probe)
        if session6 is not None:
            self._install6(*session6)
        if old is not None:
            self._retire(old)
        if old6 is not None and session6 is not None:
            self._retire(old6)
        await self._start_listeners()
        await self.republish()
        return probe

    async def set_mapping_enabled(self, enabled: bool) -> None:
        """`nat_map mapping enable|disable`: disabling removes our mappings from the router but keeps
        them wanted, so enabling puts them back."""
        now = self._now()
        for core in self._cores():
            core.set_enabled(enabled, now)
        self._run()
        await self._until_settled()

    async def check_router(self) -> None:
        """Ask the router for its external address now (and, through the epoch, whether it rebooted)."""
        now = self._now()
        for core in self._cores():
            core.check_address(now)
        self._run()
        await asyncio.sleep(0)

    # --- driving the core ------------------------------------------------------------------------------

    def _run(self) -> None:
        """Perform what the cores decided (each core's actions in their order), then re-arm the one timer."""
        for core in self._cores():
            journal: list[lc.Action] = []
            for action in core.actions():
                if isinstance(action, lc.JOURNAL_ACTIONS):
                    journal.append(action)
                    continue
                if journal:
                    self._write_journal(journal)  # durable before any request that follows it
                    journal = []
                self._perform(action, core.family)
            if journal:
                self._write_journal(journal)
        self._arm()

    def _arm(self) -> None:
        when = min((t for core in self._cores() if (t := core.timer()) is not None), default=None)
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(max(when, loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._now()
        for core in self._cores():
            core.handle_timer(now)
        self._run()

    def _perform(self, action: lc.Action, family: int = 4) -> None:
        if isinstance(action, lc.RequestMap):
            self._spawn(self._map(action) if family == 4 else self._map6(action))
        elif isinstance(action, lc.RequestDelete):
            self._spawn(self._delete(action) if family == 4 else self._delete6(action))
        elif isinstance(action, lc.RequestVerify):
            assert family == 4, "a pinhole is refreshed, never verified (lifecycle: U18)"
            self._spawn(self._verify(action))
        elif isinstance(action, lc.QueryAddress):
            self._spawn(self._query_address(action.protocol) if family == 4 else self._query_epoch6())
        elif isinstance(action, lc.Discover):
            self._spawn(self._discover() if family == 4 else self._discover6())
        elif isinstance(action, lc.Emit):
            self.events.publish(action.kind, **action.data)
        elif isinstance(action, lc.Log):
            extra = None if action.fields is None else {"fields": action.fields}
            getattr(_LOGGERS[action.channel], action.level)("%s", action.message, extra=extra)
        elif isinstance(action, lc.Settled):
            for waiter in self._waiters.pop((action.family, action.key), []):
                if not waiter.done():
                    waiter.set_result(None)
        elif isinstance(action, lc.AddressChanged) and self.settings.stun and action.old is not None:
            self._spawn(self.stun_check())

    def _write_journal(self, actions: list[lc.Action]) -> None:
        """Consecutive journal actions in one transaction (one fsync), before anything that follows them."""
        if self.journal is None:
            return
        wall = time.time()
        operations: list[JournalOp] = []
        for action in actions:
            if isinstance(action, lc.JournalRecord):
                transport, port = action.key
                entry = JournalEntry(
                    transport=transport,
                    internal_port=port,
                    owner=action.owner,
                    sticky=action.sticky,
                    desired=action.desired,
                    protocol=action.protocol,
                    gateway=action.gateway,
                    internal_address=action.internal_address,
                    requested_external_port=action.requested_external_port,
                    external_port=action.external_port,
                    lease=action.lease,
                    updated_at=wall,
                    family=action.family,
                    unique_id=action.unique_id,
                )
                operations.append(("record", entry))
            elif isinstance(action, lc.JournalTombstone):
                operations.append(("tombstone", [(action.gateway, *key, action.family) for key in action.keys]))
            else:
                assert isinstance(action, lc.JournalRemove)
                operations.append(("remove", [(action.gateway, *action.key, action.family)]))
        self.journal.apply(operations, wall)

    async def _settled(self, keys: list[tuple[int, Key]]) -> None:
        """Until one of `keys` ((family, key) pairs) has a result."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        for key in keys:
            self._waiters.setdefault(key, []).append(waiter)
        try:
            await waiter
        finally:
            for key in keys:
                waiters = self._waiters.get(key)
                if waiters and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._waiters[key]

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
            self._core.last_error = f"internal error: {task.exception()!r}"

    # --- the IPv6 pinholes' router requests (aio/pinhole.py) ---------------------------------------------

    def _pinhole_mapper(self, protocol: str) -> PortMapper:
        assert self.session6 is not None
        return self.session6.pcp if protocol == "pcp" else self.session6.upnp

    async def _map6(self, action: lc.RequestMap) -> None:
        assert self.session6 is not None and self._core6 is not None
        try:
            if action.protocol == "upnp":
                granted = await self.session6.upnp.add(action.request, unique_id=action.unique_id)
            else:
                granted = await self._pinhole_mapper(action.protocol).add(action.request)
        except AutonatError as exc:
            self._core6.request_failed(
                action.key, str(exc), self._now(), code=getattr(exc, "code", None), protocol=action.protocol
            )
        else:
            self._core6.granted(action.key, granted, self._now())
        self._run()

    async def _delete6(self, action: lc.RequestDelete) -> None:
        assert self.session6 is not None and self._core6 is not None
        transport, port = action.key
        try:
            if action.protocol == "upnp" and action.unique_id is not None:
                await self.session6.upnp.delete_pinhole(action.unique_id)
            else:
                await self._pinhole_mapper(action.protocol).delete(transport, port)
        except AutonatError as exc:
            self._core6.delete_failed(
                action.key, str(exc), self._now(), code=getattr(exc, "code", None), protocol=action.protocol
            )
        else:
            self._core6.deleted(action.key, self._now())
        self._run()

    async def _query_epoch6(self) -> None:
        """PCP's ANNOUNCE (RFC 6887 §14.1): the IPv6 router's epoch, which tells a reboot."""
        assert self.session6 is not None and self._core6 is not None
        status = await self.session6.pcp.probe()
        if status.available:
            self._core6.address("pcp", None, status.epoch, self._now())
        else:
            self._core6.address_failed(status.reason, self._now())
        self._run()

    # --- the router requests ---------------------------------------------------------------------------

    def _mapper(self, protocol: str) -> PortMapper:
        assert self.session is not None
        clients: dict[str, PortMapper] = {
            "pcp": self.session.pcp,
            "natpmp": self.session.natpmp,
            "upnp": self.session.upnp,
        }
        return clients[protocol]

    async def _map(self, action: lc.RequestMap) -> None:
        try:
            granted = await self._mapper(action.protocol).add(action.request)
        except AutonatError as exc:
            self._core.request_failed(
                action.key, str(exc), self._now(), code=getattr(exc, "code", None), protocol=action.protocol
            )
        else:
            self._core.granted(action.key, granted, self._now())
        self._run()

    async def _delete(self, action: lc.RequestDelete) -> None:
        assert self.session is not None
        transport, port = action.key
        try:
            if action.protocol == "upnp" and action.external_port:
                await self.session.upnp.delete_external(transport, action.external_port)
            else:
                await self._mapper(action.protocol).delete(transport, port)
        except AutonatError as exc:
            self._core.delete_failed(
                action.key, str(exc), self._now(), code=getattr(exc, "code", None), protocol=action.protocol
            )
        else:
            self._core.deleted(action.key, self._now())
        self._run()

    async def _verify(self, action: lc.RequestVerify) -> None:
        assert self.session is not None
        transport, port = action.key
        try:
            entry = await self.session.upnp.entry(transport, action.external_port)
        except AutonatError as exc:
            self._core.verified(action.key, True, self._now(), error=str(exc))
        else:
            local = str(self.session.location.local_address)
            present = entry is not None and entry.internal_client == local and entry.internal_port == port
            self._core.verified(action.key, present, self._now())
        self._run()

    async def _query_address(self, protocol: str) -> None:
        assert self.session is not None
        try:
            if protocol == "natpmp":
                answer = await self.session.natpmp.external_address()
                self._core.address("natpmp", answer.external_address, answer.epoch, self._now())
            elif protocol == "upnp":
                self._core.address("upnp", await self.session.upnp.external_ip(), None, self._now())
            else:
                status = await self.session.pcp.probe()  # PCP has no address request: the epoch only
                self._core.address("pcp", None, status.epoch, self._now())
        except AutonatError as exc:
            self._core.address_failed(str(exc), self._now())
        self._run()

    # --- discovery -------------------------------------------------------------------------------------

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

    async def _discover(self) -> None:
        try:
            session, probe = await self._open_session()
        except AutonatError as exc:
            self._core.discovery_failed(str(exc), self._now())
            self._run()
            return
        self._install(session, probe)
        if self.journal is not None:
            self._core.adopt(self._leftovers(4), self._now())
        self._run()
        await self._start_listeners()

    async def _open_session6(self) -> tuple[PinholeSession, PinholeProbe]:
        settings = self.settings
        session: PinholeSession = await self._pinhole_factory(
            settings.ipv6_gateway,
            settings.interface,
            settings.timeout,
            None,
            local_address=settings.ipv6_address,
            max_lifetime=settings.max_lease,
        )
        try:
            probe = await session.probe(settings.ipv6_protocol)
            if probe.selected is None:
                reasons = "; ".join(f"{name}: {status.reason}" for name, status in probe.protocols.items())
                raise AutonatError(f"no pinhole protocol works with {session.location.gateway} ({reasons})")
        except BaseException:
            session.close()
            raise
        return session, probe

    async def _discover6(self) -> None:
        assert self._core6 is not None
        try:
            session, probe = await self._open_session6()
        except AutonatError as exc:
            self._core6.discovery_failed(str(exc), self._now())
            self._run()
            return
        self._install6(session, probe)
        if self.journal is not None:
            self._core6.adopt(self._leftovers(6), self._now())
        self._run()
        await self._start_listeners6()

    def _install6(self, session: PinholeSession, probe: PinholeProbe) -> None:
        assert probe.selected is not None and self._core6 is not None
        self.session6, self.probe6 = session, probe
        router = Router(
            gateway=str(session.location.gateway),
            local_address=str(session.location.local_address),
            protocol=probe.selected,
        )
        self._state6 = "ready"
        log.info("IPv6 pinholes: %s via %s for %s", probe.selected, router.gateway, router.local_address)
        self.events.publish(
            EventKind.DISCOVERED,
            protocol=probe.selected,
            gateway=router.gateway,
            local_address=router.local_address,
            family=6,
        )
        self._core6.discovered(router, None, self._now())
        self._ready6.set()
        self._run()

    def _install(self, session: RouterSession, probe: ProbeResult) -> None:
        assert probe.selected is not None
        self.session, self.probe = session, probe
        natpmp = probe.protocols.get("natpmp")
        router = Router(
            gateway=str(session.location.gateway),
            local_address=str(session.location.local_address),
            protocol=probe.selected,
            natpmp_available=bool(natpmp and natpmp.available),
        )
        self._state = "ready"
        log.info("NAT detected type: %s, ExtIP: %s", probe.selected, probe.external_ip)
        self.events.publish(
            EventKind.DISCOVERED,
            protocol=probe.selected,
            gateway=router.gateway,
            external_ip=None if probe.external_ip is None else str(probe.external_ip),
        )
        if probe.double_nat:
            self.events.publish(EventKind.DOUBLE_NAT, external_ip=str(probe.external_ip))
        self._core.discovered(router, probe.external_ip, self._now())
        self._ready.set()
        if self.settings.stun:
            self._spawn(self.stun_check())
        self._run()

    def _leftovers(self, family: int) -> list[lc.Leftover]:
        assert self.journal is not None
        wall = time.time()
        return [
            lc.Leftover(
                transport=entry.transport,
                internal_port=entry.internal_port,
                owner=entry.owner,
                sticky=entry.sticky,
                desired=entry.desired,
                protocol=entry.protocol,
                gateway=entry.gateway,
                requested_external_port=entry.requested_external_port,
                external_port=entry.external_port,
                lease=entry.lease,
                age=max(0.0, wall - entry.updated_at),
                unique_id=entry.unique_id,
            )
            for entry in self.journal.entries()
            if entry.family == family
        ]

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

    async def _start_listeners6(self) -> None:
        if self.session6 is None:
            return
        location = self.session6.location
        local, gateway = self.session6.local_address, location.gateway
        assert isinstance(gateway, IPv6Address)
        try:
            transport, _ = await watch.listen_announcements(
                local, gateway, self._on_router_message, interface=location.interface
            )
            self._listeners.append(transport)
            self._listeners.extend(
                await watch.listen_notify6(local, gateway, self._on_router_message, interface=location.interface)
            )
        except OSError as exc:
            log.info("cannot listen for IPv6 router announcements (%s); relying on periodic checks", exc)

    def _close_listeners(self) -> None:
        for transport in self._listeners:
            transport.close()
        self._listeners.clear()

    def _on_router_message(self, message: object) -> None:
        """An announcement or NOTIFY from either family's gateway is a cue for both cores: in a home both
        are one box, and miniupnpd sends its start-up ANNOUNCE over IPv4 only (docs/QUIRKS.md P9). A cue
        only makes a core ask its own router (lifecycle `announced`), so a wrong guess costs one request."""
        now = self._now()
        for core in self._cores():
            core.announced(now)
        self._run()

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
