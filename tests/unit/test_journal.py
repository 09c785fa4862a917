"""The mapping journal: round trips, durability across SIGKILL, refusal of files it must not touch."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autonat
from autonat.engine.journal import SCHEMA_VERSION, Journal, JournalEntry, JournalError
from autonat.errors import AutonatError
from autonat.proto.types import Transport

GW = "192.168.1.1"
NOW = 1_700_000_000.0


def entry(port: int = 5060, **changes: Any) -> JournalEntry:
    base = JournalEntry(
        transport=Transport.UDP,
        internal_port=port,
        owner="config",
        sticky=True,
        desired=True,
        protocol="pcp",
        gateway=GW,
        internal_address="192.168.1.10",
        requested_external_port=port,
        external_port=None,
        lease=7200,
        updated_at=NOW,
    )
    return dataclasses.replace(base, **changes)


def assert_one_line_error(excinfo: pytest.ExceptionInfo[JournalError], path: Path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message
    assert isinstance(excinfo.value, AutonatError)
    return message


def test_round_trip_record_granted_tombstone_remove(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.db") as journal:
        assert journal.entries() == [] and journal.get(GW, Transport.UDP, 5060) is None
        journal.record(entry())
        assert journal.entries() == [entry()]

        journal.granted(GW, Transport.UDP, 5060, external_port=40000, lease=3600, now=NOW + 1)
        granted = entry(external_port=40000, lease=3600, updated_at=NOW + 1)
        assert journal.get(GW, Transport.UDP, 5060) == granted

        journal.tombstone(GW, Transport.UDP, 5060, now=NOW + 2)
        assert journal.entries() == [dataclasses.replace(granted, desired=False, updated_at=NOW + 2)]

        journal.remove(GW, Transport.UDP, 5060)
        assert journal.entries() == [] and journal.skipped == []


def test_record_is_an_upsert_on_gateway_transport_port(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.db") as journal:
        journal.record(entry())
        journal.record(entry(transport=Transport.TCP))
        journal.record(entry(gateway="10.0.0.1"))
        replacement = entry(owner="call:abc", sticky=False, protocol="upnp", external_port=5061, updated_at=NOW + 9)
        journal.record(replacement)
        assert journal.entries() == [entry(gateway="10.0.0.1"), entry(transport=Transport.TCP), replacement]


def test_missing_rows_granted_and_tombstone_raise_remove_does_not(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.db") as journal:
        with pytest.raises(KeyError):
            journal.granted(GW, Transport.UDP, 5060, 5060, 60, NOW)
        with pytest.raises(KeyError):
            journal.tombstone(GW, Transport.UDP, 5060, NOW)
        journal.remove(GW, Transport.UDP, 5060)
        assert journal.entries() == []


def test_entries_persist_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        journal.record(entry(5060))
        journal.record(entry(5061, desired=False))
    journal.close()  # idempotent
    with Journal(path) as journal:
        assert journal.entries() == [entry(5060), entry(5061, desired=False)]


def test_file_is_owner_only_in_an_owner_only_directory(tmp_path: Path) -> None:
    path = tmp_path / "state" / "autonat" / "journal.db"
    with Journal(path) as journal:
        journal.record(entry())
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        for name in ("journal.db", "journal.db-wal", "journal.db-shm"):
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name


def test_wal_mode_and_full_sync(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.db") as journal:
        assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert journal._db.execute("PRAGMA busy_timeout").fetchone()[0] > 0
        assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_two_journals_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal(path) as first, Journal(path) as second:
        first.record(entry(5060))
        assert second.get(GW, Transport.UDP, 5060) == entry(5060)
        second.granted(GW, Transport.UDP, 5060, 5070, 60, NOW + 1)
        assert first.entries() == [entry(5060, external_port=5070, lease=60, updated_at=NOW + 1)]
        second.remove(GW, Transport.UDP, 5060)
        assert first.entries() == []


def test_non_sqlite_file_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_bytes(b"not a database at all\n" * 200)
    with pytest.raises(JournalError) as excinfo:
        Journal(path)
    assert "move it away" in assert_one_line_error(excinfo, path)


def test_corrupt_page_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        for port in range(1, 200):
            journal.record(entry(port))
    data = bytearray(path.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # page 2: the mappings table's root
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError) as excinfo:
        Journal(path)
    assert "move it away" in assert_one_line_error(excinfo, path)


def test_foreign_sqlite_database_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE photos (name TEXT)")
    db.close()
    with pytest.raises(JournalError, match="not an autonat journal") as excinfo:
        Journal(path)
    assert_one_line_error(excinfo, path)
    with sqlite3.connect(path) as db:
        assert [row[0] for row in db.execute("SELECT name FROM sqlite_master")] == ["photos"]
    db.close()


def test_journal_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(JournalError, match="newer autonat") as excinfo:
        Journal(path)
    assert_one_line_error(excinfo, path)


def test_unusable_location_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(JournalError) as excinfo:
        Journal(blocker / "journal.db")
    assert_one_line_error(excinfo, blocker)
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(JournalError) as excinfo:
        Journal(tmp_path / "dir.db")
    assert_one_line_error(excinfo, tmp_path / "dir.db")


_INSERT = (
    "INSERT INTO mappings (gateway, transport, internal_port, owner, sticky, desired, protocol, internal_address,"
    " requested_external_port, external_port, lease, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_GOOD_ROW = (GW, "udp", 7000, "manual", 1, 1, "natpmp", "192.168.1.10", 0, 7000, 60, NOW)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        (1, "sctp"),
        (1, "UDP"),
        (2, 70000),
        (2, "seven"),
        (0, "router.lan"),
        (3, ""),
        (4, 2),
        (5, "yes"),
        (6, "ftp"),
        (9, 0),
        (10, -1),
        (11, "yesterday"),
    ],
)
def test_bad_row_is_skipped_and_reported(tmp_path: Path, column: int, value: object) -> None:
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        journal.record(entry())
    bad = list(_GOOD_ROW)
    bad[column] = value
    db = sqlite3.connect(path)
    db.execute(_INSERT, bad)
    db.commit()
    db.close()
    with Journal(path) as journal:
        assert journal.entries() == [entry()]
        assert len(journal.skipped) == 1 and "\n" not in journal.skipped[0]
        if column in (0, 1, 2):
            return  # the key itself is bad: get() cannot name the row
        assert journal.get(GW, Transport.UDP, 7000) is None
        assert len(journal.skipped) == 1  # reported once, not once per read
        # Recording under the same key replaces the bad row: the engine can repair it.
        repaired = entry(7000)
        journal.record(repaired)
        assert journal.entries() == [entry(), repaired] and journal.skipped == []


def test_entry_validates_and_canonicalises() -> None:
    assert entry(gateway="FE80::1").gateway == "fe80::1"
    assert entry(internal_address="fe80::0:1%eth0").internal_address == "fe80::1%eth0"
    for bad in (
        {"internal_port": 0},
        {"internal_port": True},
        {"external_port": 65536},
        {"requested_external_port": -1},
        {"protocol": "PCP"},
        {"owner": ""},
        {"owner": "a\nb"},
        {"gateway": "gateway.local"},
        {"lease": 2**32},
        {"updated_at": float("nan")},
        {"sticky": 1},
        {"transport": "udp"},
    ):
        with pytest.raises(ValueError):
            entry(**bad)


# A child process that records rows one by one and reports each as done only after record() returned.
_CHILD = """
import sys
from pathlib import Path
from autonat.engine.journal import Journal, JournalEntry
from autonat.proto.types import Transport

