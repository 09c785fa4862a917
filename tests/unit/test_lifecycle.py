"""The mapping lifecycle core on a fake clock: every decision, no asyncio, no sockets, milliseconds to run.

A small router model answers the core's actions; each test says what the router does and checks what the
core decides and when (RFC 6887 §11.2.1 renewal times, retries, verification, reboots by epoch for PCP and
NAT-PMP, address changes, a router that forgot its mappings, back-off, the caps, recovery from a journal).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

import pytest

from autonat.engine import lifecycle as lc
from autonat.engine.events import EventKind
from autonat.engine.lifecycle import Key, Leftover, Lifecycle, Router, State, Wanted
from autonat.engine.settings import NatSettings
from autonat.mapper import Mapping
from autonat.proto.types import Transport

UDP, TCP = Transport.UDP, Transport.TCP
EXTERNAL = IPv4Address("203.0.113.1")
ROUTER = Router("192.168.77.1", "192.168.77.10", "pcp")


@dataclass
class Rig:
    """The core, a clock, and a router model that answers its requests after `delay` s."""

    core: Lifecycle
    now: float = 1000.0
    external: IPv4Address = EXTERNAL
    epoch: int = 5000
    epoch_at: float = 1000.0
    table: dict[Key, int] = field(default_factory=dict)  # key -> lease granted
    refuse_maps: bool = False
    refuse_deletes: bool = False
    silent: bool = False  # requests get no answer at all (the driver reports a timeout)
    log: list[lc.Action] = field(default_factory=list)
    requests: list[lc.Action] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)
    journal: dict[Key, dict[str, Any]] = field(default_factory=dict)

    def router_epoch(self) -> int:
        return self.epoch + int(self.now - self.epoch_at)

    def reboot(self) -> None:
        self.epoch, self.epoch_at = 0, self.now
        self.table.clear()

    def step(self) -> list[lc.Action]:
        """Perform the core's actions (answering router requests at once) until it has none left."""
        performed: list[lc.Action] = []
        while actions := self.core.actions():
            for action in actions:
                performed.append(action)
                self.log.append(action)
                self._perform(action)
        return performed

    def _perform(self, action: lc.Action) -> None:
        core = self.core
        if isinstance(action, lc.JournalRecord):
            self.journal[action.key] = {"desired": action.desired, "external_port": action.external_port}
        elif isinstance(action, lc.JournalTombstone):
            for key in action.keys:
                self.journal[key]["desired"] = False
        elif isinstance(action, lc.JournalRemove):
            self.journal.pop(action.key, None)
        elif isinstance(action, lc.RequestMap):
            self.requests.append(action)
            self.request_times.append(self.now)
            assert action.key in self.journal, "a request left before its journal row"
            if self.silent:
                self.table[action.key] = action.request.lifetime  # made, but the answer is lost
                core.request_failed(action.key, "no answer", self.now)
            elif self.refuse_maps:
                core.request_failed(action.key, "refused", self.now)
            else:
                self.table[action.key] = action.request.lifetime
                transport, port = action.key
                granted = Mapping(
                    action.protocol,
                    transport,
                    IPv4Address("192.168.77.10"),
                    port,
                    self.external,
                    action.request.external_port or port,
                    action.request.lifetime,
                    self.router_epoch(),
                )
                core.granted(action.key, granted, self.now)
        elif isinstance(action, lc.RequestDelete):
            self.requests.append(action)
            if self.refuse_deletes or self.silent:
                core.delete_failed(action.key, "no answer", self.now)
            else:
                self.table.pop(action.key, None)
                core.deleted(action.key, self.now)
        elif isinstance(action, lc.RequestVerify):
            self.requests.append(action)
            core.verified(action.key, action.key in self.table, self.now)
        elif isinstance(action, lc.QueryAddress):
            self.requests.append(action)
            epoch = self.router_epoch() if action.protocol != "upnp" else None
            core.address(action.protocol, None if action.protocol == "pcp" else self.external, epoch, self.now)
        elif isinstance(action, lc.Discover):
            core.discovered(ROUTER, None, self.now)

    def advance(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Move the clock forward, firing the core's timer whenever it is due."""
        end = self.now + seconds
        self.step()
        while True:
            when = self.core.timer()
            if when is None or when > end:
                break
            self.now = max(self.now, when)
            self.core.handle_timer(self.now)
            self.step()
            if until is not None and until():
                return
        self.now = end

    def events(self, kind: EventKind) -> list[dict[str, Any]]:
        return [a.data for a in self.log if isinstance(a, lc.Emit) and a.kind is kind]

    def maps_of(self, key: Key) -> list[lc.RequestMap]:
        return [r for r in self.requests if isinstance(r, lc.RequestMap) and r.key == key]


def make(rand: float = 0.5, **settings: Any) -> Rig:
    core = Lifecycle(NatSettings(protocol="pcp", **settings), rand=lambda: rand)
    rig = Rig(core)
    core.start([], rig.now)
    rig.advance(0)  # discovery
    return rig


def test_discovery_then_a_mapping_journalled_before_its_request_and_renewed_per_rfc_6887() -> None:
    rig = make(lease=1000, verify_interval=10_000, external_ip_interval=10_000)
    rig.core.want(Wanted(UDP, 5060), rig.now)
    actions = rig.step()
    kinds = [type(a).__name__ for a in actions]
    assert kinds.index("JournalRecord") < kinds.index("RequestMap")  # the row is durable first
    assert rig.core.records[(UDP, 5060)].state is State.ACTIVE
    granted_at = rig.now
    # RFC 6887 §11.2.1: the first renewal uniformly in [1/2, 5/8] of the lifetime (rand 0.5: 9/16).
    rig.advance(600, until=lambda: len(rig.maps_of((UDP, 5060))) > 1)
    assert rig.now - granted_at == pytest.approx(1000 * (0.5 + 0.125 * 0.5))
    assert len(rig.events(EventKind.NAT_ADD)) == 1 and len(rig.events(EventKind.NAT_RENEW)) == 1
    assert [type(a).__name__ for a in rig.log].count(
        "JournalRecord"
    ) == 2  # the request and the grant; not each renewal


def test_a_failed_renewal_is_retried_at_three_quarters_then_seven_eighths() -> None:
    rig = make(lease=1000, verify_interval=10_000, external_ip_interval=10_000)
    rig.core.want(Wanted(UDP, 5060), rig.now)
    rig.step()
    start = rig.now
    rig.refuse_maps = True
    times = []
    while len(times) < 3:
        rig.advance(2000, until=lambda: len(rig.maps_of((UDP, 5060))) > len(times) + 1)
        times.append(rig.now - start)
    assert times == pytest.approx([562.5, 750.0, 875.0])
    assert rig.core.records[(UDP, 5060)].state is State.ACTIVE  # still within its lease


def test_a_refused_mapping_backs_off_and_recovers() -> None:
    rig = make()
    rig.refuse_maps = True
    rig.core.want(Wanted(UDP, 6000), rig.now)
    rig.step()
    record = rig.core.records[(UDP, 6000)]
    assert record.state is State.FAILED and rig.events(EventKind.NAT_ERROR)
    attempts = []
    for _ in range(4):
        before = len(rig.maps_of((UDP, 6000)))
        start = rig.now
        rig.advance(100, until=lambda before=before: len(rig.maps_of((UDP, 6000))) > before)
        attempts.append(rig.now - start)
    assert attempts == pytest.approx(list(lc.FAILED_RETRY[:4]))
    rig.refuse_maps = False
    rig.advance(100, until=lambda: record.state is State.ACTIVE)
    assert record.state is State.ACTIVE


def test_pcp_and_natpmp_verification_resends_the_map_and_upnp_asks_the_entry() -> None:
    rig = make(verify_interval=60)
    rig.core.want(Wanted(UDP, 5060), rig.now)
    rig.step()
    rig.advance(200)
    assert len(rig.maps_of((UDP, 5060))) >= 3  # the idempotent MAP is the PCP verification
    upnp = Lifecycle(NatSettings(protocol="upnp", verify_interval=60), rand=lambda: 0.5)
    rig2 = Rig(upnp)
    upnp.start([Wanted(TCP, 8080)], rig2.now)
    upnp.discovered(Router("192.168.77.1", "192.168.77.10", "upnp"), EXTERNAL, rig2.now)
    rig2.advance(200)
    assert sum(isinstance(r, lc.RequestVerify) for r in rig2.requests) >= 3
    assert len(rig2.maps_of((TCP, 8080))) == 1
    rig2.table.clear()  # the router lost it (upnpc -d, a flush)
    rig2.advance(70)
    assert rig2.events(EventKind.NAT_LOST) and (TCP, 8080) in rig2.table  # noticed and made again


@pytest.mark.parametrize("protocol", ["pcp", "natpmp"])
def test_an_epoch_going_back_is_a_reboot_and_everything_is_made_again(protocol: str) -> None:
    core = Lifecycle(NatSettings(protocol=protocol, verify_interval=30), rand=lambda: 0.5)
    rig = Rig(core)
    core.start([Wanted(UDP, 5060), Wanted(TCP, 5060)], rig.now)
    core.discovered(
        Router("192.168.77.1", "192.168.77.10", protocol, natpmp_available=protocol == "natpmp"), EXTERNAL, rig.now
    )
    rig.advance(20)
    assert set(rig.table) == {(UDP, 5060), (TCP, 5060)}
    rig.reboot()
    rig.advance(40)  # the next answer carries epoch ~0: far behind our clock
    assert len(rig.events(EventKind.ROUTER_REBOOT)) == 1
    assert set(rig.table) == {(UDP, 5060), (TCP, 5060)}


def test_every_answer_carrying_the_address_updates_the_one_address() -> None:
    rig = make(external_ip_interval=30)
    assert rig.core.external_ip is None  # a PCP probe carries none
    rig.core.want(Wanted(UDP, 5060), rig.now)
    rig.step()
    assert rig.core.external_ip == EXTERNAL  # from the grant
    rig.external = IPv4Address("203.0.113.2")
    rig.advance(31)  # PCP has no address request: the periodic check refreshes a mapping
    assert rig.core.external_ip == IPv4Address("203.0.113.2")
    assert rig.events(EventKind.EXTERNAL_ADDRESS_CHANGE) == [{"old": "203.0.113.1", "new": "203.0.113.2"}]
    assert rig.core.records[(UDP, 5060)].external_ip == IPv4Address("203.0.113.2")
    assert [address for _, address in rig.core.address_history] == [EXTERNAL, IPv4Address("203.0.113.2")]


def test_a_private_external_address_is_double_nat() -> None:
    rig = make()
    rig.external = IPv4Address("10.1.2.3")
    rig.core.want(Wanted(UDP, 5060), rig.now)
    rig.step()
    assert rig.events(EventKind.DOUBLE_NAT) == [{"external_ip": "10.1.2.3"}]


def test_new_holes_are_held_to_map_rate_and_refreshes_to_the_renewal_share() -> None:
    rig = make(map_rate=10, lease=120, verify_interval=10_000)
    for port in range(20000, 20100):
        rig.core.want(Wanted(UDP, port), rig.now)
    rig.step()
    assert len(rig.table) == 10  # the burst
    rig.advance(2)
    assert len(rig.table) == 30  # + 10 a second
    rig.advance(20)
    assert len(rig.table) == 100
    # Refreshes (renewals at ~67 s, all due together): never more than max(5, 4 % of 100) = 5 in any second.
    rig.request_times.clear()
    rig.advance(200)
    times = rig.request_times
    assert len(times) >= 100  # every mapping was renewed
    busiest = max(sum(t <= u < t + 1.0 for u in times) for t in times)
    assert busiest <= 5, busiest


def test_a_delete_or_a_new_mapping_never_waits_behind_refreshes_held_by_the_renewal_share() -> None:
    rig = make(map_rate=0, lease=120, verify_interval=10_000)
    for port in range(20000, 20100):
        rig.core.want(Wanted(UDP, port), rig.now)
    rig.advance(0)
    assert len(rig.table) == 100
    rig.advance(67.5)  # every first renewal is due now (same rand): 5 go, 95 wait for the next second
    rig.requests.clear()
    rig.core.want(Wanted(UDP, 21000), rig.now)
    rig.core.unwant((UDP, 20050), rig.now)
    sent = rig.step()
    assert any(isinstance(a, lc.RequestMap) and a.key == (UDP, 21000) for a in sent), sent
    assert any(isinstance(a, lc.RequestDelete) and a.key == (UDP, 20050) for a in sent), sent
    assert (UDP, 21000) in rig.table and (UDP, 20050) not in rig.table
    assert rig.core.timer() == rig.now + 1.0  # the held renewals: at the next second of the share


def test_refreshes_due_within_a_quarter_second_share_one_wake_up() -> None:
    rig = make(map_rate=0, lease=120, verify_interval=10_000, external_ip_interval=10_000)
    for offset, port in ((0.0, 21000), (0.1, 21001), (0.5, 21002)):
        rig.advance(offset - (rig.now - 1000.0))
        rig.core.want(Wanted(UDP, port), rig.now)
        rig.advance(0)
    rig.requests.clear()
    rig.request_times.clear()
    rig.advance(70)
    maps = [r for r in rig.requests if isinstance(r, lc.RequestMap)]
    sent = {r.key[1]: t for r, t in zip(maps, rig.request_times, strict=True)}
    # Renewals due at 1067.5, 1067.6 and 1068.0 (RFC 6887 §11.2.1 with rand 0.5): the first two go together.
    assert sent == {21000: 1067.5, 21001: 1067.5, 21002: 1068.0}, sent


def test_at_most_concurrency_requests_are_out_at_once() -> None:
    core = Lifecycle(NatSettings(protocol="pcp", map_rate=0), rand=lambda: 0.5)
    core.start([Wanted(UDP, p) for p in range(30000, 30100)], 0.0)
    core.handle_timer(0.0)
    assert core.actions() == [lc.Discover()]
    core.discovered(ROUTER, EXTERNAL, 0.0)
    core.handle_timer(0.0)
    requests = [a for a in core.actions() if isinstance(a, lc.RequestMap)]
    assert len(requests) == lc.CONCURRENCY and core.busy == lc.CONCURRENCY
    granted = requests[0]
    core.granted(
        granted.key,
        Mapping("pcp", UDP, IPv4Address("192.168.77.10"), granted.key[1], EXTERNAL, granted.key[1], 7200),
        0.1,
    )
    core.handle_timer(0.1)
    assert sum(isinstance(a, lc.RequestMap) for a in core.actions()) == 1  # one slot freed, one more out


def test_a_delete_is_tombstoned_first_retried_with_back_off_and_forgotten_once_confirmed() -> None:
    rig = make()
    rig.core.want(Wanted(UDP, 7000), rig.now)
    rig.step()
    rig.refuse_deletes = True
    rig.core.unwant((UDP, 7000), rig.now)
    rig.step()
    assert rig.journal[(UDP, 7000)]["desired"] is False
    tries = []
    for _ in range(4):
        before = sum(isinstance(r, lc.RequestDelete) for r in rig.requests)
        start = rig.now
        rig.advance(100, until=lambda b=before: sum(isinstance(r, lc.RequestDelete) for r in rig.requests) > b)
        tries.append(rig.now - start)
    assert tries == pytest.approx([1.0, 2.0, 5.0, 15.0])  # REMOVE_RETRY (rand 0.5: no jitter)
    rig.refuse_deletes = False
    rig.advance(100, until=lambda: (UDP, 7000) not in rig.core.records)
    assert (UDP, 7000) not in rig.journal and (UDP, 7000) not in rig.table


def test_a_removal_ends_when_the_lease_certainly_ended_and_not_before() -> None:
    rig = make(lease=600)
    rig.core.want(Wanted(UDP, 7002), rig.now)
    rig.step()
    rig.refuse_deletes = True
    rig.core.unwant((UDP, 7002), rig.now)
    rig.advance(600)
    assert (UDP, 7002) in rig.core.records  # the lease may still run on the router
    rig.advance(lc.EXPIRY_MARGIN + 61)
    assert (UDP, 7002) not in rig.core.records and (UDP, 7002) not in rig.journal


def test_wanting_a_port_being_removed_revives_its_one_record() -> None:
    rig = make()
    rig.core.want(Wanted(UDP, 7004, owner="call:a"), rig.now)
    rig.step()
    record = rig.core.records[(UDP, 7004)]
    rig.refuse_deletes = True
    rig.core.unwant((UDP, 7004), rig.now)
    rig.step()
    rig.core.want(Wanted(UDP, 7004, owner="call:b"), rig.now)
    rig.step()
    assert rig.core.records[(UDP, 7004)] is record and record.state is State.ACTIVE
    assert rig.journal[(UDP, 7004)]["desired"] is True
    rig.refuse_deletes = False
    rig.advance(100)
    assert (UDP, 7004) in rig.table  # no stale retry deleted what is wanted again


def test_unwanted_while_its_request_is_out_the_grant_is_deleted_at_once() -> None:
    core = Lifecycle(NatSettings(protocol="pcp", map_rate=0), rand=lambda: 0.5)
    core.start([], 0.0)
    core.discovered(ROUTER, EXTERNAL, 0.0)
    core.want(Wanted(UDP, 7006), 0.0)
    request = next(a for a in core.actions() if isinstance(a, lc.RequestMap))
    assert core.unwant((UDP, 7006), 0.1)
    assert not any(isinstance(a, lc.RequestDelete) for a in core.actions())  # one operation at a time
    core.granted(request.key, Mapping("pcp", UDP, IPv4Address("192.168.77.10"), 7006, EXTERNAL, 7006, 7200), 0.2)
    core.handle_timer(0.2)
    actions = core.actions()
    assert any(isinstance(a, lc.RequestDelete) for a in actions)
    assert any(isinstance(a, lc.JournalRecord) and not a.desired for a in actions)  # granted, not desired


def test_a_lost_answer_still_counts_as_maybe_on_the_router() -> None:
    rig = make()
    rig.silent = True
    rig.core.want(Wanted(UDP, 7008), rig.now)
    rig.step()
    assert rig.core.records[(UDP, 7008)].maybe_on_router and (UDP, 7008) in rig.table
    rig.silent = False
    keys = rig.core.stop(rig.now)
    rig.step()
    assert keys == [(UDP, 7008)] and (UDP, 7008) not in rig.table


def test_stop_deletes_the_non_sticky_and_keeps_the_sticky_journalled() -> None:
    rig = make()
    rig.core.want(Wanted(UDP, 5060, sticky=True), rig.now)
    rig.core.want(Wanted(UDP, 7010), rig.now)
    rig.step()
    rig.core.stop(rig.now)
    rig.step()
    assert set(rig.table) == {(UDP, 5060)} and set(rig.journal) == {(UDP, 5060)}
    assert rig.journal[(UDP, 5060)]["desired"] is True
    before = len(rig.requests)
    rig.advance(10_000)
    assert len(rig.requests) == before  # stopped: nothing new goes out


def test_recovery_from_a_journal_adopts_sticky_rows_and_deletes_the_rest() -> None:
    core = Lifecycle(NatSettings(protocol="pcp"), rand=lambda: 0.5)
    rig = Rig(core)
    core.start([Wanted(TCP, 5060)], rig.now)
    core.discovered(ROUTER, EXTERNAL, rig.now)

    def row(port: int, *, sticky: bool, desired: bool, gateway: str = ROUTER.gateway, age: float = 10) -> Leftover:
        return Leftover(UDP, port, "x", sticky, desired, "pcp", gateway, 0, port, 7200, age)

    rig.table.update({(UDP, 8000): 7200, (UDP, 8001): 7200, (UDP, 8002): 7200})
    for key in [(UDP, 8000), (UDP, 8001), (UDP, 8002)]:
        rig.journal[key] = {"desired": True, "external_port": key[1]}
    core.adopt(
        [
            row(8000, sticky=True, desired=True),  # wanted across restarts: adopted
            row(8001, sticky=False, desired=True),  # non-sticky of a crashed run: deleted
            row(8002, sticky=True, desired=False),  # a delete that never completed: deleted
            row(8003, sticky=False, desired=True, gateway="10.0.0.1", age=8000),  # another router, lease over
        ],
        rig.now,
    )
    rig.advance(10)
    assert set(rig.table) == {(UDP, 8000), (TCP, 5060)}
    assert core.records[(UDP, 8000)].wanted.sticky and core.records[(UDP, 8000)].state is State.ACTIVE
    assert any(isinstance(a, lc.JournalRemove) and a.gateway == "10.0.0.1" for a in rig.log)


def test_disabling_deletes_but_keeps_wanting_and_enabling_puts_them_back() -> None:
    rig = make()
    rig.core.want(Wanted(UDP, 5060), rig.now)
    rig.step()
    rig.core.set_enabled(False, rig.now)
    rig.step()
    assert rig.table == {} and rig.core.records[(UDP, 5060)].state is State.DISABLED
    rig.core.set_enabled(True, rig.now)
    rig.advance(1)
    assert (UDP, 5060) in rig.table


def test_a_wrong_transition_is_a_bug_not_a_silent_state() -> None:
    record = lc.Record(Wanted(UDP, 1))
    record.state = State.REMOVING
    core = Lifecycle(NatSettings(), rand=lambda: 0.5)
    with pytest.raises(AssertionError, match="is not a transition"):
        core._move(record, State.ACTIVE)


def test_timer_is_none_when_nothing_is_planned_and_the_core_reads_no_clock() -> None:
    core = Lifecycle(NatSettings(enabled=False), rand=lambda: 0.5)
    core.start([], 0.0)
    assert core.timer() is None
    assert math.isinf(lc.Record(Wanted(UDP, 1), state=State.DISABLED).wake())


def test_events_carry_the_round_trip_and_a_refusal_its_code_and_protocol() -> None:
    core = Lifecycle(NatSettings(protocol="upnp", map_rate=0), rand=lambda: 0.5)
    core.start([], 0.0)
    core.discovered(Router("192.168.77.1", "192.168.77.10", "upnp"), EXTERNAL, 0.0)
    core.want(Wanted(TCP, 80), 1.0)
    core.actions()
    core.request_failed((TCP, 80), "router refused (606)", 1.25, code=606, protocol="upnp")
    [error] = [a.data for a in core.actions() if isinstance(a, lc.Emit) and a.kind is EventKind.NAT_ERROR]
    assert (error["error_code"], error["error_protocol"], error["elapsed"]) == (606, "upnp", 0.25)
    core.want(Wanted(UDP, 5060), 2.0)
    [request] = [a for a in core.actions() if isinstance(a, lc.RequestMap)]
    granted = Mapping("upnp", UDP, IPv4Address("192.168.77.10"), 5060, EXTERNAL, 5060, 3600)
    core.granted(request.key, granted, 2.002)
    [added] = [a.data for a in core.actions() if isinstance(a, lc.Emit) and a.kind is EventKind.NAT_ADD]
    assert added["elapsed"] == pytest.approx(0.002)
    core.unwant((UDP, 5060), 3.0)
    core.actions()
    core.delete_failed((UDP, 5060), "no answer", 5.0)
    [failed] = [a.data for a in core.actions() if isinstance(a, lc.Emit) and a.kind is EventKind.NAT_ERROR]
    assert failed["operation"] == "delete" and failed["elapsed"] == 2.0 and failed["error_protocol"] == "upnp"
