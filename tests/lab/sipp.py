"""Drive SIPp (Debian `sip-tester`, 3.6.1) and count RTP with tcpdump inside the lab's namespaces.

The scenarios live in tests/lab/sipp/ (each file's header says what it checks and which `-set`
variables it needs):

- uac_call.xml: INVITE with SDP, 200 checked (c= address and Contact host == expect_ip, m= port ==
  expect_port or "any"), ACK, RTP from a pcap for hold_ms, BYE. A mismatch fails the call.
- uac_no_ack.xml: INVITE, 200, never ACK; the UAS must BYE in the same dialog (RFC 3261 section 13.3.1.4).
- uas_phone.xml (+ uas_phone_answer.xml, added automatically): REGISTER with digest auth, then answer
  one incoming call (RTP from the pcap) and take the BYE.
- uas_echo.xml, registrar_standin.xml: SIPp stand-ins for the autonat service, to prove the tooling.

    result = run_sipp(lab, "wan", "uac_call", f"{Lab.ROUTER_WAN}:5060", local_ip=Lab.WAN_HOST,
                      media_port=6000, variables={"expect_ip": Lab.ROUTER_WAN})
    assert result.ok, result.describe()

    with start_sipp(lab, "wan", "uas_echo", None, local_ip=Lab.WAN_HOST2, local_port=5060,
                    media_port=7000, calls=None):
        ...

    with count_rtp(lab, "wan", 6000, local_ip=Lab.WAN_HOST) as rtp:
        run_sipp(...)
    assert rtp.count.sent > 0 and rtp.count.received > 0

Traps met with SIPp 3.6.1 (the scenario files work around them):
- A `-set NAME` needs `<Global variables="NAME"/>` in the scenario ("Can not set the global variable"),
  and every variable must be referenced at least twice ("Variable $x is referenced 1 times!").
- `-set` values are strings: `<pause variable>` and numeric `<test>` read them as 0 (use `<todouble>`).
- A failing `check_it` action fails the call in a `<recv>`, but is ignored in a `<nop>`.
- Nothing new is sent while a retransmitted message is unanswered (a UAS cannot BYE before its 200
  retransmissions give up); SIPp never retransmits over TCP.
- `[authentication username=[$user] ...]` does not expand variables: use -au/-ap.
- An incoming request with a new Call-ID reaches a client-mode scenario only via `-oocsf`.
- When SIPp aborts an answered call (failure, or exit while calls are open) it sends a BYE itself
  (`-default_behaviors all,-bye` turns that off).
- SIPp sends ACK/BYE to its command-line address whatever the 200's Contact says (hence the check).
- When playing a pcap, the SDP m= port must be [media_port], or the RTP leaves from port 0.
- SIPp binds with SO_REUSEADDR: a second SIPp on a taken UDP port starts fine and shares its traffic.
- tcpdump needs --immediate-mode, or the packets of the last ~0.6 s are lost when it is stopped.

SIPp exit codes: 0 all calls succeeded, 1 at least one failed, 97 stopped by an internal command,
99 no call processed, 255 fatal error (also the -timeout with -timeout_error), 254 cannot bind.
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from autonat.lab import Lab

SIPP_DIR = Path(__file__).with_name("sipp")
Transport = Literal["udp", "tcp"]

# Where Debian's sip-tester puts its RTP captures (`dpkg -L sip-tester`).
_PCAP_DIRS = (Path("/usr/share/sip-tester"), Path("/usr/share/sipp"), Path("/usr/share/doc/sip-tester/pcap"))

# Defaults for the `-set` variables a scenario declares; anything declared and not here must be given.
DEFAULTS: dict[str, dict[str, str]] = {
    "uac_call": {"expect_port": "any", "hold_ms": "3000"},
    "uas_phone": {"expires": "60", "answer_wait_ms": "20000"},
    "registrar_standin": {"hold_ms": "1500"},
}
# Globals a scenario uses internally (shared between a main and an out-of-call scenario), never -set.
_INTERNAL = frozenset({"phone_done"})
# Options a scenario needs to work at all (see each file's header).
SCENARIO_ARGS: dict[str, tuple[str, ...]] = {
    "uas_phone": (
        "-oocsf",
        str(SIPP_DIR / "uas_phone_answer.xml"),
        "-callid_slash_ign",
        "-default_behaviors",
        "all,-bye",
    ),
    "uas_echo": ("-rtp_echo", "-max_non_invite_retrans", "2"),
    "registrar_standin": ("-rtp_echo",),
}
_STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL, and for each wait after them
_GLOBAL = re.compile(r"<Global\s+variables\s*=\s*\"([^\"]*)\"")


def default_pcap() -> Path:
    """The G.711 A-law capture Debian ships with SIPp (found with `dpkg -L sip-tester` if moved)."""
    for directory in _PCAP_DIRS:
        candidate = directory / "g711a.pcap"
        if candidate.is_file():
            return candidate
    listing = subprocess.run(["dpkg", "-L", "sip-tester"], capture_output=True, text=True, timeout=10, check=False)
    for line in listing.stdout.splitlines():
        if line.endswith("/g711a.pcap"):
            return Path(line)
    raise FileNotFoundError("g711a.pcap not found: is the Debian package sip-tester installed?")


def scenario_path(scenario: str | Path) -> Path:
    """`"uac_call"` -> tests/lab/sipp/uac_call.xml; a path is taken as it is."""
    path = Path(scenario)
    if path.suffix != ".xml":
        path = SIPP_DIR / f"{scenario}.xml"
    if not path.is_file():
        raise FileNotFoundError(f"SIPp scenario {path} does not exist")
    return path


def declared_variables(path: Path) -> frozenset[str]:
    """The names in the scenario's `<Global variables="...">` (the only ones `-set` accepts)."""
    names: set[str] = set()
    for match in _GLOBAL.finditer(path.read_text(encoding="latin-1")):
        names.update(name.strip() for name in match[1].split(",") if name.strip())
    return frozenset(names)


