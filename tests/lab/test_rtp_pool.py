"""The RTP mapping pool on the real router: pairs mapped ahead, handed out at once, gone at hang-up,
refilled in the background (issue "The test call", item 3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from autonat.lab import Lab

pytestmark = pytest.mark.lab
SCRIPT = str(Path(__file__).with_name("scripts") / "rtp_pool.py")


def test_pool_maps_ahead_hands_out_at_once_and_refills(lab: Lab, state_dir: Path) -> None:
    result = lab.run("lan", ["env", f"AUTONAT_STATE_DIR={state_dir}", sys.executable, SCRIPT, lab.root_url], timeout=60)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["filled"] is True
    assert facts["after_fill"] == [30000, 30001, 30002, 30003]  # two RTP/RTCP pairs, before any call
    assert facts["take_ms"] < 1.0  # no router round trip at call set-up
    assert facts["taken"] == [30000, 30001, Lab.ROUTER_WAN, 30000, 30001]
    assert facts["release_ms"] < 2000
    assert 30000 not in facts["after_release"] and 30001 not in facts["after_release"]
    assert facts["refilled"] is True
    assert facts["after_refill"] == [30002, 30003, 30004, 30005]
    assert facts["after_stop"] == []


SENDER = """
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
packet = bytes([0x80, 0x00, 0x00, 0x01]) + bytes(8) + b"echo?"
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(2)
    back = 0
    for _ in range(count):
        sock.sendto(packet, (host, port))
        try:
            # The echo re-originates (its own SSRC, sequence and timestamp): the payload comes back.
            back += sock.recv(2048)[12:] == packet[12:]
        except TimeoutError:
            pass
print(back)
"""


def test_rtp_echo_through_the_nat_with_a_pooled_pair(lab: Lab, state_dir: Path) -> None:
    import subprocess

    script = str(Path(__file__).with_name("scripts") / "echo_call.py")
    call = lab.popen(
        "lan",
        ["env", f"AUTONAT_STATE_DIR={state_dir}", sys.executable, script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert call.stdout is not None and call.stdin is not None
        ready = call.stdout.readline().split()
        assert ready[:1] == ["ready"], call.stderr.read() if call.stderr else ""
        external = ready[1]
        sent = lab.run("wan", [sys.executable, "-c", SENDER, Lab.ROUTER_WAN, external, "20"], timeout=60)
        assert sent.stdout.strip() == "20", sent.stderr  # every packet came back, through the router
        call.stdin.close()
        stats = json.loads(call.stdout.readline())
        call.wait(timeout=20)
    finally:
        if call.poll() is None:
            call.kill()
            call.wait(timeout=5)
    assert stats["received"] == stats["sent"] == 20
    assert stats["source"][0] == Lab.WAN_HOST  # echoed to where packets came from (symmetric RTP)
