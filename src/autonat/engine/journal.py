"""The crash-safe record of every port mapping we may have opened on a router.

Security rule: nothing may stay open in the router that we no longer own, even after a SIGKILL. So the
engine writes a mapping here BEFORE it asks the router for it, and removes it only AFTER the router
confirmed the delete. Whatever an earlier run left behind is therefore a superset of what can be open:
at start-up, rows still desired and sticky are re-established, everything else is deleted on the router
and then dropped from here.

Why SQLite (stdlib `sqlite3`) rather than a JSON file: an acknowledged write must survive a SIGKILL or a
power cut at any instant, and two processes (the daemon and a one-shot `autonat map ...`) may write at
once. WAL mode with `synchronous=FULL` fsyncs every commit before `execute` returns, so a row is durable
before the router request goes out; SQLite's locking serialises the writers.

Every method is a single statement in autocommit mode, i.e. one short transaction: nothing is held open
across an `await` or a router round trip.
"""

from __future__ import annotations

import ipaddress
import math
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from autonat.errors import AutonatError
from autonat.proto.types import Transport

SCHEMA_VERSION = 2  # PRAGMA user_version; 0 is a fresh file, 1 had no family / unique_id (migrated on open)
PROTOCOLS = frozenset({"pcp", "natpmp", "upnp"})
MAX_LEASE = 2**32 - 1  # PCP and NAT-PMP lifetimes are 32-bit; anything wider is not a lease
BUSY_TIMEOUT_MS = 5000  # another process's write transaction is a few ms; 5 s means something is stuck

_COLUMNS = (
    "gateway, transport, internal_port, owner, sticky, desired, protocol, internal_address,"
    " requested_external_port, external_port, lease, updated_at, family, unique_id"
)
_SCHEMA = """
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
    family INTEGER NOT NULL DEFAULT 4,
    unique_id INTEGER,
    PRIMARY KEY (gateway, transport, internal_port, family)
)
"""
# Schema 1 -> 2 (IPv6 pinholes, issue 15): `family` and `unique_id` added, and `family` joins the key (an
# IPv4 mapping made through an IPv6 PCP server, as DS-Lite does, and a pinhole may share a gateway and
# port). Every schema-1 row is an IPv4 mapping without a UniqueID, so the rows are copied as they are. SQLite
# cannot change a primary key in place: the table is rebuilt, in the one transaction that opens the file.
_MIGRATE_1_TO_2 = (
    "ALTER TABLE mappings RENAME TO mappings_v1",
    _SCHEMA,
    "INSERT INTO mappings (gateway, transport, internal_port, owner, sticky, desired, protocol, internal_address,"
    " requested_external_port, external_port, lease, updated_at, family, unique_id)"
    " SELECT gateway, transport, internal_port, owner, sticky, desired, protocol, internal_address,"
    " requested_external_port, external_port, lease, updated_at, 4, NULL FROM mappings_v1",
    "DROP TABLE mappings_v1",
)
_UPSERT = f"""
INSERT INTO mappings ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (gateway, transport, internal_port, family) DO UPDATE SET
    owner = excluded.owner, sticky = excluded.sticky, desired = excluded.desired,
    protocol = excluded.protocol, internal_address = excluded.internal_address,
    requested_external_port = excluded.requested_external_port, external_port = excluded.external_port,
    lease = excluded.lease, updated_at = excluded.updated_at, unique_id = excluded.unique_id
"""  # noqa: S608 (column names are constants)
_SELECT_ALL = f"SELECT {_COLUMNS} FROM mappings ORDER BY gateway, transport, internal_port, family"  # noqa: S608
_KEY = "gateway = ? AND transport = ? AND internal_port = ? AND family = ?"
_CORRUPT = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT"})


# (gateway, transport, internal_port), an IPv4 mapping, or with the family last: (..., 6) is a pinhole.
JournalKey = tuple[str, Transport, int] | tuple[str, Transport, int, int]
JournalOp = tuple[str, "JournalEntry | list[JournalKey]"]


