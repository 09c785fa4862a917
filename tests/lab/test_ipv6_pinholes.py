"""IPv6 firewall pinholes against the real router (miniupnpd 2.3.1 with IPv6 and WANIPv6FirewallControl).

The lab's LAN host has a stable address (LAN6_ADDRESS) and prefers a temporary one (LAN6_TEMPORARY) as
its source; the router's ip6 firewall drops unsolicited inbound traffic. A pinhole is for the stable
address and must be asked for from it (docs/QUIRKS.md U16): these tests prove that autonat's requests
leave from it, and that a datagram from the wan host gets in only while the pinhole exists.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import AUTONAT, autonat, autonat_json
from tests.lab.daemon_helpers import Daemon, request, write_config
from tests.lab.test_lab_ipv6 import arrives

pytestmark = pytest.mark.lab

PORT = 5060
ROOT6 = f"http://[{Lab.GATEWAY6}]:{Lab.HTTP_PORT}/rootDesc.xml"


def pinhole_rule(lab: Lab, port: int = PORT) -> bool:
    """Does the router's miniupnpd chain hold an accept rule for our stable address and `port`? (miniupnpd
    2.3.1 writes the destination as raw bytes: `th dport 5060 @nh,192,128 0x20010db8...0010 ... accept`.)"""
    rules = lab.run("router", ["nft", "list", "chain", "inet", "filter", "miniupnpd"], timeout=10).stdout
    address = "0x" + IPv6Address(Lab.LAN6_ADDRESS).packed.hex()
    return any(address in line and f"dport {port} " in line for line in rules.splitlines())


def upnpc_knows(lab: Lab, unique_id: int) -> str:
    """`upnpc -6 -K ID` (GetPinholePackets) from the LAN host, which sends from its temporary address: for
    a pinhole the router holds for our stable address it answers 606 (not the asker's), for an ID it does
    not hold 402 (docs/QUIRKS.md U18). Returns the code upnpc printed."""
    out = lab.run("lan", ["upnpc", "-6", "-u", ROOT6, "-K", str(unique_id)], timeout=20)
    text = out.stdout + out.stderr
    match = re.search(r"failed with code (\d+)", text)
    if match:
        return match.group(1)
    assert re.search(r"[Pp]ackets", text), text
    return "ok"


def close_all(lab: Lab, state_dir: Path, port: int = PORT) -> None:
    """Leave no pinhole of `port` behind, whatever a test did (UPnP deletes by port: U19)."""
    autonat(lab, state_dir, "map", "del", str(port), "udp", "--family", "6", "--protocol", "upnp", timeout=30)


def test_probe_shows_the_ipv6_gateway_pcp_and_upnp(lab: Lab, state_dir: Path) -> None:
    data = autonat_json(lab, state_dir, "probe")
    ipv6 = data["ipv6"]
    assert ipv6["gateway"] == Lab.GATEWAY6
    assert ipv6["local_address"] == Lab.LAN6_ADDRESS  # the stable address, not the kernel's choice
    assert ipv6["kernel_source"] == Lab.LAN6_TEMPORARY
    assert ipv6["protocols"]["pcp"]["available"], ipv6
    upnp = ipv6["protocols"]["upnp"]
    assert upnp["available"], ipv6
    assert upnp["service_type"] == "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
    assert upnp["root_url"] == ROOT6 and upnp["inbound_pinhole_allowed"] is True
    assert ipv6["selected"] == "pcp"
    assert data["selected"] == "pcp" and data["external_ip"] == Lab.ROUTER_WAN  # IPv4 as before
    text = autonat(lab, state_dir, "probe")
    assert text.returncode == 0, text.stderr
    assert f"IPv6 gateway:   {Lab.GATEWAY6}" in text.stdout
    assert f"IPv6 address:   {Lab.LAN6_ADDRESS} (the kernel would send from {Lab.LAN6_TEMPORARY})" in text.stdout
    assert re.search(r"^  pcp +yes ", text.stdout.split("IPv6 gateway")[1], re.M), text.stdout
    assert re.search(r"^  upnp +yes .*WANIPv6FirewallControl", text.stdout.split("IPv6 gateway")[1], re.M)


@pytest.mark.parametrize("protocol", ["pcp", "upnp"])
def test_a_pinhole_lets_in_only_while_it_exists(lab: Lab, state_dir: Path, protocol: str) -> None:
    try:
        assert not arrives(lab, PORT, Lab.LAN6_ADDRESS)  # before: the firewall drops it
        added = autonat_json(lab, state_dir, "map", "add", str(PORT), "udp", "--family", "6", "--protocol", protocol)
        assert added["family"] == 6 and added["protocol"] == protocol
        assert added["internal_address"] == added["external_ip"] == Lab.LAN6_ADDRESS
        assert added["external_port"] == PORT
        assert pinhole_rule(lab)
        if protocol == "upnp":
            assert isinstance(added["unique_id"], int)
            assert upnpc_knows(lab, added["unique_id"]) == "606"  # held, for our stable address
        assert arrives(lab, PORT, Lab.LAN6_ADDRESS)  # while it exists: in
        delete = ["map", "del", str(PORT), "udp", "--family", "6", "--protocol", protocol]
        if protocol == "upnp":
            delete += ["--unique-id", str(added["unique_id"])]
        deleted = autonat_json(lab, state_dir, *delete)
        assert deleted == {
            "protocol": protocol,
            "transport": "udp",
            "internal_port": PORT,
            "deleted": True,
            "family": 6,
        }
        assert not pinhole_rule(lab)
        if protocol == "upnp":
            assert upnpc_knows(lab, added["unique_id"]) == "402"  # no such pinhole any more
        time.sleep(0.2)
        assert not arrives(lab, PORT, Lab.LAN6_ADDRESS)  # after delete: dropped again
    finally:
        close_all(lab, state_dir)


def test_map_del_of_a_upnp_pinhole_without_its_id(lab: Lab, state_dir: Path) -> None:
    """Another process made it: `map del` learns its UniqueID from the router (U19) and closes it."""
    try:
        autonat_json(lab, state_dir, "map", "add", str(PORT), "udp", "--family", "6", "--protocol", "upnp")
        assert pinhole_rule(lab)
        autonat_json(lab, state_dir, "map", "del", str(PORT), "udp", "--family", "6", "--protocol", "upnp")
        assert not pinhole_rule(lab)
    finally:
        close_all(lab, state_dir)


# --- the daemon --------------------------------------------------------------------------------------------


@pytest.fixture
def daemons(lab: Lab, tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop(signal.SIGKILL if daemon.process and daemon.process.poll() is None else signal.SIGTERM)
    close_all(lab, tmp_path / "cleanup")


def new_daemon(lab: Lab, directory: Path, daemons: list[Daemon], protocol: str = "auto") -> Daemon:
    nat = f'ipv6 = true\nipv6-protocol = "{protocol}"\nverify_interval = 2\n'
    # The IPv4 mappings of the same port beside the pinhole: one journal, two families, one port.
    mappings = '[[mapping]]\nport = 5060\ntransport = "both"\n'
    daemon = Daemon(lab, directory, write_config(directory, nat=nat, mappings=mappings))
    daemons.append(daemon)
    return daemon


def add_pinhole(daemon: Daemon, *, sticky: bool) -> dict[str, object]:
    reply = request(daemon.socket_path, {"cmd": "add", "port": PORT, "proto": "udp", "sticky": sticky, "family": 6})
    assert reply["ok"], reply
    result: dict[str, object] = reply["result"]
    assert result["state"] == "active" and result["family"] == 6, result
    return result


def wait_for(predicate: object, timeout: float, what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s\n{daemon.log()}")
        time.sleep(0.1)


def test_nat_map_add_status_and_del_of_a_pinhole(lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = new_daemon(lab, tmp_path, daemons).start()
    daemon.wait_ready()
    socket_option = ["--socket", str(daemon.socket_path)]
    added = lab.run("lan", [AUTONAT, "nat_map", "add", str(PORT), "udp", "--family", "6", *socket_option], timeout=20)
    assert added.returncode == 0 and added.stdout.strip() == f"[{Lab.LAN6_ADDRESS}]:{PORT}", added.stderr
    status = lab.run("lan", [AUTONAT, "nat_map", "status", *socket_option], timeout=20).stdout
    assert f"IPv6 pinholes (pcp, {Lab.LAN6_ADDRESS} via {Lab.GATEWAY6}):" in status, status
    assert f"{PORT},udp,0,active,pcp," in status
    assert status.count(f"{PORT},udp,0,0") == 1  # the IPv4 SIP mapping of the default config, not the pinhole
    assert arrives(lab, PORT, Lab.LAN6_ADDRESS)
    (listed,) = map_list(lab, tmp_path)
    assert (listed["internal_address"], listed["internal_port"], listed["protocol"]) == (Lab.LAN6_ADDRESS, PORT, "pcp")
    assert listed["on_router"] == "unchecked"  # PCP has no read-only question
    deleted = lab.run("lan", [AUTONAT, "nat_map", "del", str(PORT), "udp", "--family", "6", *socket_option], timeout=20)
    assert deleted.returncode == 0, deleted.stderr
    assert not pinhole_rule(lab)
    assert ipv4_mapping_kept(daemon)


def map_list(lab: Lab, directory: Path) -> list[dict[str, object]]:
    """`autonat map list --family 6 --json` of the daemon's journal in `directory`."""
    journal = str(directory / "journal.sqlite")
    rows = autonat_json(lab, directory / "cli", "map", "list", "--family", "6", "--journal", journal)
    assert isinstance(rows, list)
    return rows


def family_event(daemon: Daemon, kind: str, timeout: float) -> dict[str, object]:
    """The first `kind` event of the IPv6 side (`family` 6): the IPv4 core emits its own beside it."""
    deadline = time.monotonic() + timeout
    while True:
        event = daemon.wait_event(kind, max(0.01, deadline - time.monotonic()))
        if event.get("family") == 6:
            return event


def ipv4_mapping_kept(daemon: Daemon) -> bool:
    mappings = daemon.status()["mappings"]
    return {(m["proto"], m["port"]) for m in mappings if m["family"] == 4 and m["state"] == "active"} == {
        ("udp", PORT),
        ("tcp", PORT),
    }


@pytest.mark.parametrize("protocol", ["pcp", "upnp"])
def test_the_daemon_keeps_a_pinhole_through_a_router_restart_and_a_flush(
    lab: Lab, tmp_path: Path, daemons: list[Daemon], protocol: str
) -> None:
    daemon = new_daemon(lab, tmp_path, daemons, protocol).start()
    status = daemon.wait_ready()
    assert status["ipv6"]["protocol"] == protocol and status["ipv6"]["local_address"] == Lab.LAN6_ADDRESS
    daemon.follow_events()
    added = add_pinhole(daemon, sticky=True)
    assert added["protocol"] == protocol
    assert arrives(lab, PORT, Lab.LAN6_ADDRESS)

    lab.reset_router()  # restarted without its lease file and ruleset: it forgets every pinhole
    # PCP sees the epoch go back (an ANNOUNCE); UPnP has no epoch: the next refresh (UpdatePinhole, within
    # the 2 s verify interval) finds the ID unknown and adds the pinhole again.
    wait_for(lambda: pinhole_rule(lab), 2 * 1.1 + 5, "the pinhole re-made after the router restart", daemon)
    if protocol == "pcp":
        assert family_event(daemon, "router-reboot", 5)["gateway"] == Lab.GATEWAY6
    assert arrives(lab, PORT, Lab.LAN6_ADDRESS)

    lab.wipe_rules()  # the router's chains silently flushed: the daemon is not told
    wait_for(lambda: pinhole_rule(lab), 2 * 1.1 + 3, "the pinhole restored after the flush", daemon)
    assert arrives(lab, PORT, Lab.LAN6_ADDRESS)
    pinholes = [m for m in daemon.status()["mappings"] if m["family"] == 6]
    assert [(m["port"], m["state"], m["protocol"]) for m in pinholes] == [(PORT, "active", protocol)]
    assert ipv4_mapping_kept(daemon)
    (listed,) = map_list(lab, tmp_path)
    assert listed["on_router"] == ("present" if protocol == "upnp" else "unchecked")
    assert listed["unique_id"] == pinholes[0]["unique_id"]


@pytest.mark.parametrize("protocol", ["pcp", "upnp"])
def test_a_sigkill_leaves_no_pinhole_behind_after_restart(
    lab: Lab, tmp_path: Path, daemons: list[Daemon], protocol: str
) -> None:
    daemon = new_daemon(lab, tmp_path, daemons, protocol).start()
    daemon.wait_ready()
    add_pinhole(daemon, sticky=False)
    assert arrives(lab, PORT, Lab.LAN6_ADDRESS)
    daemon.stop(signal.SIGKILL)
    assert pinhole_rule(lab)  # what the killed run left (its lease has not run out)
    again = new_daemon(lab, tmp_path, daemons, protocol).start()
    again.wait_ready()
    # The journal names the leftover (with its UniqueID for UPnP): the next start deletes it.
    wait_for(lambda: not pinhole_rule(lab), 5, "the leftover pinhole deleted", again)
    assert not [m for m in again.status()["mappings"] if m["family"] == 6]
    time.sleep(0.2)
    assert not arrives(lab, PORT, Lab.LAN6_ADDRESS)


def test_a_pinhole_pcp_will_not_delete_is_closed_by_upnp_and_reported_so(
    lab: Lab, state_dir: Path, tmp_path: Path
) -> None:
    """docs/QUIRKS.md P8: another host secret means another PCP nonce, which miniupnpd refuses to delete
    with (NOT_AUTHORIZED); the session closes the pinhole by UPnP instead and says it used UPnP."""
    other_state = tmp_path / "other-state"
    other_state.mkdir(mode=0o700)
    try:
        added = autonat_json(lab, state_dir, "map", "add", str(PORT), "udp", "--family", "6", "--protocol", "pcp")
        assert added["protocol"] == "pcp" and pinhole_rule(lab)
        deleted = autonat_json(lab, other_state, "map", "del", str(PORT), "udp", "--family", "6", "--protocol", "pcp")
        assert deleted["deleted"] is True and deleted["protocol"] == "upnp", deleted
        assert not pinhole_rule(lab)
    finally:
        close_all(lab, state_dir)
