"""The daemon's log lines (text, journald, JSON; the hole records with their fields) and sd_notify."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from autonat.daemon import logs
from autonat.daemon.notify import Notifier

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger("autonat")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.propagate = saved[0], saved[2]
    root.setLevel(saved[1])


def emit(handler: logging.Handler, stream: io.StringIO | None = None) -> list[str]:
    logging.getLogger("autonat.engine").debug("hidden at info")
    logging.getLogger("autonat.engine").warning("two\nlines become one")
    logging.getLogger("autonat.holes").info(
        "hole opened protocol=pcp",
        extra={"fields": {"event": "opened", "protocol": "pcp", "lease": 7200, "owner": "sip:external"}},
    )
    handler.flush()
    return [] if stream is None else stream.getvalue().splitlines()


def test_text_lines_have_an_iso_time_with_zone_the_pid_and_a_level(restore_logging: None) -> None:
    stream = io.StringIO()
    handler = logs.configure("info", "text", stream=stream, environ={})
    lines = emit(handler, stream)
    assert len(lines) == 2  # debug is below the level; a message never spans lines
    pid = os.getpid()
    assert re.fullmatch(rf"{ISO} autonat\[{pid}\]: WARNING two\\nlines become one", lines[0]), lines[0]
    assert re.fullmatch(rf"{ISO} autonat\[{pid}\]: INFO hole opened protocol=pcp", lines[1]), lines[1]


def test_the_security_records_are_logged_whatever_the_level(restore_logging: None) -> None:
    stream = io.StringIO()
    handler = logs.configure("error", "text", stream=stream, environ={})
    lines = emit(handler, stream)
    assert len(lines) == 1 and "hole opened" in lines[0]  # holes: INFO, kept at level error
    logs.set_level("debug")
    assert logging.getLogger("autonat").level == logging.DEBUG
    with pytest.raises(ValueError, match="log level must be one of"):
        logs.set_level("verbose")


def test_under_journald_lines_carry_the_syslog_priority_instead_of_a_time(
    restore_logging: None, tmp_path: Path
) -> None:
    with (tmp_path / "journal").open("w+") as stream:
        status = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        handler = logs.configure("info", "text", stream=stream, environ=environ)  # type: ignore[arg-type]
        emit(handler)
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines == ["<4>WARNING two\\nlines become one", "<6>INFO hole opened protocol=pcp"]
    # Another stream than the journal's (a redirect in the unit): plain text again.
    assert not logs.under_journald(io.StringIO(), environ)
    assert not logs.under_journald(stream, {"JOURNAL_STREAM": "junk"})  # type: ignore[arg-type]


def test_json_lines_parse_one_by_one_with_the_structured_fields(restore_logging: None) -> None:
    stream = io.StringIO()
    handler = logs.configure("info", "json", stream=stream, environ={})
    lines = emit(handler, stream)
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "warning" and first["message"] == "two\nlines become one"
    assert re.fullmatch(ISO, first["time"]) and first["pid"] == os.getpid() and first["logger"] == "autonat.engine"
    assert second["event"] == "opened" and second["lease"] == 7200 and second["owner"] == "sip:external"


def test_a_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be one of text, json"):
        logs.configure("info", "xml")


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def test_sd_notify_reaches_the_socket_systemd_names(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.enabled and notifier.watchdog_interval == 10.0
    assert notifier.ready("ready: external address 203.0.113.1,\n 5 of 5 mappings active")
    assert sock.recv(4096) == b"READY=1\nSTATUS=ready: external address 203.0.113.1, 5 of 5 mappings active"
    assert notifier.watchdog() and sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", sock.recv(4096))
    assert notifier.status("x") and sock.recv(4096) == b"STATUS=x"
    assert not notifier.status("x")  # unchanged: nothing sent


def test_sd_notify_abstract_names_and_no_systemd() -> None:
    name = f"autonat-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        sock.close()
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready("x") and quiet.watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None  # not ours
