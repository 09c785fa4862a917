"""The engine's IPv6 side against an in-process firewall (tests/fakes/fake_pinholes.py): the API the SIP
service uses (`Wanted(..., family=6)`, `delete(..., family=6)`, `lookup`, `relabel`, `pinholes`,
`ipv6_local_address`), one journal for both families, crash clean-up by UniqueID, and the control verbs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from autonat.daemon.control import ControlServer
from autonat.engine import engine as engine_module
from autonat.engine import lifecycle
from autonat.engine.engine import NatEngine, Wanted
from autonat.engine.events import EventKind
from autonat.engine.journal import Journal, JournalEntry
from autonat.engine.settings import NatSettings
from autonat.errors import AutonatError
from autonat.proto.types import Transport
from tests.fakes.fake_pinholes import GATEWAY6, LOCAL6, FakePinholeSession, pinhole_factory_for
from tests.fakes.fake_session import FakeSession, factory_for
from tests.unit.test_engine import until

UDP, TCP = Transport.UDP, Transport.TCP


@pytest.fixture(autouse=True)
def _quiet_and_quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """No multicast listeners of either family (the fakes have no network), delete retries in milliseconds."""

    async def no_listener(*_: Any, **__: Any) -> Any:
        raise OSError("no network in unit tests")

    for name in ("listen_announcements", "listen_notify", "listen_notify6"):
        monkeypatch.setattr(engine_module.watch, name, no_listener)
    monkeypatch.setattr(lifecycle, "REMOVE_RETRY", (0.01, 0.02, 0.05))


def make_engine(journal: Journal | None, firewall: FakePinholeSession, **settings: Any) -> NatEngine:
    return NatEngine(
        NatSettings(protocol="pcp", ipv6=True, map_rate=0, **settings),
        journal,
        session_factory=factory_for(FakeSession()),
        pinhole_factory=pinhole_factory_for(firewall),
    )


async def ready6(engine: NatEngine) -> None:
    await engine.start()
    assert await engine.wait_ready(2)
    assert await engine.wait_ready(2, family=6)  # an event, not polled: the pinhole pool waits on it
    assert engine.ipv6_local_address is not None


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[NatEngine, FakePinholeSession, Journal]]:
    firewall = FakePinholeSession()
    journal = Journal(tmp_path / "journal.sqlite")
    engine = make_engine(journal, firewall)
    await ready6(engine)
    try:
        yield engine, firewall, journal
    finally:
        await engine.stop()
        journal.close()


async def test_a_pinhole_through_the_engine_api(rig: tuple[NatEngine, FakePinholeSession, Journal]) -> None:
    engine, firewall, journal = rig
    assert engine.ipv6_local_address == str(LOCAL6)
    events = engine.events.subscribe()
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)  # subscribed from here on
    status = await engine.add(Wanted(UDP, 5060, owner="sip:lan", family=6))
    assert (status.state, status.family, status.unique_id, status.external_ip) == ("active", 6, 1, LOCAL6)
    assert firewall.upnp.holes == {1: (UDP, 5060)}
    found = engine.lookup((UDP, 5060), family=6)
    assert found is not None and (found.owner, found.unique_id) == ("sip:lan", 1) and (UDP, 5060) in engine.pinholes
    assert engine.lookup((UDP, 5060)) is None and (UDP, 5060) not in engine.mappings  # families apart
    (row,) = journal.entries()
    assert (row.family, row.unique_id, row.gateway, row.internal_address) == (6, 1, str(GATEWAY6), str(LOCAL6))
    event = await asyncio.wait_for(first, 2)
    assert event.kind is EventKind.NAT_ADD and event.data["family"] == 6 and event.data["unique_id"] == 1
    engine.relabel(UDP, 5060, "call:7", family=6)
    assert engine.pinholes[(UDP, 5060)].owner == "call:7"
    shown = engine.status()
    assert shown["ipv6"] == {
        "state": "ready",
        "protocol": "upnp",
        "gateway": str(GATEWAY6),
        "local_address": str(LOCAL6),
        "last_error": None,
    }
    assert [(m["port"], m["family"]) for m in shown["mappings"]] == [(5060, 6)]
    # The same port mapped on IPv4 is another mapping, in the same journal.
    await engine.add(Wanted(UDP, 5060))
    assert sorted(entry.family for entry in journal.entries()) == [4, 6]
    assert await engine.delete(UDP, 5060, family=6) is True
    assert firewall.upnp.holes == {} and [entry.family for entry in journal.entries()] == [4]
    assert engine.lookup((UDP, 5060)) is not None  # the IPv4 mapping stays
    assert await engine.delete(UDP, 5060, family=6) is False


async def test_a_killed_runs_pinholes_are_deleted_by_unique_id_or_re_taken(tmp_path: Path) -> None:
    firewall = FakePinholeSession()
    firewall.upnp.holes = {41: (UDP, 5060), 42: (UDP, 5062)}
    firewall.upnp.next_id = 43
    journal = Journal(tmp_path / "journal.sqlite")

    def row(port: int, sticky: bool, unique_id: int) -> JournalEntry:
        return JournalEntry(
            UDP,
            port,
            "manual",
            sticky,
            True,
            "upnp",
            str(GATEWAY6),
            str(LOCAL6),
            0,
            port,
            3600,
            time.time(),
            family=6,
            unique_id=unique_id,
        )

    journal.record(row(5060, False, 41))  # what a SIGKILLed run left: a non-sticky pinhole ...
    journal.record(row(5062, True, 42))  # ... and a sticky one
    engine = make_engine(journal, firewall)
    try:
        await ready6(engine)
        await until(lambda: 41 not in firewall.upnp.holes)
        assert firewall.upnp.holes == {42: (UDP, 5062)}  # the sticky one re-taken (UpdatePinhole 42), not doubled
        await until(lambda: engine.lookup((UDP, 5062), family=6) is not None)
        assert engine.pinholes[(UDP, 5062)].unique_id == 42
        assert {(e.internal_port, e.unique_id) for e in journal.entries()} == {(5062, 42)}
    finally:
        await engine.stop()
        journal.close()


async def test_pinholes_are_refused_with_ipv6_off(tmp_path: Path) -> None:
    engine = NatEngine(NatSettings(protocol="pcp", map_rate=0), None, session_factory=factory_for(FakeSession()))
    await engine.start()
    try:
        assert await engine.wait_ready(2)
        with pytest.raises(AutonatError, match=r"\[nat\] ipv6 = false"):
            await engine.add(Wanted(UDP, 5060, family=6))
        assert await engine.delete(UDP, 5060, family=6) is False
        assert engine.lookup((UDP, 5060), family=6) is None and len(engine.pinholes) == 0
        assert engine.status()["ipv6"] is None and engine.ipv6_local_address is None
        assert not await engine.wait_ready(0.05, family=6)  # never, with IPv6 off: bounded by the timeout
    finally:
        await engine.stop()


async def test_control_add_and_del_with_a_family(
    rig: tuple[NatEngine, FakePinholeSession, Journal], tmp_path: Path
) -> None:
    engine, firewall, _ = rig
    control = ControlServer(engine, tmp_path / "run" / "control.sock", None, None)
    await control.start()

    async def ask(request: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(control.socket_path))
        writer.write(json.dumps(request).encode() + b"\n")
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        reply: dict[str, Any] = json.loads(line)
        return reply

    try:
        added = await ask({"cmd": "add", "port": 5070, "proto": "tcp", "sticky": True, "family": 6})
        assert added["ok"] and added["result"]["family"] == 6 and added["result"]["external_ip"] == str(LOCAL6)
        assert firewall.upnp.holes == {1: (TCP, 5070)}
        for bad in (5, "6", True, None):
            reply = await ask({"cmd": "add", "port": 5071, "proto": "udp", "family": bad})
            assert reply == {"ok": False, "error": "family must be 4 (a port mapping) or 6 (an IPv6 pinhole)"}
        assert (await ask({"cmd": "del", "port": 5070, "proto": "tcp"})) == {"ok": False, "error": "no such mapping"}
        assert (await ask({"cmd": "del", "port": 5070, "proto": "tcp", "family": 6}))["ok"]
        assert firewall.upnp.holes == {}
        missing = await ask({"cmd": "del", "port": 5070, "proto": "tcp", "family": 6})
        assert missing == {"ok": False, "error": "no such pinhole"}
    finally:
        await control.stop()
