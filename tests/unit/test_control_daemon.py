"""The real daemon (`autonat run --nonat`: no router, nothing leaves loopback) under a flood of idle
control connections and the payloads that used to go unanswered with a traceback in the log: every
payload gets one error line, the log holds no traceback, `autonat nat_map status` answers throughout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from autonat.daemon.control import MAX_UNIX_CLIENTS
from tests.helpers import ensure_open_files, free_port

TOKEN = "daemon-test-token-0123"  # noqa: S105 (a test token)
FLOOD = 1000
PAYLOADS = [  # (line, the error it must get)
    (b"\x00\x00\x00\x00", "request is not JSON: Expecting value (character 0)"),
    (b"\xff\xfe\xfd", "request is not UTF-8 (byte 0)"),
    (b"[" * 30000, "request nests deeper than 32 levels"),
    (b'{"cmd": "status", "port": ' + b"7" * 5000 + b"}", "a number has more than 20 digits"),
    (b'{"cmd": "add", "port": NaN, "proto": "udp"}', "NaN is not a JSON number"),
    (b'{"cmd": "profile", "name": "\\ud800\\n"}', "no profile named '\\ud800\\n' (profiles: none configured)"),
]


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    directory: Path
    tcp_port: int

    @property
    def socket_path(self) -> Path:
        return self.directory / "control.sock"

    def log(self) -> str:
        return (self.directory / "daemon.log").read_text(errors="replace")

    def nat_map_status(self) -> str:
        """What an owner types, through the real CLI and its ControlClient."""
        result = subprocess.run(
            [sys.executable, "-m", "autonat", "nat_map", "status", "--socket", str(self.socket_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"{result.stderr}\n{self.log()}"
        return result.stdout


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    port = free_port(socket.SOCK_STREAM)
    config = tmp_path / "autonat.toml"
    config.write_text(
        f'[control]\nsocket = "{tmp_path / "control.sock"}"\ntcp = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n'
        f'[journal]\npath = "{tmp_path / "journal.sqlite"}"\n[log]\nlevel = "debug"\n'
    )
    config.chmod(0o600)
    with (tmp_path / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "autonat", "run", "--config", str(config), "--nonat"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "AUTONAT_STATE_DIR": str(tmp_path / "state")},
        )
    running = Daemon(process, tmp_path, port)
    try:
        deadline = time.monotonic() + 20
        while not running.socket_path.exists():
            assert process.poll() is None and time.monotonic() < deadline, running.log()
            time.sleep(0.02)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _flood(address: str | tuple[str, int], count: int) -> list[socket.socket]:
    """`count` connections that never send a byte, paced so that TCP's listen queue never drops a SYN."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for index in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.connect(address)
            if index % 50 == 49:
                time.sleep(0.02)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _ask(address: str | tuple[str, int], data: bytes, replies: int) -> list[dict[str, object]]:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(data)
        received = b""
        while received.count(b"\n") < replies:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {received!r}"
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


def test_the_daemon_answers_every_payload_in_one_line_under_a_flood(daemon: Daemon) -> None:
    ensure_open_files(2 * FLOOD + 256)  # the flood's own descriptors (the daemon holds at most 100 of them)
    assert daemon.nat_map_status().startswith("NAT is disabled.")
    unix = str(daemon.socket_path)
    tcp = ("127.0.0.1", daemon.tcp_port)
    flooders: list[socket.socket] = []
    try:
        flooders += _flood(unix, FLOOD)
        flooders += _flood(tcp, FLOOD)
        assert daemon.nat_map_status().startswith("NAT is disabled.")
        for line, error in PAYLOADS:
            # Twice on one connection: the error keeps it open, and a status follows.
            replies = _ask(unix, line + b"\n" + line + b"\n" + b'{"cmd": "status"}\n', 3)
            assert replies[:2] == [{"ok": False, "error": error}] * 2
            assert replies[2]["ok"] is True
            tcp_replies = _ask(tcp, f"AUTH {TOKEN}\n".encode() + line + b"\n", 2)
            assert tcp_replies == [{"ok": True}, {"ok": False, "error": error}]
        # Without the token nothing is parsed, whatever follows.
        refused = _ask(tcp, b"AUTH not-the-token\n" + PAYLOADS[2][0] + b"\n", 1)
        assert refused == [{"ok": False, "error": "closed: bad or missing token (the first line must be AUTH <token>)"}]
        assert daemon.nat_map_status().startswith("NAT is disabled.")
        # The flooders that were idle longest were told why they were closed, in one line.
        flooders[0].settimeout(5)
        assert json.loads(flooders[0].recv(4096)) == {
            "ok": False,
            "error": "closed: too many control connections; this one was idle longest",
        }
    finally:
        for sock in flooders:
            with contextlib.suppress(OSError):
                sock.close()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=15) == 0
    log = daemon.log()
    assert "Traceback" not in log and "Logging error" not in log, log
    assert " ERROR " not in log, log
    # The flood is a few summary lines, not a line per connection.
    assert "unix idle connections evicted" in log and "tcp unauthenticated connections evicted" in log, log
    assert len(log.splitlines()) < 40, log
    evicted = sum(
        int(part.split()[0])
        for line in log.splitlines()
        if "control channel: " in line
        for part in line.split("control channel: ", 1)[1].split(", ")
        if "unix idle connections evicted" in part
    )
    assert evicted >= FLOOD - MAX_UNIX_CLIENTS