def _values(entry: JournalEntry) -> tuple[Any, ...]:
    return (
        entry.gateway,
        entry.transport.value,
        entry.internal_port,
        entry.owner,
        int(entry.sticky),
        int(entry.desired),
        entry.protocol,
        entry.internal_address,
        entry.requested_external_port,
        entry.external_port,
        entry.lease,
        float(entry.updated_at),
        entry.family,
        entry.unique_id,
    )


class JournalError(AutonatError):
    """The journal file cannot be used (corrupt, foreign, from a newer autonat, unreadable)."""


def _address(text: object, what: str) -> str:
    """Canonical text of an IP address, so "FE80::1" and "fe80::1" are one key, not two mappings."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be an IP address, not {text!r}")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{what} must be an IP address, not {text!r}") from None


def _integer(value: object, what: str, low: int, high: int) -> None:
    # bool is an int to Python; a port of True is a bug, not 1.
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{what} must be an integer {low}-{high}, not {value!r}")


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One mapping as the journal knows it. Construction validates, so a bad value never reaches SQL or a router.

    Addresses are stored in canonical form; the key is (gateway, transport, internal_port, family): a router
    holds at most one mapping (family 4) and one pinhole (family 6) per internal port and transport for us.
    """

    transport: Transport
    internal_port: int
    owner: str  # "config", "manual", "call:<id>", ...
    sticky: bool
    desired: bool  # False once a delete has been decided: a tombstone until the router confirms
    protocol: str  # "pcp" | "natpmp" | "upnp": the protocol used, or about to be used
    gateway: str  # router address the mapping lives on
    internal_address: str  # our address as the router sees it
    requested_external_port: int  # 0 = any
    external_port: int | None  # None until the router granted one
    lease: int
    updated_at: float  # wall-clock seconds (time.time()), from the caller so tests control it
    family: int = 4  # 6: an IPv6 firewall pinhole (its gateway and internal address are IPv6)
    unique_id: int | None = None  # a UPnP pinhole's UniqueID (WANIPv6FirewallControl §2.3.8), 0..65535

    def __post_init__(self) -> None:
        if not isinstance(self.transport, Transport):
            raise ValueError(f"transport must be a Transport, not {self.transport!r}")
        _integer(self.internal_port, "internal port", 1, 65535)
        if not isinstance(self.owner, str) or not self.owner or not self.owner.isprintable():
            raise ValueError(f"owner must be a non-empty printable string, not {self.owner!r}")
        if not isinstance(self.sticky, bool) or not isinstance(self.desired, bool):
            raise ValueError(f"sticky and desired must be booleans, not {self.sticky!r}, {self.desired!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(sorted(PROTOCOLS))}, not {self.protocol!r}")
        object.__setattr__(self, "gateway", _address(self.gateway, "gateway"))
        object.__setattr__(self, "internal_address", _address(self.internal_address, "internal address"))
        _integer(self.requested_external_port, "requested external port", 0, 65535)
        if self.external_port is not None:
            _integer(self.external_port, "external port", 1, 65535)
        _integer(self.lease, "lease", 0, MAX_LEASE)
        if (
            isinstance(self.updated_at, bool)
            or not isinstance(self.updated_at, int | float)
            or not math.isfinite(self.updated_at)
        ):
            raise ValueError(f"updated_at must be a finite number of seconds, not {self.updated_at!r}")
        if type(self.family) is not int or self.family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {self.family!r}")
        if self.unique_id is not None:
            _integer(self.unique_id, "unique id", 0, 0xFFFF)
            if self.family != 6:
                raise ValueError("only an IPv6 pinhole has a unique id")

    @property
    def key(self) -> tuple[str, Transport, int]:
        """(gateway, transport, internal_port): with `family`, the row's primary key."""
        return (self.gateway, self.transport, self.internal_port)

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> JournalEntry:
        """Rebuild an entry from SQL values, which SQLite's loose typing lets a hand edit make anything."""
        (gateway, transport, internal_port, owner, sticky, desired, protocol, internal_address) = row[:8]
        (requested_external_port, external_port, lease, updated_at, family, unique_id) = row[8:]
        if not isinstance(transport, str):
            raise ValueError(f"transport must be udp or tcp, not {transport!r}")
        flags = []
        for name, flag in (("sticky", sticky), ("desired", desired)):
            if type(flag) is not int or flag not in (0, 1):
                raise ValueError(f"{name} must be 0 or 1, not {flag!r}")
            flags.append(bool(flag))
        if type(updated_at) is int:
            updated_at = float(updated_at)
        return cls(
            transport=Transport(transport),
            internal_port=internal_port,
            owner=owner,
            sticky=flags[0],
            desired=flags[1],
            protocol=protocol,
            gateway=gateway,
            internal_address=internal_address,
            requested_external_port=requested_external_port,
            external_port=external_port,
            lease=lease,
            updated_at=updated_at,
            family=family,
            unique_id=unique_id,
        )


