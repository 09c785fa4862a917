"""The blocking UPnP client (aio/blocking_upnp.py) against the real router (miniupnpd) in the lab, checked
with the independent reference client (`upnpc -l`). Each step is its own process on the lan host, as a
one-shot script would run it: SSDP discovery every time, no event loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import listed, upnp_entries

pytestmark = pytest.mark.lab

SCRIPT = """
import json, sys
from autonat.aio.blocking_upnp import BlockingUpnp
from autonat.aio.route import locate_router
from autonat.mapper import MappingRequest
from autonat.proto.types import Transport
from autonat.state import host_secret

command, transport, port = sys.argv[1], Transport(sys.argv[2]), int(sys.argv[3])
with BlockingUpnp(locate_router(), host_secret(), deadline=2.0) as upnp:
    found = upnp.discover()
    out = {"root_url": found.root_url, "external_ip": str(upnp.external_ip())}
    if command == "add":
        mapping = upnp.add(MappingRequest(transport, port, lifetime=600))
        out["mapping"] = [str(mapping.external_ip), mapping.external_port, mapping.lifetime]
    elif command == "add-remove":
        mapping = upnp.add(MappingRequest(transport, port, lifetime=600))
        out["listed"] = upnp.entry(transport, mapping.external_port) is not None
        upnp.remove(mapping)
        out["after"] = upnp.entry(transport, mapping.external_port) is not None
    elif command == "delete":
        upnp.delete(transport, port)
out["asyncio"] = "asyncio" in sys.modules
print(json.dumps(out))
"""


def run(lab: Lab, state_dir: Path, *args: str) -> dict[str, Any]:
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = ["env", f"AUTONAT_STATE_DIR={state_dir}", sys.executable, "-c", SCRIPT, *args]
    result = lab.run("lan", argv, timeout=30)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    assert out["root_url"] == lab.root_url and out["external_ip"] == Lab.ROUTER_WAN
    assert out["asyncio"] is False
    return out


def test_add_shows_in_upnpc_and_a_delete_by_internal_port_from_another_process_removes_it(
    lab: Lab, state_dir: Path
) -> None:
    added = run(lab, state_dir, "add", "udp", "7101")
    try:
        assert added["mapping"] == [Lab.ROUTER_WAN, 7101, 600]
        assert listed(lab, "udp", 7101), "upnpc does not list the mapping"
    finally:
        run(lab, state_dir, "delete", "udp", "7101")  # a new process: the table is looked up
    assert not listed(lab, "udp", 7101)


def test_remove_of_what_add_returned_is_one_call_and_it_is_gone(lab: Lab, state_dir: Path) -> None:
    out = run(lab, state_dir, "add-remove", "tcp", "7102")
    assert (out["listed"], out["after"]) == (True, False)
    assert not listed(lab, "tcp", 7102)


def test_a_mapping_another_client_made_for_us_is_deleted_by_internal_port(lab: Lab, state_dir: Path) -> None:
    lab.run(
        "lan",
        ["upnpc", "-u", lab.root_url, "-e", "by upnpc", "-a", Lab.LAN_ADDRESS, "7103", "7203", "UDP", "600"],
        timeout=20,
        check=True,
    )
    try:
        assert ("udp", 7203, Lab.LAN_ADDRESS, 7103) in upnp_entries(lab)
        run(lab, state_dir, "delete", "udp", "7103")
        assert ("udp", 7203, Lab.LAN_ADDRESS, 7103) not in upnp_entries(lab)
    finally:
        lab.run("lan", ["upnpc", "-u", lab.root_url, "-d", "7203", "UDP"], timeout=20)


SESSION_SCRIPT = """
import json, sys
import autonat

port = int(sys.argv[1])
with autonat.open_router() as router:
    mapping = router.add(autonat.MappingRequest(autonat.Transport.UDP, port, lifetime=600))
    print(json.dumps({"protocol": mapping.protocol, "external": [str(mapping.external_ip), mapping.external_port]}),
          flush=True)
    sys.stdin.readline()  # the test has looked at the router's table
    router.remove(mapping)
print(json.dumps({"asyncio": "asyncio" in sys.modules}))
"""
NO_5351 = """
table inet autonat_test {
    chain input {
        type filter hook input priority -10;
        udp dport 5351 reject
    }
}
"""


def test_the_blocking_session_turns_to_upnp_when_pcp_and_nat_pmp_are_refused(lab: Lab, state_dir: Path) -> None:
    """`autonat.open_router()` with "auto": PCP and NAT-PMP refused by the router (ICMP port unreachable on
    5351, an nftables rule in the router namespace), so the session maps and removes through UPnP IGD."""
    lab.run("router", ["nft", "-f", "-"], input=NO_5351, timeout=10, check=True)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        argv = ["env", f"AUTONAT_STATE_DIR={state_dir}", sys.executable, "-c", SESSION_SCRIPT, "7104"]
        with lab.popen("lan", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as script:
            assert script.stdin is not None and script.stdout is not None
            first = json.loads(script.stdout.readline())
            assert first == {"protocol": "upnp", "external": [Lab.ROUTER_WAN, 7104]}, first
            assert listed(lab, "udp", 7104), "upnpc does not list the mapping"
            script.stdin.write("\n")
            script.stdin.flush()
            assert json.loads(script.stdout.readline()) == {"asyncio": False}
            assert script.wait(timeout=30) == 0
        assert not listed(lab, "udp", 7104)
    finally:
        lab.run("router", ["nft", "delete", "table", "inet", "autonat_test"], timeout=10)
        lab.run("lan", ["upnpc", "-u", lab.root_url, "-d", "7104", "UDP"], timeout=20)
