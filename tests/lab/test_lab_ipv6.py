"""The lab's IPv6: routed documentation prefixes, a firewall that drops unsolicited inbound, and the real
router (miniupnpd with IPv6) opening a UPnP IGDv2 pinhole for the address the request came from."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from autonat.lab import Lab

pytestmark = pytest.mark.lab

LISTEN = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    data, source = s.recvfrom(100)
    print(data.decode(), source[0])
except TimeoutError:
    print("nothing")
"""
SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""
SOURCE = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 9))
print(s.getsockname()[0])
"""


def arrives(lab: Lab, port: int, target: str) -> bool:
    listener = lab.popen("lan", [sys.executable, "-c", LISTEN, str(port), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        lab.run("wan", [sys.executable, "-c", SEND, target, str(port), "knock"], timeout=10, check=True)
        out, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(timeout=5)
    return out.startswith("knock")


def test_ipv6_is_routed_and_unsolicited_inbound_is_dropped(lab: Lab) -> None:
    source = lab.run("lan", [sys.executable, "-c", SOURCE, Lab.WAN6_HOST], timeout=10, check=True).stdout.strip()
    assert source == Lab.LAN6_TEMPORARY  # the kernel prefers the "temporary" address, as desktops do
    assert not arrives(lab, 5060, Lab.LAN6_ADDRESS)  # a home router's firewall: nothing gets in unasked


def test_a_upnp_pinhole_lets_in_only_while_it_exists(lab: Lab) -> None:
    """`upnpc -6 -A` (IGD:2 AddPinhole) from the lan host: miniupnpd grants it for the request's own source,
    the temporary address; traffic from the wan host reaches it only while the pinhole exists."""
    root_url = f"http://[{Lab.GATEWAY6}]:{Lab.HTTP_PORT}/rootDesc.xml"
    added = lab.run(
        "lan", ["upnpc", "-6", "-u", root_url, "-A", "", "0", Lab.LAN6_TEMPORARY, "5062", "UDP", "120"], timeout=20
    )
    match = re.search(r"Pinhole ID = (\d+)", added.stdout)
    assert match, added.stdout + added.stderr
    unique_id = match.group(1)
    try:
        assert arrives(lab, 5062, Lab.LAN6_TEMPORARY)
    finally:
        lab.run("lan", ["upnpc", "-6", "-u", root_url, "-D", unique_id], timeout=20)
    time.sleep(0.2)
    assert not arrives(lab, 5062, Lab.LAN6_TEMPORARY)
