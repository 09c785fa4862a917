"""`autonat doctor` names the router quirks a fake IGD plays (docs/QUIRKS.md), and still judges right."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakeigd.conftest import GATEWAY, FakeNet, RunningIgd


def doctor(fakenet: FakeNet) -> tuple[int, dict[str, Any]]:
    # No PCP/NAT-PMP server on the fake gateway: those probes time out quickly; UPnP is the fake's.
    result = fakenet.autonat("doctor", "--quick", "--json", "--gateway", GATEWAY, "--timeout", "0.5", timeout=60)
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
