"""`[web]` in the real daemon (`autonat run --nonat`: no router, nothing leaves loopback): the listener
starts after the control socket, answers, needs a restart to change, stops with the daemon, and a port
already taken is one line, no traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port


def write_config(directory: Path, port: int, web_extra: str = "") -> Path:
    config = directory / "autonat.toml"
    config.write_text(
        f'[control]\nsocket = "{directory / "control.sock"}"\n[journal]\npath = "{directory / "journal.sqlite"}"\n'
        f'[web]\nlisten = "127.0.0.1:{port}"\n{web_extra}'
    )
    config.chmod(0o600)
    return config


def start(directory: Path, config: Path) -> subprocess.Popen[bytes]:
    with (directory / "daemon.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "autonat", "run", "--config", str(config), "--nonat"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "AUTONAT_STATE_DIR": str(directory / "state")},
        )


def log_of(directory: Path) -> str:
    return (directory / "daemon.log").read_text(errors="replace")


def wait_for(predicate: object, directory: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, log_of(directory)
        time.sleep(0.02)


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        body: bytes = reply.read()
        return body


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port(socket.SOCK_STREAM)
    process = start(tmp_path, write_config(tmp_path, port))
    try:
        wait_for(lambda: "status page on" in log_of(tmp_path) and "running:" in log_of(tmp_path), tmp_path)
        yield process, port, tmp_path
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_the_daemon_serves_the_page_reloads_without_it_and_stops_it(
    daemon: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    process, port, directory = daemon
    log = log_of(directory)
    assert f"status page on http://127.0.0.1:{port}/ (no token: loopback only)" in log
    assert log.index("status page on") < log.index("running:")  # up before the daemon says it runs
    status = json.loads(get(port, "/api/status"))
    assert status["engine"]["nat"] == "disabled" and status["doctor"] is None
    assert b'autonat_nat_state{state="disabled"} 1.0' in get(port, "/metrics")
    assert b"<title>autonat</title>" in get(port, "/")
    # [web] changes only with a restart, and the reload says so.
    write_config(directory, port, "max_connections = 4\n")
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in log_of(directory), directory)
    assert "restart needed for [web]" in log_of(directory)
    assert json.loads(get(port, "/api/status"))["schema"] == 1  # still serving
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    assert "Traceback" not in log_of(directory)


def test_a_port_already_taken_is_one_line_and_no_daemon(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start(tmp_path, write_config(tmp_path, port))
        assert process.wait(timeout=20) == 8
    log = log_of(tmp_path)
    assert f"cannot listen on 127.0.0.1:{port} for the status page ([web] listen): Address already in use" in log
    assert "Traceback" not in log
    assert not (tmp_path / "control.sock").exists()  # the control socket it had opened is gone again