class Journal:
    """The mappings journal at `path`; see the module docstring for the protocol the engine follows with it.

    `skipped` lists, one line each, rows that could not be read back (a hand edit, a bug in an older
    version): start-up carries on with the good rows rather than leaving every mapping unmanaged.

    Calls may come from any one thread at a time or from several (e.g. `asyncio.to_thread`, so an fsync
    does not stall the event loop); a lock keeps them from interleaving on the one connection.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.skipped: list[str] = []
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create journal directory {path.parent}: {exc.strerror}") from None
        try:
            # Create the file ourselves: SQLite would create it with the umask's (often world-readable) mode,
            # and it copies the database file's mode onto the -wal and -shm files.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise JournalError(f"cannot create journal {path}: {exc.strerror}") from None
        try:
            # Autocommit (isolation_level=None): each statement is its own transaction, committed on return.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            with self._guard():
                self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")  # the first read: a non-SQLite file fails here
        db.execute("PRAGMA synchronous = FULL")  # fsync every commit: durable before the router hears of it
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise JournalError(self._move_away(f"is corrupt ({' '.join(problems[0].split())})"))
        db.execute("BEGIN IMMEDIATE")  # two processes opening a fresh file: one creates, the other sees it
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.path} is from a newer autonat (schema {version}, this one knows"
                    f" {SCHEMA_VERSION}); upgrade autonat"
                )
            if version == 0:
                if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise JournalError(self._move_away("is an SQLite database but not an autonat journal"))
                db.execute(_SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version < 0:
                raise JournalError(self._move_away(f"is not an autonat journal (schema {version})"))
            elif version == 1:
                for statement in _MIGRATE_1_TO_2:  # in the same transaction: all or nothing
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _move_away(self, problem: str) -> str:
        return f"journal {self.path} {problem}; move it away to start a fresh one"

    def _error(self, exc: sqlite3.Error) -> JournalError:
        detail = " ".join(str(exc).split())  # one line, whatever SQLite said
        if getattr(exc, "sqlite_errorname", None) in _CORRUPT:
            return JournalError(self._move_away(f"is not a usable SQLite database ({detail})"))
        return JournalError(f"journal {self.path}: {detail}")

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialise calls, and turn SQLite's errors into one line for the user (a closed journal is a bug)."""
        with self._lock:
            try:
                yield
            except sqlite3.ProgrammingError:
                raise
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    @staticmethod
    def _key(gateway: str, transport: Transport, internal_port: int, family: int = 4) -> tuple[str, str, int, int]:
        if not isinstance(transport, Transport):
            raise ValueError(f"transport must be a Transport, not {transport!r}")
        _integer(internal_port, "internal port", 1, 65535)
        if type(family) is not int or family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        return (_address(gateway, "gateway"), transport.value, internal_port, family)

    def record(self, entry: JournalEntry) -> None:
        """Insert or replace the entry under its key. Call BEFORE asking the router for the mapping."""
        with self._guard():
            self._db.execute(_UPSERT, _values(entry))

    def granted(
        self,
        gateway: str,
        transport: Transport,
        internal_port: int,
        external_port: int,
        lease: int,
        now: float,
        *,
        family: int = 4,
    ) -> None:
        """Note what the router granted. KeyError if the row is gone: the router now holds a mapping we do not
        journal (someone removed it meanwhile), and the caller must record it again or delete it."""
        key = self._key(gateway, transport, internal_port, family)
        _integer(external_port, "external port", 1, 65535)
        _integer(lease, "lease", 0, MAX_LEASE)
        with self._guard():
            cursor = self._db.execute(
                f"UPDATE mappings SET external_port = ?, lease = ?, updated_at = ? WHERE {_KEY}",  # noqa: S608
                (external_port, lease, float(now), *key),
            )
        if cursor.rowcount == 0:
            raise KeyError(key)

    def tombstone(self, gateway: str, transport: Transport, internal_port: int, now: float, *, family: int = 4) -> None:
        """Mark the mapping as no longer wanted (desired=False), BEFORE asking the router to delete it: if we
        die in between, the next start-up deletes it instead of re-establishing it. KeyError if no such row."""
        key = self._key(gateway, transport, internal_port, family)
        with self._guard():
            cursor = self._db.execute(
                f"UPDATE mappings SET desired = 0, updated_at = ? WHERE {_KEY}",  # noqa: S608
                (float(now), *key),
            )
        if cursor.rowcount == 0:
            raise KeyError(key)

    def apply(self, operations: list[JournalOp], now: float) -> None:
        """Several writes in ONE transaction (one fsync), in order: ("record", entry) inserts or replaces a
        row, ("tombstone", keys) marks rows no longer desired, ("remove", keys) forgets rows. Keys are
        (gateway, transport, internal_port), with the family last for a pinhole's (6); a tombstone or remove
        of a missing row is not an error. The lifecycle core batches what one step decides, so a burst of
        mappings costs one fsync, not one each."""
        if not operations:
            return
        with self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for kind, payload in operations:
                    if kind == "record":
                        assert isinstance(payload, JournalEntry)
                        self._db.execute(_UPSERT, _values(payload))
                    elif kind == "tombstone":
                        assert isinstance(payload, list)
                        self._db.executemany(
                            f"UPDATE mappings SET desired = 0, updated_at = ? WHERE {_KEY}",  # noqa: S608
                            [(float(now), *self._key(*key)) for key in payload],
                        )
                    elif kind == "remove":
                        assert isinstance(payload, list)
                        self._db.executemany(
                            f"DELETE FROM mappings WHERE {_KEY}",  # noqa: S608
                            [self._key(*key) for key in payload],
                        )
                    else:
                        raise ValueError(f"unknown journal operation {kind!r}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def remove(self, gateway: str, transport: Transport, internal_port: int, *, family: int = 4) -> None:
        """Forget the mapping. Call only AFTER the router confirmed the delete. A missing row is fine."""
        key = self._key(gateway, transport, internal_port, family)
        with self._guard():
            self._db.execute(f"DELETE FROM mappings WHERE {_KEY}", key)  # noqa: S608

    def entries(self) -> list[JournalEntry]:
        """Every readable row, ordered by key; `skipped` is replaced by the rows that could not be read."""
        with self._guard():
            rows = self._db.execute(_SELECT_ALL).fetchall()
        good: list[JournalEntry] = []
        self.skipped = []
        for row in rows:
            entry = self._read(row)
            if entry is not None:
                good.append(entry)
        return good

    def get(self, gateway: str, transport: Transport, internal_port: int, *, family: int = 4) -> JournalEntry | None:
        """The entry under this key, or None if there is none (or it is unreadable, then noted in `skipped`)."""
        key = self._key(gateway, transport, internal_port, family)
        with self._guard():
            row = self._db.execute(f"SELECT {_COLUMNS} FROM mappings WHERE {_KEY}", key).fetchone()  # noqa: S608
        return None if row is None else self._read(row)

    def _read(self, row: tuple[Any, ...]) -> JournalEntry | None:
        try:
            return JournalEntry._from_row(row)
        except ValueError as exc:
            note = f"skipped journal row {row[0]!r} {row[1]!r} {row[2]!r}: {exc}"
            if note not in self.skipped:
                self.skipped.append(note)
            return None

    def close(self) -> None:
        """Close the connection (idempotent); SQLite checkpoints the WAL into the file when the last one closes."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
