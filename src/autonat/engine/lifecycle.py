"""The mapping lifecycle, sans-IO: every decision the NAT engine makes, and none of its I/O.

Like aioquic's `QuicConnection`, this core is driven by exactly three things, each with `now` (seconds
on the caller's monotonic clock) passed in: calls (`want`, `unwant`, `set_enabled`, `republish`,
`stop` ...), results of the actions it asked for (`granted`, `request_failed`, `deleted`, `address` ...),
and its one timer firing (`handle_timer` at `timer()`). It answers with typed actions, drained with
`actions()` and performed in order by the driver (autonat.engine.engine.NatEngine): write the journal,
ask the router, emit an event, log a line. It reads no clock, opens no socket and never awaits.

Everything that decides the fate of a mapping lives here, with one owner each:
- the wanted set and each mapping's `State` (the table below), lease, renewal (RFC 6887 §11.2.1,
  RFC 6886 §3.7) and verification schedule, back-off and retries;
- the router: which protocol, its epochs (RFC 6886 §3.6, RFC 6887 §8.5) and so its reboots;
- **the one external address**: every answer that carries it (a probe, a NAT-PMP address answer, a PCP
  or NAT-PMP grant, a UPnP GetExternalIPAddress) updates it, and a change is one event;
- the caps on router traffic: at most `CONCURRENCY` requests in flight, new holes at most `map_rate` a
  second, refreshes at most `RENEWAL_SHARE` of the mappings in any one second;
- the journal rule: a mapping's row is written *before* its request leaves (the actions come out in that
  order) and removed only after the router confirmed the delete. A delete the router did not confirm is
  retried with back-off until it does or the lease has certainly run out; asking for the port again
  revives the same record (one record per key, always: two for one key is how a flood once leaked
  unjournalled mappings).

States and transitions (`_ALLOWED`; anything else is a bug and raises):

    state      what it means                                  leaves for
    PENDING    wanted, not on the router (yet, or any more)   ACTIVE (granted), FAILED, REMOVING, DISABLED
    ACTIVE     granted; renewed and verified on schedule      ACTIVE (renewed), PENDING (lost, reboot),
                                                              FAILED, REMOVING, DISABLED
    FAILED     the last request failed: retried after back-off ACTIVE, FAILED, PENDING, REMOVING, DISABLED
    DISABLED   wanted, kept off the router (mapping disable)  PENDING (enable), REMOVING
    REMOVING   not wanted: deleted on the router, retried     PENDING (wanted again), REMOVING; forgotten
               until confirmed or its lease certainly ended   once confirmed (the record leaves the table)

One operation at a time per mapping (`Record.inflight`): a decision that comes while one is out waits
for its result, which is the only concurrency device; the driver needs no locks.

IPv6 firewall pinholes (`family` 6) run through this same core, one instance per family: the same states,
schedule, caps, journal rule and events, for the IPv6 gateway's PCP or UPnP IGD:2. What differs is
declared here, not in the driver: a pinhole's "external" address is our own (RFC 6887 §11.1 on a
firewall), so a grant is never taken as the router's external address and a family-6 core owns none (no
address events, no double NAT); the address check is PCP's epoch alone (an ANNOUNCE, or the refresh of
the mapping due soonest), UPnP has none; a UPnP pinhole is refreshed (UpdatePinhole, which also proves it
is there: docs/QUIRKS.md U18) and deleted by the UniqueID the router gave it, which the record and the
journal keep. Every event and journal row says its family.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from autonat.addresses import IPAddress, is_public
from autonat.engine import schedule
from autonat.engine.events import EventKind
from autonat.engine.settings import NatSettings
from autonat.limits import TokenBucket
from autonat.mapper import Mapping, MappingRequest
from autonat.proto.epoch import EpochTracker
from autonat.proto.types import Transport

Key = tuple[Transport, int]
FAMILIES = (4, 6)

DISCOVERY_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
FAILED_RETRY = (2.0, 5.0, 15.0, 30.0, 60.0)
REMOVE_RETRY = (1.0, 2.0, 5.0, 15.0, 30.0, 60.0)  # a delete the router did not confirm, tried again
EXPIRY_MARGIN = 60.0  # past the lease's end by this much, a router has certainly dropped the mapping
# Routine refreshes due within this many seconds go out with the one due now: one wake-up for a few of
# them instead of one each (the renewal window of RFC 6887 §11.2.1 is 1/8 of the lease, seconds at least).
COALESCE = 0.25
RENEWAL_SHARE = 0.04  # at most 4 % of the mappings refreshed in any one second ...
MIN_REFRESHES_PER_SECOND = 5  # ... but never fewer than this, so small sets are not slowed down
CONCURRENCY = 16  # router requests in flight: a burst of a thousand overflows a router's socket buffer
ANNOUNCE_SETTLE = 0.05  # miniupnpd's first announcement after a change is stale; the right one follows
ADDRESS_HISTORY = 16


class State(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    FAILED = "failed"
    DISABLED = "disabled"
    REMOVING = "removing"


_ALLOWED: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.ACTIVE, State.FAILED, State.REMOVING, State.DISABLED, State.PENDING}),
    State.ACTIVE: frozenset({State.ACTIVE, State.PENDING, State.FAILED, State.REMOVING, State.DISABLED}),
    State.FAILED: frozenset({State.ACTIVE, State.FAILED, State.PENDING, State.REMOVING, State.DISABLED}),
    State.DISABLED: frozenset({State.PENDING, State.REMOVING, State.DISABLED}),
    State.REMOVING: frozenset({State.PENDING, State.REMOVING}),
}


class Op(enum.Enum):
    MAP = "map"
    DELETE = "delete"
    VERIFY = "verify"


@dataclass(frozen=True, slots=True)
class Wanted:
    """A mapping somebody asked for; `family` 6 is an IPv6 firewall pinhole for our stable address (whose
    `external_port` is ignored: a pinhole opens the internal port itself)."""

    transport: Transport
    internal_port: int
    external_port: int = 0
    sticky: bool = False
    owner: str = "manual"
    family: int = 4

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be 4 (a port mapping) or 6 (an IPv6 pinhole), not {self.family!r}")

    @property
    def key(self) -> Key:
        return self.transport, self.internal_port


@dataclass(frozen=True, slots=True)
class Router:
    """What discovery found: the gateway, our address as it sees us, and the protocol to use."""

    gateway: str
    local_address: str
    protocol: str  # "pcp" | "natpmp" | "upnp"
    natpmp_available: bool = False  # NAT-PMP answers address queries (RFC 6886 §3.2), whatever is selected


@dataclass(frozen=True, slots=True)
class Leftover:
    """A journal row of an earlier run, as the driver read it (`age`: seconds since its update)."""

    transport: Transport
    internal_port: int
    owner: str
    sticky: bool
    desired: bool
    protocol: str
    gateway: str
    requested_external_port: int
    external_port: int | None
    lease: int
    age: float
    unique_id: int | None = None  # a UPnP pinhole's UniqueID


# --- actions ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Discover:
    """Find the router (probe every protocol) and report `discovered` or `discovery_failed`."""


@dataclass(frozen=True, slots=True)
class RequestMap:
    key: Key
    protocol: str
    request: MappingRequest
    unique_id: int | None = None  # a UPnP pinhole being refreshed: UpdatePinhole names it so


@dataclass(frozen=True, slots=True)
class RequestDelete:
    key: Key
    protocol: str
    external_port: int | None  # UPnP deletes by external port
    unique_id: int | None = None  # ... and a UPnP pinhole by its UniqueID


@dataclass(frozen=True, slots=True)
class RequestVerify:
    """UPnP has no idempotent refresh to prove a mapping is there: ask GetSpecificPortMappingEntry (IPv4
    only: a UPnP pinhole is refreshed with UpdatePinhole instead)."""

    key: Key
    external_port: int


@dataclass(frozen=True, slots=True)
class QueryAddress:
    """Ask `protocol` for the external address (and, through its epoch, whether the router rebooted)."""

    protocol: str


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """Write the whole row: BEFORE the request that follows it in the same batch, and after a grant
    (`external_port` and `lease` as granted). `desired` False for a mapping being removed."""

    key: Key
    owner: str
    sticky: bool
    desired: bool
    protocol: str
    gateway: str
    internal_address: str
    requested_external_port: int
    external_port: int | None
    lease: int
    family: int = 4
    unique_id: int | None = None


@dataclass(frozen=True, slots=True)
class JournalTombstone:
    """No longer desired: if we die before the delete is confirmed, the next start deletes it."""

    keys: tuple[Key, ...]
    gateway: str
    family: int = 4


@dataclass(frozen=True, slots=True)
class JournalRemove:
    key: Key
    gateway: str
    family: int = 4


@dataclass(frozen=True, slots=True)
class Emit:
    kind: EventKind
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the log: `channel` "holes" is the security record (every hole opened, changed, lost and
    closed, with its `fields`: event, protocol, transport, internal and external address, lease, owner)."""

    channel: str  # "holes" | "engine"
    level: str  # "info" | "warning" | "error"
    message: str
    fields: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Settled:
    """The operation on `key` that a caller may be waiting for (add, delete) has a result."""

    key: Key
    family: int = 4


