"""SIP profiles on the real router: ext-sip-ip / ext-rtp-ip follow the engine without a restart, `stun:`
resolves through the NAT, the per-peer decision, and the STUN cross-check that exposes a double NAT."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import AUTONAT
from tests.lab.daemon_helpers import Daemon, eventually, request, write_config

pytestmark = pytest.mark.lab

PROFILES = """
[[profile]]
name = "external"
ext-sip-ip = "auto-nat"
ext-rtp-ip = "auto-nat"

[[profile]]
name = "stunned"
sip-port = 5070
ext-rtp-ip = "stun:203.0.113.100"
ext-sip-ip = "stun:203.0.113.100:3478"
local-network-acl = "none"
"""


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        daemon.stop(signal.SIGTERM)


def profile_status(lab: Lab, daemon: Daemon, name: str) -> dict[str, str]:
    result = lab.run(daemon.host, [AUTONAT, "profile", "status", name, "--socket", str(daemon.socket_path)], timeout=20)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line and not line.startswith("=")]
    return {line[:24].strip(): line[24:] for line in rows}


def test_auto_nat_profile_follows_the_router_without_restart(lab: Lab, tmp_path: Path, started: list[Daemon]) -> None:
    daemon = Daemon(lab, tmp_path, write_config(tmp_path, extra=PROFILES)).start()
    started.append(daemon)
    daemon.wait_ready()
    status = profile_status(lab, daemon, "external")
    assert status["Ext-SIP-IP"] == status["Ext-RTP-IP"] == Lab.ROUTER_WAN
    assert status["SIP-IP"] == status["RTP-IP"] == Lab.LAN_ADDRESS
    assert status["Auto-NAT"] == "true"
    assert status["URL"] == f"sip:mod_sofia@{Lab.ROUTER_WAN}:5060"
    pid = daemon.process.pid if daemon.process else None
    lab.set_wan_ip(Lab.ROUTER_WAN_ALT)
    eventually(
        lambda: profile_status(lab, daemon, "external")["Ext-SIP-IP"] == Lab.ROUTER_WAN_ALT, 5, "the new WAN address"
    )
    assert profile_status(lab, daemon, "external")["Ext-RTP-IP"] == Lab.ROUTER_WAN_ALT
    assert daemon.process is not None and daemon.process.pid == pid and daemon.process.poll() is None


def test_stun_values_resolve_through_the_nat(lab: Lab, tmp_path: Path, started: list[Daemon]) -> None:
    daemon = Daemon(lab, tmp_path, write_config(tmp_path, extra=PROFILES)).start()
    started.append(daemon)
    daemon.wait_ready()
    eventually(lambda: profile_status(lab, daemon, "stunned")["Ext-SIP-IP"] == Lab.ROUTER_WAN, 5, "the STUN address")
    status = profile_status(lab, daemon, "stunned")
    assert status["Ext-RTP-IP"] == Lab.ROUTER_WAN and status["Ext-SIP-IP-Source"] == "stun"


def test_the_decision_per_peer(lab: Lab, tmp_path: Path, started: list[Daemon]) -> None:
    daemon = Daemon(lab, tmp_path, write_config(tmp_path, extra=PROFILES)).start()
    started.append(daemon)
    daemon.wait_ready()

    def advertised(profile: str, destination: str, media: bool = False) -> str:
        message = {"cmd": "advertise", "name": profile, "destination": destination, "media": media}
        reply = request(daemon.socket_path, message)
        assert reply["ok"], reply
        return str(reply["result"])

    assert advertised("external", "198.51.100.20") == Lab.ROUTER_WAN  # the internet
    assert advertised("external", "198.51.100.20", media=True) == Lab.ROUTER_WAN
    assert advertised("external", "192.168.77.50") == Lab.LAN_ADDRESS  # localnet.auto: our LAN
    assert advertised("external", "127.0.0.1") == Lab.LAN_ADDRESS  # loopback: never the external one
    assert advertised("external", "10.9.9.9") == Lab.ROUTER_WAN  # private, but another network
    eventually(lambda: advertised("stunned", "192.168.77.50") == Lab.ROUTER_WAN, 5, "acl none")


def test_stun_cross_check_agrees_with_a_single_nat(lab: Lab, tmp_path: Path, started: list[Daemon]) -> None:
    daemon = Daemon(lab, tmp_path, write_config(tmp_path, nat='stun = "stun:203.0.113.100"')).start()
    started.append(daemon)
    daemon.wait_ready()
    eventually(lambda: daemon.status()["stun"] is not None, 5, "a STUN answer")
    status = daemon.status()
    assert status["stun"]["matches_router"] is True and status["stun"]["address"] == Lab.ROUTER_WAN
    assert status["double_nat"] is False


def test_stun_cross_check_exposes_a_double_nat(double_nat_lab: Lab, tmp_path: Path, started: list[Daemon]) -> None:
    lab = double_nat_lab
    daemon = Daemon(lab, tmp_path, write_config(tmp_path, nat='stun = "stun:203.0.113.100"'), host="lan2").start()
    started.append(daemon)
    daemon.wait_socket()
    eventually(lambda: daemon.status()["stun"] is not None, 10, "a STUN answer")
    status = daemon.status()
    assert status["stun"]["address"] == Lab.ROUTER_WAN  # what the internet sees, two NATs out
    assert status["stun"]["matches_router"] is False
    assert status["double_nat"] is True


def test_probe_cross_checks_with_stun(lab: Lab, state_dir: Path) -> None:
    from tests.lab.cli_helpers import autonat_json

    data = autonat_json(lab, state_dir, "probe", "--stun", "stun:203.0.113.100")
    assert data["stun"] == {"server": "stun:203.0.113.100", "address": Lab.ROUTER_WAN, "matches_router": True}
    assert data["double_nat"] is False


def test_probe_stun_behind_double_nat_says_so(double_nat_lab: Lab, state_dir: Path) -> None:
    from tests.lab.cli_helpers import autonat

    result = autonat(double_nat_lab, state_dir, "probe", "--stun", "stun:203.0.113.100", "--json", host="lan2")
    data = __import__("json").loads(result.stdout)
    assert data["stun"]["address"] == Lab.ROUTER_WAN and data["stun"]["matches_router"] is False
    assert data["double_nat"] is True
