"""UPnP IGD against the real router (miniupnpd) in the lab."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import autonat, autonat_json, listed, reaches_lan

pytestmark = pytest.mark.lab
# The router's SSDP responder made silent: M-SEARCHes dropped before miniupnpd sees them (no ICMP either).
SILENT_SSDP = (
    "add table inet autonat_test_silence; "
    "add chain inet autonat_test_silence input { type filter hook input priority -10; }; "
    "add rule inet autonat_test_silence input udp dport 1900 drop"
)
IGD_SERVER = str(Path(__file__).parents[1] / "fakes" / "igd_server.py")


def test_probe_lists_upnp_with_root_url_and_device(lab: Lab, state_dir: Path) -> None:
    data = autonat_json(lab, state_dir, "probe")
    upnp = data["protocols"]["upnp"]
    assert upnp["available"] is True
    assert upnp["root_url"] == lab.root_url
    assert upnp["friendly_name"] and upnp["manufacturer"] and upnp["model_name"]
    assert upnp["external_ip"] == Lab.ROUTER_WAN
    assert upnp["service_type"].startswith("urn:schemas-upnp-org:service:WANIPConnection:")
    assert data["selected"] == "pcp"  # PCP > NAT-PMP > UPnP among those that work
    only = autonat_json(lab, state_dir, "probe", "--protocol", "upnp")
    assert only["selected"] == "upnp" and list(only["protocols"]) == ["upnp"]


def test_probe_with_root_url_skips_discovery(lab: Lab, state_dir: Path) -> None:
    data = autonat_json(lab, state_dir, "probe", "--protocol", "upnp", "--root-url", lab.root_url)
    assert data["protocols"]["upnp"]["available"] is True


def test_map_add_tcp_forwards_and_del_removes(lab: Lab, state_dir: Path) -> None:
    mapping = autonat_json(lab, state_dir, "map", "add", "5062", "tcp", "--protocol", "upnp")
    assert (mapping["protocol"], mapping["external_ip"], mapping["external_port"]) == ("upnp", Lab.ROUTER_WAN, 5062)
    try:
        assert listed(lab, "tcp", 5062), "upnpc does not list the mapping"
        assert reaches_lan(lab, "tcp", 5062, 5062), "a connection from wan did not reach lan"
    finally:
        autonat_json(lab, state_dir, "map", "del", "5062", "tcp", "--protocol", "upnp")
    assert not listed(lab, "tcp", 5062)
    assert not reaches_lan(lab, "tcp", 5062, 5062, seconds=1.0)


def test_map_list_shows_mappings_of_other_clients(lab: Lab, state_dir: Path) -> None:
    lab.run(
        "lan",
        ["upnpc", "-u", lab.root_url, "-e", "by upnpc", "-a", Lab.LAN_ADDRESS, "7001", "7001", "UDP", "600"],
        timeout=20,
        check=True,
    )
    lab.run("lan", ["natpmpc", "-g", Lab.GATEWAY, "-a", "7002", "7002", "tcp", "600"], timeout=20, check=True)
    ours = autonat_json(lab, state_dir, "map", "add", "7003", "udp", "--protocol", "upnp")
    try:
        rows = autonat_json(lab, state_dir, "map", "list")
        by_port = {(row["transport"], row["external_port"]): row for row in rows}
        assert by_port[("udp", 7001)]["description"] == "by upnpc" and not by_port[("udp", 7001)]["ours"]
        assert by_port[("tcp", 7002)]["description"].startswith("NAT-PMP") and not by_port[("tcp", 7002)]["ours"]
        assert by_port[("udp", ours["external_port"])]["ours"] is True
        assert all(row["internal_client"] == Lab.LAN_ADDRESS for row in by_port.values())
    finally:
        lab.run("lan", ["upnpc", "-u", lab.root_url, "-d", "7001", "UDP"], timeout=20)
        lab.run("lan", ["natpmpc", "-g", Lab.GATEWAY, "-a", "7002", "0", "tcp", "0"], timeout=20)
        autonat(lab, state_dir, "map", "del", "7003", "udp", "--protocol", "upnp")


def test_secure_mode_refusal_names_the_upnp_error(lab: Lab, state_dir: Path) -> None:
    # The lab router's allow rule covers ports 1024-65535 only.
    result = autonat(lab, state_dir, "map", "add", "80", "tcp", "--protocol", "upnp")
    assert result.returncode == 5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "UPnP error 606" in lines[0], result.stderr


def test_deleting_an_absent_mapping_succeeds(lab: Lab, state_dir: Path) -> None:
    assert autonat(lab, state_dir, "map", "del", "7999", "udp", "--protocol", "upnp").returncode == 0


def test_a_port_held_by_another_host_moves_our_mapping_elsewhere(lab: Lab, state_dir: Path) -> None:
    # The router's own LAN address (another host, as far as miniupnpd is concerned) holds 7200/udp.
    lab.run(
        "router",
        ["upnpc", "-u", lab.root_url, "-e", "other host", "-a", Lab.GATEWAY, "7200", "7200", "UDP", "600"],
        timeout=20,
        check=True,
    )
    try:
        mapping = autonat_json(lab, state_dir, "map", "add", "7200", "udp", "--protocol", "upnp")
        # 718 ConflictInMappingEntry -> AddAnyPortMapping (the IGD:2 SCPD lists it): the router picks the port.
        assert mapping["external_port"] != 7200
        assert listed(lab, "udp", mapping["external_port"])
        assert autonat(lab, state_dir, "map", "del", "7200", "udp", "--protocol", "upnp").returncode == 0
        assert not listed(lab, "udp", mapping["external_port"])
        rows = autonat_json(lab, state_dir, "map", "list")
        assert any(r["external_port"] == 7200 and r["internal_client"] == Lab.GATEWAY for r in rows), (
            "not ours to delete"
        )
    finally:
        lab.run("router", ["upnpc", "-u", lab.root_url, "-d", "7200", "UDP"], timeout=20)


def test_a_hostile_neighbour_neither_wins_nor_hides_why_it_was_discarded(lab: Lab, state_dir: Path) -> None:
    """A host on the LAN (here: beside us on the lan host, our address as its LOCATION) answers SSDP too
    and serves a 100 MB header line. The real router still wins; with the router silent (its SSDP
    dropped in the router: a stopped daemon would refuse SSDP at once, which ends discovery before the
    neighbour is heard, see aio/ssdp.py; and loss on the LAN link would drop our own multicast looped back
    to the neighbour as well, since the lab's loss rule sits on the LAN host's ingress), the one-line error
    names the neighbour's offence, within the deadline."""
    log = state_dir.parent / "neighbour.log"
    neighbour = lab.popen(
        "lan",
        [sys.executable, IGD_SERVER, "huge_header_line", Lab.LAN_ADDRESS, str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    hostile = f"http://{Lab.LAN_ADDRESS}:{Lab.HTTP_PORT}/rootDesc.xml"
    try:
        assert neighbour.stdout is not None and neighbour.stdout.readline().strip() == "ready"
        data = autonat_json(lab, state_dir, "probe", "--protocol", "upnp")
        upnp = data["protocols"]["upnp"]
        assert upnp["available"] is True and upnp["root_url"] == lab.root_url
        outcomes = {candidate["location"]: candidate["outcome"] for candidate in upnp["candidates"]}
        assert outcomes[lab.root_url] == "usable"
        assert outcomes.get(hostile, "failed") in ("failed", "unfinished")  # never chosen, whenever it answered
        lab.run("router", ["nft", SILENT_SSDP], check=True)
        started = time.monotonic()
        result = autonat(lab, state_dir, "probe", "--protocol", "upnp", "--timeout", "2")
        assert time.monotonic() - started < 2 * 1.1 + 1  # the deadline +10 %, plus the process's start
        assert result.returncode == 7
        [line] = result.stderr.strip().splitlines()
        assert f"router's reply headers from {hostile} exceed 16384 bytes" in line, line
    finally:
        neighbour.kill()
        neighbour.wait(timeout=10)
        lab.run("router", ["nft", "delete table inet autonat_test_silence"])