@dataclass(frozen=True, slots=True)
class AddressChanged:
    """The external address changed: the driver re-checks with STUN, when configured."""

    old: IPAddress | None
    new: IPAddress | None


Action = (
    Discover
    | RequestMap
    | RequestDelete
    | RequestVerify
    | QueryAddress
    | JournalRecord
    | JournalTombstone
    | JournalRemove
    | Emit
    | Log
    | Settled
    | AddressChanged
)
JOURNAL_ACTIONS = (JournalRecord, JournalTombstone, JournalRemove)


# --- state ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Record:
    """One mapping as the core knows it. Owned by the core: others get `MappingStatus` snapshots."""

    wanted: Wanted
    state: State = State.PENDING
    inflight: Op | None = None
    due: float = 0.0  # PENDING/FAILED: next attempt; REMOVING: next delete
    protocol: str | None = None  # what granted it
    asked_via: str | None = None  # protocol of the last request sent, answered or not
    asked_until: float | None = None  # where the lease of the last request would end if it was granted
    external_ip: IPAddress | None = None
    external_port: int | None = None
    lease: int | None = None
    granted_at: float | None = None
    expires_at: float | None = None  # None: permanent, or never granted
    open_ended: bool = False  # granted permanent, or longer than max_lease (the router's own end is unknown)
    next_renewal: float = math.inf
    next_verify: float = math.inf
    failures: int = 0
    removal_failures: int = 0
    last_error: str | None = None
    journalled: tuple[Any, ...] | None = None  # what the journal row holds, so refreshes write nothing
    sent_at: float | None = None  # when the request now out left (for the events' `elapsed`)
    seq: int = 0  # the heap entry that is current for this record
    unique_id: int | None = None  # a UPnP pinhole's UniqueID (family 6): what verifies and deletes it

    @property
    def key(self) -> Key:
        return self.wanted.key

    @property
    def maybe_on_router(self) -> bool:
        """Something may exist on the router for it: granted, or asked for (the answer may have been lost)."""
        return self.protocol is not None or self.asked_via is not None

    def certainly_gone(self, now: float) -> bool:
        """The lease of whatever we may have on the router has run out (by a margin)."""
        if self.protocol is not None and self.open_ended:
            return False  # permanent, or for longer than we took it as: its end is not ours to know
        ends = [end for end in (self.expires_at, self.asked_until) if end is not None]
        return bool(ends) and now > max(ends) + EXPIRY_MARGIN

    def wake(self) -> float:
        """When this record next needs the core's attention (inf: not by time)."""
        if self.inflight is not None or self.state is State.DISABLED:
            return math.inf
        if self.state is State.ACTIVE:
            return min(self.next_renewal, self.next_verify)
        return self.due


