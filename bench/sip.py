"""The SIP service under load: short calls per second on one core, call set-up latency with and without the RTP
mapping pool, and CPU per concurrent echo call.

1. calls/s: `autonat run --nonat` pinned to one CPU answers SIPp's built-in `uac` scenario (INVITE, 200, ACK,
   BYE at once) on 127.0.0.1 at rising rates, a fresh daemon per rate; SIPp runs on the other CPU. The daemon's
   CPU time comes from /proc/PID/task/*/schedstat. The sustained figure is the highest rate with no failed call,
   no SIPp retransmission, the offered rate achieved and the daemon under SATURATED % of its core. Target (issue
   "The test call"): 500 calls/s. Each call leaves two server transactions (INVITE in RFC 6026's Accepted state,
   BYE in Completed) for 64*T1 = 32 s, so a run shorter than that does not reach the steady state of the
   transaction table: `--duration 60` shows it.
2. set-up latency: the daemon on the lab's lan host behind the real router (miniupnpd), profile with
   ext-sip-ip/ext-rtp-ip "auto-nat", SIPp on the wan host calling 203.0.113.1:5060 slowly. `rtp-pool = 4` (ports
   mapped ahead) against `rtp-pool = 0` (each call maps its RTP ports on the router before the 200). INVITE -> 200
   is timed from a capture on the wan host (microseconds) and by SIPp's -trace_rtt (whole milliseconds).
3. CPU per echo call: N calls held up at once on 127.0.0.1 (bench/sipp/uac_echo_hold.xml plays Debian's
   g711a.pcap: 30 ms PCMA packets, ~33 packets/s per call); daemon CPU and the RTP counters of
   `{"cmd": "calls"}` over a window while all N calls are up.

Needs root (part 2 builds lab `bsip`), two CPUs, /usr/bin/sipp (sip-tester) and tcpdump. Traffic stays on
127.0.0.1 (parts 1 and 3) and inside the lab's namespaces (part 2).

    .venv/bin/python bench/sip.py --quick          # ~3 min
    .venv/bin/python bench/sip.py                  # ~8 min
    .venv/bin/python bench/sip.py --parts 1 --rates 300,500 --duration 40 --json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AUTONAT = str(ROOT / ".venv" / "bin" / "autonat")
SCENARIOS = Path(__file__).resolve().parent / "sipp"
SIPP = shutil.which("sipp") or "/usr/bin/sipp"
TCPDUMP = shutil.which("tcpdump") or "/usr/bin/tcpdump"
PCAP = Path("/usr/share/sip-tester/g711a.pcap")  # `dpkg -L sip-tester`
PCAP_PLAY_MS = 7100  # g711a.pcap: 236 packets over 7.05 s

TARGET_CPS = 500
SATURATED = 95.0  # % of a core: a pinned process at its limit reads 97-100 % (tick-granular accounting)
LOOPBACK = "127.0.0.1"
BENCH_SIP_PORT = 5090
SIPP_PORT = 5070
MEDIA_PORT = 6000
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL, and for the wait after SIGKILL

LAB_PREFIX = "bsip"
ROUTER_WAN = "203.0.113.1"
WAN_HOST = "203.0.113.100"


# ------------------------------------------------------------------------------------------------ processes
def cpus() -> tuple[int, int]:
    """(CPU for the daemon, CPU for SIPp and this script)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        sys.exit("needs two CPUs: the daemon on one, SIPp on the other")
    return allowed[0], allowed[1]


def cpu_seconds(pid: int) -> float:
    """CPU time of a process in nanoseconds' resolution: the sum over its threads of /proc/PID/task/TID/schedstat's
    first field (utime + stime of /proc/PID/stat counts in 10 ms ticks, too coarse for a few seconds at 2 %)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def end(proc: subprocess.Popen[Any], sig: signal.Signals = signal.SIGTERM) -> int | None:
    """Stop a process we started, by its PID: `sig`, then SIGKILL, each wait bounded."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
    try:
        return proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        return None


def udp_receive_drops() -> int:
    """Datagrams the kernel dropped for a full socket receive buffer (this network namespace, all sockets)."""
    rows = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1], strict=False)).get("RcvbufErrors", 0)) if len(rows) >= 2 else 0


