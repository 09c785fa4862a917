"""--gateway is a requirement for every protocol (issue "A service for a real network"): an IGD that is
not that gateway is skipped, with the reason in the output, never used quietly."""

from __future__ import annotations

import subprocess

import pytest

from tests.fakeigd.conftest import GATEWAY, FakeNet, RunningIgd

OTHER = "10.77.0.3"  # a second address on the gateway host: the one the user names


@pytest.mark.parametrize("fake_igd", ["normal"], indirect=True)
def test_an_igd_that_is_not_the_named_gateway_is_skipped_with_the_reason(
    fakenet: FakeNet, fake_igd: RunningIgd
) -> None:
    command = ["ip", "-n", fakenet.gateway_ns, "addr", "add", f"{OTHER}/24", "dev", "eth0"]
    added = subprocess.run(command, capture_output=True, timeout=10, check=False)
    assert added.returncode == 0, added.stderr
    try:
        default = fakenet.autonat("probe", "--protocol", "upnp", "--timeout", "1", "--json")
        assert default.code == 0 and default.json()["protocols"]["upnp"]["available"] is True  # .1 is the gateway
        asked_before = len(fake_igd.requests())
        pinned = fakenet.autonat("probe", "--protocol", "upnp", "--gateway", OTHER, "--timeout", "1", "--json")
        assert pinned.code == 7, pinned.stdout
        upnp = pinned.json()["protocols"]["upnp"]
        assert upnp["available"] is False
        reasons = " ".join(c["reason"] for c in upnp["candidates"]) + upnp["reason"]
        assert f"not the gateway {OTHER} asked for" in reasons, upnp
        assert not [r for r in fake_igd.requests()[asked_before:] if "ctl/IPConn" in r]  # nothing asked of it
        mapped = fakenet.autonat(
            "map", "add", "5000", "udp", "--protocol", "upnp", "--gateway", OTHER, "--timeout", "1"
        )
        assert mapped.code != 0 and f"not the gateway {OTHER} asked for" in mapped.stderr, mapped.stderr
    finally:
        command = ["ip", "-n", fakenet.gateway_ns, "addr", "del", f"{OTHER}/24", "dev", "eth0"]
        subprocess.run(command, capture_output=True, timeout=10, check=False)
    assert GATEWAY != OTHER