@dataclass(frozen=True, slots=True)
class MappingStatus:
    """A read-only snapshot of one mapping: what callers outside the core (the pool, the control channel)
    get instead of the core's records."""

    transport: Transport
    port: int
    owner: str
    sticky: bool
    state: State
    protocol: str | None
    external_ip: IPAddress | None
    external_port: int | None
    lease: int | None
    expires_in: float | None  # seconds from the snapshot; None: permanent or not granted
    last_error: str | None
    family: int = 4  # 6: an IPv6 firewall pinhole (external_ip is our own address)
    unique_id: int | None = None  # a UPnP pinhole's UniqueID

    @property
    def key(self) -> Key:
        return self.transport, self.port

    @property
    def active(self) -> bool:
        return self.state is State.ACTIVE and self.external_port is not None

    def to_dict(self, wall: float) -> dict[str, Any]:
        """The JSON form (`nat_map status --json`, events); `wall` turns `expires_in` into a wall time."""
        return {
            "port": self.port,
            "proto": str(self.transport),
            "sticky": self.sticky,
            "owner": self.owner,
            "state": str(self.state),
            "protocol": self.protocol,
            "external_ip": None if self.external_ip is None else str(self.external_ip),
            "external_port": self.external_port,
            "lease": self.lease,
            "expires_at": None if self.expires_in is None else round(wall + self.expires_in, 3),
            "last_error": self.last_error,
            "family": self.family,
            "unique_id": self.unique_id,
        }


def _status(record: Record, now: float) -> MappingStatus:
    wanted = record.wanted
    return MappingStatus(
        transport=wanted.transport,
        port=wanted.internal_port,
        owner=wanted.owner,
        sticky=wanted.sticky,
        state=record.state,
        protocol=record.protocol,
        external_ip=record.external_ip,
        external_port=record.external_port,
        lease=record.lease,
        expires_in=None if record.expires_at is None else max(0.0, record.expires_at - now),
        last_error=record.last_error,
        family=wanted.family,
        unique_id=record.unique_id,
    )


