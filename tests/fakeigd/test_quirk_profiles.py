"""Each quirk profile of tests/fakes/quirks.py as a regression case: against the router that profile
plays, autonat's one-shot clients and its engine do the right thing (map, renew, delete, the external
address), and every error code the router answers is counted in `autonat_router_errors_total`.

The engine runs in the client namespace (tests/fakeigd/engine_driver.py) with 0.5 s request deadlines;
"drops mappings after a minute" is shown with a fake that drops them after 2 s and an engine that
verifies every second.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from autonat.aio.upnp import alternative_ports
from autonat.proto.types import Transport
from autonat.state import host_secret
from tests.fakeigd.conftest import FakeNet, RunningQuirk
from tests.fakes.igd_server import DROP_AFTER, FORCED_LEASE
from tests.fakes.quirks import BY_NAME, PROFILES, Profile

PORT = 5000
ASKED = 600  # the lease engine_driver.py asks for


def profiles(*names: str) -> pytest.MarkDecorator:
    chosen = [BY_NAME[name] for name in names] if names else list(PROFILES)
    return pytest.mark.parametrize("quirk_router", chosen, indirect=True, ids=str)


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one series of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in metrics.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match[1].split(","))) == wanted:
            return float(match[2])
    return 0.0


def expected_port(fakenet: FakeNet, profile: Profile) -> int:
    if not profile.moved:
        return PORT
    return next(alternative_ports(host_secret(fakenet.tmp / "state"), Transport.UDP, PORT))


def events(run: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [event for event in run["events"] if event["event"] == kind]


@profiles()
def test_the_engine_maps_renews_and_deletes_through_the_quirk(fakenet: FakeNet, quirk_router: RunningQuirk) -> None:
    profile = quirk_router.profile
    run = fakenet.engine(renew=True)
    kinds = [event["event"] for event in run["events"]]
    if profile.maps:
        [discovered] = events(run, "discovered")
        assert discovered["protocol"] == profile.protocol
        add = events(run, "nat-add")[0]
        assert (add["protocol"], add["external_ip"]) == (profile.protocol, profile.external_ip), add
        assert add["external_port"] == expected_port(fakenet, profile)
        assert add["lease"] == (ASKED if profile.lease is None else profile.lease)
        assert run["status"]["external_ip"] == profile.external_ip
        # Renewed on the same port, then deleted at stop: the router confirmed it (nat-del).
        renew = events(run, "nat-renew")
        assert renew and renew[0]["external_port"] == add["external_port"], kinds
        assert "nat-error" not in kinds and "nat-del" in kinds, kinds
        if profile.igd is not None:
            assert f"DELETED UDP {add['external_port']}" in quirk_router.requests()
    else:
        assert "nat-add" not in kinds, kinds
    # Every code the router answered on the way, handled or final, is one series per code.
    for protocol, code in profile.codes:
        assert sample(run["metrics"], "autonat_router_errors_total", protocol=protocol, code=str(code)) >= 1, (
            protocol,
            code,
        )


@profiles("always_725")
def test_725_even_for_a_permanent_lease_is_one_final_refusal(fakenet: FakeNet, quirk_router: RunningQuirk) -> None:
    run = fakenet.engine()
    [error] = events(run, "nat-error")[:1]
    assert error["error_code"] == 725 and "even to a permanent lease" in error["last_error"]
    # One finite lease, one permanent, then nothing more: no loop over 16 attempts.
    assert [line for line in quirk_router.requests() if line.startswith("ADD")] == [
        f"ADD UDP {PORT} -> {PORT} lease {ASKED}",
        f"ADD UDP {PORT} -> {PORT} lease 0",
    ]
    result = fakenet.autonat("map", "add", str(PORT), "udp", "--protocol", "upnp", "--timeout", "0.5")
    assert result.code == 5 and len(result.error_lines) == 1 and "UPnP error 725" in result.error_lines[0]


@profiles("external_zero")
def test_a_router_without_a_wan_address_maps_nothing_and_says_why(fakenet: FakeNet, quirk_router: RunningQuirk) -> None:
    run = fakenet.engine()
    assert run["state"] == "stopped" and "no usable WAN address" in (run["status"]["last_error"] or "")
    assert run["status"]["external_ip"] is None
    assert not [line for line in quirk_router.requests() if line.startswith("ADD")]


@profiles("natpmp_no_wan")
def test_double_nat_behind_pcp_and_natpmp_is_named_not_mapped(fakenet: FakeNet, quirk_router: RunningQuirk) -> None:
    run = fakenet.engine()
    [error] = events(run, "nat-error")[:1]
    assert "double NAT" in error["last_error"] and "10.0.0.2" in error["last_error"]
    result = fakenet.autonat("probe", "--json", "--timeout", "0.5")
    natpmp = result.json()["protocols"]["natpmp"]
    assert natpmp["available"] is False and natpmp["result"] == 3 and "NAT-PMP result 3" in natpmp["reason"]


@profiles("natpmp_no_anonymous_port", "natpmp_lease_forever")
def test_natpmp_suggests_the_internal_port_and_caps_endless_leases(
    fakenet: FakeNet, quirk_router: RunningQuirk
) -> None:
    """RouterOS refuses a suggested port of 0 (P5): autonat suggests the internal port and gets it. A
    lease of 2**32-1 s (G1) is taken as a day, and the CLI warns."""
    result = fakenet.autonat("map", "add", str(PORT), "udp", "--protocol", "natpmp", "--json", "--timeout", "0.5")
    assert result.code == 0, result.stderr
    assert result.json()["external_port"] == PORT
    forever = quirk_router.profile.name == "natpmp_lease_forever"
    assert result.json()["lifetime"] == (86400 if forever else 7200)
    assert ("treating it as 86400 s" in result.stderr) is forever
    assert fakenet.autonat("map", "del", str(PORT), "udp", "--protocol", "natpmp", "--timeout", "0.5").code == 0


@profiles("several_wan", "dslforum", "ssdp_all_first_only", "multicast_only", "other_port")
def test_discovery_finds_the_usable_service(fakenet: FakeNet, quirk_router: RunningQuirk) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--json", "--timeout", "1")
    assert result.code == 0, result.stderr
    upnp = result.json()["protocols"]["upnp"]
    assert upnp["root_url"].endswith("/rootDesc.xml")  # never the WFADevice description (S6)
    name = quirk_router.profile.name
    if name == "several_wan":  # the connected PPP service, not the better-ranked IP one that is down
        assert upnp["service_type"] == "urn:schemas-upnp-org:service:WANPPPConnection:1"
        assert upnp["control_url"].endswith("/ctl/PPPConn")
        assert upnp["skipped_services"] == [
            {"service_type": "urn:schemas-upnp-org:service:WANIPConnection:1", "connection_status": "Disconnected"}
        ]
    elif name == "dslforum":  # the fake refuses any SOAP call not in the dslforum namespace
        assert upnp["service_type"] == "urn:dslforum-org:service:WANIPConnection:1"
        assert upnp["connection_status"] == "Connected"
    assert upnp["external_ip"] == "203.0.113.9"


@profiles("drop_after")
def test_a_router_that_drops_mappings_gets_them_back_at_the_next_verification(
    fakenet: FakeNet, quirk_router: RunningQuirk
) -> None:
    run = fakenet.engine(verify_interval=1, lost=DROP_AFTER + 3)
    kinds = [event["event"] for event in run["events"] if event["event"].startswith("nat-")]
    assert kinds[:3] == ["nat-add", "nat-lost", "nat-add"], kinds
    log = quirk_router.requests()
    dropped = log.index(f"DROPPED UDP {PORT}")
    assert f"MAPPED UDP {PORT} -> {PORT} lease {ASKED}" in log[dropped:]  # made again after the drop
    assert f"DELETED UDP {PORT}" in log  # and removed at stop


@profiles("lease_day")
def test_a_router_that_holds_every_mapping_a_day_still_gets_it_deleted(
    fakenet: FakeNet, quirk_router: RunningQuirk
) -> None:
    added = fakenet.autonat("map", "add", str(PORT), "udp", "--protocol", "upnp", "--lifetime", "600", "--json")
    assert added.code == 0 and added.json()["lifetime"] == 600, added.stderr
    listing = fakenet.autonat("map", "list", "--json", "--timeout", "1")
    [entry] = listing.json()
    assert entry["lease"] == FORCED_LEASE  # the router's own lease, whatever was asked
    assert fakenet.autonat("map", "del", str(PORT), "udp", "--protocol", "upnp").code == 0
    assert f"DELETED UDP {PORT}" in quirk_router.requests()
