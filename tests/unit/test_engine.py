"""The engine's bookkeeping of holes, against an in-process router that keeps a table (tests/fakes).

The promise under test: nothing we asked the router for outlives its lease unknown to the journal, a
delete the router did not confirm is retried while the daemon runs, and a stop that cannot finish
leaves tombstones the next start deletes. (Real-router versions: tests/lab/test_abuse.py.)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from autonat.engine import engine as engine_module
from autonat.engine import lifecycle
from autonat.engine.engine import NatEngine, Wanted
from autonat.engine.journal import Journal
from autonat.engine.settings import NatSettings
from autonat.proto.types import Transport
from tests.fakes.fake_session import FakeSession, factory_for

UDP = Transport.UDP


@pytest.fixture(autouse=True)
def _quiet_and_quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """No multicast listeners (the fake router has no network), and delete retries in milliseconds."""

    async def no_listener(*_: Any) -> Any:
        raise OSError("no network in unit tests")

    monkeypatch.setattr(engine_module.watch, "listen_announcements", no_listener)
    monkeypatch.setattr(engine_module.watch, "listen_notify", no_listener)
    monkeypatch.setattr(lifecycle, "REMOVE_RETRY", (0.01, 0.02, 0.05))


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def started_engine(session: FakeSession, journal: Journal | None, **settings: Any) -> NatEngine:
    return NatEngine(NatSettings(protocol="pcp", **settings), journal, session_factory=factory_for(session))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[NatEngine, FakeSession, Journal]]:
    session = FakeSession()
    journal = Journal(tmp_path / "journal.sqlite")
    engine = started_engine(session, journal, map_rate=0)
    await engine.start()
    assert await engine.wait_ready(2)
    try:
        yield engine, session, journal
    finally:
        await engine.stop()
        journal.close()


def journalled(journal: Journal) -> dict[int, bool]:
    """internal port -> desired, for every journal row."""
    return {entry.internal_port: entry.desired for entry in journal.entries()}


async def test_a_delete_the_router_does_not_confirm_is_retried_until_it_is(
    rig: tuple[NatEngine, FakeSession, Journal],
) -> None:
    engine, session, journal = rig
    await engine.add(Wanted(UDP, 16000))
    assert (UDP, 16000) in session.pcp.table
    session.pcp.fail_deletes = True
    assert await engine.delete(UDP, 16000) is True
    mapping = engine.mappings[(UDP, 16000)]  # kept: the router may still hold it
    assert mapping.state == "removing" and engine.status()["mappings"][0]["state"] == "removing"
    assert journalled(journal) == {16000: False}  # tombstoned: a crash now still deletes it at the next start
    tries = session.pcp.deletes
    await until(lambda: session.pcp.deletes >= tries + 2)  # retried in the background, with back-off
    assert (UDP, 16000) in session.pcp.table and (UDP, 16000) in engine.mappings
    session.pcp.fail_deletes = False
    await until(lambda: (UDP, 16000) not in engine.mappings)
    assert (UDP, 16000) not in session.pcp.table
    assert journalled(journal) == {}
    assert engine.removing == 0


async def test_wanting_a_port_again_while_its_delete_is_pending_revives_the_one_mapping(
    rig: tuple[NatEngine, FakeSession, Journal],
) -> None:
    engine, session, journal = rig
    await engine.add(Wanted(UDP, 16002, owner="call:a"))
    record = engine._core.records[(UDP, 16002)]
    session.pcp.fail_deletes = True
    await engine.delete(UDP, 16002)
    assert engine.mappings[(UDP, 16002)].state == "removing"
    again = await engine.add(Wanted(UDP, 16002, owner="call:b"))
    assert engine._core.records[(UDP, 16002)] is record  # the one record for that port, revived
    assert again.state == "active" and again.owner == "call:b"
    assert journalled(journal) == {16002: True}
    session.pcp.fail_deletes = False
    await asyncio.sleep(0.2)  # no stale retry may delete what is wanted again
    assert (UDP, 16002) in session.pcp.table and journalled(journal) == {16002: True}


async def test_churn_never_leaves_a_router_mapping_outside_the_journal(tmp_path: Path) -> None:
    """Calls come and go on a small port range while deletes fail at random: at every step, whatever the
    router holds for us has a journal row; after stop and a restart on the same journal, nothing is left."""
    session = FakeSession()
    session.pcp.delay = 0.001
    journal = Journal(tmp_path / "journal.sqlite")
    engine = started_engine(session, journal, map_rate=0, shutdown_timeout=5)
    await engine.start()
    assert await engine.wait_ready(2)
    rng = random.Random(7)
    ports = [16000 + 2 * i for i in range(12)]
    live: set[int] = set()

    def check() -> None:
        rows = journalled(journal)
        for transport, port in session.pcp.table:
            assert port in rows, f"router holds {transport} {port}, the journal does not"

    async def call(port: int) -> None:
        await asyncio.gather(engine.add(Wanted(UDP, port, owner="call")), engine.add(Wanted(UDP, port + 1)))
        await asyncio.sleep(rng.random() * 0.01)
        await asyncio.gather(engine.delete(UDP, port), engine.delete(UDP, port + 1))

    tasks: list[asyncio.Task[None]] = []
    for step in range(300):
        session.pcp.fail_deletes = rng.random() < 0.3
        port = rng.choice(ports)
        if port not in live:
            live.add(port)
            task = asyncio.ensure_future(call(port))
            task.add_done_callback(lambda _, port=port: live.discard(port))
            tasks.append(task)
        await asyncio.sleep(0.002)
        if step % 20 == 0:
            check()
    await asyncio.gather(*tasks)
    check()
    session.pcp.fail_deletes = False
    await engine.stop()
    assert session.pcp.table == {}
    assert journalled(journal) == {}
    journal.close()


async def test_stop_tombstones_what_the_router_would_not_delete_and_the_next_start_deletes_it(
    tmp_path: Path,
) -> None:
    session = FakeSession()
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    engine = started_engine(session, journal, map_rate=0, shutdown_timeout=0.3)
    await engine.start()
    assert await engine.wait_ready(2)
    for port in (16010, 16011, 16012):
        await engine.add(Wanted(UDP, port))
    await engine.add(Wanted(UDP, 5060, sticky=True))
    session.pcp.fail_deletes = True
    started = time.monotonic()
    await engine.stop()
    assert time.monotonic() - started < 1.5  # bounded by shutdown_timeout, not by the retries
    assert journalled(journal) == {5060: True, 16010: False, 16011: False, 16012: False}
    journal.close()

    journal = Journal(path)
    engine = started_engine(session, journal, map_rate=0)
    await engine.start()
    assert await engine.wait_ready(2)
    await until(lambda: engine.removing == 3)  # the leftovers, still refused by the router: kept, retried
    tries = session.pcp.deletes
    await until(lambda: session.pcp.deletes >= tries + 3)
    assert journalled(journal) == {5060: True, 16010: False, 16011: False, 16012: False}
    session.pcp.fail_deletes = False
    await until(lambda: set(session.pcp.table) == {(UDP, 5060)})
    assert journalled(journal) == {5060: True}
    await engine.stop()
    journal.close()


async def test_a_request_whose_answer_was_lost_is_deleted_at_stop(tmp_path: Path) -> None:
    session = FakeSession()
    journal = Journal(tmp_path / "journal.sqlite")
    engine = started_engine(session, journal, map_rate=0, timeout=0.2)
    await engine.start()
    assert await engine.wait_ready(2)
    session.pcp.lose_add_answers = True
    mapping = await engine.add(Wanted(UDP, 16020))
    assert mapping.state == "failed" and (UDP, 16020) in session.pcp.table  # made, though we never heard
    assert journalled(journal) == {16020: True}
    await engine.stop()
    assert session.pcp.table == {} and journalled(journal) == {}


async def test_a_removal_is_given_up_only_once_the_lease_has_certainly_run_out(
    rig: tuple[NatEngine, FakeSession, Journal],
) -> None:
    engine, session, journal = rig
    await engine.add(Wanted(UDP, 16030))
    record = engine._core.records[(UDP, 16030)]
    session.pcp.fail_deletes = True
    await engine.delete(UDP, 16030)
    await asyncio.sleep(0.1)
    assert (UDP, 16030) in engine.mappings  # the lease (7200 s) is far from over: keep trying
    assert record.expires_at is not None and record.asked_until is not None
    past = asyncio.get_running_loop().time() - lifecycle.EXPIRY_MARGIN - 1
    record.expires_at = record.asked_until = past
    await until(lambda: (UDP, 16030) not in engine.mappings)
    assert journalled(journal) == {}


async def test_new_mappings_reach_the_router_at_most_map_rate_a_second(tmp_path: Path) -> None:
    session = FakeSession()
    engine = started_engine(session, None, map_rate=20)
    await engine.start()
    assert await engine.wait_ready(2)
    started = time.monotonic()
    for port in range(17000, 17040):
        await engine.add(Wanted(UDP, port), wait=0)
    assert len(session.pcp.table) <= 20 + 1  # the burst, not forty
    assert engine.map_budget() < 1
    await until(lambda: len(session.pcp.table) == 40, timeout=5)
    assert time.monotonic() - started >= 0.9  # the other twenty waited for tokens (20 a second)
    before = session.pcp.adds
    await engine.republish()  # refreshes are not new holes: not held back
    assert session.pcp.adds == before + 40
    await engine.stop()


async def test_a_grant_taken_at_max_lease_is_never_given_up_by_time(tmp_path: Path) -> None:
    """The router may hold such a mapping far longer than we took it as (mapper.cap_grant): keep deleting."""
    session = FakeSession()
    engine = started_engine(session, None, map_rate=0, lease=3600, max_lease=3600)
    await engine.start()
    assert await engine.wait_ready(2)
    await engine.add(Wanted(UDP, 16040))
    record = engine._core.records[(UDP, 16040)]
    assert record.open_ended
    session.pcp.fail_deletes = True
    await engine.delete(UDP, 16040)
    record.expires_at = record.asked_until = asyncio.get_running_loop().time() - lifecycle.EXPIRY_MARGIN - 1
    tries = session.pcp.deletes
    await until(lambda: session.pcp.deletes >= tries + 3)
    assert (UDP, 16040) in engine.mappings  # still ours to delete
    session.pcp.fail_deletes = False
    await engine.stop()
    assert session.pcp.table == {}


async def test_a_pcp_only_router_gives_the_external_address_and_its_change() -> None:
    """Regression: PCP has no address request and its probe (ANNOUNCE) carries no address; the address
    comes from the grants, and a change is noticed by refreshing a mapping (issue "The engine owns its
    truth"). Real protocol clients against the fake router on loopback, NAT-PMP refused."""
    from ipaddress import IPv4Address

    from autonat.aio.channel import DatagramChannel
    from autonat.aio.route import RouterLocation
    from autonat.aio.router import RouterSession, reply_key
    from autonat.engine.events import EventKind
    from tests.fakes.pcp_natpmp_router import start_fake_router

    router, port = await start_fake_router(pcp_only=True)
    loopback = IPv4Address("127.0.0.1")

    async def factory(*_: Any, **__: Any) -> RouterSession:
        channel = await DatagramChannel.open(loopback, reply_key)
        return RouterSession(RouterLocation(loopback, loopback, "lo"), channel, 1.0, server_port=port)

    engine = NatEngine(NatSettings(protocol="pcp", external_ip_interval=0.3), None, session_factory=factory)
    events = engine.events.subscribe()
    await engine.start([Wanted(UDP, 5060)])
    await until(lambda: engine.status()["external_ip"] == "203.0.113.1")
    assert engine.status()["mappings"][0]["external_ip"] == "203.0.113.1"
    router.external = IPv4Address("203.0.113.2")
    changed = asyncio.get_running_loop().time()
    async with asyncio.timeout(5):
        async for event in events:
            if event.kind is EventKind.EXTERNAL_ADDRESS_CHANGE:
                break
    assert event.data == {"old": "203.0.113.1", "new": "203.0.113.2"}
    assert asyncio.get_running_loop().time() - changed < 5
    assert engine.status()["external_ip"] == "203.0.113.2"
    assert [h["address"] for h in engine.status()["address_history"]] == ["203.0.113.1", "203.0.113.2"]
    await events.aclose()
    await engine.stop()
    assert router.transport is not None
    router.transport.close()


async def test_the_status_json_has_exactly_the_keys_docs_json_documents(
    rig: tuple[NatEngine, FakeSession, Journal],
) -> None:
    import re

    engine, _, _ = rig
    doc = (Path(__file__).resolve().parents[2] / "docs" / "JSON.md").read_text()
    status_table = doc.split("A mapping:")[0].split("## `autonat nat_map status")[1]

    def keys(table: str) -> set[str]:
        return {key for row in re.findall(r"^\| (`[^|]+`) \|", table, re.M) for key in re.findall(r"`(\w+)`", row)}

    assert set(engine.status()) == keys(status_table)
    assert engine.status()["schema"] == engine_module.STATUS_SCHEMA == 2


async def test_a_mapping_in_the_status_json_has_the_documented_keys(
    rig: tuple[NatEngine, FakeSession, Journal],
) -> None:
    import re

    engine, _, _ = rig
    await engine.add(Wanted(UDP, 16050))
    doc = (Path(__file__).resolve().parents[2] / "docs" / "JSON.md").read_text()
    table = doc.split("A mapping:")[1].split("##")[0]
    documented = {key for row in re.findall(r"^\| (`[^|]+`) \|", table, re.M) for key in re.findall(r"`(\w+)`", row)}
    assert set(engine.status()["mappings"][0]) == documented


async def test_the_journal_row_is_durable_before_the_request_reaches_the_router(tmp_path: Path) -> None:
    """Deterministic, not by random SIGKILLs: at the instant each request reaches the router, a second
    connection to the journal file (what the next start would read) already holds its row."""
    session = FakeSession()
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    reader = Journal(path)
    seen: list[tuple[int, bool]] = []

    def check(request: Any) -> None:
        entry = reader.get("192.168.77.1", request.transport, request.internal_port)
        seen.append((request.internal_port, entry is not None and entry.desired))

    session.pcp.before_add = check
    engine = started_engine(session, journal, map_rate=0)
    await engine.start([Wanted(UDP, 5060)])
    assert await engine.wait_ready(2)
    for port in range(16100, 16110):
        await engine.add(Wanted(UDP, port))
    await engine.stop()
    assert len(seen) == 11 and all(durable for _, durable in seen), seen
    reader.close()
    journal.close()