def _set_args(path: Path, variables: Mapping[str, str]) -> list[str]:
    declared = declared_variables(path) - _INTERNAL
    values = {**DEFAULTS.get(path.stem, {}), **variables}
    unknown = set(values) - declared
    if unknown:
        raise ValueError(f"{path.name} declares no global {sorted(unknown)} (it has {sorted(declared)})")
    missing = declared - set(values)
    if missing:
        raise ValueError(f"{path.name} needs -set {sorted(missing)}")
    args: list[str] = []
    for name in sorted(values):
        args += ["-set", name, str(values[name])]
    return args


@dataclass(frozen=True)
class SippResult:
    """What one SIPp run did. `stats` is the last row of its `-trace_stat` CSV (cumulative columns
    end in "(C)"); `messages`, `errors` and `logs` are its -trace_msg, -trace_err and -trace_logs files."""

    argv: list[str]
    returncode: int
    calls: int | None
    successful: int
    failed: int
    stats: dict[str, str]
    messages: str
    errors: str
    logs: str
    stdout: str
    logdir: Path
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Exit 0, no failed call, and (when a call count was asked for) that many successful calls."""
        enough = self.calls is None or self.successful >= self.calls
        return self.returncode == 0 and self.failed == 0 and enough and not self.timed_out

    def describe(self) -> str:
        """A short account for assertion messages: outcome, the command, the error log's tail."""
        head = (
            f"sipp exit {self.returncode}{' (killed: timed out)' if self.timed_out else ''}, "
            f"{self.successful} successful / {self.failed} failed calls, logs in {self.logdir}"
        )
        return f"{head}\n$ {' '.join(self.argv)}\n{self.errors[-1500:]}"

    def received(self, first_line: str) -> int:
        """How many messages starting with `first_line` (e.g. "BYE ", "SIP/2.0 200") SIPp received."""
        return len(re.findall(rf"message received \[\d+\] bytes :\n\n{re.escape(first_line)}", self.messages))

    def sent(self, first_line: str) -> int:
        """How many messages starting with `first_line` SIPp sent (retransmissions included)."""
        return len(re.findall(rf"message sent \(\d+ bytes\):\n\n{re.escape(first_line)}", self.messages))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _stats(path: Path) -> dict[str, str]:
    text = _read(path)
    rows = [row for row in csv.reader(text.splitlines(), delimiter=";") if row]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def _count(stats: Mapping[str, str], column: str) -> int:
    try:
        return int(stats.get(column, "0") or 0)
    except ValueError:
        return 0


