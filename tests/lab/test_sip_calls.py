"""The test call through the real router: SIPp on the internet host calls autonat's SIP service.

Acceptance of "The test call": the echo test over UDP and TCP at the router's public address (SDP with
203.0.113.1 and a mapped port, RTP counted both ways, the RTP mapping gone within 2 s of the BYE), a
LAN caller (local address, no mapping), a caller that never ACKs (BYE after 64*T1, mapping released),
a registered phone rung from the internet with media relayed both ways, and two autonat instances
behind the lab's double NAT, one registered to the other, holding a 60 s call without an ACK timeout.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import AUTONAT, listed
from tests.lab.daemon_helpers import Daemon, control, eventually, request, write_config
from tests.lab.sipp import SippResult, count_rtp, run_sipp, start_sipp

pytestmark = pytest.mark.lab

T1 = 0.1  # 64*T1 = 6.4 s: the no-ACK test waits for the RFC timeout without waiting 32 s
PROFILE = f"""
[sip]
t1 = {T1}
rtp-timeout = 120
rtp-pool = 2

[[user]]
name = "105"
password = "pw105"

[[user]]
name = "200"
password = "pw200"

[[profile]]
name = "external"
ext-sip-ip = "auto-nat"
ext-rtp-ip = "auto-nat"
"""
CALLER_MEDIA = 6000
PHONE_MEDIA = 7000


def start_service(
    lab: Lab, tmp_path: Path, started: list[Daemon], *, extra: str = PROFILE, host: str = "lan"
) -> Daemon:
    daemon = Daemon(lab, tmp_path / host, write_config(tmp_path / host, extra=extra), host=host).start()
    started.append(daemon)
    daemon.wait_socket()
    return daemon


def wait_external(daemon: Daemon) -> None:
    """Discovery done, SIP ports mapped, and the RTP pool filled (both pairs active)."""
    status = daemon.wait_ready(timeout=15)
    eventually(
        lambda: (
            sum(m["owner"] == "rtp-pool" for m in daemon.status()["mappings"]) >= 4 and daemon.wait_ready(timeout=5)
        ),
        10,
        "RTP pool filled",
    )
    assert status["external_ip"] == Lab.ROUTER_WAN


def answer_port(result: SippResult) -> int:
    """The m=audio port of the 200 OK the caller received."""
    match = re.search(r"SIP/2\.0 200 OK.*?\nm=audio (\d+)", result.messages, re.S)
    assert match, result.describe()
    return int(match.group(1))


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_echo_call_from_the_internet(healthy_lab: Lab, tmp_path: Path, started: list[Daemon], transport: str) -> None:
    lab = healthy_lab
    daemon = start_service(lab, tmp_path, started)
    wait_external(daemon)
    with (
        count_rtp(lab, "wan", CALLER_MEDIA, local_ip=Lab.WAN_HOST) as rtp,
        start_sipp(
            lab,
            "wan",
            "uac_call",
            f"{Lab.ROUTER_WAN}:5060",
            transport=transport,  # type: ignore[arg-type]
            local_ip=Lab.WAN_HOST,
            media_port=CALLER_MEDIA,
            variables={"expect_ip": Lab.ROUTER_WAN, "hold_ms": "3000"},
            calls=1,
            service="9196",
            workdir=tmp_path,
        ) as sipp,
    ):
        live = eventually(lambda: control(daemon, "calls"), 10, "the call is up")
        leg = live[0]["legs"][0]
        assert leg["mapped"] is True and leg["advertised"].startswith(f"{Lab.ROUTER_WAN}:")
        external = int(leg["advertised"].rsplit(":", 1)[1])
        assert listed(lab, "udp", external), "the RTP mapping is not in the router's table during the call"
        result = sipp.wait(timeout=30)
    assert result.ok, result.describe()
    assert answer_port(result) == external
    count = rtp.count
    assert count.sent >= 50 and count.received >= 50, count
    assert {address for address, _ in count.received_from} == {Lab.ROUTER_WAN}
    ended = time.monotonic()
    eventually(lambda: not listed(lab, "udp", external), 2.0, "RTP mapping removed after the BYE")
    assert time.monotonic() - ended <= 2.0
    assert control(daemon, "calls") == []
    # The profile's own SIP mappings: made at start, removed when the daemon stops.
    sip = {(m["proto"], m["port"]) for m in daemon.status()["mappings"] if m["owner"] == "sip:external"}
    assert sip == {("udp", 5060), ("tcp", 5060)}
    assert listed(lab, "udp", 5060) and listed(lab, "tcp", 5060)
    daemon.stop()
    assert not listed(lab, "udp", 5060) and not listed(lab, "tcp", 5060)


def test_a_lan_caller_gets_the_local_address_and_no_mapping(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    daemon = start_service(lab, tmp_path, started)
    wait_external(daemon)
    before = {(m["proto"], m["port"]) for m in daemon.status()["mappings"]}
    with (
        count_rtp(lab, "lan", CALLER_MEDIA, local_ip=Lab.LAN_ADDRESS) as rtp,
        start_sipp(
            lab,
            "lan",
            "uac_call",
            f"{Lab.LAN_ADDRESS}:5060",
            local_ip=Lab.LAN_ADDRESS,
            local_port=5070,
            media_port=CALLER_MEDIA,
            variables={"expect_ip": Lab.LAN_ADDRESS, "hold_ms": "2000"},
            calls=1,
            service="9196",
            workdir=tmp_path,
        ) as sipp,
    ):
        live = eventually(lambda: control(daemon, "calls"), 10, "the call is up")
        leg = live[0]["legs"][0]
        assert leg["mapped"] is False and leg["advertised"].startswith(f"{Lab.LAN_ADDRESS}:")
        during = {(m["proto"], m["port"]) for m in daemon.status()["mappings"]}
        shown = lab.run("lan", [AUTONAT, "calls", "--socket", str(daemon.socket_path)], timeout=20)
        assert shown.returncode == 0, shown.stderr
        row = shown.stdout.splitlines()[1].split(",")
        assert row[1:4] == ["external", "echo", "9196"] and row[-1] == "false", shown.stdout
        result = sipp.wait(timeout=30)
    assert result.ok, result.describe()
    assert during == before, "a LAN call created a mapping"
    assert not listed(lab, "udp", answer_port(result))
    assert rtp.count.sent > 0 and rtp.count.received > 0, rtp.count
    status = lab.run("lan", [AUTONAT, "profile", "status", "external", "--socket", str(daemon.socket_path)], timeout=20)
    rows = {line[:24].strip(): line[24:] for line in status.stdout.splitlines() if line and not line.startswith("=")}
    assert rows["CALLS-IN"] == "1" and rows["Live-Calls"] == "0", status.stdout


def test_a_caller_that_never_acks_gets_a_bye_and_the_mapping_is_released(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    daemon = start_service(lab, tmp_path, started)
    wait_external(daemon)
    daemon.follow_events()
    started_at = time.monotonic()
    result = run_sipp(
        lab,
        "wan",
        "uac_no_ack",
        f"{Lab.ROUTER_WAN}:5060",
        local_ip=Lab.WAN_HOST,
        media_port=CALLER_MEDIA,
        service="9196",
        timeout=30,
        workdir=tmp_path,
    )
    took = time.monotonic() - started_at
    assert result.ok, result.describe()
    assert result.received("BYE ") >= 1
    assert result.received("SIP/2.0 200") >= 3  # the 200 OK was retransmitted while no ACK came
    assert took >= 64 * T1 - 0.5
    event = daemon.wait_event("call-end", timeout=5)
    assert event["reason"] == "ack timeout"
    port = answer_port(result)
    eventually(lambda: not listed(lab, "udp", port), 2.0, "RTP mapping removed after the ACK timeout")
    assert "no ACK for our 200 OK" in daemon.log()


def test_a_registered_phone_is_rung_from_the_internet_and_media_flows_both_ways(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    daemon = start_service(lab, tmp_path, started)
    wait_external(daemon)
    with (
        count_rtp(lab, "wan", PHONE_MEDIA, local_ip=Lab.WAN_HOST2) as phone_rtp,
        count_rtp(lab, "wan", CALLER_MEDIA, local_ip=Lab.WAN_HOST) as caller_rtp,
        start_sipp(
            lab,
            "wan",
            "uas_phone",
            f"{Lab.ROUTER_WAN}:5060",
            local_ip=Lab.WAN_HOST2,
            local_port=5062,
            media_port=PHONE_MEDIA,
            auth=("105", "pw105"),
            variables={"user": "105"},
            calls=1,
            workdir=tmp_path,
        ) as phone,
    ):
        registered = eventually(lambda: control(daemon, "registrations"), 10, "phone 105 registered")
        assert registered[0]["user"] == "105"
        assert f"{Lab.WAN_HOST2}" in registered[0]["source"]  # reached at the REGISTER's source
        # auth-calls (the default): ringing a user needs a [[user]]'s credentials; SIPp answers our 407.
        caller = run_sipp(
            lab,
            "wan",
            "uac_auth_call",
            f"{Lab.ROUTER_WAN}:5060",
            local_ip=Lab.WAN_HOST,
            media_port=CALLER_MEDIA,
            variables={"expect_ip": Lab.ROUTER_WAN, "hold_ms": "3000"},
            service="105",
            auth=("200", "pw200"),
            workdir=tmp_path,
        )
        phone_result = phone.wait(timeout=30)
    assert caller.ok, caller.describe()
    assert phone_result.ok, phone_result.describe()
    # Both legs reach the phone/caller from the router's public address: the relay anchors the media.
    assert caller_rtp.count.received >= 20 and phone_rtp.count.received >= 20, (caller_rtp.count, phone_rtp.count)
    assert {a for a, _ in caller_rtp.count.received_from} == {Lab.ROUTER_WAN}
    assert {a for a, _ in phone_rtp.count.received_from} == {Lab.ROUTER_WAN}
    eventually(
        lambda: not any(m["owner"].startswith("call:") for m in daemon.status()["mappings"]),
        2,
        "both legs' RTP mappings removed after the call",
    )


INNER = """
[sip]
t1 = 0.5
rtp-timeout = 120

