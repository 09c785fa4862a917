"""Calls that real phones make, through the real router: baresip and kamailio from Debian against autonat.

Acceptance of "Calls that real phones accept":
- baresip on the internet host calls the echo test at 203.0.113.1 with plain RTP (and puts the call on hold and
  back), with ICE (`medianat=ice`: answered as ICE-lite, its checks answered) and with rtcp-mux (accepted, the
  RTCP port's router mapping dropped); audio flows both ways, and what comes back has our SSRC, not the phone's;
- baresip registered as 105 from the internet is called by a second baresip and held by it: the hold reaches the
  callee (its re-INVITE), audio flows both ways through the relay;
- kamailio on the internet as a gateway's registrar: its location table only ever holds our public Contact (the
  first REGISTER waits for the router's address), and a call from its side reaches the echo test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import listed
from tests.lab.daemon_helpers import Daemon, control, eventually, request
from tests.lab.phones import BARESIP, KAMAILIO, KAMCMD, Baresip, Kamailio, require
from tests.lab.sipp import RtpCount, count_rtp
from tests.lab.test_sip_calls import PROFILE, start_service, wait_external

pytestmark = pytest.mark.lab

CALLER_RTP = 7000
CALLEE_RTP = 7100


def rtp_both_ways(count: RtpCount, least: int) -> None:
    """RTP went both ways at the phone's port, what came back came from our public address, and none of it
    carried the phone's own SSRC (the echo speaks as itself, RFC 3550 §8.2; a relay passes the other phone's)."""
    sent = {p.ssrc for p in count.packets if p.src[1] == count.port and p.ssrc is not None}
    received = {p.ssrc for p in count.packets if p.dst[1] == count.port and p.ssrc is not None}
    assert count.sent >= least and count.received >= least, count
    assert {address for address, _ in count.received_from} == {Lab.ROUTER_WAN}, count.received_from
    assert sent and received and not sent & received, (sent, received)


def the_call(daemon: Daemon) -> dict[str, Any]:
    calls = eventually(lambda: [c for c in control(daemon, "calls") if c["state"] == "answered"], 10, "call up")
    assert len(calls) == 1, calls
    call: dict[str, Any] = calls[0]
    return call


def legs_say(daemon: Daemon, *directions: str) -> list[dict[str, Any]]:
    """Wait until the call's legs report `directions` (what each phone last said, RFC 3264 §6.1)."""

    def check() -> list[dict[str, Any]] | None:
        calls = control(daemon, "calls")
        if calls and [leg["direction"] for leg in calls[0]["legs"]] == list(directions):
            legs: list[dict[str, Any]] = calls[0]["legs"]
            return legs
        return None

    result: list[dict[str, Any]] = eventually(check, 5, f"legs saying {directions}")
    return result


