"""The UPnP client against a fake IGD: each quirk the real router cannot show, with its expected outcome,
bounded in time (every call has a deadline) and memory (peak RSS of the client process)."""

from __future__ import annotations

import itertools

import pytest

from autonat.aio.upnp import alternative_ports
from autonat.proto.types import Transport
from autonat.state import host_secret
from tests.fakeigd.conftest import GATEWAY, FakeNet, RunningIgd

ROOT_URL = f"http://{GATEWAY}:5000/rootDesc.xml"
MEMORY_CAP_KB = 120_000  # the interpreter with httpx loaded is ~45 MB; a 10 MB body must not add to it


def scenario(name: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("fake_igd", [name], indirect=True)


def mapped(fake: RunningIgd) -> list[str]:
    return [line for line in fake.requests() if line.startswith("MAPPED")]


@scenario("normal")
def test_probe_shows_the_igd(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--json")
    assert result.code == 0, result.stderr
    upnp = result.json()["protocols"]["upnp"]
    assert upnp["available"] is True
    assert upnp["root_url"] == ROOT_URL
    assert (upnp["friendly_name"], upnp["manufacturer"], upnp["model_name"]) == (
        "Fake IGD",
        "autonat tests",
        "quirk box",
    )
    assert upnp["external_ip"] == "203.0.113.9"
    assert result.json()["selected"] == "upnp"


@scenario("normal")
def test_add_list_delete(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    added = fakenet.autonat("map", "add", "5000", "udp", "--protocol", "upnp", "--lifetime", "3600", "--json")
    assert added.code == 0, added.stderr
    assert added.json()["external_port"] == 5000 and added.json()["lifetime"] == 3600
    assert mapped(fake_igd) == ["MAPPED UDP 5000 -> 5000 lease 3600"]
    listing = fakenet.autonat("map", "list", "--root-url", ROOT_URL, "--json")
    assert listing.code == 0, listing.stderr
    [entry] = listing.json()
    assert entry["internal_client"] == "10.77.0.2" and entry["ours"] is True
    deleted = fakenet.autonat("map", "del", "5000", "udp", "--protocol", "upnp")
    assert deleted.code == 0, deleted.stderr
    assert "DELETED UDP 5000" in fake_igd.requests()


@scenario("only_permanent")
def test_725_takes_a_permanent_lease_only_after_the_external_ip_checked_out(
    fakenet: FakeNet, fake_igd: RunningIgd
) -> None:
    result = fakenet.autonat("map", "add", "5000", "udp", "--protocol", "upnp", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["lifetime"] == 0
    assert "only grants permanent UPnP leases" in result.stderr
    assert mapped(fake_igd) == ["MAPPED UDP 5000 -> 5000 lease 0"]


@scenario("lease_402")
def test_402_on_a_lease_then_on_zero_ends_at_604800(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("map", "add", "5000", "tcp", "--protocol", "upnp", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["lifetime"] == 604800
    assert mapped(fake_igd) == ["MAPPED TCP 5000 -> 5000 lease 604800"]


@scenario("conflict_501")
def test_501_is_treated_as_a_conflict_once(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("map", "add", "5000", "udp", "--protocol", "upnp", "--json")
    assert result.code == 0, result.stderr
    expected = next(alternative_ports(host_secret(fakenet.tmp / "state"), Transport.UDP, 5000))
    assert result.json()["external_port"] == expected
    assert mapped(fake_igd) == [f"MAPPED UDP {expected} -> 5000 lease 7200"]


@scenario("conflict_718_twice")
def test_718_twice_walks_the_deterministic_port_sequence(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("map", "add", "5000", "udp", "--protocol", "upnp", "--json")
    assert result.code == 0, result.stderr
    expected = list(itertools.islice(alternative_ports(host_secret(fakenet.tmp / "state"), Transport.UDP, 5000), 2))[1]
    assert result.json()["external_port"] == expected


@scenario("same_port_724")
def test_724_retries_with_external_equal_internal(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("map", "add", "5000", "udp", "--external-port", "6000", "--protocol", "upnp", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["external_port"] == 5000


@pytest.mark.parametrize(
    ("fake_igd", "fragment"),
    [
        ("wildcard_727", "a fixed port is impossible via UPnP"),
        ("policy_606", "router's policy forbids this mapping"),
        ("table_full_728", "mapping table is full"),
    ],
    indirect=["fake_igd"],
)
def test_final_refusals_are_one_line(fakenet: FakeNet, fake_igd: RunningIgd, fragment: str) -> None:
    result = fakenet.autonat("map", "add", "5000", "udp", "--protocol", "upnp")
    assert result.code == 5
    assert len(result.error_lines) == 1 and fragment in result.error_lines[0]
    assert mapped(fake_igd) == []


@scenario("external_zero")
def test_external_ip_zero_means_no_usable_wan(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--json")
    assert result.code == 7
    upnp = result.json()["protocols"]["upnp"]
    assert upnp["available"] is False and "no usable WAN address" in upnp["reason"]


@pytest.mark.parametrize("fake_igd", ["location_loopback", "location_other_host"], indirect=True)
def test_forged_locations_are_never_fetched(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--timeout", "1", "--json")
    assert result.code == 7
    assert result.json()["protocols"]["upnp"]["available"] is False
    assert result.seconds < 4
    assert any("LOCATION" in reason for reason in result.json()["dropped"])
    assert not [line for line in fake_igd.requests() if line.startswith("HTTP")]


@pytest.mark.parametrize(
    ("fake_igd", "fragment"),
    [("entity_bomb", "description is unusable"), ("huge_body", "cap")],
    indirect=["fake_igd"],
)
def test_hostile_descriptions_are_refused_in_bounded_time_and_memory(
    fakenet: FakeNet, fake_igd: RunningIgd, fragment: str
) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--json")
    assert result.code == 7
    reason = result.json()["protocols"]["upnp"]["reason"]
    assert fragment in reason
    assert result.seconds < 5
    assert 0 < result.max_rss_kb < MEMORY_CAP_KB


@scenario("drip")
def test_a_dripping_server_is_cut_off_at_the_deadline(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--timeout", "2", "--json")
    assert result.code == 7
    assert "within 2 s" in result.json()["protocols"]["upnp"]["reason"]
    assert result.seconds < 5


@pytest.mark.parametrize("fake_igd", ["multicast_only", "other_port"], indirect=True)
def test_multicast_only_and_other_source_port_are_still_found(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["protocols"]["upnp"]["root_url"] == ROOT_URL
