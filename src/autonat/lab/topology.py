"""A home network with a real router (miniupnpd) in Linux network namespaces.

    wan  (203.0.113.100 + .101, stund)          the internet, with a STUN server
     |  eth0 ---- wan0
    router (WAN 203.0.113.1, LAN bridge br0 192.168.77.1, nftables + miniupnpd: UPnP IGD, NAT-PMP, PCP)
     |  br0 port p-lan ---- eth0
    lan  (192.168.77.10, default via .1)         where the client under test runs

and, with double NAT, a second router behind the first one:

    router  br0 port p-r2 ---- wan0  router2 (WAN 192.168.77.2, LAN bridge br0 192.168.88.1, miniupnpd)
                                       br0 port p-lan2 ---- eth0  lan2 (192.168.88.10)

Namespaces are called `{prefix}-{host}`, so labs with different prefixes coexist. Links are created
directly inside the namespaces: nothing ever appears in the root namespace. Everything the lab creates is
written to a JSON record in its state directory (/run/autonat-lab/{prefix}/) *before* it is created, and
`down` removes exactly what the record lists. Daemons are stopped only after /proc shows the recorded start
time and command line.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from autonat.lab import config, procs
from autonat.lab.errors import LabError

STATE_ROOT = Path("/run/autonat-lab")
DEFAULT_PREFIX = "anl"
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")

HOSTS = ("lan", "wan", "router", "lan2", "router2")
BASE_HOSTS = ("wan", "router", "lan")
DOUBLE_NAT_HOSTS = ("router2", "lan2")
ROUTERS = ("router", "router2")
LINKS = ("lan", "wan", "lan2", "uplink2")

# Interface names inside the namespaces (each namespace has its own, so no prefix is needed).
HOST_IF = "eth0"
WAN_IF = "wan0"
BRIDGE = "br0"
LAN_PORT = "p-lan"
ROUTER2_PORT = "p-r2"
LAN2_PORT = "p-lan2"

# link -> the two receiving ends (host, interface) where loss is applied
_LINK_ENDS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "lan": (("lan", HOST_IF), ("router", LAN_PORT)),
    "wan": (("wan", HOST_IF), ("router", WAN_IF)),
    "lan2": (("lan2", HOST_IF), ("router2", LAN2_PORT)),
    "uplink2": (("router2", WAN_IF), ("router", ROUTER2_PORT)),
}
_DAEMON_OF = {"router": "miniupnpd", "router2": "miniupnpd2"}

# program -> Debian package that provides it
_PROGRAMS = {
    "ip": "iproute2",
    "nft": "nftables",
    "miniupnpd": "miniupnpd-nftables",
    "stund": "stun-server",
    "unshare": "util-linux",
    "mount": "mount",
    "sh": "dash",
}
TEST_PROGRAMS = {"natpmpc": "natpmpc", "upnpc": "miniupnpc", "socat": "socat"}

_CMD_TIMEOUT = 15.0
_READY_TIMEOUT = 15.0

# A NAT-PMP "external address" request run inside a namespace (stdlib only; retries every 250 ms).
_NATPMP_PROBE = r"""
import json, socket, struct, sys, time
gateway, port, timeout, expect = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + timeout
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
last = None
while time.monotonic() < deadline:
    s.settimeout(max(0.01, min(0.25, deadline - time.monotonic())))
    try:
        s.sendto(b"\0\0", (gateway, port))
        while True:
            data = s.recv(64)
            if len(data) >= 12 and data[0] == 0 and data[1] == 128:
                break
    except OSError:
        continue
    result, epoch = struct.unpack("!HI", data[2:8])
    last = {"result": result, "epoch": epoch, "address": socket.inet_ntoa(data[8:12])}
    if not expect or last["address"] == expect:
        break
    time.sleep(0.05)
print(json.dumps(last))
"""


def _which(program: str) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    return shutil.which(program, path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin")


def check_requirements(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Check we are root on Linux and the programs exist; returns program -> path. Raises LabError."""
    if not sys.platform.startswith("linux"):
        raise LabError(f"the lab needs Linux network namespaces (this is {sys.platform})")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, nftables): run it as root or with sudo")
    paths: dict[str, str] = {}
    for program, package in {**_PROGRAMS, **(extra or {})}.items():
        path = _which(program)
        if path is None:
            raise LabError(f"missing program {program}: install the Debian package {package}")
        paths[program] = path
    return paths


_BACKEND_CHECKED: dict[str, bool] = {}


def _check_miniupnpd_backend(path: str) -> None:
    if path in _BACKEND_CHECKED:
        return
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5, check=False)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"cannot run {path} --version: {exc}") from None
    if "nftables" not in text:
        raise LabError("miniupnpd here is not the nftables variant: install the Debian package miniupnpd-nftables")
    _BACKEND_CHECKED[path] = True


@dataclass
class NatPmpReply:
    """Answer to a NAT-PMP external-address request (RFC 6886 opcode 0)."""

    result: int
    epoch: int
    address: str


@dataclass
class DaemonStatus:
    name: str
    host: str
    namespace: str
    running: bool
    state: str  # running | dead | foreign (PID reused by another process) | stopped (by a fault switch)
    pid: int | None
    log: str | None