def _collect(argv: list[str], returncode: int, calls: int | None, logdir: Path, timed_out: bool) -> SippResult:
    stats = _stats(logdir / "stats.csv")
    return SippResult(
        argv=argv,
        returncode=returncode,
        calls=calls,
        successful=_count(stats, "SuccessfulCall(C)"),
        failed=_count(stats, "FailedCall(C)"),
        stats=stats,
        messages=_read(logdir / "messages.log"),
        errors=_read(logdir / "errors.log"),
        logs=_read(logdir / "logs.log"),
        stdout=_read(logdir / "stdout.log"),
        logdir=logdir,
        timed_out=timed_out,
    )


def sipp_argv(
    scenario: str | Path,
    target: str | None,
    *,
    logdir: Path,
    transport: Transport = "udp",
    local_ip: str,
    local_port: int | None = None,
    media_ip: str | None = None,
    media_port: int,
    variables: Mapping[str, str] | None = None,
    calls: int | None = 1,
    rate: float | None = None,
    timeout: float = 60,
    service: str | None = None,
    auth: tuple[str, str] | None = None,
    pcap: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The SIPp command line (without the namespace wrapper) that run_sipp/start_sipp use."""
    path = scenario_path(scenario)
    argv = [shutil.which("sipp") or "sipp", "-sf", str(path)]
    if target is not None:
        argv.append(target)
    argv += ["-t", {"udp": "u1", "tcp": "t1"}[transport], "-i", local_ip, "-bind_local"]
    if local_port is not None:
        argv += ["-p", str(local_port)]
    argv += ["-mi", media_ip or local_ip, "-mp", str(media_port)]
    argv += ["-key", "pcap", str(pcap or default_pcap())]
    argv += _set_args(path, variables or {})
    if calls is not None:
        argv += ["-m", str(calls)]
    if rate is not None:
        argv += ["-r", f"{rate:g}"]
    if service is not None:
        argv += ["-s", service]
    if auth is not None:
        argv += ["-au", auth[0], "-ap", auth[1]]
    argv += [
        "-nostdin",
        "-timeout",
        f"{max(1, round(timeout))}s",
        "-timeout_error",
        "-trace_msg",
        "-message_file",
        str(logdir / "messages.log"),
        "-trace_err",
        "-error_file",
        str(logdir / "errors.log"),
        "-trace_logs",
        "-log_file",
        str(logdir / "logs.log"),
        "-trace_stat",
        "-stf",
        str(logdir / "stats.csv"),
    ]
    argv += SCENARIO_ARGS.get(path.stem, ())
    argv += list(extra)
    return argv


def _logdir(workdir: Path | None, scenario: str | Path) -> Path:
    name = f"sipp-{Path(scenario).stem}-"
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix=name))
    workdir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=name, dir=workdir))


def _end(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> int:
    """Stop a process we started (by its PID), bounded: `sig`, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=_STOP_GRACE)


