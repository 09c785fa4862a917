"""Running the real daemon (`autonat run`) on the lab's lan host, and talking to its control socket."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autonat.lab import Lab
from tests.lab.cli_helpers import AUTONAT


def eventually(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """`check()`'s first true value, polled every `interval` s; fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(interval)


def write_config(
    directory: Path, *, mappings: str = "", nat: str = "", extra: str = "", log_level: str = "debug"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "autonat.toml"
    path.write_text(
        f"[nat]\n{nat}\n{mappings}\n{extra}\n"
        f'[control]\nsocket = "{directory / "control.sock"}"\n'
        f'[journal]\npath = "{directory / "journal.sqlite"}"\n'
        f'[log]\nlevel = "{log_level}"\n'
    )
    return path


def request(socket_path: Path, message: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    data: dict[str, Any] = json.loads(reply)
    return data


@dataclass
class Daemon:
    lab: Lab
    directory: Path
    config: Path
    process: subprocess.Popen[str] | None = None
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    started_at: float = 0.0
    host: str = "lan"
    env: dict[str, str] = field(default_factory=dict)  # more environment for the daemon (NOTIFY_SOCKET ...)

    @property
    def socket_path(self) -> Path:
        return self.directory / "control.sock"

    def start(self, *args: str) -> Daemon:
        log = (self.directory / "daemon.log").open("a")
        self.started_at = time.monotonic()
        self.process = self.lab.popen(
            self.host,
            [
                "env",
                f"AUTONAT_STATE_DIR={self.directory / 'state'}",
                *(f"{name}={value}" for name, value in self.env.items()),
                AUTONAT,
                "run",
                "--config",
                str(self.config),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return self

    def wait_socket(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                request(self.socket_path, {"cmd": "status"}, timeout=1)
                return
            except (OSError, ValueError):
                time.sleep(0.02)
        raise AssertionError(f"daemon control socket not up; log:\n{self.log()}")

    def status(self) -> dict[str, Any]:
        reply = request(self.socket_path, {"cmd": "status"})
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    def wait_ready(self, timeout: float = 10) -> dict[str, Any]:
        self.wait_socket(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status["state"] == "ready" and all(m["state"] == "active" for m in status["mappings"]):
                return status
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready: {self.status()}\n{self.log()}")

    def follow_events(self) -> None:
        """Collect events in the background into `self.events`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        sock.sendall(b'{"cmd": "events"}\n')
        reader = sock.makefile("r")
        assert json.loads(reader.readline())["ok"]

        def pump() -> None:
            try:
                for line in reader:
                    self.events.put(json.loads(line))
            except (OSError, ValueError):
                pass

        threading.Thread(target=pump, daemon=True).start()

    def wait_event(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind} event within {timeout} s\n{self.log()}")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event["event"] == kind:
                return event

    def send(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, signum: signal.Signals = signal.SIGTERM, timeout: float = 10) -> float:
        """Send `signum`, wait for the exit; returns the seconds it took."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(signum)
        self.process.wait(timeout=timeout)
        return time.monotonic() - started

    def log(self) -> str:
        path = self.directory / "daemon.log"
        return path.read_text()[-4000:] if path.exists() else ""


def control(daemon: Daemon, command: str, **args: Any) -> Any:
    """The result of one control command; fails on an error reply."""
    reply = request(daemon.socket_path, {"cmd": command, **args})
    assert reply["ok"], reply
    return reply["result"]