def test_baresip_calls_the_echo_test_plain_held_with_ice_and_with_rtcp_mux(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    require(BARESIP)
    lab = healthy_lab
    daemon = start_service(lab, tmp_path, started, extra=PROFILE)
    wait_external(daemon)
    account = f"<sip:caller@{Lab.WAN_HOST}>;regint=0"
    dial = f"/dial sip:9196@{Lab.ROUTER_WAN}"

    # Plain RTP, held and resumed: sendonly is answered recvonly, and the echo speaks with its own SSRC.
    phone = Baresip(lab, tmp_path / "plain", Lab.WAN_HOST, account)
    with count_rtp(lab, "wan", CALLER_RTP, local_ip=Lab.WAN_HOST, workdir=tmp_path) as rtp:
        phone.start(dial, seconds=9)
        the_call(daemon)
        time.sleep(2)
        phone.command("hold")
        legs_say(daemon, "sendonly")
        time.sleep(1)
        phone.command("resume")
        legs_say(daemon, "sendrecv")
        log = phone.wait(timeout=20)
    assert "Call established" in log, log[-2000:]
    rtp_both_ways(rtp.count, 100)
    eventually(lambda: control(daemon, "calls") == [], 5, "the call ended with the phone's BYE")

    # ICE: the answer is an ICE-lite agent's and the phone's connectivity checks are answered.
    ice = Baresip(lab, tmp_path / "ice", Lab.WAN_HOST, account + ";medianat=ice")
    with count_rtp(lab, "wan", CALLER_RTP, local_ip=Lab.WAN_HOST, workdir=tmp_path) as rtp:
        ice.start(dial, seconds=5)
        log = ice.wait(timeout=15)
    assert "connectivity check is complete" in log and f"raddr {Lab.ROUTER_WAN}:" in log, log[-2000:]
    rtp_both_ways(rtp.count, 50)

    # rtcp-mux: accepted, so the RTCP port needs no hole in the router.
    mux = Baresip(lab, tmp_path / "mux", Lab.WAN_HOST, account, rtcp_mux=True)
    with count_rtp(lab, "wan", CALLER_RTP, local_ip=Lab.WAN_HOST, workdir=tmp_path) as rtp:
        mux.start(dial, seconds=6)
        leg = the_call(daemon)["legs"][0]
        assert leg["mapped"] is True
        external = int(leg["advertised"].rsplit(":", 1)[1])
        assert listed(lab, "udp", external)
        eventually(lambda: not listed(lab, "udp", external + 1), 5, "the RTCP mapping dropped (rtcp-mux)")
        log = mux.wait(timeout=15)
    assert "Call established" in log, log[-2000:]
    count = rtp.count
    rtp_both_ways(count, 50)
    assert {p.src[1] for p in count.packets if p.dst[1] == CALLER_RTP} == {external}  # RTCP too, one port


def test_a_registered_baresip_is_called_and_held_by_a_second_one(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    require(BARESIP)
    lab = healthy_lab
    daemon = start_service(lab, tmp_path, started, extra=PROFILE)
    wait_external(daemon)
    callee = Baresip(
        lab, tmp_path / "105", Lab.WAN_HOST2, f"<sip:105@{Lab.ROUTER_WAN}>;auth_pass=pw105;answermode=auto;regint=60",
        rtp_port=CALLEE_RTP, ctrl_port=4445,
    )  # fmt: skip
    caller = Baresip(lab, tmp_path / "200", Lab.WAN_HOST, f"<sip:200@{Lab.ROUTER_WAN}>;auth_pass=pw200;regint=0")
    callee.start(seconds=25)
    try:
        eventually(lambda: control(daemon, "registrations"), 10, "105 registered")
        with (
            # baresip takes its media address from eth0 (203.0.113.100) whatever its sip_listen: count by port.
            count_rtp(lab, "wan", CALLEE_RTP, workdir=tmp_path) as callee_rtp,
            count_rtp(lab, "wan", CALLER_RTP, local_ip=Lab.WAN_HOST, workdir=tmp_path) as caller_rtp,
        ):
            caller.start(f"/dial sip:105@{Lab.ROUTER_WAN}", seconds=9)  # auth-calls: it answers our 407
            call = the_call(daemon)
            assert call["kind"] == "user" and len(call["legs"]) == 2
            time.sleep(2)
            caller.command("hold")
            legs_say(daemon, "sendonly", "recvonly")  # the callee was asked, and answered as §6.1 says
            time.sleep(1)
            caller.command("resume")
            legs_say(daemon, "sendrecv", "sendrecv")
            caller.wait(timeout=20)
    finally:
        log = callee.wait(timeout=30)
    assert log.count("stream: update 'audio'") >= 3, log[-3000:]  # the call, the hold, the resume reached it
    rtp_both_ways(caller_rtp.count, 100)
    rtp_both_ways(callee_rtp.count, 100)


GATEWAY = """
[[profile.gateway]]
name = "kam"
proxy = "{registrar}:5080"
username = "200"
password = "pw200"
expires = 120

[[profile.extension]]
match = "^200$"
action = "echo"
"""


@pytest.fixture
def kamailio(healthy_lab: Lab, tmp_path: Path) -> Iterator[Kamailio]:
    require(KAMAILIO, KAMCMD)
    registrar = Kamailio(healthy_lab, tmp_path / "kamailio", Lab.WAN_HOST2).start()
    yield registrar
    registrar.stop()


def test_kamailio_holds_only_our_public_contact_and_routes_a_call_to_the_echo_test(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon], kamailio: Kamailio
) -> None:
    require(BARESIP)
    lab = healthy_lab
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # the location table, from before the daemon starts until the call is over
        while not stop.wait(0.1):
            seen.extend(kamailio.contacts())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        daemon = start_service(lab, tmp_path, started, extra=PROFILE + GATEWAY.format(registrar=Lab.WAN_HOST2))
        wait_external(daemon)
        eventually(lambda: seen, 15, "autonat registered at kamailio")
        profile = request(daemon.socket_path, {"cmd": "profile", "name": "external"})["result"]
        assert profile["Gateways"]["kam"]["state"] in ("REGED", "REGISTER"), profile["Gateways"]
        caller = Baresip(lab, tmp_path / "caller", Lab.WAN_HOST, f"<sip:caller@{Lab.WAN_HOST}>;regint=0")
        with count_rtp(lab, "wan", CALLER_RTP, local_ip=Lab.WAN_HOST, workdir=tmp_path) as rtp:
            caller.start(f"/dial sip:200@{Lab.WAN_HOST2}:5080", seconds=5)
            call = the_call(daemon)
            log = caller.wait(timeout=15)
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert {contact.split("@", 1)[1] for contact in seen} == {f"{Lab.ROUTER_WAN}:5060"}, set(seen)
    assert (call["kind"], call["number"]) == ("echo", "200") and f"udp:{Lab.WAN_HOST2}:5080" in call["legs"][0]["peer"]
    assert "Call established" in log, log[-2000:]
    rtp_both_ways(rtp.count, 50)