def run_sipp(
    lab: Lab,
    host: str,
    scenario: str | Path,
    target: str | None,
    *,
    transport: Transport = "udp",
    local_ip: str,
    local_port: int | None = None,
    media_ip: str | None = None,
    media_port: int,
    variables: Mapping[str, str] | None = None,
    calls: int = 1,
    rate: float | None = None,
    timeout: float = 60,
    service: str | None = None,
    auth: tuple[str, str] | None = None,
    pcap: Path | None = None,
    workdir: Path | None = None,
    extra: Sequence[str] = (),
) -> SippResult:
    """Run a SIPp scenario to its end in `host`'s namespace and return what it did.

    `target` is "HOST:PORT" (None for a scenario that starts by receiving). SIPp's own `-timeout`
    is `timeout` seconds (with -timeout_error: reaching it is a failure); the process is killed
    10 s after that. Logs go to a new directory (under `workdir` if given), kept for the caller.
    """
    logdir = _logdir(workdir, scenario)
    argv = sipp_argv(
        scenario,
        target,
        logdir=logdir,
        transport=transport,
        local_ip=local_ip,
        local_port=local_port,
        media_ip=media_ip,
        media_port=media_port,
        variables=variables,
        calls=calls,
        rate=rate,
        timeout=timeout,
        service=service,
        auth=auth,
        pcap=pcap,
        extra=extra,
    )
    with (logdir / "stdout.log").open("wb") as out:
        proc = lab.popen(host, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=logdir)
        timed_out = False
        try:
            returncode = proc.wait(timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = _end(proc)
        finally:
            if proc.poll() is None:
                _end(proc, signal.SIGKILL)
    return _collect(argv, returncode, calls, logdir, timed_out)


def listening(lab: Lab, host: str, transport: Transport, ip: str, port: int, pid: int | None = None) -> bool:
    """Does a socket in `host`'s namespace listen on ip:port (TCP) or is one bound there (UDP)?
    With `pid`, only a socket of that process counts (another one may hold the port)."""
    flag = "-Hltnp" if transport == "tcp" else "-Hlunp"
    out = lab.run(host, ["ss", flag, f"sport = :{port}"], timeout=10).stdout
    for line in out.splitlines():
        # ss writes an IPv6 address in brackets, and the IPv6 wildcard as [::]
        shown = (f"[{ip}]", "*", "[::]") if ":" in ip else (ip, "*", "0.0.0.0")
        if not any(f"{address}:{port} " in line for address in shown):
            continue
        if pid is None or f"pid={pid}," in line:
            return True
    return False


@dataclass
class SippProcess:
    """A SIPp running in the background (started by start_sipp). Use it as a context manager, or call
    stop(); both end the process by its PID (SIGTERM, then SIGKILL) within a few seconds."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    calls: int | None
    logdir: Path
    result: SippResult | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> SippResult:
        """Wait up to `timeout` s for SIPp to finish by itself (e.g. after -m calls); stop it if not."""
        timed_out = False
        try:
            returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = _end(self.proc)
        self.result = _collect(self.argv, returncode, self.calls, self.logdir, timed_out)
        return self.result

    def stop(self) -> SippResult:
        """Stop SIPp now (SIGTERM lets it write its final statistics) and return what it did."""
        if self.result is None or self.running():
            returncode = _end(self.proc)
            self.result = _collect(self.argv, returncode, self.calls, self.logdir, False)
        return self.result

    def __enter__(self) -> SippProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_sipp(
    lab: Lab,
    host: str,
    scenario: str | Path,
    target: str | None,
    *,
    transport: Transport = "udp",
    local_ip: str,
    local_port: int | None = None,
    media_ip: str | None = None,
    media_port: int,
    variables: Mapping[str, str] | None = None,
    calls: int | None = None,
    rate: float | None = None,
    timeout: float = 120,
    service: str | None = None,
    auth: tuple[str, str] | None = None,
    pcap: Path | None = None,
    workdir: Path | None = None,
    extra: Sequence[str] = (),
    ready_timeout: float = 5.0,
) -> SippProcess:
    """Start SIPp in the background in `host`'s namespace (e.g. a UAS). With `local_port` (a server
    scenario), refuse a port something else holds and return only once SIPp listens there (or raise,
    within `ready_timeout`); it dies by its own `-timeout` at the latest.
    `calls=None` leaves out -m: the UAS answers until stopped."""
    # SIPp sets SO_REUSEADDR: over UDP a second SIPp binds a taken port without complaint, and the
    # two then share its traffic. Refuse instead.
    if local_port is not None and listening(lab, host, transport, local_ip, local_port):
        raise RuntimeError(f"{local_ip}:{local_port}/{transport} in {host} is already taken")
    logdir = _logdir(workdir, scenario)
    argv = sipp_argv(
        scenario,
        target,
        logdir=logdir,
        transport=transport,
        local_ip=local_ip,
        local_port=local_port,
        media_ip=media_ip,
        media_port=media_port,
        variables=variables,
        calls=calls,
        rate=rate,
        timeout=timeout,
        service=service,
        auth=auth,
        pcap=pcap,
        extra=extra,
    )
    with (logdir / "stdout.log").open("wb") as out:
        proc = lab.popen(host, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=logdir)
    sipp = SippProcess(proc, argv, calls, logdir)
    if local_port is None:
        return sipp
    deadline = time.monotonic() + ready_timeout
    while not listening(lab, host, transport, local_ip, local_port, sipp.pid):
        if not sipp.running() or time.monotonic() > deadline:
            result = sipp.stop()
            raise RuntimeError(f"SIPp did not come up on {local_ip}:{local_port}/{transport}: {result.describe()}")
        time.sleep(0.05)
    return sipp


# ------------------------------------------------------------------------------------------------ RTP


@dataclass(frozen=True)
class UdpPacket:
    time: float
    src: tuple[str, int]
    dst: tuple[str, int]
    length: int  # UDP payload bytes
    head: bytes = b""  # the payload's first 12 bytes (an RTP header: sequence number, SSRC ...), as captured

    @property
    def ssrc(self) -> int | None:
        """The SSRC of an RTP packet (RFC 3550 §5.1), None for anything else (RTCP, STUN, short)."""
        if len(self.head) < 12 or self.head[0] >> 6 != 2 or 192 <= self.head[1] <= 223:
            return None
        return int.from_bytes(self.head[8:12], "big")


@dataclass(frozen=True)
class RtpCount:
    """UDP packets seen at one local media port: `sent` left from it, `received` arrived at it."""

    port: int
    sent: int
    received: int
    sent_to: frozenset[tuple[str, int]]
    received_from: frozenset[tuple[str, int]]
    packets: tuple[UdpPacket, ...]


_LINKTYPES = frozenset({1, 12, 14, 101, 113, 276})  # Ethernet, raw IP (three numbers), Linux cooked v1/v2
_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_MAX_RECORD = 1 << 18


def _ip_udp(frame: bytes) -> tuple[tuple[str, int], tuple[str, int], int, bytes] | None:
    if not frame:
        return None
    version = frame[0] >> 4
    if version == 4 and len(frame) >= 20:
        header = (frame[0] & 0x0F) * 4
        fragment = struct.unpack("!H", frame[6:8])[0] & 0x1FFF
        if frame[9] != 17 or fragment or len(frame) < header + 8:
            return None
        src_ip, dst_ip = str(ipaddress.IPv4Address(frame[12:16])), str(ipaddress.IPv4Address(frame[16:20]))
        udp = frame[header : header + 20]
    elif version == 6 and len(frame) >= 48:
        if frame[6] != 17:  # no extension headers on our own test traffic
            return None
        src_ip, dst_ip = str(ipaddress.IPv6Address(frame[8:24])), str(ipaddress.IPv6Address(frame[24:40]))
        udp = frame[40:60]
    else:
        return None
    sport, dport, length = struct.unpack("!HHH", udp[:6])
    return (src_ip, sport), (dst_ip, dport), max(0, length - 8), bytes(udp[8:20])


def _link_payload(linktype: int, data: bytes) -> bytes | None:
    """The IP packet inside one captured frame, or None for anything else."""
    if linktype in (101, 12, 14):  # raw IP
        return data
    ethertype_at, offset = {1: (12, 14), 113: (14, 16), 276: (0, 20)}.get(linktype, (-1, 0))
    if ethertype_at < 0 or len(data) < offset:
        return None
    ethertype = struct.unpack("!H", data[ethertype_at : ethertype_at + 2])[0]
    while linktype == 1 and ethertype in (0x8100, 0x88A8) and len(data) >= offset + 4:  # VLAN tags
        ethertype = struct.unpack("!H", data[offset + 2 : offset + 4])[0]
        offset += 4
    return data[offset:] if ethertype in (0x0800, 0x86DD) else None


def read_pcap_udp(path: Path) -> list[UdpPacket]:
    """The UDP packets of a classic pcap file (as tcpdump -w writes it; a truncated last record, as
    left by a stopped capture, is ignored). Raises ValueError for anything that is not a pcap file."""
    data = path.read_bytes()
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        raise ValueError(f"{path} is not a pcap file")
    endian, unit = _PCAP_MAGIC[data[:4]]
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    if linktype not in _LINKTYPES:
        raise ValueError(f"{path}: link type {linktype} not supported")
    packets: list[UdpPacket] = []
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, captured, _ = struct.unpack(endian + "IIII", data[offset : offset + 16])
        if captured > _MAX_RECORD or offset + 16 + captured > len(data):
            break
        frame = _link_payload(linktype, data[offset + 16 : offset + 16 + captured])
        offset += 16 + captured
        parsed = _ip_udp(frame) if frame is not None else None
        if parsed is not None:
            packets.append(UdpPacket(seconds + fraction * unit, *parsed))
    return packets


def tally(packets: Sequence[UdpPacket], port: int, local_ip: str | None = None) -> RtpCount:
    """Count the packets leaving from / arriving at `port` (on `local_ip` if given)."""
    out = [p for p in packets if p.src[1] == port and (local_ip is None or p.src[0] == local_ip)]
    into = [p for p in packets if p.dst[1] == port and (local_ip is None or p.dst[0] == local_ip)]
    return RtpCount(
        port=port,
        sent=len(out),
        received=len(into),
        sent_to=frozenset(p.dst for p in out),
        received_from=frozenset(p.src for p in into),
        packets=tuple(packets),
    )


class RtpCapture:
    """tcpdump on `udp port N` in one namespace, from start() to stop(); see count_rtp().

    Captures on every interface of the namespace (`-i any`). At an endpoint every packet is seen once
    (on loopback too: Linux hands `any` only the incoming copy); in a router namespace a forwarded
    packet is seen twice, so give `interface` there."""

    def __init__(
        self,
        lab: Lab,
        host: str,
        port: int,
        *,
        local_ip: str | None = None,
        interface: str = "any",
        workdir: Path | None = None,
    ) -> None:
        self.lab, self.host, self.port, self.local_ip, self.interface = lab, host, port, local_ip, interface
        self.dir = Path(tempfile.mkdtemp(prefix=f"rtp-{port}-", dir=workdir))
        self.file = self.dir / "capture.pcap"
        self._proc: subprocess.Popen[bytes] | None = None
        self._count: RtpCount | None = None

    def start(self, timeout: float = 5.0) -> None:
        """Start tcpdump and return once it captures (it says "listening on")."""
        errors = self.dir / "tcpdump.err"
        argv = [shutil.which("tcpdump") or "tcpdump", "-i", self.interface, "-n", "-U", "--immediate-mode", "-s", "128"]
        # --immediate-mode: without it the kernel hands packets over in blocks, and the block still
        # filling when tcpdump is stopped is lost (up to ~0.6 s of RTP here). -Z root: tcpdump would
        # otherwise drop to its own user and fail to write into our directory.
        argv += ["-Z", "root", "-w", str(self.file), "udp", "port", str(self.port)]
        with errors.open("wb") as err:
            self._proc = self.lab.popen(self.host, argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + timeout
        while "listening on" not in _read(errors):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                _end(self._proc)
                raise RuntimeError(f"tcpdump did not start in {self.host}: {_read(errors).strip()}")
            time.sleep(0.02)

    def stop(self) -> RtpCount:
        """Stop tcpdump (SIGINT: it flushes and exits) and count what it saw."""
        if self._proc is not None:
            _end(self._proc, signal.SIGINT)
            self._proc = None
            self._count = tally(read_pcap_udp(self.file), self.port, self.local_ip)
        if self._count is None:
            raise RuntimeError("the capture was never started")
        return self._count

    @property
    def count(self) -> RtpCount:
        if self._count is None:
            raise RuntimeError("the capture is still running (leave the with block first)")
        return self._count

    def __enter__(self) -> RtpCapture:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def count_rtp(
    lab: Lab,
    host: str,
    port: int,
    *,
    local_ip: str | None = None,
    interface: str = "any",
    workdir: Path | None = None,
) -> Iterator[RtpCapture]:
    """Count UDP packets from and to local port `port` in `host`'s namespace while the block runs:

    with count_rtp(lab, "wan", 6000, local_ip=Lab.WAN_HOST) as rtp:
        run_sipp(...)
    rtp.count.sent, rtp.count.received, rtp.count.received_from
    """
    capture = RtpCapture(lab, host, port, local_ip=local_ip, interface=interface, workdir=workdir)
    capture.start()
    try:
        yield capture
    finally:
        capture.stop()