journal = Journal(Path(sys.argv[1]))
for port in range(1, int(sys.argv[2]) + 1):
    journal.record(JournalEntry(Transport.TCP, port, "config", True, True, "upnp", "10.0.0.1", "10.0.0.2",
                                port, None, 3600, float(port)))
    print(port, flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(10))
def test_acknowledged_rows_survive_sigkill(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    total = 2000
    path = tmp_path / "journal.db"
    env = {**os.environ, "PYTHONPATH": str(Path(autonat.__file__).parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(total)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    received = []
    try:
        for _ in range(rng.randint(1, 300)):
            received.append(child.stdout.readline())
            assert received[-1], child.stderr.read()
        time.sleep(rng.uniform(0, 0.003))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    received.append(child.stdout.read())
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    output = "".join(received)
    done = int(output[: output.rindex("\n")].rsplit("\n", 1)[-1])  # the last complete line
    assert done < total  # killed mid-run, as intended

    with Journal(path) as journal:
        ports = [row.internal_port for row in journal.entries()]
        assert journal.skipped == []
    # Every acknowledged row is there; at most the one in flight beyond it.
    assert ports[:done] == list(range(1, done + 1))
    assert len(ports) in (done, done + 1)


# Hypothesis: random operations through two handles (with reopens) match a dict model.
_keys = st.tuples(st.sampled_from([GW, "10.0.0.1", "fe80::1"]), st.sampled_from(Transport), st.sampled_from([1, 65535]))
_entries = st.builds(
    lambda key, owner, sticky, desired, protocol, requested, external, lease, at: JournalEntry(
        key[1], key[2], owner, sticky, desired, protocol, key[0], "192.168.1.10", requested, external, lease, at
    ),
    _keys,
    st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), min_size=1, max_size=12),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["pcp", "natpmp", "upnp"]),
    st.integers(0, 65535),
    st.none() | st.integers(1, 65535),
    st.integers(0, 2**32 - 1),
    st.floats(0, 4e9, allow_nan=False),
)
_operations = st.lists(
    st.tuples(st.integers(0, 1), st.sampled_from(["record", "granted", "tombstone", "remove", "reopen"])).flatmap(
        lambda pick: st.tuples(
            st.just(pick[0]),
            st.just(pick[1]),
            _entries,
            st.integers(1, 65535),
            st.integers(0, 2**32 - 1),
            st.floats(0, 4e9, allow_nan=False),
        )
    ),
    max_size=25,
)