[[profile]]
name = "inner"
ext-sip-ip = "auto-nat"
ext-rtp-ip = "auto-nat"
auth-calls = false  # the inner PBX's own LAN phone calls out without an account (auth-calls: test_abuse)

[[profile.gateway]]
name = "outer"
proxy = "{outer}:5060"
username = "200"
password = "pw200"
expires = 120

[[profile.extension]]
match = "^\\\\*(\\\\d+)$"
action = "gateway"
gateway = "outer"
"""


def test_double_nat_registration_and_a_60_s_call_without_ack_timeout(
    double_nat_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = double_nat_lab
    outer = start_service(lab, tmp_path, started)
    outer.wait_ready(timeout=15)
    # The lab's router, like many, has no hairpin NAT: the inner instance reaches the outer one at the
    # outer's LAN address, through the inner router's NAT (router2).
    inner = start_service(lab, tmp_path, started, extra=INNER.format(outer=Lab.LAN_ADDRESS), host="lan2")
    registered = eventually(lambda: control(outer, "registrations"), 15, "inner instance registered to outer")
    assert registered[0]["user"] == "200"
    assert Lab.ROUTER2_WAN in registered[0]["source"]  # seen from behind the inner NAT
    gateways = request(inner.socket_path, {"cmd": "profile", "name": "inner"})["result"]["Gateways"]
    assert gateways["outer"]["state"] == "REGED"
    with count_rtp(lab, "lan2", CALLER_MEDIA, local_ip=Lab.LAN2_ADDRESS) as rtp:
        result = run_sipp(
            lab,
            "lan2",
            "uac_call",
            f"{Lab.LAN2_ADDRESS}:5060",
            local_ip=Lab.LAN2_ADDRESS,
            local_port=5070,
            media_port=CALLER_MEDIA,
            variables={"expect_ip": Lab.LAN2_ADDRESS, "hold_ms": "60000"},
            service="*9196",
            timeout=90,
            workdir=tmp_path,
        )
    assert result.ok, result.describe()  # the caller hung up after 60 s; nobody else did
    assert rtp.count.sent >= 50 and rtp.count.received >= 50, rtp.count  # echoed by the outer instance
    for daemon in (inner, outer):
        assert "ack timeout" not in daemon.log().lower()
        assert "no ACK" not in daemon.log()
