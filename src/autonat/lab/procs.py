"""Daemons the lab starts: spawn them in a namespace, recognise them again, stop only our own.

A daemon is recorded by PID, kernel start time and the exact command line it exec'd; before any signal is
sent, `/proc/PID` must still show that start time and that command line, so a recycled PID (or a process
somebody else started) is never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autonat.lab.errors import LabError

# Popen objects of the daemons this process started: kept referenced so that Python neither warns about
# them nor forgets to reap them (a dead child stays a zombie until its parent waits for it).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}

# Run the daemon in a private mount namespace where /dev/console is /dev/null: with no syslog daemon,
# miniupnpd would otherwise write every log line to the console (slow, and floods the host console).
_CONSOLE_SHIM = 'if [ -e /dev/console ]; then mount --bind /dev/null /dev/console || exit 97; fi; exec "$@"'


@dataclass
class ProcRecord:
    """What we know about a daemon we started."""

    name: str
    host: str
    namespace: str
    pid: int
    starttime: int
    cmdline: list[str]
    log: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcRecord:
        return cls(
            name=str(data["name"]),
            host=str(data["host"]),
            namespace=str(data["namespace"]),
            pid=int(data["pid"]),
            starttime=int(data["starttime"]),
            cmdline=[str(a) for a in data["cmdline"]],
            log=str(data["log"]),
        )


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state first), or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def proc_starttime(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return []
    return [a.decode(errors="surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def exit_code(pid: int) -> int | None:
    """Exit code of a daemon this process started and that has exited (None if unknown)."""
    child = _CHILDREN.get(pid)
    return child.poll() if child is not None else None


def state(rec: ProcRecord) -> str:
    """'running' (the recorded process, verified), 'dead', or 'foreign' (PID now belongs to another)."""
    child = _CHILDREN.get(rec.pid)
    if child is not None and child.poll() is not None:
        return "dead"
    _reap(rec.pid)
    fields = _stat_fields(rec.pid)
    if fields is None or fields[0] in ("Z", "X", "x"):
        return "dead"
    if len(fields) <= 19 or int(fields[19]) != rec.starttime:
        return "foreign"
    return "running" if proc_cmdline(rec.pid) == rec.cmdline else "foreign"


def is_running(rec: ProcRecord) -> bool:
    return state(rec) == "running"


def log_tail(path: str, lines: int = 1) -> str:
    """Last non-empty lines of a log file (NUL bytes and noise stripped), joined with ' | '."""
    try:
        data = Path(path).read_bytes()[-16384:]
    except OSError:
        return ""
    text = data.replace(b"\0", b"").decode(errors="replace")
    keep = [ln.strip() for ln in text.splitlines() if ln.strip() and "table_cb(" not in ln]
    return " | ".join(keep[-lines:])


def spawn(*, name: str, host: str, namespace: str, argv: list[str], log: Path, ip: str) -> ProcRecord:
    """Start `argv` in `namespace` (private mount namespace, /dev/console -> /dev/null), output to `log`.

    The process chain `ip netns exec` -> `unshare` -> `sh` -> daemon only exec's, so the PID of the Popen
    is the daemon's PID. Returns at once; use `wait_exec` to wait until the daemon's own image runs.
    """
    full = [
        ip,
        "netns",
        "exec",
        namespace,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        _CONSOLE_SHIM,
        "sh",
        *argv,
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        child = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _CHILDREN[child.pid] = child
    return ProcRecord(
        name=name,
        host=host,
        namespace=namespace,
        pid=child.pid,
        starttime=proc_starttime(child.pid) or 0,
        cmdline=list(argv),
        log=str(log),
    )


def wait_exec(rec: ProcRecord, timeout: float = 5.0) -> None:
    """Wait until the PID runs the daemon's command line itself (the shim chain has exec'd)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_cmdline(rec.pid) == rec.cmdline:
            return
        if state(rec) == "dead" or exit_code(rec.pid) is not None:
            raise LabError(_died_message(rec))
        time.sleep(0.005)
    raise LabError(f"{rec.name} in {rec.namespace} did not start within {timeout:g} s")


def _died_message(rec: ProcRecord) -> str:
    code = exit_code(rec.pid)
    how = f" (exit {code})" if code is not None else ""
    tail = log_tail(rec.log, 2)
    return f"{rec.name} in {rec.namespace} exited during start-up{how}: {tail or 'no output'} [{rec.log}]"


def listening(pid: int, *, tcp: tuple[int, ...] = (), udp: tuple[int, ...] = ()) -> bool:
    """True if the network namespace of `pid` has TCP listeners / UDP sockets on all the given ports."""

    def ports(proto: str, listen_only: bool) -> set[int]:
        found: set[int] = set()
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            return found
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or (listen_only and fields[3] != "0A"):
                continue
            found.add(int(fields[1].rsplit(":", 1)[1], 16))
        return found

    # A dual-stack socket (miniupnpd's HTTP with IPv6 on) is listed in tcp6/udp6 only.
    return set(tcp) <= ports("tcp", True) | ports("tcp6", True) and set(udp) <= ports("udp", False) | ports(
        "udp6", False
    )


def wait_listening(
    rec: ProcRecord, *, tcp: tuple[int, ...] = (), udp: tuple[int, ...] = (), timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not is_running(rec):
            raise LabError(_died_message(rec))
        if listening(rec.pid, tcp=tcp, udp=udp):
            return
        if time.monotonic() > deadline:
            want = ", ".join([f"TCP {p}" for p in tcp] + [f"UDP {p}" for p in udp])
            tail = log_tail(rec.log, 1)
            raise LabError(f"{rec.name} in {rec.namespace} does not listen on {want} after {timeout:g} s: {tail}")
        time.sleep(0.01)


def send_signal(rec: ProcRecord, sig: signal.Signals) -> bool:
    """Send `sig` if (and only if) the recorded process is still ours. Returns whether it was sent."""
    if not is_running(rec):
        return False
    os.kill(rec.pid, sig)
    return True


def stop(rec: ProcRecord, timeout: float = 5.0) -> str:
    """Stop a recorded daemon: SIGTERM, then SIGKILL after `timeout`. Only after verifying it is ours.

    Returns 'stopped', 'dead' (was not running) or 'foreign' (PID reused by another process: untouched).
    """
    first = state(rec)
    if first != "running":
        return first
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 3.0)):
        if not send_signal(rec, sig):
            return "stopped"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if state(rec) != "running":
                _reap(rec.pid)
                return "stopped"
            time.sleep(0.01)
    raise LabError(f"{rec.name} (PID {rec.pid}) in {rec.namespace} survived SIGKILL")