@settings(max_examples=60)
@given(_operations)
def test_random_operations_match_a_dict_model(operations: list[tuple[int, str, JournalEntry, int, int, float]]) -> None:
    model: dict[tuple[str, Transport, int], JournalEntry] = {}
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "journal.db"
        handles = [Journal(path), Journal(path)]
        try:
            for which, operation, item, external_port, lease, now in operations:
                journal = handles[which]
                key = item.key
                if operation == "record":
                    journal.record(item)
                    model[key] = item
                elif operation == "granted":
                    if key in model:
                        journal.granted(*key, external_port, lease, now)
                        model[key] = dataclasses.replace(
                            model[key], external_port=external_port, lease=lease, updated_at=now
                        )
                    else:
                        with pytest.raises(KeyError):
                            journal.granted(*key, external_port, lease, now)
                elif operation == "tombstone":
                    if key in model:
                        journal.tombstone(*key, now)
                        model[key] = dataclasses.replace(model[key], desired=False, updated_at=now)
                    else:
                        with pytest.raises(KeyError):
                            journal.tombstone(*key, now)
                elif operation == "remove":
                    journal.remove(*key)
                    model.pop(key, None)
                else:
                    journal.close()
                    handles[which] = Journal(path)
                assert handles[1 - which].get(*key) == model.get(key)
            expected = [model[key] for key in sorted(model, key=lambda k: (k[0], k[1].value, k[2]))]
            for journal in handles:
                assert journal.entries() == expected and journal.skipped == []
        finally:
            for journal in handles:
                journal.close()
