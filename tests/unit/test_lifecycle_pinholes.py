"""The lifecycle core keeping IPv6 pinholes (`family` 6) on a fake clock: the same states, schedule,
journal rule and events as IPv4 mappings, with what differs for a firewall (no external address of
its own, UPnP pinholes named by UniqueID and refreshed rather than verified, docs/QUIRKS.md U18)."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv6Address
from typing import Any

import pytest

from autonat.engine import lifecycle as lc
from autonat.engine.events import EventKind
from autonat.engine.lifecycle import Key, Leftover, Lifecycle, Router, State, Wanted
from autonat.engine.settings import NatSettings
from autonat.limits import TokenBucket
from autonat.mapper import Mapping
from autonat.proto.types import Transport

UDP = Transport.UDP
OURS = IPv6Address("2001:db8:0:77::10")
GATEWAY6 = "2001:db8:0:77::1"


@dataclass
class PinholeRig:
    """A family-6 core and a firewall model: pinholes by UniqueID, which a flush or reboot forgets."""

    core: Lifecycle
    protocol: str
    now: float = 1000.0
    epoch: int = 100
    epoch_at: float = 1000.0
    holes: dict[int, Key] = field(default_factory=dict)  # UniqueID -> key (UPnP); PCP uses ids too
    next_id: int = 1
    log: list[lc.Action] = field(default_factory=list)
    journal: dict[Key, dict[str, Any]] = field(default_factory=dict)

    def step(self) -> None:
        while actions := self.core.actions():
            for action in actions:
                self.log.append(action)
                self._perform(action)

    def _perform(self, action: lc.Action) -> None:
        core = self.core
        if isinstance(action, lc.JournalRecord):
            assert action.family == 6 and action.gateway == GATEWAY6 and action.internal_address == str(OURS)
            self.journal[action.key] = {"desired": action.desired, "unique_id": action.unique_id}
        elif isinstance(action, lc.JournalTombstone):
            assert action.family == 6
            for key in action.keys:
                self.journal[key]["desired"] = False
        elif isinstance(action, lc.JournalRemove):
            assert action.family == 6
            self.journal.pop(action.key, None)
        elif isinstance(action, lc.RequestMap):
            assert action.key in self.journal, "a request left before its journal row"
            unique_id = action.unique_id
            if unique_id is None or self.holes.get(unique_id) != action.key:  # AddPinhole (again)
                unique_id, self.next_id = self.next_id, self.next_id + 1
            self.holes[unique_id] = action.key
            transport, port = action.key
            granted = Mapping(
                action.protocol,
                transport,
                OURS,
                port,
                OURS,  # a pinhole's "external" address is our own (RFC 6887 §11.1 on a firewall)
                port,
                action.request.lifetime,
                self.epoch + int(self.now - self.epoch_at) if action.protocol == "pcp" else None,
                unique_id if action.protocol == "upnp" else None,
            )
            core.granted(action.key, granted, self.now)
        elif isinstance(action, lc.RequestDelete):
            for unique_id, key in list(self.holes.items()):
                if key == action.key and (action.protocol != "upnp" or unique_id == action.unique_id):
                    del self.holes[unique_id]
            core.deleted(action.key, self.now)
        elif isinstance(action, lc.RequestVerify):
            raise AssertionError("a pinhole is refreshed, never verified")
        elif isinstance(action, lc.QueryAddress):
            assert self.protocol == "pcp"
            core.address("pcp", None, self.epoch + int(self.now - self.epoch_at), self.now)
        elif isinstance(action, lc.Discover):
            core.discovered(Router(GATEWAY6, str(OURS), self.protocol), None, self.now)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        self.step()
        while (when := self.core.timer()) is not None and when <= end:
            self.now = max(self.now, when)
            self.core.handle_timer(self.now)
            self.step()
        self.now = end

    def events(self, kind: EventKind) -> list[dict[str, Any]]:
        return [a.data for a in self.log if isinstance(a, lc.Emit) and a.kind is kind]

    def of(self, kind: type[Any]) -> list[Any]:
        return [a for a in self.log if isinstance(a, kind)]


def make(protocol: str = "upnp", **settings: Any) -> PinholeRig:
    core = Lifecycle(NatSettings(ipv6=True, verify_interval=60, **settings), rand=lambda: 0.5, family=6)
    rig = PinholeRig(core, protocol)
    core.start([], rig.now)
    rig.advance(0)
    return rig


def test_a_upnp_pinhole_is_journalled_with_its_unique_id_and_renewed_by_it() -> None:
    rig = make()
    rig.core.want(Wanted(UDP, 5060, owner="sip:lan", family=6), rig.now)
    rig.advance(0)
    status = rig.core.statuses(rig.now)[0]
    assert (status.state, status.family, status.unique_id, status.external_ip) == (State.ACTIVE, 6, 1, OURS)
    assert rig.journal[(UDP, 5060)] == {"desired": True, "unique_id": 1}
    assert rig.core.external_ip is None  # a firewall has no external address: no address events
    assert not rig.events(EventKind.EXTERNAL_ADDRESS_CHANGE)
    (added,) = rig.events(EventKind.NAT_ADD)
    assert added["family"] == 6 and added["unique_id"] == 1 and added["owner"] == "sip:lan"
    first = rig.of(lc.RequestMap)
    rig.advance(60 * 1.1 + 1)  # one verify interval: an UpdatePinhole by its UniqueID, no CheckPinholeWorking
    maps = rig.of(lc.RequestMap)[len(first) :]
    assert maps and all(m.unique_id == 1 for m in maps)
    assert not rig.of(lc.RequestVerify)
    records = len(rig.of(lc.JournalRecord))
    rig.advance(600)  # renewals of what is journalled write nothing
    assert len(rig.of(lc.JournalRecord)) == records


def test_a_pinhole_the_router_forgot_is_made_again_and_its_new_id_journalled() -> None:
    rig = make()
    rig.core.want(Wanted(UDP, 5060, family=6), rig.now)
    rig.advance(0)
    rig.holes.clear()  # a flushed ruleset: UpdatePinhole fails, AddPinhole makes it again (ID 2)
    rig.advance(60 * 1.1 + 1)
    assert rig.core.statuses(rig.now)[0].unique_id == 2
    assert rig.journal[(UDP, 5060)]["unique_id"] == 2
    assert rig.core.unwant((UDP, 5060), rig.now)
    rig.advance(0)
    (delete,) = rig.of(lc.RequestDelete)
    assert delete.unique_id == 2 and delete.protocol == "upnp"
    assert rig.journal == {} and rig.holes == {}
    (deleted,) = rig.events(EventKind.NAT_DEL)
    assert deleted == {"port": 5060, "proto": "udp", "owner": "manual", "family": 6}


def test_a_pcp_pinhole_is_re_made_when_the_epoch_goes_back() -> None:
    rig = make("pcp")
    rig.core.want(Wanted(UDP, 5060, family=6, sticky=True), rig.now)
    rig.advance(0)
    assert rig.core.statuses(rig.now)[0].protocol == "pcp"
    before = len(rig.of(lc.RequestMap))
    rig.epoch, rig.epoch_at = 0, rig.now  # the router rebooted
    rig.holes.clear()
    rig.core.address("pcp", None, 0, rig.now)  # its ANNOUNCE
    rig.advance(1)
    (reboot,) = rig.events(EventKind.ROUTER_REBOOT)
    assert reboot["family"] == 6 and reboot["gateway"] == GATEWAY6
    assert len(rig.of(lc.RequestMap)) > before and rig.holes
    assert rig.core.statuses(rig.now)[0].state is State.ACTIVE


def test_leftovers_of_a_killed_run_are_deleted_by_unique_id_or_adopted() -> None:
    core = Lifecycle(NatSettings(ipv6=True), rand=lambda: 0.5, family=6)
    rig = PinholeRig(core, "upnp")
    rig.holes = {7: (UDP, 5060), 8: (UDP, 5062)}
    rig.next_id = 9
    core.start([], rig.now)
    core.discovered(Router(GATEWAY6, str(OURS), "upnp"), None, rig.now)

    def leftover(port: int, sticky: bool, unique_id: int) -> Leftover:
        return Leftover(UDP, port, "manual", sticky, True, "upnp", GATEWAY6, port, port, 3600, 10.0, unique_id)

    rig.journal = {(UDP, 5060): {"desired": True, "unique_id": 7}, (UDP, 5062): {"desired": True, "unique_id": 8}}
    core.adopt([leftover(5060, False, 7), leftover(5062, True, 8)], rig.now)
    rig.advance(1)
    (delete,) = rig.of(lc.RequestDelete)
    assert (delete.key, delete.unique_id) == ((UDP, 5060), 7)  # non-sticky: gone, by its UniqueID
    assert rig.holes == {8: (UDP, 5062)}  # sticky: re-taken with UpdatePinhole 8, not a second pinhole
    assert [m.unique_id for m in rig.of(lc.RequestMap)] == [8]
    assert set(rig.journal) == {(UDP, 5062)}


def test_families_do_not_mix_and_share_the_map_rate() -> None:
    settings = NatSettings(ipv6=True, map_rate=2)
    bucket = TokenBucket(2, 4)
    four = Lifecycle(settings, rand=lambda: 0.5, new_holes=bucket)
    six = Lifecycle(settings, rand=lambda: 0.5, family=6, new_holes=bucket)
    with pytest.raises(ValueError, match="family 4 mapping given to the family 6 core"):
        six.want(Wanted(UDP, 5060), 0.0)
    with pytest.raises(ValueError, match="family 6 mapping given to the family 4 core"):
        four.start([Wanted(UDP, 5060, family=6)], 0.0)
    with pytest.raises(ValueError):
        Wanted(UDP, 5060, family=5)
    assert six.map_budget(0.0) == four.map_budget(0.0) == 4
    assert bucket.take(0.0)
    assert six.map_budget(0.0) == four.map_budget(0.0) == 3  # one bucket: a flood cannot double the rate
