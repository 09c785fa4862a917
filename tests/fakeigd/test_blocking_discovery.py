"""The blocking UPnP client's SSDP discovery (aio/blocking_upnp.py) on a gateway of our own, where the fake
IGD plays the router: the same candidates, reasons and time bounds as the asyncio client's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.fakeigd.conftest import GATEWAY, FakeNet, RunningIgd

DEADLINE = 2.0
LOCATION = f"http://{GATEWAY}:5000/rootDesc.xml"
SCRIPT = """
import json, sys, time
from autonat.aio.blocking_upnp import BlockingUpnp
from autonat.aio.route import locate_router
started = time.monotonic()
upnp = BlockingUpnp(locate_router(), b"k" * 32, deadline=float(sys.argv[1]))
out = {}
try:
    found = upnp.discover()
    out["found"] = [found.root_url, str(found.external_ip)]
except Exception as exc:
    out["error"] = [type(exc).__name__, str(exc)]
out["elapsed"] = time.monotonic() - started
out["candidates"] = [c.to_dict() for c in upnp.candidates]
out["asyncio"] = "asyncio" in sys.modules
print(json.dumps(out))
"""


def discover(fakenet: FakeNet) -> dict[str, Any]:
    done = subprocess.run(
        ["ip", "netns", "exec", fakenet.client_ns, sys.executable, "-c", SCRIPT, str(DEADLINE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out: dict[str, Any] = json.loads(done.stdout)
    assert out["asyncio"] is False
    return out


@pytest.mark.parametrize("fake_igd", ["normal", "multicast_only"], indirect=True)
def test_the_igd_is_found_over_ssdp_at_once(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    out = discover(fakenet)
    assert out["found"] == [LOCATION, "203.0.113.9"], out
    assert out["elapsed"] < DEADLINE / 2  # certain at once: a public address on the gateway itself


@pytest.mark.parametrize(
    ("fake_igd", "kind", "fragment", "outcome"),
    [
        (
            "location_loopback",
            "ProtocolUnavailable",
            "offered LOCATION http://127.0.0.1:5000/rootDesc.xml, refused",
            "refused",
        ),
        ("huge_header_line", "ProtocolUnavailable", f"reply headers from {LOCATION} exceed 16384 bytes", "failed"),
        ("header_drip", "RouterTimeout", f"{LOCATION}: reply headers incomplete (", "unfinished"),
        ("hang", "RouterTimeout", f"{LOCATION}: connected, request sent, no reply", "unfinished"),
    ],
    indirect=["fake_igd"],
)
def test_an_unusable_igd_ends_in_time_with_its_reason(
    fakenet: FakeNet, fake_igd: RunningIgd, kind: str, fragment: str, outcome: str
) -> None:
    out = discover(fakenet)
    name, message = out["error"]
    assert name == kind and fragment in message and "\n" not in message, message
    [candidate] = out["candidates"]
    assert candidate["outcome"] == outcome
    assert out["elapsed"] <= DEADLINE * 1.10
    if outcome in ("refused", "failed"):
        assert out["elapsed"] < DEADLINE / 2  # the failure window (0.5 s), not the deadline


def test_a_gateway_with_no_ssdp_server_fails_at_once(fakenet: FakeNet) -> None:
    started = time.monotonic()
    out = discover(fakenet)
    assert out["error"][0] == "RouterUnreachable" and "ICMP port unreachable" in out["error"][1], out
    assert out["elapsed"] < 0.5 and time.monotonic() - started < 5
