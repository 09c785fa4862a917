"""The lab itself: a real miniupnpd router in namespaces, its CLI, and each fault switch."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from autonat.cli.main import cli
from autonat.lab import Lab, LabError, procs
from autonat.lab import topology as topology_mod

pytestmark = pytest.mark.lab

_RECV = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    data, addr = s.recvfrom(2048)
except TimeoutError:
    sys.exit(1)
sys.stdout.write(data.decode(errors="replace"))
"""

_ECHO = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.2)
end = time.monotonic() + float(sys.argv[2])
print("ready", flush=True)
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(2048)
    except OSError:
        continue
    if data == b"quit":
        break
    s.sendto(data, addr)
"""

_PROBE = r"""
import socket, sys, time
target, port, count, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
got = 0
for seq in range(count):
    s.sendto(b"%d" % seq, (target, port))
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data = s.recv(64)
        except OSError:
            break
        if data == b"%d" % seq:
            got += 1
            break
for _ in range(3):
    s.sendto(b"quit", (target, port))
print(got)
"""

PY = [sys.executable, "-I", "-S", "-c"]


def _py(script: str, *args: object) -> list[str]:
    return [*PY, script, *map(str, args)]


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "helper did not start"
    assert proc.stdout.readline().strip() == b"ready"


def delivered(lab: Lab, port: int, dst: str | None = None, wait: float = 1.0) -> bool:
    """Send one datagram from wan (socat) to the router's WAN:port; did it arrive at lan:port?"""
    payload = f"hello-{port}-{time.monotonic_ns()}"
    rx = lab.popen("lan", _py(_RECV, port, wait), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(rx)
        target = dst or lab.status().wan_ip
        lab.run(
            "wan",
            ["socat", "-u", "STDIN", f"UDP4-SENDTO:{target}:{port}"],
            input=payload,
            timeout=5,
            check=True,
        )
        out, _ = rx.communicate(timeout=wait + 5)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait(timeout=5)
    return payload in out.decode(errors="replace")


def round_trips(lab: Lab, count: int = 40, port: int = 7777) -> int:
    """UDP echo from lan to the router's LAN address: how many of `count` probes came back."""
    echo = lab.popen("router", _py(_ECHO, port, 20), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(echo)
        out = lab.run("lan", _py(_PROBE, Lab.GATEWAY, port, count, 0.05), timeout=30, check=True)
        return int(out.stdout.strip())
    finally:
        if echo.poll() is None:
            echo.kill()
        echo.wait(timeout=5)


def upnpc(lab: Lab, *args: str, host: str = "lan", url: str | None = None) -> str:
    out = lab.run(host, ["upnpc", "-u", url or lab.root_url, *args], timeout=20)
    return out.stdout + out.stderr


_ADDED: list[tuple[Lab, int]] = []


@pytest.fixture(autouse=True)
def _remove_added_mappings() -> Iterator[None]:
    """upnpc's mappings have no lease: remove each test's own, so later tests see the router as it was."""
    yield
    while _ADDED:
        lab, port = _ADDED.pop()
        upnpc(lab, "-d", str(port), "UDP")


def add_mapping(lab: Lab, port: int, desc: str = "test") -> None:
    _ADDED.append((lab, port))
    out = upnpc(lab, "-e", desc, "-a", Lab.LAN_ADDRESS, str(port), str(port), "UDP")
    assert "is redirected to internal" in out, out


def natpmpc(lab: Lab, host: str = "lan", gateway: str = Lab.GATEWAY) -> subprocess.CompletedProcess[str]:
    return lab.run(host, ["natpmpc", "-g", gateway], timeout=20)


def epoch(lab: Lab) -> int:
    reply = lab.probe_natpmp("lan")
    assert reply is not None and reply.result == 0
    return reply.epoch


def pids(lab: Lab) -> dict[str, int | None]:
    return {name: d.pid for name, d in lab.status().daemons.items()}


# ------------------------------------------------------------------------------------------- basics
def test_up_is_idempotent(lab: Lab) -> None:
    before = pids(lab)
    t0 = time.monotonic()
    st = lab.up()
    assert time.monotonic() - t0 < 2.0
    assert st.up, st.problems
    assert pids(lab) == before


def test_status_reports_everything(lab: Lab) -> None:
    st = lab.status()
    assert st.up and st.exists and not st.problems
    assert st.namespaces == {h: f"{lab.prefix}-{h}" for h in ("wan", "router", "lan")}
    assert all(st.present.values())
    assert {"stund", "miniupnpd"} <= set(st.daemons)
    for d in st.daemons.values():
        assert d.running and d.pid and Path(f"/proc/{d.pid}").exists()
    assert "203.0.113.1/24" in st.addresses["router"]["wan0"]
    assert "192.168.77.1/24" in st.addresses["router"]["br0"]
    assert st.addresses["lan"]["eth0"] == ["192.168.77.10/24"]
    assert set(st.addresses["wan"]["eth0"]) == {"203.0.113.100/24", "203.0.113.101/24"}
    assert st.root_url == lab.root_url == "http://192.168.77.1:5000/rootDesc.xml"
    assert json.loads(json.dumps(st.to_dict()))["daemons"]["miniupnpd"]["pid"] == st.daemons["miniupnpd"].pid

    res = CliRunner().invoke(cli, ["lab", "--prefix", lab.prefix, "status", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["root_url"] == lab.root_url


def test_natpmpc_reports_public_ip(lab: Lab) -> None:
    out = natpmpc(lab)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Public IP address : 203.0.113.1" in out.stdout


def test_upnpc_reports_external_ip(lab: Lab) -> None:
    assert "ExternalIPAddress = 203.0.113.1" in upnpc(lab, "-s")


def test_mapping_forwards_datagram_from_wan(lab: Lab) -> None:
    add_mapping(lab, 41001)
    assert delivered(lab, 41001)
    assert not delivered(lab, 41002, wait=0.5)  # no mapping, no delivery


LAB_CLI = [sys.executable, "-m", "autonat", "lab"]


def test_exec_passes_exit_code(lab: Lab) -> None:
    argv = [*LAB_CLI, "--prefix", lab.prefix, "exec", "lan", "--", "sh", "-c", "exit 7"]
    done = subprocess.run(argv, timeout=30, check=False)
    assert done.returncode == 7


def test_exec_becomes_the_command_so_signals_reach_it(lab: Lab) -> None:
    # `autonat lab exec lan -- autonat run` must stop when it is sent SIGTERM: no wrapper left in between.
    proc = subprocess.Popen([*LAB_CLI, "--prefix", lab.prefix, "exec", "lan", "--", "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "exec did not become the command"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


# ------------------------------------------------------------------------------------------- faults
def test_restart_router_resets_epoch_keeps_mappings(lab: Lab) -> None:
    add_mapping(lab, 41011)
    e1 = epoch(lab)
    if e1 < 2:
        time.sleep(2.2 - e1)
        e1 = epoch(lab)
    old = lab.pid("miniupnpd")
    new = lab.restart_router()
    assert new != old and lab.pid("miniupnpd") == new
    assert old is not None and not _alive(old)
    assert epoch(lab) <= 1 < e1
    assert "41011->192.168.77.10:41011" in upnpc(lab, "-l")  # back from the lease file
    assert delivered(lab, 41011)


def test_stop_and_start_router(lab: Lab) -> None:
    lab.stop_router()
    assert lab.pid("miniupnpd") is None
    assert not lab.status().up
    assert lab.probe_natpmp("lan", timeout=0.6) is None
    lab.start_router()
    assert epoch(lab) <= 1


def test_wipe_rules_vanish_silently(lab: Lab) -> None:
    add_mapping(lab, 41021)
    assert delivered(lab, 41021)
    lab.wipe_rules()
    assert lab.status().rules_wiped == ["router"]
    assert "41021->192.168.77.10:41021" in upnpc(lab, "-l")  # still listed...
    assert not delivered(lab, 41021, wait=0.7)  # ...but no longer forwarded
    lab.restart_router()  # the lease file brings the rules back
    assert delivered(lab, 41021)


def test_reset_router_drops_all_mappings(lab: Lab) -> None:
    add_mapping(lab, 41031)
    lab.reset_router()
    assert "41031" not in upnpc(lab, "-l")
    assert not delivered(lab, 41031, wait=0.5)
    assert "Public IP address : 203.0.113.1" in natpmpc(lab).stdout


def test_set_wan_ip_is_reported(lab: Lab) -> None:
    add_mapping(lab, 41041)
    how = lab.set_wan_ip(Lab.ROUTER_WAN_ALT)
    assert how == "netlink"  # miniupnpd 2.3.1 watches its WAN interface
    assert "Public IP address : 203.0.113.2" in natpmpc(lab).stdout
    assert "ExternalIPAddress = 203.0.113.2" in upnpc(lab, "-s")
    assert lab.status().addresses["router"]["wan0"] == ["203.0.113.2/24"]
    assert delivered(lab, 41041, dst=Lab.ROUTER_WAN_ALT)  # rules match the interface, not the address
    with pytest.raises(LabError, match="free host address"):
        lab.set_wan_ip(Lab.WAN_HOST)
    assert "WAN address back to 203.0.113.1" in lab.reset_faults()
    assert "Public IP address : 203.0.113.1" in natpmpc(lab).stdout


def test_loss(lab: Lab) -> None:
    lab.set_loss(50)
    assert lab.status().loss == {"lan": 50}
    got = round_trips(lab, 40)
    # 50 % each way: about 25 % of round trips survive (expected 10 of 40)
    assert 1 <= got <= 22, got
    lab.set_loss(0)
    assert lab.status().loss == {}
    assert round_trips(lab, 40) == 40


def test_double_nat(double_nat_lab: Lab) -> None:
    lab = double_nat_lab
    st = lab.status()
    assert st.double_nat and st.up, st.problems
    assert st.addresses["router2"]["wan0"] == ["192.168.77.2/24"]
    assert st.root_url2 == "http://192.168.88.1:5000/rootDesc.xml"
    out = natpmpc(lab, "lan2", Lab.GATEWAY2)
    assert "Public IP address" not in out.stdout and "FAILED" in out.stdout + out.stderr
    reply = lab.probe_natpmp("lan2")
    assert reply is not None and (reply.result, reply.address) == (3, "0.0.0.0")
    status = upnpc(lab, "-s", host="lan2", url=lab.root_url2)
    assert "ExternalIPAddress = \n" in status or "GetExternalIPAddress failed. (empty string)" in status
    assert not re.search(r"ExternalIPAddress = \d", status)
    added = upnpc(lab, "-a", Lab.LAN2_ADDRESS, "41051", "41051", "UDP", host="lan2", url=lab.root_url2)
    assert "501" in added
    # through both NATs to the outer router, which does know the public address
    outer = lab.probe_natpmp("lan2", gateway=Lab.GATEWAY)
    assert outer is not None and outer.address == Lab.ROUTER_WAN
    lab.set_double_nat(False)
    assert not Path("/run/netns", lab.ns("router2")).exists()
    assert lab.pid("miniupnpd2") is None


# ---------------------------------------------------------------------------------- coexistence / down
def test_second_lab_coexists_and_down_kills_only_its_own(lab: Lab) -> None:
    first = pids(lab)
    other = Lab(lab.prefix + "b")
    decoy = subprocess.Popen(["sleep", "60"])
    try:
        st = other.up()
        assert st.up and st.namespaces["lan"] == f"{other.prefix}-lan"
        reply = other.probe_natpmp("lan")
        assert reply is not None and reply.address == Lab.ROUTER_WAN
        theirs = pids(other)
        assert not set(theirs.values()) & set(first.values())
        # a record entry whose PID is now someone else's process must not be killed
        record = other.state_dir / "state.json"
        data = json.loads(record.read_text())
        start = procs.proc_starttime(decoy.pid)
        data["processes"]["decoy"] = {
            "name": "decoy",
            "host": "lan",
            "namespace": other.ns("lan"),
            "pid": decoy.pid,
            "starttime": start,
            "cmdline": ["/usr/sbin/miniupnpd", "-d"],
            "log": "/dev/null",
        }
        record.write_text(json.dumps(data))
        assert other.down() is True
        assert decoy.poll() is None  # untouched
        for pid in theirs.values():
            assert pid is not None and not _alive(pid)
        for host in ("wan", "router", "lan"):
            assert not Path("/run/netns", other.ns(host)).exists()
        assert not other.state_dir.exists()
        assert other.down() is False  # nothing there: fine
        assert pids(lab) == first and lab.status().up
    finally:
        decoy.kill()
        decoy.wait(timeout=5)
        other.down()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["lab", "--prefix", f"n{os.getpid()}", "fault", "wipe-rules"])
    assert res.exit_code != 0 and "is not up" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = runner.invoke(cli, ["lab", "--prefix", "Bad!", "status"])
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli, ["lab", "--prefix", f"n{os.getpid()}", "down"])
    assert res.exit_code == 0 and "nothing to remove" in res.output
    real = topology_mod._which
    monkeypatch.setattr(topology_mod, "_which", lambda p: None if p == "stund" else real(p))
    res = runner.invoke(cli, ["lab", "--prefix", f"n{os.getpid()}", "up"])
    assert res.exit_code == 1
    assert res.output.strip() == "Error: missing program stund: install the Debian package stun-server"
    assert not Path("/run/autonat-lab", f"n{os.getpid()}.lock").exists()


def test_the_gateway_mac_stays_when_router2_comes_and_goes(healthy_lab: Lab) -> None:
    # A bridge takes its ports' lowest MAC unless given one: the lan hosts' ARP caches would then point at
    # a MAC that left with router2 (packets to the gateway silently dropped for up to ~30 s).
    lab = healthy_lab

    def gateway_mac() -> str:
        return lab.run("router", ["cat", "/sys/class/net/br0/address"], check=True).stdout.strip()

    before = gateway_mac()
    lab.set_double_nat(True)
    try:
        assert gateway_mac() == before
    finally:
        lab.set_double_nat(False)
    assert gateway_mac() == before
    reply = lab.probe_natpmp(timeout=2)  # the lan host reaches the gateway at once
    assert reply is not None and reply.address == Lab.ROUTER_WAN
