"""`autonat doctor` names the router quirks a fake plays (docs/QUIRKS.md), and still judges right: every
quirk profile of tests/fakes/quirks.py, by its ID in `doctor --json`'s findings."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakeigd.conftest import GATEWAY, FakeNet, RunningIgd, RunningQuirk
from tests.fakes.quirks import PROFILES


def doctor(fakenet: FakeNet, *, quick: bool = True) -> tuple[int, dict[str, Any]]:
    # Without a PCP/NAT-PMP (or UPnP) server on the fake gateway, that probe ends at once (ICMP port
    # unreachable). The full run waits doctor's PERSISTENCE (12 s) before it looks again.
    result = fakenet.autonat(
        "doctor", *(["--quick"] if quick else []), "--json", "--gateway", GATEWAY, "--timeout", "0.5", timeout=60
    )
    assert result.stdout, result.stderr
    return result.code, result.json()


def quirks(data: dict[str, Any]) -> set[str]:
    return {f["quirk"] for f in data["findings"] if f["quirk"]}


@pytest.mark.parametrize(
    ("fake_igd", "quirk", "lease"), [("only_permanent", "U1", 0), ("lease_402", "U3", 604800)], indirect=["fake_igd"]
)
def test_a_router_refusing_leases_is_named_and_still_usable(
    fakenet: FakeNet, fake_igd: RunningIgd, quirk: str, lease: int
) -> None:
    code, data = doctor(fakenet)
    assert code == 0, data["findings"]  # a warning, not a failure: autonat works with it
    assert quirk in quirks(data)
    trial = data["measurements"]["trials"][0]
    assert trial["granted_lease"] == lease and trial["deleted"] is True  # and what it got is removed


@pytest.mark.parametrize("fake_igd", ["conflict_501"], indirect=True)
def test_a_501_on_conflict_is_named(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    code, data = doctor(fakenet)
    assert code == 0 and "U4" in quirks(data), data["findings"]


@pytest.mark.parametrize("fake_igd", ["external_zero"], indirect=True)
def test_a_router_without_a_wan_address_is_named(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    code, data = doctor(fakenet)
    assert code == 1 and "U8" in quirks(data), data["findings"]


@pytest.mark.parametrize(
    "quirk_router",
    [pytest.param(p, marks=pytest.mark.slow) if p.doctor_full else p for p in PROFILES],
    indirect=True,
    ids=str,
)
def test_every_quirk_profile_is_named_by_its_id(fakenet: FakeNet, quirk_router: RunningQuirk) -> None:
    profile = quirk_router.profile
    code, data = doctor(fakenet, quick=not profile.doctor_full)
    named = [f for f in data["findings"] if f["quirk"] == profile.quirk]
    assert quirks(data) == {profile.quirk}, data["findings"]  # that quirk, and no other
    assert code == profile.doctor_status, data["findings"]
    for finding in named:  # the one-sentence reason, and the fix where the user has one to make
        assert finding["summary"] and (finding["verdict"] == "ok" or finding["fix"]), finding
    assert all(trial["deleted"] is not False for trial in data["measurements"]["trials"])  # nothing left behind


@pytest.mark.parametrize("fake_igd", ["normal"], indirect=True)
def test_a_well_behaved_router_is_named_no_quirk(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    code, data = doctor(fakenet)
    assert code == 0 and quirks(data) == set(), data["findings"]
    assert data["measurements"]["ssdp"]["unicast_answered"] is True