@dataclass
class LabStatus:
    """What `status` reports. `up` is True when every namespace and daemon the lab should have is there."""

    prefix: str
    state_dir: str
    exists: bool
    up: bool
    double_nat: bool
    namespaces: dict[str, str]
    present: dict[str, bool]
    daemons: dict[str, DaemonStatus]
    addresses: dict[str, dict[str, list[str]]]
    wan_ip: str | None
    root_url: str
    root_url2: str | None
    loss: dict[str, int]
    rules_wiped: list[str]
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Record:
    prefix: str
    complete: bool = False
    namespaces: list[str] = field(default_factory=list)
    processes: dict[str, procs.ProcRecord] = field(default_factory=dict)
    double_nat: bool = False
    router2_stun: bool = False
    wan_ip: str = "203.0.113.1"
    loss: dict[str, int] = field(default_factory=dict)
    rules_wiped: list[str] = field(default_factory=list)
    pcp_only: bool = False
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["processes"] = {k: v.to_json() for k, v in self.processes.items()}
        data["version"] = 1
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Record:
        return cls(
            prefix=str(data["prefix"]),
            complete=bool(data.get("complete", False)),
            namespaces=[str(n) for n in data.get("namespaces", [])],
            processes={str(k): procs.ProcRecord.from_json(v) for k, v in data.get("processes", {}).items()},
            double_nat=bool(data.get("double_nat", False)),
            router2_stun=bool(data.get("router2_stun", False)),
            wan_ip=str(data.get("wan_ip", Lab.ROUTER_WAN)),
            loss={str(k): int(v) for k, v in data.get("loss", {}).items()},
            rules_wiped=[str(r) for r in data.get("rules_wiped", [])],
            pcp_only=bool(data.get("pcp_only", False)),
            created=float(data.get("created", 0.0)),
        )


