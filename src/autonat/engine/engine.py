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
from typing import Any

from autonat.addresses import IPAddress
from autonat.aio import watch
from autonat.aio.router import ProbeResult, RouterSession
from autonat.engine import lifecycle as lc
from autonat.engine.bus import EventBus
from autonat.engine.events import EventKind
from autonat.engine.journal import Journal, JournalEntry, JournalOp
from autonat.engine.lifecycle import Key, Lifecycle, MappingStatus, Router, State, Wanted
from autonat.engine.settings import NatSettings
from autonat.errors import AutonatError
from autonat.mapper import PortMapper
from autonat.proto.types import Transport

__all__ = ["EngineStatus", "MappingStatus", "NatEngine", "State", "Wanted"]

log = logging.getLogger("autonat.engine")
holes = logging.getLogger("autonat.holes")
_LOGGERS = {"holes": holes, "engine": log}
STATUS_SCHEMA = 2  # the `schema` key of the status JSON (2: typed states, FreeSWITCH's proto_num left to the CLI)


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
    mappings: tuple[MappingStatus, ...]
    address_history: tuple[tuple[float, IPAddress | None], ...]  # (wall time, address), oldest first

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
        }


class _Mappings(MappingABC[Key, MappingStatus]):
    """A read-only view of the engine's mappings as snapshots."""

    def __init__(self, engine: NatEngine) -> None:
        self._engine = engine

    def __getitem__(self, key: Key) -> MappingStatus:
        status = self._engine.lookup(key)
        if status is None:
            raise KeyError(key)
        return status

    def __contains__(self, key: object) -> bool:
        return key in self._engine._core.records

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._engine._core.records))

    def __len__(self) -> int:
        return len(self._engine._core.records)


