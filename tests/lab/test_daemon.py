"""The daemon against the real router: mappings kept through restarts, wipes, IP changes and our own
crashes; FreeSWITCH's nat_map verbs; clean shutdown."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import AUTONAT, reaches_lan, upnp_entries
from tests.lab.daemon_helpers import Daemon, request, write_config

pytestmark = pytest.mark.lab

SIP = '[[mapping]]\nport = 5060\ntransport = "both"\n'


@pytest.fixture
def daemons(lab: Lab, tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop(signal.SIGKILL if daemon.process and daemon.process.poll() is None else signal.SIGTERM)
    # What a killed daemon left is cleaned by the next start in each test; remove test ports anyway.
    for transport, external, client, _ in upnp_entries(lab):
        if client == Lab.LAN_ADDRESS:
            lab.run("lan", ["upnpc", "-u", lab.root_url, "-d", str(external), transport.upper()], timeout=20)


def new_daemon(lab: Lab, directory: Path, daemons: list[Daemon], *, mappings: str = SIP, nat: str = "") -> Daemon:
    daemon = Daemon(lab, directory, write_config(directory, mappings=mappings, nat=nat))
    daemons.append(daemon)
    return daemon


def ours(lab: Lab) -> set[tuple[str, int]]:
    return {(transport, internal) for transport, _, client, internal in upnp_entries(lab) if client == Lab.LAN_ADDRESS}


def wait_until(predicate: object, timeout: float, step: float = 0.05) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def test_config_mappings_are_on_the_router_within_a_second(lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = new_daemon(lab, tmp_path, daemons).start()
    wait_until(lambda: {("udp", 5060), ("tcp", 5060)} <= ours(lab), timeout=5, step=0.02)
    assert time.monotonic() - daemon.started_at < 1.0, "mappings took longer than 1 s from `autonat run`"
    status = lab.run("lan", [AUTONAT, "nat_map", "status", "--socket", str(daemon.socket_path)], timeout=20)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"Nat Type: PCP, ExtIP: {Lab.ROUTER_WAN}"
    assert lines[1] == "NAT port mapping enabled."
    assert lines[2] == "port,proto,proto_num,sticky"
    assert set(lines[3:5]) == {"5060,udp,0,0", "5060,tcp,1,0"}
    assert lines[-1] == "2 total."


def test_nat_map_verbs(lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = new_daemon(lab, tmp_path, daemons).start()
    daemon.wait_ready()
    socket_option = ["--socket", str(daemon.socket_path)]
    added = lab.run("lan", [AUTONAT, "nat_map", "add", "7010", "udp", "sticky", *socket_option], timeout=20)
    assert added.stdout.strip() == f"{Lab.ROUTER_WAN}:7010", added.stderr
    assert ("udp", 7010) in ours(lab)
    as_json = lab.run("lan", [AUTONAT, "nat_map", "status", "--json", *socket_option], timeout=20)
    row = next(m for m in __import__("json").loads(as_json.stdout)["mappings"] if m["port"] == 7010)
    assert (row["sticky"], row["external_port"], row["protocol"], row["owner"]) == (True, 7010, "pcp", "manual")
    assert row["expires_at"] > time.time() + 3600
    disabled = lab.run("lan", [AUTONAT, "nat_map", "mapping", "disable", *socket_option], timeout=20)
    assert disabled.stdout.strip() == "NAT port mapping disabled."
    assert not ours(lab) & {("udp", 7010), ("udp", 5060), ("tcp", 5060)}
    lab.run("lan", [AUTONAT, "nat_map", "mapping", "enable", *socket_option], timeout=20)
    wait_until(lambda: {("udp", 7010), ("udp", 5060), ("tcp", 5060)} <= ours(lab), timeout=5)
    republished = lab.run("lan", [AUTONAT, "nat_map", "republish", *socket_option], timeout=20)
    assert republished.stdout.strip() == "republished 3 mappings"
    reinit = lab.run("lan", [AUTONAT, "nat_map", "reinit", *socket_option], timeout=20)
    assert reinit.stdout.strip() == f"Nat Type: PCP, ExtIP: {Lab.ROUTER_WAN}"
    deleted = lab.run("lan", [AUTONAT, "nat_map", "del", "7010", "udp", *socket_option], timeout=20)
    assert deleted.stdout.strip() == "deleted"
    assert ("udp", 7010) not in ours(lab)
    missing = lab.run("lan", [AUTONAT, "nat_map", "del", "7010", "udp", *socket_option], timeout=20)
    assert missing.returncode == 8 and missing.stderr.strip() == "autonat: no such mapping"


def test_nat_map_without_a_daemon_is_one_clear_line(lab: Lab, tmp_path: Path) -> None:
    result = lab.run("lan", [AUTONAT, "nat_map", "status", "--socket", str(tmp_path / "none.sock")], timeout=20)
    assert result.returncode == 8
    assert result.stderr.strip() == f"autonat: no autonat daemon is running (no control socket at {tmp_path}/none.sock)"


@pytest.mark.parametrize("protocol", ["pcp", "upnp"])
def test_router_restart_recreates_every_mapping(lab: Lab, tmp_path: Path, daemons: list[Daemon], protocol: str) -> None:
    daemon = new_daemon(lab, tmp_path, daemons, nat=f'protocol = "{protocol}"').start()
    daemon.wait_ready()
    daemon.follow_events()
    if protocol == "pcp":
        # RFC 6887 §8.5 allows 2 s of disagreement between the clocks: an epoch going from 1 s back to 0 is
        # no reboot. A router up for seconds only (this test alone, on a fresh lab) first runs past that.
        reply = lab.probe_natpmp()
        assert reply is not None
        time.sleep(max(0.0, 3.0 - reply.epoch))
    lab.reset_router()  # restart without its lease file: the router forgets every mapping, epoch 0
    restarted = time.monotonic()
    # PCP/NAT-PMP see the epoch go back; UPnP has none and hears the router's SSDP NOTIFY instead.
    daemon.wait_event("router-reboot" if protocol == "pcp" else "nat-lost", timeout=5)
    wait_until(lambda: {("udp", 5060), ("tcp", 5060)} <= ours(lab), timeout=5 - (time.monotonic() - restarted))


def test_silently_wiped_rules_come_back_within_the_verify_interval(
    lab: Lab, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = new_daemon(lab, tmp_path, daemons, nat="verify_interval = 2").start()
    daemon.wait_ready()
    assert reaches_lan(lab, "udp", 5060, 5060)
    lab.wipe_rules()  # the router still lists the mappings but no longer forwards
    wiped = time.monotonic()
    assert not reaches_lan(lab, "udp", 5060, 5060, seconds=0.5)
    # Each mapping is re-sent within one verify interval (2 s, +10 % jitter); each probe listens 0.5 s.
    while not reaches_lan(lab, "udp", 5060, 5060, seconds=0.5):
        if time.monotonic() - wiped > 2 * 1.1 + 1.0:
            rules = lab.run("router", ["nft", "list", "chain", "inet", "filter", "miniupnpd"], timeout=10).stdout
            raise AssertionError(f"forwarding not restored within the verify interval\n{rules}\n{daemon.log()}")


@pytest.mark.parametrize("protocol", ["pcp", "natpmp", "upnp"])
def test_mapping_deleted_by_another_client_comes_back(
    lab: Lab, tmp_path: Path, daemons: list[Daemon], protocol: str
) -> None:
    daemon = new_daemon(lab, tmp_path, daemons, nat=f'verify_interval = 2\nprotocol = "{protocol}"').start()
    daemon.wait_ready()
    lab.run("lan", ["upnpc", "-u", lab.root_url, "-d", "5060", "UDP"], timeout=20, check=True)
    assert ("udp", 5060) not in ours(lab)
    wait_until(lambda: ("udp", 5060) in ours(lab), timeout=2 * 1.1 + 1)


def test_wan_address_change_is_an_event_with_old_and_new(lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = new_daemon(lab, tmp_path, daemons).start()
    daemon.wait_ready()
    daemon.follow_events()
    lab.set_wan_ip(Lab.ROUTER_WAN_ALT)
    event = daemon.wait_event("external-address-change", timeout=5)
    assert (event["old"], event["new"]) == (Lab.ROUTER_WAN, Lab.ROUTER_WAN_ALT)
    assert daemon.status()["external_ip"] == Lab.ROUTER_WAN_ALT


def test_a_pcp_only_router_gives_the_address_and_its_change(lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    """Regression (issue "The engine owns its truth"): with NAT-PMP dropped at the router, `auto` picks PCP,
    which has no address request: the address must come from the grants, and a change be noticed."""
    lab.set_pcp_only(True)
    probe = lab.run("lan", ["timeout", "2", "natpmpc", "-g", Lab.GATEWAY], timeout=20)
    assert probe.returncode != 0, "NAT-PMP still answered: the router is not PCP-only"
    daemon = new_daemon(lab, tmp_path, daemons, nat="external_ip_interval = 2").start()
    status = daemon.wait_ready()
    assert status["protocol"] == "pcp"
    wait_until(lambda: daemon.status()["external_ip"] == Lab.ROUTER_WAN, timeout=5)
    shown = lab.run("lan", [AUTONAT, "nat_map", "status", "--socket", str(daemon.socket_path)], timeout=20)
    assert f"Nat Type: PCP, ExtIP: {Lab.ROUTER_WAN}" in shown.stdout, shown.stdout
    daemon.follow_events()
    lab.set_pcp_only(False)  # the lab checks a WAN change with NAT-PMP; our daemon never asks it (probed out)
    lab.set_wan_ip(Lab.ROUTER_WAN_ALT)
    lab.set_pcp_only(True)
    event = daemon.wait_event("external-address-change", timeout=5)
    assert (event["old"], event["new"]) == (Lab.ROUTER_WAN, Lab.ROUTER_WAN_ALT)
    assert daemon.status()["external_ip"] == Lab.ROUTER_WAN_ALT


def test_sigterm_removes_non_sticky_mappings_within_2_s(lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = new_daemon(lab, tmp_path, daemons).start()
    daemon.wait_ready()
    assert request(daemon.socket_path, {"cmd": "add", "port": 7020, "proto": "tcp", "sticky": True})["ok"]
    stopped = time.monotonic()
    daemon.stop(signal.SIGTERM)
    wait_until(lambda: not {("udp", 5060), ("tcp", 5060)} & ours(lab), timeout=2 - (time.monotonic() - stopped))
    assert daemon.process is not None and daemon.process.returncode == 0
    assert ("tcp", 7020) in ours(lab), "a sticky mapping must survive a clean shutdown"
    # ... and be re-established (adopted) at the next start, then removable.
    again = new_daemon(lab, tmp_path, daemons).start()
    status = again.wait_ready()
    assert any(m["port"] == 7020 and m["sticky"] for m in status["mappings"])
    assert request(again.socket_path, {"cmd": "del", "port": 7020, "proto": "tcp"})["ok"]
    assert ("tcp", 7020) not in ours(lab)


def test_nonat_and_nonatmap(lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    nonat = new_daemon(lab, tmp_path / "a", daemons).start("--nonat")
    nonat.wait_socket()
    result = lab.run("lan", [AUTONAT, "nat_map", "status", "--socket", str(nonat.socket_path)], timeout=20)
    assert result.stdout.strip() == "NAT is disabled."
    assert not {("udp", 5060), ("tcp", 5060)} & ours(lab)
    nonat.stop()
    nomap = new_daemon(lab, tmp_path / "b", daemons).start("--nonatmap")
    nomap.wait_socket()
    wait_until(lambda: nomap.status()["external_ip"] == Lab.ROUTER_WAN, timeout=5)
    assert nomap.status()["mapping_enabled"] is False
    assert not {("udp", 5060), ("tcp", 5060)} & ours(lab)


def test_twenty_sigkills_leave_exactly_the_desired_mappings(lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    rng = random.Random(20261123)
    pool = list(range(7100, 7108))
    must_have: set[int] = set()  # acknowledged sticky adds, not deleted since
    must_not: set[int] = set()  # acknowledged deletes / non-sticky adds of a killed run
    for _ in range(20):
        daemon = new_daemon(lab, tmp_path, daemons).start()
        daemon.wait_ready(timeout=15)
        kill_at = time.monotonic() + rng.uniform(0.0, 0.4)
        while time.monotonic() < kill_at:
            port = rng.choice(pool)
            if rng.random() < 0.6:
                sticky = rng.random() < 0.5
                reply = request(daemon.socket_path, {"cmd": "add", "port": port, "proto": "udp", "sticky": sticky})
                if reply["ok"]:
                    (must_have.add if sticky else must_have.discard)(port)
                    (must_not.discard if sticky else must_not.add)(port)
            else:
                reply = request(daemon.socket_path, {"cmd": "del", "port": port, "proto": "udp"})
                if reply["ok"]:
                    must_have.discard(port)
                    must_not.add(port)
        daemon.stop(signal.SIGKILL)
    final = new_daemon(lab, tmp_path, daemons).start()
    status = final.wait_ready(timeout=15)
    desired = {(m["proto"], m["port"]) for m in status["mappings"]}
    on_router = {entry for entry in ours(lab) if entry[1] in pool or entry[1] == 5060}
    assert on_router == desired, f"router {sorted(on_router)} != desired {sorted(desired)}"
    assert {("udp", p) for p in must_have} <= desired
    assert not {("udp", p) for p in must_not} & desired


def test_start_does_not_wait_for_a_dead_router(lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    lab.stop_router()
    daemon = new_daemon(lab, tmp_path, daemons).start()
    daemon.wait_socket(timeout=3)
    assert time.monotonic() - daemon.started_at < 3
    assert daemon.status()["state"] == "discovering"
    lab.start_router()
    # Discovery retries with back-off (1, 2, 5 s ...): the mappings follow the router's return.
    wait_until(lambda: {("udp", 5060), ("tcp", 5060)} <= ours(lab), timeout=10)
