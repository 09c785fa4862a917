"""Telling systemd how the daemon is doing: the sd_notify protocol (sd_notify(3)), without libsystemd.

systemd starts a `Type=notify` service with NOTIFY_SOCKET naming a datagram socket (a path, or an
abstract-namespace name written with a leading "@"); the service sends newline-separated `KEY=VALUE`
lines to it: READY=1 once it serves, RELOADING=1 (with MONOTONIC_USEC, systemd 253's notify-reload
contract) while it re-reads its config, STATUS=... for `systemctl status`, WATCHDOG=1 at least every
WATCHDOG_USEC microseconds (half that, as sd_watchdog_enabled(3) advises), STOPPING=1 on the way out.
Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

MAX_STATUS = 200  # a STATUS line `systemctl status` shows whole


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        self._address = address if address.startswith(("/", "\0")) else ""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 and mine else None
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, **fields: str) -> bool:
        """Send KEY=VALUE lines (keyword names as keys); False when not under systemd or it failed."""
        if not self._address:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self._address)
        except OSError:
            return False  # systemd went away (or a stale variable): the daemon carries on
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=_one_line(status))

    def reloading(self) -> bool:
        return self.send(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))

    def stopping(self) -> bool:
        return self.send(STOPPING="1")

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def status(self, text: str) -> bool:
        """STATUS=, only when it changed."""
        line = _one_line(text)
        if line == self._last_status:
            return False
        self._last_status = line
        return self.send(STATUS=line)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_STATUS]
