"""The journal's schema 2 (issue 15): IPv6 pinholes beside IPv4 mappings, and the migration of a schema-1 file."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from autonat.engine.journal import SCHEMA_VERSION, Journal, JournalEntry
from autonat.proto.types import Transport
from tests.unit.test_journal import NOW, entry

GW6 = "2001:db8:0:77::1"
OURS6 = "2001:db8:0:77::10"

# The schema autonat wrote before issue 15, verbatim, and two rows as it wrote them.
_SCHEMA_1 = """
CREATE TABLE mappings (
    gateway TEXT NOT NULL,
    transport TEXT NOT NULL,
    internal_port INTEGER NOT NULL,
    owner TEXT NOT NULL,
    sticky INTEGER NOT NULL,
    desired INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    internal_address TEXT NOT NULL,
    requested_external_port INTEGER NOT NULL,
    external_port INTEGER,
    lease INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (gateway, transport, internal_port)
)
"""
_ROWS_1 = [
    ("192.168.1.1", "udp", 5060, "config", 1, 1, "pcp", "192.168.1.10", 5060, 40000, 7200, NOW),
    ("192.168.1.1", "tcp", 8080, "manual", 0, 0, "upnp", "192.168.1.10", 0, None, 3600, NOW + 1),
]


def pinhole(port: int = 5060, **changes: object) -> JournalEntry:
    base = entry(port, gateway=GW6, internal_address=OURS6, family=6, protocol="upnp", unique_id=7)
    return dataclasses.replace(base, **changes)


def old_journal(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute(_SCHEMA_1)
    db.executemany("INSERT INTO mappings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _ROWS_1)
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


def test_a_schema_1_journal_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    old_journal(path)
    with Journal(path) as journal:
        rows = journal.entries()
        assert journal.skipped == []
        assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert [(e.transport, e.internal_port, e.external_port, e.desired, e.family, e.unique_id) for e in rows] == [
        (Transport.TCP, 8080, None, False, 4, None),
        (Transport.UDP, 5060, 40000, True, 4, None),
    ]
    assert rows[1] == entry(5060, external_port=40000, requested_external_port=5060)
    # Opened again (already migrated): the same rows, nothing done twice.
    with Journal(path) as journal:
        assert journal.entries() == rows
        journal.record(pinhole())
        assert len(journal.entries()) == 3


def test_a_migration_that_fails_leaves_the_schema_1_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    old_journal(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE mappings_v1 (x)")  # the rename inside the migration now fails
    db.commit()
    db.close()
    with pytest.raises(Exception, match="mappings_v1"):
        Journal(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM mappings").fetchone()[0] == 2
    db.close()


def test_a_pinhole_and_a_mapping_of_the_same_key_are_two_rows(tmp_path: Path) -> None:
    # An IPv4 mapping through an IPv6 PCP server (DS-Lite) may share gateway, transport and port with a pinhole.
    mapping = entry(5060, gateway=GW6, internal_address="192.168.1.10")
    hole = pinhole(5060)
    with Journal(tmp_path / "j.sqlite") as journal:
        journal.record(mapping)
        journal.record(hole)
        assert journal.get(GW6, Transport.UDP, 5060) == mapping
        assert journal.get(GW6, Transport.UDP, 5060, family=6) == hole
        journal.granted(GW6, Transport.UDP, 5060, 5060, 3600, NOW + 5, family=6)
        journal.tombstone(GW6, Transport.UDP, 5060, NOW + 6, family=6)
        got = journal.get(GW6, Transport.UDP, 5060, family=6)
        assert got == dataclasses.replace(hole, external_port=5060, lease=3600, desired=False, updated_at=NOW + 6)
        assert journal.get(GW6, Transport.UDP, 5060) == mapping  # untouched
        journal.apply(
            [("record", dataclasses.replace(hole, unique_id=9)), ("remove", [(GW6, Transport.UDP, 5060)])], NOW
        )
        assert journal.get(GW6, Transport.UDP, 5060) is None
        assert journal.get(GW6, Transport.UDP, 5060, family=6).unique_id == 9  # type: ignore[union-attr]
        journal.apply([("remove", [(GW6, Transport.UDP, 5060, 6)])], NOW)
        assert journal.entries() == []


def test_family_and_unique_id_are_validated(tmp_path: Path) -> None:
    for bad in ({"family": 5}, {"family": True}, {"unique_id": 65536}, {"unique_id": -1}, {"unique_id": "7"}):
        with pytest.raises(ValueError):
            pinhole(**bad)
    with pytest.raises(ValueError, match="only an IPv6 pinhole"):
        entry(unique_id=3)
    with Journal(tmp_path / "j.sqlite") as journal:
        journal.record(pinhole(6000))
        journal._db.execute("UPDATE mappings SET unique_id = 'x'")  # a hand edit
        assert journal.entries() == [] and "unique id" in journal.skipped[0]
        with pytest.raises(ValueError):
            journal.remove(GW6, Transport.UDP, 6000, family=5)