class Lab:
    """One lab instance, identified by its name prefix. Every method needs root on Linux.

    Methods that change the lab take a per-prefix file lock, so a CLI and a test run can share a lab.
    """

    # Addresses (the same in every lab: namespaces keep labs apart).
    WAN_HOST: ClassVar[str] = "203.0.113.100"  # STUN server, "somewhere on the internet"
    WAN_HOST2: ClassVar[str] = "203.0.113.101"  # second STUN address
    WAN_NET: ClassVar[str] = "203.0.113.0/24"
    ROUTER_WAN: ClassVar[str] = "203.0.113.1"  # the router's public address
    ROUTER_WAN_ALT: ClassVar[str] = "203.0.113.2"  # a handy new address for set_wan_ip
    GATEWAY: ClassVar[str] = "192.168.77.1"
    LAN_ADDRESS: ClassVar[str] = "192.168.77.10"
    LAN_NET: ClassVar[str] = "192.168.77.0/24"
    ROUTER2_WAN: ClassVar[str] = "192.168.77.2"
    GATEWAY2: ClassVar[str] = "192.168.88.1"
    LAN2_ADDRESS: ClassVar[str] = "192.168.88.10"
    LAN2_NET: ClassVar[str] = "192.168.88.0/24"
    # IPv6: documentation prefixes (2001:db8::/32), routed by the router (no NAT), its firewall dropping
    # unsolicited inbound. The lan host has a stable address and a "temporary" one that the kernel prefers
    # as source (as use_tempaddr=2 hosts do): pinholes are granted for the request's own source only.
    # The stable one carries `mngtmpaddr`, as a desktop's SLAAC address does (the kernel makes temporaries
    # from it; use_tempaddr stays 0 here, so it makes none and the "temporary" one stays fixed): that flag
    # is how a client tells the stable address from the others (autonat.proto.netlink.stable_ipv6).
    WAN6_NET: ClassVar[str] = "2001:db8:0:1::/64"
    WAN6_HOST: ClassVar[str] = "2001:db8:0:1::100"
    ROUTER_WAN6: ClassVar[str] = "2001:db8:0:1::1"
    LAN6_NET: ClassVar[str] = "2001:db8:0:77::/64"
    GATEWAY6: ClassVar[str] = "2001:db8:0:77::1"
    LAN6_ADDRESS: ClassVar[str] = "2001:db8:0:77::10"  # the stable address
    LAN6_TEMPORARY: ClassVar[str] = "2001:db8:0:77:5eed:1:2:3"  # what the kernel picks as source
    HTTP_PORT: ClassVar[int] = 5000
    NATPMP_PORT: ClassVar[int] = 5351
    STUN_PORT: ClassVar[int] = 3478
    HOSTS: ClassVar[tuple[str, ...]] = HOSTS
    LINKS: ClassVar[tuple[str, ...]] = LINKS
    ROUTERS: ClassVar[tuple[str, ...]] = ROUTERS

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, state_root: str | Path | None = None) -> None:
        if not _PREFIX_RE.match(prefix):
            raise LabError(f"bad lab prefix {prefix!r}: 1-12 characters a-z0-9, starting with a letter")
        self.prefix = prefix
        self.state_root = Path(state_root) if state_root is not None else STATE_ROOT
        self.state_dir = self.state_root / prefix
        self._record_path = self.state_dir / "state.json"
        self._lock_path = self.state_root / f"{prefix}.lock"
        self._rec: _Record | None = None
        self._depth = 0
        self._paths: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r})"

    # ----------------------------------------------------------------------------------------- naming
    def ns(self, host: str) -> str:
        """Namespace name of a host: lan | wan | router | lan2 | router2."""
        if host not in HOSTS:
            raise LabError(f"unknown lab host {host!r} (one of {', '.join(HOSTS)})")
        return f"{self.prefix}-{host}"

    @property
    def root_url(self) -> str:
        """UPnP root description of the router, as seen from lan."""
        return f"http://{self.GATEWAY}:{self.HTTP_PORT}/rootDesc.xml"

    @property
    def root_url2(self) -> str:
        """UPnP root description of the inner router (double NAT), as seen from lan2."""
        return f"http://{self.GATEWAY2}:{self.HTTP_PORT}/rootDesc.xml"

    def gateway_of(self, host: str) -> str:
        return {"lan": self.GATEWAY, "lan2": self.GATEWAY2, "router2": self.GATEWAY}.get(host, self.WAN_HOST)

    # ------------------------------------------------------------------------------ running commands
    def _program(self, name: str) -> str:
        if not self._paths:
            self._paths = check_requirements()
        return self._paths[name]

    def _need_ns(self, host: str) -> str:
        name = self.ns(host)
        if not Path("/run/netns", name).exists():
            raise LabError(f"namespace {name} does not exist (is lab {self.prefix} up? `autonat lab up`)")
        return name

    def run(
        self,
        host: str,
        argv: list[str],
        timeout: float = 30,
        check: bool = False,
        input: bytes | str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in a host's namespace; output captured and decoded (invalid bytes replaced).

        Raises subprocess.TimeoutExpired after `timeout` (the command is killed) and, with `check`,
        subprocess.CalledProcessError on a non-zero exit.
        """
        ns = self._need_ns(host)
        full = [self._program("ip"), "netns", "exec", ns, *argv]
        data = input.encode() if isinstance(input, str) else input
        raw = subprocess.run(
            full,
            input=data,
            stdin=None if data is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        result = subprocess.CompletedProcess(
            list(argv),
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
        if check:
            result.check_returncode()
        return result

    def argv_in(self, host: str, argv: list[str]) -> list[str]:
        """The command line that runs `argv` in a host's namespace (`ip netns exec` exec's it)."""
        return [self._program("ip"), "netns", "exec", self._need_ns(host), *argv]

    def popen(self, host: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` in a host's namespace (keyword arguments go to subprocess.Popen).

        The returned process is the command itself (`ip netns exec` exec's it), so kill()/wait() act on
        it. The caller owns it: terminate it and wait for it.
        """
        ns = self._need_ns(host)
        return subprocess.Popen([self._program("ip"), "netns", "exec", ns, *argv], **kw)

    def _cmd(self, argv: list[str], input: str | None = None, what: str | None = None) -> str:
        try:
            out = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise LabError(f"{what or ' '.join(argv)}: timed out after {_CMD_TIMEOUT:g} s") from None
        if out.returncode != 0:
            msg = " ".join((out.stderr or out.stdout).split()) or f"exit {out.returncode}"
            raise LabError(f"{what or ' '.join(argv)}: {msg}")
        return out.stdout

    def _ip(self, host: str, *args: str) -> str:
        return self._cmd([self._program("ip"), "-n", self.ns(host), *args])

    def _nft(self, host: str, script: str, what: str) -> str:
        ns = self.ns(host)
        return self._cmd([self._program("ip"), "netns", "exec", ns, self._program("nft"), "-f", "-"], script, what)

    def _sysctl(self, host: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self._cmd(
            [self._program("ip"), "netns", "exec", self.ns(host), "sh", "-c", f"echo {value} > {path}"],
            what=f"sysctl {key}={value} in {self.ns(host)}",
        )

    # ------------------------------------------------------------------------------ record and lock
    def _load(self) -> _Record | None:
        try:
            data = json.loads(self._record_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"unreadable lab record {self._record_path}: {exc}") from None
        try:
            return _Record.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise LabError(f"unreadable lab record {self._record_path}: {exc!r}") from None

    def _save(self) -> None:
        assert self._rec is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._rec.to_json(), indent=2) + "\n")
        os.replace(tmp, self._record_path)

    @contextmanager
    def _locked(self, timeout: float = 120.0) -> Iterator[None]:
        """Hold the per-prefix lock (re-entrant) and have self._rec loaded from disk."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.state_root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise LabError(f"lab {self.prefix} is busy (lock {self._lock_path} held)") from None
                time.sleep(0.05)
                continue
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the lock file was removed by `down` while we waited: take the new one
        self._depth = 1
        try:
            self._rec = self._load()
            yield
        finally:
            self._depth = 0
            if self._rec is None and not self._record_path.exists():
                self._unlink_lock()  # no lab under this prefix: leave nothing behind
            os.close(fd)

    def _require_up(self) -> _Record:
        if self._rec is None or not self._rec.complete:
            raise LabError(f"lab {self.prefix} is not up: run `autonat lab up` first")
        return self._rec

    # ---------------------------------------------------------------------------------- up / down
    def up(self, double_nat: bool = False) -> LabStatus:
        """Build the lab, or make sure it is healthy. Idempotent.

        A healthy lab is left untouched (faults included) and this returns in milliseconds. A dead daemon
        is restarted, a missing router firewall reloaded; a half-built lab (missing namespaces or a crash
        during `up`) is torn down by its record and rebuilt. `double_nat=True` adds the second router if
        missing; `double_nat=False` never removes it (use `set_double_nat(False)`).
        """
        paths = self._paths or check_requirements()
        self._paths = paths
        _check_miniupnpd_backend(paths["miniupnpd"])
        with self._locked():
            rec = self._rec
            repaired = False
            if rec is not None and rec.complete and not self._missing_namespaces(rec):
                try:
                    self._repair(rec)
                    repaired = True
                except LabError:
                    rec = self._rec  # repair failed: rebuild from scratch below
            if not repaired:
                want_double = double_nat or (rec is not None and rec.double_nat)
                want_stun = rec is not None and rec.router2_stun
                if rec is not None:
                    self._teardown(rec)
                self._build()
                if want_double:
                    self.set_double_nat(True, stun=want_stun)
            if double_nat and self._rec is not None and not self._rec.double_nat:
                self.set_double_nat(True)
            return self.status()

    def down(self) -> bool:
        """Remove what the record says this lab created. Returns False if there was nothing to remove."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, nftables): run it as root or with sudo")
        with self._locked():
            rec = self._rec
            if rec is None:
                if self.state_dir.is_dir():
                    shutil.rmtree(self.state_dir)
                self._unlink_lock()
                return False
            self._teardown(rec)
            self._unlink_lock()
            return True

    def _unlink_lock(self) -> None:
        self._lock_path.unlink(missing_ok=True)

    def _missing_namespaces(self, rec: _Record) -> list[str]:
        hosts = BASE_HOSTS + (DOUBLE_NAT_HOSTS if rec.double_nat else ())
        return [self.ns(h) for h in hosts if not Path("/run/netns", self.ns(h)).exists()]

    def _teardown(self, rec: _Record) -> None:
        errors: list[str] = []
        for proc in reversed(list(rec.processes.values())):
            try:
                procs.stop(proc)
            except LabError as exc:
                errors.append(str(exc))
        for name in reversed(rec.namespaces):
            if Path("/run/netns", name).exists():
                try:
                    self._cmd([self._program("ip"), "netns", "del", name])
                except LabError as exc:
                    errors.append(str(exc))
        if errors:
            self._rec = rec
            self._save()
            raise LabError("; ".join(errors))
        if self.state_dir.is_dir():
            shutil.rmtree(self.state_dir)
        self._rec = None

    def _build(self) -> None:
        self._rec = _Record(prefix=self.prefix, wan_ip=self.ROUTER_WAN)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._save()
        try:
            for host in BASE_HOSTS:
                self._create_ns(host)
            self._wire_base()
            self._load_ruleset("router")
            self._start_stund()
            self._start_miniupnpd("router")
            self._rec.complete = True
            self._save()
        except BaseException as exc:
            rec = self._rec
            try:
                self._teardown(rec)
            except LabError as cleanup:
                raise LabError(f"lab up failed: {exc}; cleanup also failed: {cleanup}") from None
            if isinstance(exc, LabError):
                raise LabError(f"lab up failed: {exc}") from None
            raise

    def _create_ns(self, host: str) -> None:
        assert self._rec is not None
        name = self.ns(host)
        if Path("/run/netns", name).exists() and name not in self._rec.namespaces:
            raise LabError(
                f"namespace {name} exists but is not part of lab {self.prefix}'s record: "
                f"remove it (ip netns del {name}) or use another prefix"
            )
        if name not in self._rec.namespaces:
            self._rec.namespaces.append(name)
            self._save()
        if not Path("/run/netns", name).exists():
            self._cmd([self._program("ip"), "netns", "add", name])
        self._ip(host, "link", "set", "lo", "up")

    def _veth(self, host: str, ifname: str, peer_host: str, peer_if: str) -> None:
        self._ip(
            host, "link", "add", "name", ifname, "type", "veth", "peer", "name", peer_if, "netns", self.ns(peer_host)
        )

    def _bridge(self, host: str, address: str, ports: list[str]) -> None:
        # A fixed MAC: a bridge otherwise takes the lowest MAC among its ports, so adding and removing
        # router2's port (double NAT on/off) changed the gateway's MAC under the LAN hosts' ARP caches,
        # and the lan host's packets went to a MAC nobody had for up to ~30 s (seen as STUN timeouts).
        mac = "02:00:5e:10:00:01" if host == "router" else "02:00:5e:10:00:02"
        self._ip(host, "link", "add", "name", BRIDGE, "address", mac, "type", "bridge", "mcast_snooping", "0")
        for port in ports:
            self._ip(host, "link", "set", port, "master", BRIDGE)
            self._ip(host, "link", "set", port, "up")
        self._ip(host, "addr", "add", address, "dev", BRIDGE)
        self._ip(host, "link", "set", BRIDGE, "up")

    def _iface(self, host: str, ifname: str, addresses: list[str], gateway: str | None) -> None:
        for address in addresses:
            self._ip(host, "addr", "add", address, "dev", ifname)
        self._ip(host, "link", "set", ifname, "up")
        if gateway:
            self._ip(host, "route", "replace", "default", "via", gateway, "dev", ifname)

    def _wire_base(self) -> None:
        assert self._rec is not None
        self._veth("router", WAN_IF, "wan", HOST_IF)
        self._veth("router", LAN_PORT, "lan", HOST_IF)
        for host in BASE_HOSTS:  # static IPv6: no DAD delay, no router advertisements from anyone
            self._sysctl(host, "net.ipv6.conf.all.accept_dad", "0")
            self._sysctl(host, "net.ipv6.conf.default.accept_dad", "0")
            self._sysctl(host, "net.ipv6.conf.all.accept_ra", "0")
            self._sysctl(host, "net.ipv6.conf.default.accept_ra", "0")
        self._iface("wan", HOST_IF, [f"{self.WAN_HOST}/24", f"{self.WAN_HOST2}/24"], None)
        self._iface("router", WAN_IF, [f"{self._rec.wan_ip}/24"], self.WAN_HOST)
        self._bridge("router", f"{self.GATEWAY}/24", [LAN_PORT])
        self._sysctl("router", "net.ipv4.ip_forward", "1")
        self._iface("lan", HOST_IF, [f"{self.LAN_ADDRESS}/24"], self.GATEWAY)
        self._wire_ipv6()

    def _wire_ipv6(self) -> None:
        self._sysctl("router", "net.ipv6.conf.all.forwarding", "1")
        self._ip("wan", "-6", "addr", "add", f"{self.WAN6_HOST}/64", "dev", HOST_IF, "nodad")
        self._ip("wan", "-6", "route", "replace", self.LAN6_NET, "via", self.ROUTER_WAN6, "dev", HOST_IF)
        self._ip("router", "-6", "addr", "add", f"{self.ROUTER_WAN6}/64", "dev", WAN_IF, "nodad")
        self._ip("router", "-6", "route", "replace", "default", "via", self.WAN6_HOST, "dev", WAN_IF)
        self._ip("router", "-6", "addr", "add", f"{self.GATEWAY6}/64", "dev", BRIDGE, "nodad")
        self._sysctl("lan", f"net.ipv6.conf.{HOST_IF}.use_tempaddr", "0")  # whatever this host's default
        self._ip("lan", "-6", "addr", "add", f"{self.LAN6_ADDRESS}/64", "dev", HOST_IF, "nodad", "mngtmpaddr")
        self._ip("lan", "-6", "addr", "add", f"{self.LAN6_TEMPORARY}/64", "dev", HOST_IF, "nodad")
        self._ip(
            "lan", "-6", "route", "replace", "default", "via", self.GATEWAY6, "dev", HOST_IF, "src", self.LAN6_TEMPORARY
        )

    def _wire_double_nat(self) -> None:
        self._veth("router", ROUTER2_PORT, "router2", WAN_IF)
        self._ip("router", "link", "set", ROUTER2_PORT, "master", BRIDGE)
        self._ip("router", "link", "set", ROUTER2_PORT, "up")
        self._veth("router2", LAN2_PORT, "lan2", HOST_IF)
        self._iface("router2", WAN_IF, [f"{self.ROUTER2_WAN}/24"], self.GATEWAY)
        self._bridge("router2", f"{self.GATEWAY2}/24", [LAN2_PORT])
        self._sysctl("router2", "net.ipv4.ip_forward", "1")
        self._iface("lan2", HOST_IF, [f"{self.LAN2_ADDRESS}/24"], self.GATEWAY2)

    def _load_ruleset(self, router: str) -> None:
        self._nft(router, config.router_ruleset(wan_if=WAN_IF, lan_if=BRIDGE), f"nft ruleset of {self.ns(router)}")

    def _has_ruleset(self, router: str) -> bool:
        ns = self.ns(router)
        argv = [
            self._program("ip"),
            "netns",
            "exec",
            ns,
            self._program("nft"),
            "list",
            "table",
            "inet",
            config.NFT_TABLE,
        ]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and all(f"chain {c} " in out.stdout for c in config.MINIUPNPD_CHAINS)

    # ---------------------------------------------------------------------------------- daemons
    def _router_dir(self, router: str) -> Path:
        return self.state_dir / router

    def lease_file(self, router: str = "router") -> Path:
        return self._router_dir(router) / "miniupnpd.leases"

    def log_file(self, daemon: str = "miniupnpd") -> Path:
        """Log of a daemon: stund, miniupnpd (router) or miniupnpd2 (router2)."""
        if daemon == "stund":
            return self.state_dir / "wan" / "stund.log"
        router = {"miniupnpd": "router", "miniupnpd2": "router2"}.get(daemon)
        if router is None:
            raise LabError(f"unknown daemon {daemon!r} (stund, miniupnpd, miniupnpd2)")
        return self._router_dir(router) / "miniupnpd.log"

    def _start_stund(self) -> procs.ProcRecord:
        assert self._rec is not None
        argv = [self._program("stund"), "-h", self.WAN_HOST, "-a", self.WAN_HOST2]
        rec = procs.spawn(
            name="stund",
            host="wan",
            namespace=self.ns("wan"),
            argv=argv,
            log=self.log_file("stund"),
            ip=self._program("ip"),
        )
        self._rec.processes["stund"] = rec
        self._save()
        procs.wait_exec(rec)
        procs.wait_listening(rec, udp=(self.STUN_PORT,), timeout=_READY_TIMEOUT)
        return rec

    def _start_miniupnpd(self, router: str) -> procs.ProcRecord:
        assert self._rec is not None
        rdir = self._router_dir(router)
        rdir.mkdir(parents=True, exist_ok=True)
        stun = router == "router" or self._rec.router2_stun
        settings = config.MiniupnpdSettings(
            prefix=self.prefix,
            router=router,
            wan_if=WAN_IF,
            lan_if=BRIDGE,
            lan_net=self.LAN_NET if router == "router" else self.LAN2_NET,
            http_port=self.HTTP_PORT,
            lease_file=str(self.lease_file(router)),
            stun_host=self.WAN_HOST if stun else None,
            stun_port=self.STUN_PORT,
            ipv6=router == "router",
        )
        conf = rdir / "miniupnpd.conf"
        conf.write_text(config.miniupnpd_conf(settings))
        name = _DAEMON_OF[router]
        pidfile = rdir / "miniupnpd.pid"
        # Our previous daemon is known not to run (callers check): a stale pid file naming a PID that is
        # still a zombie (or reused) would make miniupnpd exit with "MiniUPnPd is already running".
        pidfile.unlink(missing_ok=True)
        argv = [self._program("miniupnpd"), "-d", "-f", str(conf), "-P", str(pidfile)]
        rec = procs.spawn(
            name=name,
            host=router,
            namespace=self.ns(router),
            argv=argv,
            log=self.log_file(name),
            ip=self._program("ip"),
        )
        self._rec.processes[name] = rec
        self._save()
        procs.wait_exec(rec)
        procs.wait_listening(rec, tcp=(self.HTTP_PORT,), udp=(self.NATPMP_PORT,), timeout=_READY_TIMEOUT)
        return rec

    def _repair(self, rec: _Record) -> None:
        stund = rec.processes.get("stund")
        if stund is None or not procs.is_running(stund):
            self._start_stund()
        for router in self._routers(rec):
            if not self._has_ruleset(router):
                self.reset_router(router)
                continue
            daemon = rec.processes.get(_DAEMON_OF[router])
            if daemon is None or not procs.is_running(daemon):
                self.start_router(router)

    def _routers(self, rec: _Record) -> tuple[str, ...]:
        return ROUTERS if rec.double_nat else ("router",)

    def _check_router(self, router: str) -> None:
        rec = self._require_up()
        if router not in self._routers(rec):
            extra = " (double NAT is off)" if router == "router2" else ""
            raise LabError(f"no router {router!r} in lab {self.prefix}{extra}")

    # ---------------------------------------------------------------------------------- status
    def status(self) -> LabStatus:
        """Report namespaces, daemons (verified PIDs), addresses, URLs and active faults."""
        rec = self._rec if self._depth else self._load()
        hosts = BASE_HOSTS + (DOUBLE_NAT_HOSTS if rec is not None and rec.double_nat else ())
        present = {h: Path("/run/netns", self.ns(h)).exists() for h in hosts}
        daemons: dict[str, DaemonStatus] = {}
        problems: list[str] = []
        if rec is None:
            problems.append("not created")
        else:
            if not rec.complete:
                problems.append("incomplete (an `up` did not finish): run `up` again or `down`")
            expected = ["stund", "miniupnpd"] + (["miniupnpd2"] if rec.double_nat else [])
            for name in expected:
                proc = rec.processes.get(name)
                host = "wan" if name == "stund" else ("router" if name == "miniupnpd" else "router2")
                st = procs.state(proc) if proc is not None else "stopped"
                running = st == "running"
                daemons[name] = DaemonStatus(
                    name=name,
                    host=host,
                    namespace=self.ns(host),
                    running=running,
                    state=st,
                    pid=proc.pid if proc is not None and running else None,
                    log=str(self.log_file(name)),
                )
                if not running:
                    problems.append(f"{name} {st}")
            problems += [f"namespace {self.ns(h)} missing" for h, ok in present.items() if not ok]
        addresses = {h: self._addresses(h) for h, ok in present.items() if ok}
        return LabStatus(
            prefix=self.prefix,
            state_dir=str(self.state_dir),
            exists=rec is not None,
            up=rec is not None and not problems,
            double_nat=rec is not None and rec.double_nat,
            namespaces={h: self.ns(h) for h in hosts},
            present=present,
            daemons=daemons,
            addresses=addresses,
            wan_ip=rec.wan_ip if rec is not None else None,
            root_url=self.root_url,
            root_url2=self.root_url2 if rec is not None and rec.double_nat else None,
            loss=dict(rec.loss) if rec is not None else {},
            rules_wiped=list(rec.rules_wiped) if rec is not None else [],
            problems=problems,
        )

    def _addresses(self, host: str) -> dict[str, list[str]]:
        try:
            out = self._cmd([self._program("ip"), "-n", self.ns(host), "-j", "-4", "addr", "show"])
            data = json.loads(out or "[]")
        except (LabError, ValueError):
            return {}
        result: dict[str, list[str]] = {}
        for link in data:
            if link.get("ifname") == "lo":
                continue
            addrs = [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if "local" in a]
            if addrs:
                result[str(link.get("ifname"))] = addrs
        return result

    def pid(self, daemon: str = "miniupnpd") -> int | None:
        """PID of a running lab daemon (stund, miniupnpd, miniupnpd2), verified; None if not running."""
        rec = self._rec if self._depth else self._load()
        proc = rec.processes.get(daemon) if rec is not None else None
        return proc.pid if proc is not None and procs.is_running(proc) else None

    # ---------------------------------------------------------------------------------- probes
    def probe_natpmp(
        self, host: str = "lan", timeout: float = 3.0, expect: str | None = None, gateway: str | None = None
    ) -> NatPmpReply | None:
        """Ask a NAT-PMP server (default: the host's gateway) for its external address, from `host`.

        Retries every 250 ms. With `expect`, keeps asking until that address is reported or `timeout`
        passes. Returns the last reply, or None if none came.
        """
        gateway = gateway or self.gateway_of(host)
        argv = [
            sys.executable,
            "-I",
            "-S",
            "-c",
            _NATPMP_PROBE,
            gateway,
            str(self.NATPMP_PORT),
            str(timeout),
            expect or "",
        ]
        out = self.run(host, argv, timeout=timeout + 10)
        if out.returncode != 0:
            raise LabError(f"NAT-PMP probe in {self.ns(host)} failed: {out.stderr.strip()[-200:]}")
        data = json.loads(out.stdout or "null")
        if data is None:
            return None
        return NatPmpReply(result=int(data["result"]), epoch=int(data["epoch"]), address=str(data["address"]))

    # ---------------------------------------------------------------------------------- faults
    def stop_router(self, router: str = "router") -> None:
        """Stop the router's miniupnpd (SIGTERM; recorded PID, verified). Kernel rules stay in place, so
        existing mappings keep forwarding; the router just stops answering UPnP/NAT-PMP/PCP."""
        with self._locked():
            self._check_router(router)
            assert self._rec is not None
            proc = self._rec.processes.get(_DAEMON_OF[router])
            if proc is not None:
                procs.stop(proc)
                del self._rec.processes[_DAEMON_OF[router]]
                self._save()

    def start_router(self, router: str = "router") -> int:
        """Start the router's miniupnpd if it is not running (waits until it listens); returns its PID.

        It reloads its lease file: mappings come back with their remaining lifetime, rules flushed by
        `wipe_rules` are re-added. Its NAT-PMP/PCP epoch starts again at 0.
        """
        with self._locked():
            self._check_router(router)
            assert self._rec is not None
            proc = self._rec.processes.get(_DAEMON_OF[router])
            if proc is not None and procs.is_running(proc):
                return proc.pid
            stund = self._rec.processes.get("stund")
            if router == "router" and (stund is None or not procs.is_running(stund)):
                self._start_stund()
            pid = self._start_miniupnpd(router).pid
            if router in self._rec.rules_wiped:
                self._rec.rules_wiped.remove(router)
                self._save()
            return pid

    def restart_router(self, router: str = "router") -> int:
        """Kill the router's miniupnpd and start it again with its lease file; returns the new PID.

        Like a router reboot that keeps its state: the epoch resets to 0, mappings come back from the lease
        file with their remaining lifetime (and rules lost to `wipe_rules` are re-added).
        """
        with self._locked():
            self._check_router(router)
            self.stop_router(router)
            return self.start_router(router)

    def wipe_rules(self, router: str = "router") -> None:
        """Flush miniupnpd's nft chains while it runs: "mappings vanish silently".

        The router still lists the mappings (its nftables backend caches them) but no new flow is
        forwarded; flows already in conntrack keep going, as on a real router. Undo: restart_router().
        """
        with self._locked():
            self._check_router(router)
            assert self._rec is not None
            self._nft(router, config.flush_miniupnpd_chains(), f"flush miniupnpd chains in {self.ns(router)}")
            if router not in self._rec.rules_wiped:
                self._rec.rules_wiped.append(router)
                self._save()

    def reset_router(self, router: str = "router") -> int:
        """Hard variant: stop miniupnpd, reload the router's whole ruleset, delete the lease file, start.

        Like a router firewall restart: every mapping is gone, the router lists none. Returns the new PID.
        """
        with self._locked():
            self._check_router(router)
            assert self._rec is not None
            self.stop_router(router)
            self._load_ruleset(router)
            self.lease_file(router).unlink(missing_ok=True)
            if router in self._rec.rules_wiped:
                self._rec.rules_wiped.remove(router)
                self._save()
            return self.start_router(router)

    def set_wan_ip(self, ip: str, timeout: float = 10.0) -> str:
        """Give the router a new WAN address (in 203.0.113.0/24, so the STUN server stays reachable).

        Measured with miniupnpd 2.3.1: it watches its WAN interface over netlink, so the change alone is
        enough. It re-runs STUN, then reports the new address by UPnP, NAT-PMP and PCP within
        milliseconds, and it resets its NAT-PMP/PCP epoch to 0 (SIGUSR1 does the same, even without a
        change). Existing mappings keep forwarding: its DNAT rules match the WAN interface, not the
        address. This method checks with a NAT-PMP request from lan, and falls back to SIGUSR1 and then a
        restart if the new address is not reported. Returns how it was noticed: 'netlink', 'SIGUSR1',
        'restart', or 'not running' (the router daemon was stopped; it learns the address at start).
        """
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise LabError(f"not an IPv4 address: {ip!r}") from None
        net = ipaddress.IPv4Network(self.WAN_NET)
        if (
            addr not in net
            or addr in (net.network_address, net.broadcast_address)
            or str(addr)
            in (
                self.WAN_HOST,
                self.WAN_HOST2,
            )
        ):
            raise LabError(f"WAN address must be a free host address in {self.WAN_NET} (not {ip})")
        with self._locked():
            rec = self._require_up()
            self._ip("router", "-4", "addr", "flush", "dev", WAN_IF)
            self._ip("router", "addr", "add", f"{addr}/24", "dev", WAN_IF)
            self._ip("router", "route", "replace", "default", "via", self.WAN_HOST, "dev", WAN_IF)
            rec.wan_ip = str(addr)
            self._save()
            proc = rec.processes.get("miniupnpd")
            if proc is None or not procs.is_running(proc):
                return "not running"
            step = max(timeout / 3, 1.0)
            if self._reports(str(addr), step):
                return "netlink"
            if procs.send_signal(proc, signal.SIGUSR1) and self._reports(str(addr), step):
                return "SIGUSR1"
            self.restart_router("router")
            if self._reports(str(addr), step):
                return "restart"
            raise LabError(f"miniupnpd does not report the new WAN address {addr} (see {proc.log})")

    def _reports(self, ip: str, timeout: float) -> bool:
        reply = self.probe_natpmp("lan", timeout=timeout, expect=ip)
        return reply is not None and reply.address == ip

    def set_loss(self, percent: int, link: str = "lan") -> None:
        """Random loss of `percent` % in each direction of a link (0 clears it).

        Links: lan (lan <-> router), wan (router <-> wan), lan2 and uplink2 (router2 <-> router) with double
        NAT. nftables `numgen random mod 100 < N drop` in netdev ingress hooks on both receiving ends.
        """
        if not 0 <= int(percent) <= 100:
            raise LabError(f"loss must be 0-100 %, not {percent}")
        if link not in _LINK_ENDS:
            raise LabError(f"unknown link {link!r} (one of {', '.join(LINKS)})")
        with self._locked():
            rec = self._require_up()
            if link in ("lan2", "uplink2") and not rec.double_nat:
                if percent == 0:
                    return
                raise LabError(f"link {link} exists only with double NAT")
            for host, device in _LINK_ENDS[link]:
                self._nft(host, config.loss_rules(device, int(percent)), f"loss on {device} in {self.ns(host)}")
            if percent:
                rec.loss[link] = int(percent)
            else:
                rec.loss.pop(link, None)
            self._save()

    def set_pcp_only(self, enabled: bool) -> None:
        """Make the router answer PCP only (NAT-PMP requests dropped at its LAN port), or both again."""
        with self._locked():
            rec = self._require_up()
            self._nft("router", config.pcp_only_rules(LAN_PORT, enabled), f"PCP only ({enabled}) on {LAN_PORT}")
            rec.pcp_only = enabled
            self._save()

    def set_double_nat(self, enabled: bool, stun: bool = False) -> None:
        """Add or remove the inner router (router2 + lan2) behind the first router's LAN.

        By default router2's miniupnpd runs without STUN and so knows only its private WAN 192.168.77.2:
        UPnP reports an empty external address and refuses mappings (501), NAT-PMP answers result 3 with
        0.0.0.0, PCP NO_RESOURCES. With `stun=True` it reports 203.0.113.1 but still refuses every mapping.
        """
        with self._locked():
            rec = self._require_up()
            if enabled == rec.double_nat and (not enabled or stun == rec.router2_stun):
                return
            if rec.double_nat:
                self._remove_double_nat(rec)
            if not enabled:
                return
            rec.router2_stun = stun
            try:
                for host in DOUBLE_NAT_HOSTS:
                    self._create_ns(host)
                self._wire_double_nat()
                self._load_ruleset("router2")
                rec.double_nat = True
                self._save()
                self._start_miniupnpd("router2")
            except BaseException:
                self._remove_double_nat(rec)
                raise

    def _remove_double_nat(self, rec: _Record) -> None:
        for link in ("uplink2", "lan2"):
            rec.loss.pop(link, None)
        proc = rec.processes.get("miniupnpd2")
        if proc is not None:
            procs.stop(proc)
            del rec.processes["miniupnpd2"]
        if Path("/run/netns", self.ns("router")).exists():
            # clear loss on router's port to router2 (the port itself goes away with router2's namespace)
            self._nft("router", config.loss_rules(ROUTER2_PORT, 0), "clear loss on p-r2")
        for host in reversed(DOUBLE_NAT_HOSTS):
            name = self.ns(host)
            if Path("/run/netns", name).exists() and name in rec.namespaces:
                self._cmd([self._program("ip"), "netns", "del", name])
            if name in rec.namespaces:
                rec.namespaces.remove(name)
        if "router2" in rec.rules_wiped:
            rec.rules_wiped.remove("router2")
        rec.double_nat = False
        rec.router2_stun = False
        self._save()
        shutil.rmtree(self._router_dir("router2"), ignore_errors=True)

    def reset_faults(self) -> list[str]:
        """Bring the lab back to its baseline: no loss, original WAN address, routers running with their
        rules. Leaves the double NAT as it is. Returns what was done (empty if nothing was needed)."""
        done: list[str] = []
        with self._locked():
            rec = self._require_up()
            for link in list(rec.loss):
                self.set_loss(0, link)
                done.append(f"loss {link} cleared")
            if rec.pcp_only:
                self.set_pcp_only(False)
                done.append("NAT-PMP answered again")
            if rec.wan_ip != self.ROUTER_WAN:
                self.set_wan_ip(self.ROUTER_WAN)
                done.append(f"WAN address back to {self.ROUTER_WAN}")
            stund = rec.processes.get("stund")
            if stund is None or not procs.is_running(stund):
                self._start_stund()
                done.append("stund started")
            for router in self._routers(rec):
                proc = rec.processes.get(_DAEMON_OF[router])
                if not self._has_ruleset(router):
                    self.reset_router(router)
                    done.append(f"{router} firewall reloaded")
                elif router in rec.rules_wiped:
                    self.restart_router(router)
                    done.append(f"{router} restarted (rules restored from lease file)")
                elif proc is None or not procs.is_running(proc):
                    self.start_router(router)
                    done.append(f"{router} started")
        return done