def control(sock: Path, message: dict[str, Any], timeout: float = 5.0) -> Any:
    """One request on the daemon's control socket (what `autonat calls --json` / `profile status` send). A Unix
    socket is reached by its path from any network namespace."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(sock))
        conn.sendall(json.dumps(message).encode() + b"\n")
        reply = b""
        deadline = time.monotonic() + timeout
        while not reply.endswith(b"\n") and time.monotonic() < deadline:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            reply += chunk
    data = json.loads(reply)
    if not data.get("ok"):
        raise RuntimeError(f"control {message}: {data.get('error')}")
    return data["result"]


@dataclass
class Daemon:
    """`autonat run` started by this script, pinned to one CPU, optionally in a lab namespace."""

    proc: subprocess.Popen[bytes]
    directory: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.directory / "control.sock"

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def request(self, message: dict[str, Any]) -> Any:
        return control(self.socket, message)

    def wait_up(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}): {self.log()}")
            try:
                self.request({"cmd": "profile", "name": "bench"})
                return
            except (OSError, ValueError, RuntimeError):
                time.sleep(0.05)
        raise RuntimeError(f"daemon not up within {timeout} s: {self.log()}")

    def live_calls(self) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = self.request({"cmd": "calls"})
        return calls

    def log(self) -> str:
        path = self.directory / "daemon.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        end(self.proc)


def write_config(directory: Path, *, loopback: bool, pool: int = 4) -> Path:
    if loopback:
        nat = "[nat]\nenabled = false\n"
        # One SIPp is one source address: the per-source caps that hold a flood back would hold the bench
        # back too, so they are off here (the capacity measured is the service's, not a cap's).
        sip = (
            "rtp-start-port = 20000\nrtp-end-port = 29999\nrtp-timeout = 30\nt1 = 0.5\nmax-calls = 5000\n"
            "source-call-rate = 0\nsource-max-calls = 100000\n"
        )
        profile = f'name = "bench"\nsip-ip = "{LOOPBACK}"\nsip-port = {BENCH_SIP_PORT}\n'
    else:
        nat = "[nat]\n"
        sip = f"rtp-start-port = 20000\nrtp-end-port = 29999\nrtp-pool = {pool}\nsource-call-rate = 0\n"
        profile = 'name = "bench"\next-sip-ip = "auto-nat"\next-rtp-ip = "auto-nat"\n'
    path = directory / "autonat.toml"
    path.write_text(
        f"{nat}"
        f'[control]\nsocket = "{directory / "control.sock"}"\n'
        f'[journal]\npath = "{directory / "journal.sqlite"}"\n'
        '[log]\nlevel = "warning"\n'
        f"[sip]\n{sip}"
        f"[[profile]]\n{profile}"
    )
    return path


def start_daemon(directory: Path, cpu: int, *, lab: Any = None, pool: int = 4) -> Daemon:
    config = write_config(directory, loopback=lab is None, pool=pool)
    argv = ["taskset", "-c", str(cpu), AUTONAT, "run", "--config", str(config)]
    if lab is None:
        argv.append("--nonat")
    else:
        argv = lab.argv_in("lan", argv)  # `ip netns exec` and taskset exec: the PID is the daemon's
    env = {**os.environ, "AUTONAT_STATE_DIR": str(directory / "state")}
    with (directory / "daemon.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(proc, directory)
    try:
        daemon.wait_up()
    except BaseException:
        daemon.stop()
        raise
    return daemon


@dataclass
class SippRun:
    returncode: int | None
    wall: float
    stats: dict[str, str]
    errors: str
    directory: Path

    def count(self, column: str) -> int:
        try:
            return int(self.stats.get(column, "0") or 0)
        except ValueError:
            return 0

    @property
    def successful(self) -> int:
        return self.count("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self.count("FailedCall(C)")

    @property
    def created(self) -> int:
        return self.count("TotalCallCreated")

    def received(self, status: int, *, untagged: bool = False) -> int:
        """Failed calls whose unexpected message was a `status` response (SIPp's error trace); `untagged`: only
        those whose To header has no tag, i.e. refused before any dialog existed."""
        count = 0
        for part in self.errors.split(f"received 'SIP/2.0 {status} ")[1:]:
            to = next((line for line in part.split("\n") if line.lower().startswith(("to:", "t:"))), "")
            count += not untagged or ";tag=" not in to
        return count


def sipp_logs(directory: Path) -> list[str]:
    return [
        "-nostdin",
        "-trace_stat",
        "-stf",
        str(directory / "stats.csv"),
        "-fd",
        "1",
        "-trace_err",
        "-error_file",
        str(directory / "errors.log"),
    ]


def start_sipp(argv: list[str], directory: Path) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "stdout.log").open("wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=directory)


def finish_sipp(proc: subprocess.Popen[bytes], directory: Path, started: float, timeout: float) -> SippRun:
    try:
        returncode: int | None = proc.wait(timeout=max(0.1, started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        returncode = end(proc)
    wall = time.monotonic() - started
    rows = [row for row in csv.reader(read(directory / "stats.csv").splitlines(), delimiter=";") if row]
    stats = dict(zip(rows[0], rows[-1], strict=False)) if len(rows) >= 2 else {}
    return SippRun(returncode, wall, stats, read(directory / "errors.log"), directory)


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def quantile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (p99 of fewer than 100 samples is the largest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# ------------------------------------------------------------------------------------ 1: calls per second
def kept_up(step: dict[str, Any]) -> bool:
    """Sustained: every call succeeded at the offered rate, no response was late enough for SIPp to retransmit
    (T1, 500 ms: the daemon's queue grew), and the daemon's core had headroom."""
    return (
        step["calls"] > 0
        and step["failed"] == 0
        and step["retransmissions"] == 0
        and step["achieved_cps"] >= 0.97 * step["rate"]
        and step["cpu_pct"] < SATURATED
    )


def calls_per_second(rates: list[int], duration: float, work: Path, cpu_daemon: int, cpu_load: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for rate in rates:
        directory = work / f"cps-{rate}"
        directory.mkdir()
        daemon = start_daemon(directory, cpu_daemon)
        try:
            calls = round(rate * duration)
            argv = ["taskset", "-c", str(cpu_load), SIPP, "-sn", "uac", "-s", "9196", f"{LOOPBACK}:{BENCH_SIP_PORT}"]
            argv += ["-i", LOOPBACK, "-p", str(SIPP_PORT), "-mp", str(MEDIA_PORT), "-d", "0"]
            argv += ["-r", str(rate), "-m", str(calls), "-timeout", f"{round(duration) + 60}s", "-timeout_error"]
            argv += sipp_logs(directory / "sipp")
            before, drops = daemon.cpu(), udp_receive_drops()
            started = time.monotonic()
            proc = start_sipp(argv, directory / "sipp")
            try:
                run = finish_sipp(proc, directory / "sipp", started, duration + 75)
            finally:
                end(proc)
            used, drops = daemon.cpu() - before, udp_receive_drops() - drops
            left = len(daemon.live_calls())
        finally:
            daemon.stop()
        step = {
            "rate": rate,
            "seconds": round(run.wall, 2),
            "calls": run.created,
            "successful": run.successful,
            "failed": run.failed,
            "failed_503": run.received(503),
            "failed_503_untagged": run.received(503, untagged=True),
            "failed_timeout": run.count("FailedMaxUDPRetrans(C)"),
            "retransmissions": run.count("Retransmissions(C)"),
            "udp_drops": drops,
            "calls_left_in_daemon": left,
            "cpu_pct": round(100 * used / run.wall, 1),
            "cpu_ms_per_call": round(1000 * used / max(1, run.created), 3),
            "achieved_cps": round(run.successful / run.wall, 1),
            "sipp_exit": run.returncode,
        }
        steps.append(step)
        print(
            f"  {rate} calls/s: {step['successful']} ok, {step['failed']} failed, {step['cpu_pct']} % CPU", flush=True
        )
        if step["failed"] and step["cpu_pct"] >= SATURATED:
            break  # saturated: every higher rate fails too, and slowly (SIPp waits out its retransmissions)
    sustained = max((s["rate"] for s in steps if kept_up(s)), default=0)
    return {"duration_s": duration, "steps": steps, "sustained_cps": sustained, "target_cps": TARGET_CPS}


# ------------------------------------------------------------------------------- 2: set-up latency (lab)
_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}


def udp_payloads(path: Path) -> Iterator[tuple[float, bytes]]:
    """(time, UDP payload) of each IPv4 packet in a classic pcap as tcpdump writes it (Ethernet, raw IP, Linux
    cooked v1/v2); a record cut short by stopping the capture ends the file."""
    data = path.read_bytes()
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        return
    endian, unit = _PCAP_MAGIC[data[:4]]
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    skip = {1: 14, 101: 0, 12: 0, 14: 0, 113: 16, 276: 20}.get(linktype)
    if skip is None:
        raise ValueError(f"{path}: link type {linktype} not handled")
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, captured, _ = struct.unpack(endian + "IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        if len(frame) < captured:
            return
        ip = frame[skip:]
        if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        header = (ip[0] & 0x0F) * 4
        yield seconds + fraction * unit, ip[header + 8 :]


def setup_times(capture: Path) -> list[float]:
    """INVITE (first transmission) -> first 200 to it, per Call-ID, in seconds."""
    invites: dict[bytes, float] = {}
    answers: dict[bytes, float] = {}
    for when, payload in udp_payloads(capture):
        lines = payload.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        call_id, cseq = headers.get(b"call-id") or headers.get(b"i"), headers.get(b"cseq", b"")
        if call_id is None or not cseq.endswith(b"INVITE"):
            continue
        if lines[0].startswith(b"INVITE "):
            invites.setdefault(call_id, when)
        elif lines[0].startswith(b"SIP/2.0 200"):
            answers.setdefault(call_id, when)
    return [answers[key] - invites[key] for key in invites if key in answers]


def wait_for_router(daemon: Daemon, pool: int, timeout: float = 30.0) -> dict[str, Any]:
    """Until Ext-SIP-IP is the router's public address and every mapping (SIP, and the pool's pairs) is up."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        profile = daemon.request({"cmd": "profile", "name": "bench"})
        status = daemon.request({"cmd": "status"})
        mappings = status.get("mappings", [])
        active = [m for m in mappings if m.get("state") == "active"]
        external = profile.get("ext_sip_ip", profile.get("Ext-SIP-IP"))  # the profile status's key, old and new
        if external == ROUTER_WAN and len(active) == len(mappings) and len(active) >= 1 + 2 * pool:
            return status
        time.sleep(0.2)
    raise RuntimeError(f"daemon did not reach the router in {timeout} s: {status}\n{daemon.log()}")


@contextlib.contextmanager
def capture(lab: Any, host: str, port: int, path: Path) -> Iterator[None]:
    """tcpdump on `udp port N` in a lab namespace while the block runs (stopped by SIGINT: it flushes)."""
    errors = path.with_suffix(".err")
    argv = lab.argv_in(
        host, [TCPDUMP, "-i", "any", "-n", "--immediate-mode", "-U", "-s", "4096", "-Z", "root", "-w", str(path)]
    )
    with errors.open("wb") as err:
        proc = subprocess.Popen([*argv, "udp", "port", str(port)], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 10
        while "listening on" not in read(errors):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump did not start: {read(errors)}")
            time.sleep(0.02)
        yield
        time.sleep(0.3)  # the last BYE's 200 on its way
    finally:
        end(proc, signal.SIGINT)


def setup_latency(calls: int, work: Path, cpu_daemon: int, cpu_load: int) -> dict[str, Any]:
    from autonat.lab import Lab

    lab = Lab(LAB_PREFIX)
    results: dict[str, Any] = {"calls": calls, "rate": 2}
    lab.up()
    try:
        for mode, pool in (("pool", 4), ("on-demand", 0)):
            directory = work / f"latency-{mode}"
            directory.mkdir()
            daemon = start_daemon(directory, cpu_daemon, lab=lab, pool=pool)
            try:
                status = wait_for_router(daemon, pool)
                time.sleep(1.0)  # let the pool settle (the brief's "give it a second")
                sipp_dir = directory / "sipp"
                argv = ["taskset", "-c", str(cpu_load), SIPP, "-sn", "uac", "-s", "9196", f"{ROUTER_WAN}:5060"]
                argv += ["-i", WAN_HOST, "-p", str(SIPP_PORT), "-mp", str(MEDIA_PORT), "-d", "0", "-r", "2"]
                argv += ["-m", str(calls), "-trace_rtt", "-rtt_freq", "1"]
                argv += ["-timeout", f"{calls // 2 + 60}s", "-timeout_error", *sipp_logs(sipp_dir)]
                pcap = directory / "sip.pcap"
                with capture(lab, "wan", 5060, pcap):
                    started = time.monotonic()
                    proc = start_sipp(lab.argv_in("wan", argv), sipp_dir)
                    try:
                        run = finish_sipp(proc, sipp_dir, started, calls / 2 + 75)
                    finally:
                        end(proc)
            finally:
                daemon.stop()
            precise = setup_times(pcap)
            rtt: list[float] = []
            for path in sipp_dir.glob("*_rtt.csv"):
                rows = list(csv.reader(read(path).splitlines(), delimiter=";"))[1:]
                rtt += [float(row[1]) for row in rows if len(row) >= 2]
            if not precise:
                raise RuntimeError(
                    f"{mode}: no INVITE/200 pair captured (SIPp: {run.successful} ok, {run.failed} failed)"
                )
            results[mode] = {
                "rtp_pool": pool,
                "protocol": status.get("protocol"),
                "successful": run.successful,
                "failed": run.failed,
                "p50_ms": round(1000 * quantile(precise, 0.5), 3),
                "p99_ms": round(1000 * quantile(precise, 0.99), 3),
                "max_ms": round(1000 * max(precise), 3),
                "n": len(precise),
                "sipp_rtt_p50_ms": quantile(rtt, 0.5) if rtt else None,
                "sipp_rtt_p99_ms": quantile(rtt, 0.99) if rtt else None,
            }
            print(f"  {mode}: p50 {results[mode]['p50_ms']} ms, p99 {results[mode]['p99_ms']} ms", flush=True)
    finally:
        lab.down()
    results["ratio_p50"] = round(results["on-demand"]["p50_ms"] / results["pool"]["p50_ms"], 2)
    results["ratio_p99"] = round(results["on-demand"]["p99_ms"] / results["pool"]["p99_ms"], 2)
    return results


# -------------------------------------------------------------------------------- 3: CPU per echo call
def rtp_totals(calls: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    return {call["id"]: (call["rtp"].get("received", 0), call["rtp"].get("sent", 0)) for call in calls}


def echo_calls(sizes: list[int], plays: int, work: Path, cpu_daemon: int, cpu_load: int) -> dict[str, Any]:
    hold = plays * PCAP_PLAY_MS / 1000
    rows: list[dict[str, Any]] = []
    directory = work / "echo-idle"
    directory.mkdir()
    daemon = start_daemon(directory, cpu_daemon)
    try:
        time.sleep(0.5)
        before, started = daemon.cpu(), time.monotonic()
        time.sleep(3.0)
        idle = (daemon.cpu() - before) / (time.monotonic() - started)
    finally:
        daemon.stop()
    rows.append({"calls": 0, "window_s": 3.0, "cpu_pct": round(100 * idle, 3)})
    for size in sizes:
        directory = work / f"echo-{size}"
        directory.mkdir()
        daemon = start_daemon(directory, cpu_daemon)
        try:
            sipp_dir = directory / "sipp"
            argv = ["taskset", "-c", str(cpu_load), SIPP, "-sf", str(SCENARIOS / "uac_echo_hold.xml"), "-s", "9196"]
            argv += [f"{LOOPBACK}:{BENCH_SIP_PORT}", "-i", LOOPBACK, "-p", str(SIPP_PORT), "-mp", str(MEDIA_PORT)]
            argv += ["-key", "pcap", str(PCAP), "-set", "plays", str(plays), "-set", "play_ms", str(PCAP_PLAY_MS)]
            argv += ["-r", str(size), "-l", str(size), "-m", str(size), "-timeout", f"{round(hold) + 60}s"]
            argv += ["-timeout_error", *sipp_logs(sipp_dir)]
            started = time.monotonic()
            proc = start_sipp(argv, sipp_dir)
            try:
                deadline = started + 10
                while time.monotonic() < deadline:
                    calls = daemon.live_calls()
                    if sum(1 for c in calls if c["state"] == "answered") >= size:
                        break
                    time.sleep(0.1)
                else:
                    raise RuntimeError(f"{size} calls not up within 10 s ({len(calls)} live)")
                time.sleep(0.5)  # the last calls' first packets
                cpu0, t0, first = daemon.cpu(), time.monotonic(), rtp_totals(daemon.live_calls())
                time.sleep(max(1.0, started + hold - time.monotonic() - 0.8))
                cpu1, t1, last = daemon.cpu(), time.monotonic(), rtp_totals(daemon.live_calls())
                run = finish_sipp(proc, sipp_dir, started, hold + 75)
            finally:
                end(proc)
        finally:
            daemon.stop()
        window = t1 - t0
        common = first.keys() & last.keys()
        echoed = sum(last[key][1] - first[key][1] for key in common)
        received = sum(last[key][0] - first[key][0] for key in common)
        cpu = (cpu1 - cpu0) / window
        row = {
            "calls": size,
            "calls_in_window": len(common),
            "window_s": round(window, 2),
            "cpu_pct": round(100 * cpu, 2),
            "cpu_pct_per_call": round(100 * cpu / size, 3),
            "packets_in_per_s": round(received / window),
            "packets_echoed_per_s": round(echoed / window),
            "packets_per_s_per_call": round(echoed / window / max(1, len(common)), 1),
            "us_cpu_per_packet": round(1e6 * (cpu1 - cpu0) / echoed, 1) if echoed else None,
            "successful": run.successful,
            "failed": run.failed,
        }
        rows.append(row)
        print(f"  {size} calls: {row['cpu_pct']} % CPU, {row['packets_echoed_per_s']} packets/s echoed", flush=True)
    return {"hold_s": hold, "rows": rows}


# ------------------------------------------------------------------------------------------------ report
def table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def report(figures: dict[str, Any]) -> None:
    print(f"\nmachine: {os.cpu_count()} CPUs, load average before the run {figures['load_before']}")
    if "calls_per_second" in figures:
        part = figures["calls_per_second"]
        print(f"\n1. short calls (INVITE/200/ACK/BYE) on one core, {part['duration_s']:g} s per rate, fresh daemon")
        keys = ["rate", "calls", "successful", "failed", "failed_503", "failed_timeout", "retransmissions"]
        keys += ["udp_drops", "calls_left_in_daemon", "seconds", "cpu_pct", "cpu_ms_per_call", "achieved_cps"]
        heads = ["calls/s", "calls", "ok", "failed", "503", "timeout", "retrans", "drops", "left", "wall s", "CPU %"]
        rows = [[*(s[k] for k in keys), "yes" if kept_up(s) else "no"] for s in part["steps"]]
        table([*heads, "CPU ms/call", "ok/s", "kept up"], rows)
        print(
            "  503: refused; timeout: SIPp gave up retransmitting; retrans: INVITE/BYE resent after 500 ms without "
            "answer; drops: datagrams lost to full receive buffers; left: calls still up in the daemon after SIPp "
            "ended (lost ACK/BYE, SIPp took a late 200 to the INVITE for the BYE's)"
        )
    if "setup_latency" in figures:
        part = figures["setup_latency"]
        print(f"\n2. INVITE -> 200 through the lab router, {part['calls']} calls at {part['rate']}/s (capture on wan)")
        print("   (nearest rank: below 100 samples p99 is the slowest call; SIPp's own figures are whole ms)")
        keys = ["rtp_pool", "protocol", "successful", "failed", "p50_ms", "p99_ms", "max_ms", "n"]
        keys += ["sipp_rtt_p50_ms", "sipp_rtt_p99_ms"]
        heads = ["mode", "rtp-pool", "protocol", "ok", "failed", "p50 ms", "p99 ms", "max ms", "n"]
        rows = [[mode, *(part[mode][k] for k in keys)] for mode in ("pool", "on-demand")]
        table([*heads, "sipp p50", "sipp p99"], rows)
    if "echo_calls" in figures:
        part = figures["echo_calls"]
        print(f"\n3. concurrent echo calls on one core (g711a.pcap, calls held {part['hold_s']:g} s)")
        keys = ["calls", "window_s", "cpu_pct", "cpu_pct_per_call", "packets_in_per_s", "packets_echoed_per_s"]
        keys += ["packets_per_s_per_call", "us_cpu_per_packet", "failed"]
        heads = ["calls", "window s", "CPU %", "CPU %/call", "pkts in/s", "echoed/s", "pkt/s/call", "µs/packet"]
        table([*heads, "failed"], [[row.get(k) for k in keys] for row in part["rows"]])
    print("\nsummary")
    if "calls_per_second" in figures:
        part = figures["calls_per_second"]
        best = part["sustained_cps"]
        print(
            f"  sustained short calls: {best} calls/s over {part['duration_s']:g} s (0 failed, 0 retransmitted, "
            f"daemon < {SATURATED:g} % of its core) = {best / TARGET_CPS:.2f} x the {TARGET_CPS} calls/s target"
        )
        costs = [s["cpu_ms_per_call"] for s in part["steps"] if kept_up(s)]
        if costs:
            ceiling = 1000 / min(costs)
            print(f"  CPU per call {min(costs)}-{max(costs)} ms -> a full core would carry ~{ceiling:.0f} calls/s")
        refused = [s for s in part["steps"] if s["failed_503"]]
        if refused:
            first = refused[0]
            print(
                f"  503s from {first['rate']} calls/s on ({first['failed_503']} of {first['calls']} calls, "
                f"{first['failed_503_untagged']} without a To tag, i.e. refused before a dialog existed) while the "
                f"daemon used {first['cpu_pct']} % of its core: a limit other than CPU"
            )
    if "setup_latency" in figures:
        part = figures["setup_latency"]
        print(
            f"  set-up latency p50 {part['pool']['p50_ms']} ms with the pool, {part['on-demand']['p50_ms']} ms "
            f"mapping per call: x{part['ratio_p50']} (p99 x{part['ratio_p99']})"
        )
    if "echo_calls" in figures:
        rows = [r for r in figures["echo_calls"]["rows"] if r["calls"]]
        for row in rows:
            print(
                f"  {row['calls']} echo calls: {row['cpu_pct']} % of a core = {row['cpu_pct_per_call']} % per call, "
                f"{row['us_cpu_per_packet']} µs CPU per packet echoed"
            )
        if len(rows) >= 2:
            low, high = rows[0], rows[-1]
            calls = high["calls"] - low["calls"]
            packets = high["packets_echoed_per_s"] - low["packets_echoed_per_s"]
            extra = (high["cpu_pct"] - low["cpu_pct"]) / 100
            print(
                f"  marginal, {low['calls']} -> {high['calls']} calls: {100 * extra / calls:.3f} % of a core per call, "
                f"{1e6 * extra / max(1, packets):.1f} µs per packet"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s per rate, 30 latency calls, 7 s echo calls")
    parser.add_argument("--parts", default="1,2,3", help="which measurements, e.g. 1,3")
    parser.add_argument("--rates", default="200,400,500,600,800,1000", help="calls/s steps of part 1")
    parser.add_argument("--duration", type=float, default=None, help="seconds per rate (5 quick, 15 full)")
    parser.add_argument("--latency-calls", type=int, default=None, help="calls per mode in part 2 (30 / 60)")
    parser.add_argument("--echo-calls", default="20,50,100", help="concurrent calls of part 3")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, captures)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (taskset on the daemon is fine without, the lab in part 2 is not)")
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    cpu_daemon, cpu_load = cpus()
    os.sched_setaffinity(0, {cpu_load})  # this script and everything it starts stay off the daemon's CPU
    duration = args.duration or (5.0 if args.quick else 15.0)
    latency_calls = args.latency_calls or (30 if args.quick else 60)
    figures: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    work = Path(tempfile.mkdtemp(prefix="bench-sip-"))
    try:
        if 1 in parts:
            print("1. calls per second", flush=True)
            rates = [int(r) for r in args.rates.split(",")]
            figures["calls_per_second"] = calls_per_second(rates, duration, work, cpu_daemon, cpu_load)
        if 2 in parts:
            print("2. set-up latency (lab)", flush=True)
            figures["setup_latency"] = setup_latency(latency_calls, work, cpu_daemon, cpu_load)
        if 3 in parts:
            print("3. CPU per echo call", flush=True)
            sizes = [int(n) for n in args.echo_calls.split(",")]
            figures["echo_calls"] = echo_calls(sizes, 1 if args.quick else 2, work, cpu_daemon, cpu_load)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        report(figures)
    if args.keep:
        print(f"\nlogs kept in {work}")


if __name__ == "__main__":
    main()