class Lifecycle:
    """Owns the wanted mappings, their state on the router, the router's epochs and the external address."""

    def __init__(
        self,
        settings: NatSettings,
        *,
        rand: Callable[[], float],
        family: int = 4,
        new_holes: TokenBucket | None = None,
    ) -> None:
        """`family` 6 makes this the core of IPv6 pinholes (see the module docstring); `new_holes`, the
        `map_rate` bucket, is shared with the other family's core so the cap holds for both together."""
        if family not in FAMILIES:
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        self.family = family
        self.settings = settings
        self.records: dict[Key, Record] = {}
        self.router: Router | None = None
        self.external_ip: IPAddress | None = None
        self.address_history: collections.deque[tuple[float, IPAddress | None]] = collections.deque(
            maxlen=ADDRESS_HISTORY
        )
        self.mapping_enabled = settings.mapping
        self.stopping = False
        self.last_error: str | None = None
        self._rand = rand
        self._actions: list[Action] = []
        # Two queues, so routine work never holds up the rest: `_work` (new mappings, retries, deletes, what
        # republish asked for now) waits only for the in-flight cap; `_refreshes` (renewals and verifications
        # of active mappings) also for the renewal share. One queue let a refresh held back by the share stop
        # every delete and new mapping due behind it for up to a second.
        self._work: list[tuple[float, int, Key]] = []
        self._refreshes: list[tuple[float, int, Key]] = []
        self._seq = 0
        self._inflight = 0  # router requests out (map, delete, verify)
        self._recent: collections.deque[float] = collections.deque()  # refresh starts, last second
        self._urgent: set[Key] = set()  # republished: refreshed now, whatever the refresh share
        # A call needs two mappings (RTP, RTCP) at once; a burst smaller than that would starve it.
        self._new_holes = new_holes or TokenBucket(settings.map_rate, max(4.0, settings.map_rate))
        self._what = "mapping" if family == 4 else "pinhole"  # in log lines
        self._epochs = {"pcp": EpochTracker("pcp"), "natpmp": EpochTracker("natpmp")}
        self._discover_at: float | None = None  # next discovery attempt (None: none planned)
        self._discovering = False
        self._discovery_attempts = 0
        self._address_at: float | None = None  # next external address check
        self._address_inflight = False

    # --- output ------------------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        """The actions decided since the last call, in the order they must be performed."""
        actions, self._actions = self._actions, []
        return actions

    def timer(self) -> float | None:
        """When `handle_timer` must run next (None: nothing planned)."""
        times = [t for t in (self._discover_at, self._address_at) if t is not None]
        for queue, routine in ((self._work, False), (self._refreshes, True)):
            while queue:
                when, seq, key = queue[0]
                record = self.records.get(key)
                if record is None or record.seq != seq:
                    heapq.heappop(queue)  # superseded or forgotten
                    continue
                times.append(max(when, self._refresh_slot()) if self._blocked(record, routine) else when)
                break
        return min(times, default=None)

    def _blocked(self, record: Record, routine: bool) -> bool:
        """A routine refresh held back by the renewal share, or any request by the in-flight cap."""
        if self._inflight >= CONCURRENCY:
            return True
        return routine and record.state is State.ACTIVE and len(self._recent) >= self._refresh_cap()

    def _refresh_cap(self) -> int:
        return max(MIN_REFRESHES_PER_SECOND, math.floor(len(self.records) * RENEWAL_SHARE))

    def _refresh_slot(self) -> float:
        return self._recent[0] + 1.0 if self._recent else 0.0

    # --- calls -----------------------------------------------------------------------------------------

    def _check_family(self, wanted: Wanted) -> None:
        if wanted.family != self.family:
            raise ValueError(f"a family {wanted.family} mapping given to the family {self.family} core")

    def start(self, static: Iterable[Wanted], now: float) -> None:
        for wanted in static:
            self._check_family(wanted)
            self.records[wanted.key] = Record(wanted, due=now)
        if self.settings.enabled:
            self._discover_at = now

    def want(self, wanted: Wanted, now: float) -> None:
        """Want a mapping (again): a record being removed under the same key is revived, never doubled."""
        self._check_family(wanted)
        record = self.records.get(wanted.key)
        if record is None:
            record = self.records[wanted.key] = Record(wanted, due=now)
        else:
            changed = record.wanted != wanted
            record.wanted = wanted
            if changed and record.journalled is not None and self.router is not None and record.asked_via:
                # The journal says at once what is wanted now (sticky or not, its owner): a crash right
                # after this call must not bring back the old wish.
                lease = record.lease if record.lease is not None else self._lease_for(record.asked_via)
                self._journal(record, record.protocol or record.asked_via, record.external_port, lease)
            if record.state is State.REMOVING:
                record.removal_failures = 0
                self._move(record, State.PENDING)
                record.due = now
            elif record.state is State.FAILED:
                record.due = now  # asked for again: no reason to wait out the back-off
        if not self.mapping_enabled and record.state is not State.DISABLED:
            self._move(record, State.DISABLED)
        self._push(record)
        self.handle_timer(now)  # a new request leaves in this step, not at the next timer

    def unwant(self, key: Key, now: float) -> bool:
        """Stop wanting a mapping: delete it on the router (retried until confirmed). False if unknown."""
        record = self.records.get(key)
        if record is None:
            return False
        if record.state is State.REMOVING:
            return True
        if not record.maybe_on_router and record.inflight is None:
            self._forget(record, journal=record.journalled is not None)
            self._actions.append(Settled(key, self.family))
            return True
        self._move(record, State.REMOVING)
        record.due = now
        self._tombstone([record])
        self._push(record)
        self.handle_timer(now)  # the delete leaves in this step (after the tombstone)
        return True

    def relabel(self, key: Key, owner: str) -> None:
        """A new owner (a pooled RTP pair taken by a call); the journal learns it at the next refresh."""
        record = self.records.get(key)
        if record is not None and record.state is not State.REMOVING:
            old = record.wanted
            record.wanted = dataclasses.replace(old, owner=owner)

    def set_enabled(self, enabled: bool, now: float) -> None:
        """`nat_map mapping enable|disable`: disabling deletes our mappings on the router but keeps them
        wanted (DISABLED), so enabling puts them back."""
        if enabled == self.mapping_enabled:
            return
        self.mapping_enabled = enabled
        for record in self.records.values():
            if record.state is State.REMOVING:
                continue
            if enabled:
                self._move(record, State.PENDING)
                record.due = now
            else:
                self._move(record, State.DISABLED)
                if record.maybe_on_router and record.inflight is None:
                    self._request_delete(record, now)
            self._push(record)

    def republish(self, now: float) -> None:
        """Re-send every mapping now (FreeSWITCH's `nat_map republish`); not held back as new holes."""
        for record in self.records.values():
            if record.state in (State.ACTIVE, State.PENDING, State.FAILED):
                record.next_renewal = record.due = now
                self._urgent.add(record.key)
                self._push(record)
        self.handle_timer(now)

    def stop(self, now: float) -> list[Key]:
        """Stop: delete every mapping that is not sticky (and whatever is already being removed), the
        journal tombstoning them first in one write. Returns their keys; nothing new is requested."""
        self.stopping = True
        self._discover_at = self._address_at = None
        doomed = [
            r for r in self.records.values() if (r.state is State.REMOVING or not r.wanted.sticky) and r.maybe_on_router
        ]
        for record in doomed:
            if record.state is not State.REMOVING:
                self._move(record, State.REMOVING)
            record.due = now
            self._push(record)
        self._tombstone(doomed)
        self.handle_timer(now)
        return [record.key for record in doomed]

    def announced(self, now: float) -> None:
        """The router announced itself (PCP ANNOUNCE / NAT-PMP on 224.0.0.1:5350, SSDP NOTIFY): never
        trust the content (miniupnpd's first announcement after a change is stale), go and ask."""
        if self.router is None or self.stopping:
            return
        self._address_at = now + ANNOUNCE_SETTLE
        if self.router.protocol == "upnp":
            # UPnP has no epoch: a NOTIFY around a router restart is the cue to verify every mapping.
            for record in self.records.values():
                if record.state is State.ACTIVE:
                    record.next_verify = min(record.next_verify, now + ANNOUNCE_SETTLE)
                    self._push(record)

    def check_address(self, now: float) -> None:
        """Ask for the external address now (`nat_map` verbs, tests)."""
        if self.router is not None and not self.stopping:
            self._address_at = now

    # --- discovery --------------------------------------------------------------------------------------

    def discovered(self, router: Router, external_ip: IPAddress | None, now: float) -> None:
        """Discovery (or `reinit`) found `router`: every wanted mapping is (re-)made through it."""
        changed = self.router is not None and self.router != router
        self.router = router
        self._discovering = False
        self._discover_at = None
        self._discovery_attempts = 0
        self.last_error = None
        for tracker in self._epochs.values():
            tracker.reset()
        self._address_seen(external_ip, now)
        if not self.stopping:
            self._address_at = now + self.settings.external_ip_interval
        for record in self.records.values():
            if changed and record.state is State.ACTIVE:
                self._move(record, State.PENDING)  # another router: everything is made there afresh
            if record.state in (State.PENDING, State.FAILED):
                record.due = now
            if not self.mapping_enabled and record.state is not State.REMOVING:
                self._move(record, State.DISABLED)
            self._push(record)

    def discovery_failed(self, error: str, now: float) -> None:
        self._discovering = False
        self.last_error = error
        delay = DISCOVERY_BACKOFF[min(self._discovery_attempts, len(DISCOVERY_BACKOFF) - 1)]
        self._discovery_attempts += 1
        if not self.stopping:
            self._discover_at = now + delay
        what = "discovery" if self.family == 4 else "IPv6 pinhole discovery"
        self._log("engine", "warning", f"{what} failed ({error}); retrying in {delay:g} s")

    def adopt(self, leftovers: Iterable[Leftover], now: float) -> None:
        """What an earlier run left in the journal: rows still desired and sticky are wanted again (their
        first refresh re-takes them: same nonce, same rule); rows on another gateway are dropped once their
        lease is over; everything else is deleted through the same retried removal as any delete."""
        assert self.router is not None
        count = 0
        for entry in leftovers:
            key = (entry.transport, entry.internal_port)
            if entry.gateway != self.router.gateway:
                if entry.external_port is None or entry.age > entry.lease:
                    self._actions.append(JournalRemove(key, entry.gateway, self.family))  # expired there
                continue
            wanted = Wanted(key[0], key[1], entry.requested_external_port, entry.sticky, entry.owner, self.family)
            if entry.desired and entry.sticky and key not in self.records:
                # Its first refresh re-takes it: the same nonce (PCP), UpdatePinhole by its UniqueID (UPnP).
                self.records[key] = Record(wanted, due=now, unique_id=entry.unique_id)
                self._push(self.records[key])
            if key in self.records:
                continue  # adopted
            granted = entry.external_port is not None
            started = now - entry.age
            record = Record(
                wanted,
                state=State.REMOVING,
                due=now,
                protocol=entry.protocol if granted else None,
                asked_via=entry.protocol,
                asked_until=started + entry.lease,
                external_port=entry.external_port,
                lease=entry.lease,
                expires_at=started + entry.lease if granted and entry.lease else None,
                open_ended=entry.lease == 0 or (entry.protocol != "upnp" and entry.lease >= self.settings.max_lease),
                journalled=("leftover",),
                unique_id=entry.unique_id,
            )
            self.records[key] = record
            self._push(record)
            count += 1
        if count:
            self._tombstone([r for r in self.records.values() if r.journalled == ("leftover",)])
            self._log("engine", "info", f"deleting {count} {self._what}(s) an earlier run left on the router")

    # --- results ---------------------------------------------------------------------------------------

    def granted(self, key: Key, mapping: Mapping, now: float) -> None:
        """The router granted (or refreshed) the mapping of `key`."""
        record = self._result(key)
        if record is None:
            return
        self._epoch_seen(mapping.protocol, mapping.epoch, now)
        self._address_seen(mapping.external_ip, now)
        first = record.protocol != mapping.protocol or record.state is not State.ACTIVE
        moved = record.external_port not in (None, mapping.external_port)
        renamed = record.unique_id != mapping.unique_id  # a UPnP pinhole made anew gets a new UniqueID
        record.unique_id = mapping.unique_id
        record.protocol = mapping.protocol
        record.external_ip = mapping.external_ip or self.external_ip
        record.external_port = mapping.external_port
        record.lease = mapping.lifetime
        record.granted_at = now
        record.failures = 0
        record.last_error = None
        lifetime = mapping.lifetime
        record.expires_at = None if lifetime == 0 else now + lifetime
        # A grant at max_lease may have been cut down to it (mapper.cap_grant): the router's hold is longer.
        record.open_ended = lifetime == 0 or (mapping.protocol != "upnp" and lifetime >= self.settings.max_lease)
        journal_key = (
            mapping.protocol,
            self._gateway(),
            record.wanted,
            record.state is not State.REMOVING,
            record.unique_id,
        )
        if record.journalled != journal_key or moved or first or renamed:
            self._journal(record, mapping.protocol, mapping.external_port, lifetime)
        if record.state is State.REMOVING or record.state is State.DISABLED:
            # Unwanted (or disabled) while the request was out: what was granted goes at once.
            if record.state is State.REMOVING:
                record.due = now
            else:
                self._request_delete(record, now)
            self._log_hole("opened", record)
            self._actions.append(Settled(key, self.family))
            self._push(record)
            return
        self._move(record, State.ACTIVE)
        record.next_renewal = math.inf if lifetime == 0 else schedule.first_renewal(now, lifetime, self._rand)
        interval = self.settings.verify_interval
        record.next_verify = (
            schedule.first_verification(now, interval, self._rand)
            if first
            else schedule.next_verification(now, interval, self._rand)
        )
        data = {**self._event_data(record), **self._elapsed(record, now)}
        if first or moved:
            self._log_hole("changed" if moved and not first else "opened", record)
            self._emit(EventKind.NAT_ADD, **data)
        else:
            self._emit(EventKind.NAT_RENEW, **data)
        self._actions.append(Settled(key, self.family))
        self._push(record)

    def request_failed(
        self, key: Key, error: str, now: float, *, code: int | None = None, protocol: str | None = None
    ) -> None:
        """The MAP request for `key` failed (refused, or no answer: the router may still have acted).
        `code` is the router's error code when it refused (UPnP, PCP, NAT-PMP result), `protocol` the one
        the request went over; both travel on the nat-error event (metrics count failures by code)."""
        record = self._result(key)
        if record is None:
            return
        failure = {"error_code": code, "error_protocol": protocol or record.asked_via, **self._elapsed(record, now)}
        record.failures += 1
        record.last_error = error
        if record.state is State.REMOVING:
            record.due = now  # it may exist all the same: delete it
        elif record.state is State.DISABLED:
            self._request_delete(record, now)
        else:
            retry = None
            if record.state is State.ACTIVE and record.granted_at is not None and record.lease:
                retry = schedule.retry_renewal(record.granted_at, record.lease, now)
            if retry is not None:
                record.next_renewal = record.next_verify = retry
                self._emit(EventKind.NAT_ERROR, **self._event_data(record), **failure, retry_in=round(retry - now, 3))
            else:
                self._move(record, State.FAILED)
                record.due = now + FAILED_RETRY[min(record.failures - 1, len(FAILED_RETRY) - 1)]
                self._log("engine", "warning", f"{self._what} {key[0]} {key[1]} failed: {error}")
                self._emit(EventKind.NAT_ERROR, **self._event_data(record), **failure)
        self._actions.append(Settled(key, self.family))
        self._push(record)

    def deleted(self, key: Key, now: float) -> None:
        """The router confirmed the delete of `key`."""
        record = self._result(key)
        if record is None:
            return
        self._log_hole("closed", record)
        if record.state is State.REMOVING:
            self._forget(record, journal=True)
            self._emit(EventKind.NAT_DEL, **self._deleted_data(record))
        else:
            # Wanted again meanwhile (revived, or kept while disabled): its hole is closed, its row goes
            # too; a new request will write it again before it leaves.
            self._actions.append(JournalRemove(key, self._gateway(), self.family))
            self._emit(EventKind.NAT_DEL, **self._deleted_data(record))
            record.journalled = None
            record.protocol = record.asked_via = record.asked_until = None
            record.external_port = record.expires_at = record.unique_id = None
            record.due = now
            if record.state is State.ACTIVE:
                self._move(record, State.PENDING)
            self._push(record)
        self._actions.append(Settled(key, self.family))

    def delete_failed(
        self, key: Key, error: str, now: float, *, code: int | None = None, protocol: str | None = None
    ) -> None:
        record = self._result(key)
        if record is None:
            return
        record.last_error = error
        self._emit(
            EventKind.NAT_ERROR,
            **self._event_data(record),
            operation="delete",
            error_code=code,
            error_protocol=protocol or record.protocol or record.asked_via,
            **self._elapsed(record, now),
        )
        if record.state is State.REMOVING:
            record.removal_failures += 1
            delay = REMOVE_RETRY[min(record.removal_failures - 1, len(REMOVE_RETRY) - 1)]
            record.due = now + delay * (0.9 + 0.2 * self._rand())
            self._log("engine", "warning", f"could not delete {key[0]} {key[1]}: {error} (retrying in {delay:.0f} s)")
        else:
            self._log("engine", "warning", f"could not delete {key[0]} {key[1]}: {error}")
        self._actions.append(Settled(key, self.family))
        self._push(record)

    def verified(self, key: Key, present: bool, now: float, error: str | None = None) -> None:
        """A UPnP verification: `present` False means the router no longer lists it for us."""
        record = self._result(key)
        if record is None:
            return
        if error is not None:
            record.last_error = error
        if not present and error is None and record.state is State.ACTIVE:
            self._lost(record, "the router no longer lists it", now)
        else:
            record.next_verify = schedule.next_verification(now, self.settings.verify_interval, self._rand)
        self._push(record)

    def address(self, protocol: str, address: IPAddress | None, epoch: int | None, now: float) -> None:
        """An answer to QueryAddress (or any answer carrying the address and the epoch)."""
        self._address_inflight = False
        self._epoch_seen(protocol, epoch, now)
        self._address_seen(address, now)
        if not self.stopping:
            self._address_at = now + self.settings.external_ip_interval

    def address_failed(self, error: str, now: float) -> None:
        self._address_inflight = False
        self.last_error = error
        if not self.stopping:
            self._address_at = now + self.settings.external_ip_interval

    def epoch(self, protocol: str, epoch: int | None, now: float) -> None:
        """An epoch seen outside a grant or an address answer (a PCP ANNOUNCE reply)."""
        self._epoch_seen(protocol, epoch, now)

    # --- the timer -------------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        if self._discover_at is not None and now >= self._discover_at and not self._discovering:
            self._discovering = True
            self._discover_at = None
            self._actions.append(Discover())
        if self._address_at is not None and now >= self._address_at and not self._address_inflight:
            self._address_at = None
            self._query_address(now)
        while self._recent and self._recent[0] <= now - 1.0:
            self._recent.popleft()
        for queue, routine in ((self._work, False), (self._refreshes, True)):
            horizon = now + COALESCE if routine else now
            while queue and queue[0][0] <= horizon:
                _, seq, key = queue[0]
                record = self.records.get(key)
                if record is None or record.seq != seq:
                    heapq.heappop(queue)
                    continue
                if self._blocked(record, routine):
                    break  # the in-flight cap or the refresh share: timer() says when to come back
                heapq.heappop(queue)
                record.seq = 0
                self._urgent.discard(key)
                self._service(record, now)

    def _service(self, record: Record, now: float) -> None:
        if record.inflight is not None:
            return
        if record.state is State.REMOVING:
            if record.maybe_on_router and record.certainly_gone(now):
                self._log_hole("closed", record, reason="lease ran out before the router confirmed a delete")
                self._forget(record, journal=True)
                self._emit(EventKind.NAT_DEL, **self._deleted_data(record))
                self._actions.append(Settled(record.key, self.family))
                return
            if self.router is None:
                record.due = now + REMOVE_RETRY[0]
                self._push(record)
                return
            self._request_delete(record, now)
            return
        if self.stopping or self.router is None or record.state is State.DISABLED:
            return
        if record.state is State.ACTIVE:
            self._recent.append(now)
            # A UPnP pinhole is not verified but refreshed (UpdatePinhole by its UniqueID, AddPinhole when the
            # router no longer knows it): miniupnpd 2.3.1 answers CheckPinholeWorking for a pinhole whose rule
            # a ruleset flush removed, but refuses to update it (docs/QUIRKS.md U18), like PCP's idempotent MAP.
            verifiable = record.external_port is not None and self.family == 4
            if record.protocol == "upnp" and now < record.next_renewal and verifiable:
                assert record.external_port is not None
                record.inflight = Op.VERIFY
                self._inflight += 1
                self._actions.append(RequestVerify(record.key, record.external_port))
                return
        elif not record.maybe_on_router and not self._new_holes.take(now):
            record.due = now + self._new_holes.wait(now)  # a new hole: within map_rate
            self._push(record)
            return
        self._request_map(record, now)

    # --- internals ------------------------------------------------------------------------------------

    def _gateway(self) -> str:
        return "" if self.router is None else self.router.gateway

    def _move(self, record: Record, state: State) -> None:
        if state not in _ALLOWED[record.state]:
            raise AssertionError(f"mapping {record.key}: {record.state} -> {state} is not a transition")
        record.state = state

    def _push(self, record: Record) -> None:
        when = record.wake()
        self._seq += 1
        record.seq = self._seq
        if when != math.inf:
            routine = record.state is State.ACTIVE and record.key not in self._urgent
            heapq.heappush(self._refreshes if routine else self._work, (when, self._seq, record.key))

    def _result(self, key: Key) -> Record | None:
        record = self.records.get(key)
        if record is None or record.inflight is None:
            return None
        record.inflight = None
        self._inflight -= 1
        return record

    def _lease_for(self, protocol: str) -> int:
        return self.settings.upnp_lease if protocol == "upnp" else self.settings.lease

    def _request_map(self, record: Record, now: float) -> None:
        assert self.router is not None
        protocol = self.router.protocol
        lease = self._lease_for(protocol)
        wanted = record.wanted
        if record.journalled != (protocol, self.router.gateway, wanted, True, record.unique_id):
            # A refresh of what is journalled writes nothing: renewals must not cost an fsync each.
            self._journal(record, protocol, record.external_port, lease)
        record.asked_via = protocol
        record.asked_until = now + lease  # a lost answer may still have (re)started a lease
        record.inflight = Op.MAP
        record.sent_at = now
        self._inflight += 1
        request = MappingRequest(
            wanted.transport, wanted.internal_port, record.external_port or wanted.external_port, lease
        )
        self._actions.append(RequestMap(record.key, protocol, request, record.unique_id))

    def _request_delete(self, record: Record, now: float | None = None) -> None:
        protocol = record.protocol or record.asked_via
        if protocol is None:
            return
        record.sent_at = now
        record.inflight = Op.DELETE
        self._inflight += 1
        self._actions.append(RequestDelete(record.key, protocol, record.external_port, record.unique_id))

    def _journal(self, record: Record, protocol: str, external_port: int | None, lease: int) -> None:
        assert self.router is not None
        wanted = record.wanted
        desired = record.state is not State.REMOVING
        self._actions.append(
            JournalRecord(
                key=record.key,
                owner=wanted.owner,
                sticky=wanted.sticky,
                desired=desired,
                protocol=protocol,
                gateway=self.router.gateway,
                internal_address=self.router.local_address,
                requested_external_port=wanted.external_port,
                external_port=external_port,
                lease=lease,
                family=self.family,
                unique_id=record.unique_id,
            )
        )
        record.journalled = (protocol, self.router.gateway, wanted, desired, record.unique_id)

    def _tombstone(self, records: list[Record]) -> None:
        rows = [record for record in records if record.journalled is not None]
        if rows:
            self._actions.append(JournalTombstone(tuple(record.key for record in rows), self._gateway(), self.family))
            for record in rows:
                record.journalled = None  # the row stays (tombstoned) until the delete is confirmed

    def _forget(self, record: Record, *, journal: bool) -> None:
        del self.records[record.key]
        record.seq = -1
        if journal:
            self._actions.append(JournalRemove(record.key, self._gateway(), self.family))

    def _lost(self, record: Record, why: str, now: float) -> None:
        self._log_hole("lost", record, level="warning", reason=why)
        self._emit(EventKind.NAT_LOST, reason=why, **self._event_data(record))
        self._move(record, State.PENDING)
        record.due = now
        record.unique_id = None  # a pinhole the router no longer holds: its UniqueID names nothing now

    def _epoch_seen(self, protocol: str, epoch: int | None, now: float) -> None:
        tracker = self._epochs.get(protocol)
        if tracker is None or epoch is None or not tracker.observe(epoch, now):
            return
        # One reboot is seen once, whichever protocol saw it: the others start afresh.
        for other in self._epochs.values():
            if other is not tracker:
                other.reset()
        router = "router" if self.family == 4 else "IPv6 router"
        self._log(
            "engine", "warning", f"{router} lost its state ({protocol} epoch went back): re-creating every {self._what}"
        )
        self._emit(EventKind.ROUTER_REBOOT, reason="epoch went back", gateway=self._gateway(), **self._family_data())
        for record in self.records.values():
            if record.state is State.ACTIVE:
                self._move(record, State.PENDING)
                record.due = now
                self._push(record)
        self._address_at = now

    def _address_seen(self, address: IPAddress | None, now: float) -> None:
        """Every answer that carries the external address comes here: one address, one owner. A pinhole
        core owns none: the "external" address of a pinhole is our own (RFC 6887 §11.1 on a firewall)."""
        if address is None or address == self.external_ip or self.family == 6:
            return
        old, self.external_ip = self.external_ip, address
        self.address_history.append((now, address))
        for record in self.records.values():
            if record.state is State.ACTIVE:
                record.external_ip = address
        if old is not None:
            self._log("engine", "warning", f"external address changed: {old} -> {address}")
            self._emit(EventKind.EXTERNAL_ADDRESS_CHANGE, old=str(old), new=str(address))
        if not is_public(address):
            self._emit(EventKind.DOUBLE_NAT, external_ip=str(address))
        self._actions.append(AddressChanged(old, address))

    def _query_address(self, now: float) -> None:
        """Which question tells the external address: NAT-PMP's (RFC 6886 §3.2) when it answers, UPnP's
        GetExternalIPAddress, and with PCP alone (which has no such request) a refresh of the mapping due
        soonest, whose answer carries the address; with no mapping, a PCP ANNOUNCE for the epoch."""
        router = self.router
        if router is None or (self.family == 6 and router.protocol == "upnp"):
            return  # UPnP pinholes: no epoch to ask for; verification and NOTIFY cover a router restart
        if router.natpmp_available or router.protocol in ("natpmp", "upnp"):
            self._address_inflight = True
            self._actions.append(QueryAddress("natpmp" if router.natpmp_available else router.protocol))
            return
        active = [r for r in self.records.values() if r.state is State.ACTIVE and r.inflight is None]
        if active and self.mapping_enabled and self._inflight < CONCURRENCY:
            soonest = min(active, key=lambda r: r.next_renewal)
            self._request_map(soonest, now)
            self._address_at = now + self.settings.external_ip_interval
            return
        self._address_inflight = True
        self._actions.append(QueryAddress("pcp"))

    @staticmethod
    def _elapsed(record: Record, now: float) -> dict[str, float]:
        """`elapsed`: the request's round trip, for the events (and the metrics' latency histogram)."""
        return {} if record.sent_at is None else {"elapsed": round(max(0.0, now - record.sent_at), 6)}

    def _event_data(self, record: Record) -> dict[str, Any]:
        data = _status(record, 0.0).to_dict(0.0)
        data.pop("expires_at")
        return data

    def _deleted_data(self, record: Record) -> dict[str, Any]:
        """A nat-del event's keys: the mapping's port, transport and owner, and its family."""
        return {"port": record.key[1], "proto": str(record.key[0]), "owner": record.wanted.owner, "family": self.family}

    def _family_data(self) -> dict[str, Any]:
        """What a pinhole core adds to its router events, so they are not taken for the IPv4 router's."""
        return {"family": 6} if self.family == 6 else {}

    def _emit(self, kind: EventKind, **data: Any) -> None:
        self._actions.append(Emit(kind, data))

    def _log(self, channel: str, level: str, message: str) -> None:
        self._actions.append(Log(channel, level, message))

    def _log_hole(self, event: str, record: Record, *, level: str = "info", reason: str | None = None) -> None:
        """One line for the security record: what happened to which hole, with every field that says so."""
        router = self.router
        local = "?" if router is None else _host(router.local_address)
        transport, port = record.key
        external = "?"
        if record.external_port is not None:
            external = f"{_host(str(record.external_ip or '?'))}:{record.external_port}"
        fields: dict[str, Any] = {
            "event": event,
            "protocol": record.protocol or record.asked_via,
            "transport": str(transport),
            "internal": f"{local}:{port}",
            "external": external,
            "lease": record.lease,
            "owner": record.wanted.owner,
        }
        if self.family == 6:
            fields["family"] = 6
            if record.unique_id is not None:
                fields["unique_id"] = record.unique_id
        if reason is not None:
            fields["reason"] = reason
        words = " ".join(f"{name}={value}" for name, value in fields.items() if name not in ("event", "reason"))
        message = f"hole {event} {words}" + (f" ({reason})" if reason else "")
        self._actions.append(Log("holes", level, message, fields))

    # --- queries -----------------------------------------------------------------------------------------

    def status_of(self, key: Key, now: float) -> MappingStatus | None:
        record = self.records.get(key)
        return None if record is None else _status(record, now)

    def statuses(self, now: float) -> list[MappingStatus]:
        records = sorted(self.records.values(), key=lambda r: (r.key[1], r.key[0]))
        return [_status(record, now) for record in records]

    @property
    def new_holes(self) -> TokenBucket:
        """The `map_rate` bucket: the other family's core takes it too (see `__init__`)."""
        return self._new_holes

    def map_budget(self, now: float) -> float:
        """How many new mappings may go to the router right now (`map_rate`)."""
        return self._new_holes.available(now)

    def settling(self, keys: Iterable[Key]) -> bool:
        """Is any of `keys` still to be sent (republished) or waiting for the router's answer?"""
        for key in keys:
            record = self.records.get(key)
            if record is not None and (record.inflight is not None or key in self._urgent):
                return True
        return False

    @property
    def removing(self) -> int:
        return sum(record.state is State.REMOVING for record in self.records.values())

    @property
    def busy(self) -> int:
        """Router requests out."""
        return self._inflight


def _host(address: str) -> str:
    """An address as the host part of `host:port` in a log line: IPv6 in brackets (RFC 3986 §3.2.2)."""
    return f"[{address}]" if ":" in address else address