class NatEngine:
    """Owns the router session and drives the lifecycle core; use `start()` / `stop()`."""

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
        self.session: RouterSession | None = None
        self.probe: ProbeResult | None = None
        self.stun_result: dict[str, Any] | None = None
        self._core = Lifecycle(settings, rand=rand)
        self._session_factory = session_factory
        self._state = "disabled" if not settings.enabled else "starting"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[asyncio.BaseTransport] = []
        self._ready = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._waiters: dict[Key, list[asyncio.Future[None]]] = {}
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
    def removing(self) -> int:
        """Mappings decided deleted whose deletion the router has not confirmed yet."""
        return self._core.removing

    def router_errors(self) -> dict[tuple[str, int], int]:
        """Every error code the router answered since start, handled (a 725 answered with a permanent
        lease, docs/QUIRKS.md U1) or final, by (protocol, code); the metrics' autonat_router_errors_total."""
        counts = dict(self._router_errors)
        if self.session is not None:
            for key, count in self.session.router_errors().items():
                counts[key] = counts.get(key, 0) + count
        return counts

    def _retire(self, session: RouterSession) -> None:
        """Keep a session's error counts before it goes (the counter must never go down)."""
        for key, count in session.router_errors().items():
            self._router_errors[key] = self._router_errors.get(key, 0) + count
        session.close()

    def lookup(self, key: Key) -> MappingStatus | None:
        return self._core.status_of(key, self._now())

    def map_budget(self) -> float:
        """How many new mappings may go to the router right now (`map_rate`): a caller that cannot wait
        (a call being answered) checks this instead of queueing behind the limit."""
        return self._core.map_budget(self._now())

    def status_object(self) -> EngineStatus:
        core, now = self._core, self._now()
        probe = self.probe
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
            mappings=tuple(core.statuses(now)),
            address_history=tuple((at + self._wall_offset, address) for at, address in core.address_history),
        )

    def status(self) -> dict[str, Any]:
        return self.status_object().to_dict(time.time())

    # --- life cycle ----------------------------------------------------------------------------------

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def start(self, static: Iterable[Wanted] = ()) -> None:
        """Returns at once: discovery and mapping happen in the background."""
        self._core.start(static, self._now())
        if self.settings.enabled:
            self._state = "discovering"
        self._run()

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        return self._ready.is_set()

    async def stop(self) -> None:
        """Delete every non-sticky mapping within `shutdown_timeout`; sticky ones stay (and stay journalled).
        What the router did not confirm by then stays tombstoned in the journal: the next start deletes it."""
        self._close_listeners()
        keys = self._core.stop(self._now())
        self._run()
        if keys and self.session is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_timeout):
                    while any(key in self._core.records for key in keys):
                        await self._settled(keys)
            left = sum(key in self._core.records for key in keys)
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
        self._state = "stopped"

    # --- commands (nat_map verbs) --------------------------------------------------------------------

    async def add(self, wanted: Wanted, wait: float | None = None) -> MappingStatus:
        """Want a mapping; with the router known, wait (up to `wait` s) for its first result."""
        self._core.want(wanted, self._now())
        self._run()
        if self.session is not None and self._core.mapping_enabled:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait if wait is not None else self.settings.timeout * 3):
                    while (record := self._core.records.get(wanted.key)) is not None and (
                        record.inflight is not None or record.state in (State.PENDING,)
                    ):
                        await self._settled([wanted.key])
        status = self.lookup(wanted.key)
        assert status is not None
        return status

    def relabel(self, transport: Transport, internal_port: int, owner: str) -> None:
        """Give a mapping a new owner (a pooled RTP pair taken by a call); journalled at its next refresh."""
        self._core.relabel((transport, internal_port), owner)

    async def delete(self, transport: Transport, internal_port: int) -> bool:
        """Stop wanting a mapping and delete it on the router. False if there is no such mapping; True
        once the delete is decided (and its first attempt has a result): if the router does not confirm,
        the engine keeps trying in the background, the journal keeping it tombstoned meanwhile."""
        key = (transport, internal_port)
        if not self._core.unwant(key, self._now()):
            return False
        self._run()
        record = self._core.records.get(key)
        if record is not None and record.state is State.REMOVING and self.session is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.timeout * 3):
                    while (record := self._core.records.get(key)) is not None and record.inflight is not None:
                        await self._settled([key])
        return True

    async def republish(self) -> None:
        """Re-send every mapping now (FreeSWITCH's `nat_map republish`)."""
        self._core.republish(self._now())
        self._run()
        keys = list(self._core.records)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.timeout * 3):
                while self._core.settling(keys):
                    await self._settled(keys)

    async def reinit(self) -> ProbeResult:
        """Rediscover; swap the new router state in only once it is complete, then re-make the mappings."""
        session, probe = await self._open_session()
        old = self.session
        self._close_listeners()
        self._install(session, probe)
        if old is not None:
            self._retire(old)
        await self._start_listeners()
        await self.republish()
        return probe

    async def set_mapping_enabled(self, enabled: bool) -> None:
        """`nat_map mapping enable|disable`: disabling removes our mappings from the router but keeps
        them wanted, so enabling puts them back."""
        self._core.set_enabled(enabled, self._now())
        self._run()
        keys = list(self._core.records)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.timeout * 3):
                while self._core.settling(keys):
                    await self._settled(keys)

    async def check_router(self) -> None:
        """Ask the router for its external address now (and, through the epoch, whether it rebooted)."""
        self._core.check_address(self._now())
        self._run()
        await asyncio.sleep(0)

    # --- driving the core ------------------------------------------------------------------------------

    def _run(self) -> None:
        """Perform what the core decided, then re-arm the one timer."""
        actions = self._core.actions()
        journal: list[lc.Action] = []
        for action in actions:
            if isinstance(action, lc.JOURNAL_ACTIONS):
                journal.append(action)
                continue
            if journal:
                self._write_journal(journal)  # durable before any request that follows it
                journal = []
            self._perform(action)
        if journal:
            self._write_journal(journal)
        self._arm()

    def _arm(self) -> None:
        when = self._core.timer()
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
        self._core.handle_timer(self._now())
        self._run()

    def _perform(self, action: lc.Action) -> None:
        if isinstance(action, lc.RequestMap):
            self._spawn(self._map(action))
        elif isinstance(action, lc.RequestDelete):
            self._spawn(self._delete(action))
        elif isinstance(action, lc.RequestVerify):
            self._spawn(self._verify(action))
        elif isinstance(action, lc.QueryAddress):
            self._spawn(self._query_address(action.protocol))
        elif isinstance(action, lc.Discover):
            self._spawn(self._discover())
        elif isinstance(action, lc.Emit):
            self.events.publish(action.kind, **action.data)
        elif isinstance(action, lc.Log):
            extra = None if action.fields is None else {"fields": action.fields}
            getattr(_LOGGERS[action.channel], action.level)("%s", action.message, extra=extra)
        elif isinstance(action, lc.Settled):
            for waiter in self._waiters.pop(action.key, []):
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
                )
                operations.append(("record", entry))
            elif isinstance(action, lc.JournalTombstone):
                operations.append(("tombstone", [(action.gateway, *key) for key in action.keys]))
            else:
                assert isinstance(action, lc.JournalRemove)
                operations.append(("remove", [(action.gateway, *action.key)]))
        self.journal.apply(operations, wall)

    async def _settled(self, keys: list[Key]) -> None:
        """Until one of `keys` has a result."""
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
            self._core.adopt(self._leftovers(), self._now())
        self._run()
        await self._start_listeners()

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

    def _leftovers(self) -> list[lc.Leftover]:
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
            )
            for entry in self.journal.entries()
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

    def _close_listeners(self) -> None:
        for transport in self._listeners:
            transport.close()
        self._listeners.clear()

    def _on_router_message(self, message: object) -> None:
        self._core.announced(self._now())
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
