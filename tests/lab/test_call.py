"""`autonat call`, the test call from our side, through the real router (issue 14, item 2 and its acceptance).

The daemon on the lan host calls out as a phone behind the NAT would (SDP with the router's address and a
pooled, mapped RTP pair) and measures the echo of its signal:
- SIPp's RTP echo on the internet host: audio both ways through the NAT, every figure printed, and tcpdump on
  the internet host sees the echo addressed to the very external address and port our SDP advertised;
- another autonat's 9196 on the internet host, whose echo re-originates the packets: the same verdict;
- a second autonat behind the lab's double NAT calling the first one's 9196: audio both ways through the
  inner router's NAT (no mapping can be had there; the verdict says so);
- a silent peer (answers, sends nothing): "fail: no audio back" within the call time; a busy one: 486.
Every call's RTP mapping is gone from the router when the command returns.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import AUTONAT, listed
from tests.lab.daemon_helpers import Daemon, control, eventually, write_config
from tests.lab.sipp import count_rtp, start_sipp
from tests.lab.test_sip_calls import PROFILE, wait_external

pytestmark = pytest.mark.lab

ECHO_MEDIA = 6000
ECHO_URI = f"sip:9196@{Lab.WAN_HOST}:5060"
WAN_ECHO = """
[sip]
t1 = 0.1

[[profile]]
name = "internet"
sip-ip = "203.0.113.101"
rtp-ip = "203.0.113.101"
"""
INNER = """
[sip]
t1 = 0.1

[[profile]]
name = "inner"
ext-sip-ip = "auto-nat"
ext-rtp-ip = "auto-nat"
"""


def start(lab: Lab, tmp_path: Path, started: list[Daemon], extra: str, host: str, *args: str) -> Daemon:
    daemon = Daemon(lab, tmp_path / host, write_config(tmp_path / host, extra=extra), host=host).start(*args)
    started.append(daemon)
    daemon.wait_socket()
    return daemon


def call(lab: Lab, daemon: Daemon, uri: str, *args: str, host: str = "lan") -> subprocess.CompletedProcess[str]:
    argv = [AUTONAT, "call", uri, "--socket", str(daemon.socket_path), *args]
    return lab.run(host, argv, timeout=90)


def call_json(lab: Lab, daemon: Daemon, uri: str, seconds: int, host: str = "lan") -> tuple[int, dict[str, Any]]:
    done = call(lab, daemon, uri, "--seconds", str(seconds), "--json", host=host)
    assert done.stdout, done.stderr + daemon.log()
    result: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, result


def rtp_mappings(daemon: Daemon) -> set[int]:
    return {m["port"] for m in daemon.status()["mappings"] if m["owner"].startswith("call:")}


def external_port(result: dict[str, Any]) -> int:
    return int(result["media"]["advertised"].rsplit(":", 1)[1])


@pytest.mark.slow  # 6.8 s: two test calls (3 s and 1 s of signal)
def test_the_test_call_to_sipp_s_echo_gets_audio_both_ways_through_the_mapping(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    daemon = start(lab, tmp_path, started, PROFILE, "lan")
    wait_external(daemon)
    with (
        count_rtp(lab, "wan", ECHO_MEDIA, local_ip=Lab.WAN_HOST) as rtp,
        start_sipp(
            lab,
            "wan",
            "uas_echo",
            None,
            local_ip=Lab.WAN_HOST,
            local_port=5060,
            media_port=ECHO_MEDIA,
            calls=2,
            workdir=tmp_path,
        ),  # fmt: skip
    ):
        code, result = call_json(lab, daemon, ECHO_URI, 3)
        port = external_port(result)
        gone = not listed(lab, "udp", port)  # right when the command returns
        shown = call(lab, daemon, ECHO_URI, "--seconds", "1")
    assert code == 0 and result["ok"] is True, result
    assert result["verdict"] == "ok: audio both ways through the NAT"
    media = result["media"]
    assert media["advertised"] == media["mapping"] == f"{Lab.ROUTER_WAN}:{port}" and media["through_mapping"]
    assert media["local"].startswith(f"{Lab.LAN_ADDRESS}:") and media["remote"] == f"{Lab.WAN_HOST}:{ECHO_MEDIA}"
    assert result["codec"] == "PCMA"  # the stand-in answers PCMA only: the signal follows the answer
    sent, received = result["rtp"]["sent"], result["rtp"]["received"]
    assert sent == 150 and received >= sent - 3, result["rtp"]  # 3 s of 20 ms packets; the lab loses none
    rtt = result["rtt_ms"]
    assert 0 < rtt["min"] <= rtt["avg"] <= rtt["max"] < 500 and result["jitter_ms"] is not None
    # What the internet host saw: our signal from the router's address, and SIPp's echo sent back to the
    # external address and port our SDP advertised (the mapping), nowhere else.
    packets = rtp.count.packets  # both calls': the first call's come first
    signal = [p for p in packets if p.dst == (Lab.WAN_HOST, ECHO_MEDIA)][:sent]
    echoes = [p for p in packets if p.src == (Lab.WAN_HOST, ECHO_MEDIA)][:received]
    assert {p.src for p in signal} == {(Lab.ROUTER_WAN, port)} and len(signal) == sent
    assert {p.dst for p in echoes} == {(Lab.ROUTER_WAN, port)} and len(echoes) == received
    assert gone, "the call's RTP mapping was still on the router when `autonat call` returned"
    assert rtp_mappings(daemon) == set() and control(daemon, "calls") == []
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "ok: audio both ways through the NAT"
    assert lines[1].startswith(f"call:    {ECHO_URI} from profile external, answered 200 OK in ")
    assert lines[2].startswith("rtp:     sent 50, received back ")
    assert [line[:8] for line in lines[3:]] == ["rtt:    ", "jitter: ", "media:  "]
    assert f"our SDP gave {Lab.ROUTER_WAN}:" in lines[5] and "(the router mapping)" in lines[5]


@pytest.mark.slow  # 5.3 s
def test_loss_on_the_internet_link_is_measured_as_what_reached_our_socket(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    daemon = start(lab, tmp_path, started, PROFILE.replace("rtp-pool = 2", "rtp-pool = 1"), "lan")
    daemon.wait_ready(timeout=15)
    pool = [16384, 16385]
    eventually(lambda: sorted(m["port"] for m in daemon.status()["mappings"] if m["owner"] == "rtp-pool") == pool,
               10, "the pool's one pair mapped")  # fmt: skip
    lab.set_loss(10, "wan")  # each way: about 19 % of the echoes lost on the round trip
    try:
        with (
            count_rtp(lab, "lan", 16384, local_ip=Lab.LAN_ADDRESS) as ours,  # the pool's one pair: the first
            count_rtp(lab, "wan", ECHO_MEDIA, local_ip=Lab.WAN_HOST) as theirs,
            start_sipp(
                lab,
                "wan",
                "uas_echo",
                None,
                local_ip=Lab.WAN_HOST,
                local_port=5060,
                media_port=ECHO_MEDIA,
                calls=1,
                workdir=tmp_path,
            ),  # fmt: skip
        ):
            code, result = call_json(lab, daemon, ECHO_URI, 3)
    finally:
        lab.set_loss(0, "wan")
    assert code == 0 and result["verdict"].startswith("ok: audio both ways through the NAT"), result
    assert result["media"]["local"] == f"{Lab.LAN_ADDRESS}:16384", result["media"]
    rtp = result["rtp"]
    arrived = [p for p in ours.count.packets if p.dst == (Lab.LAN_ADDRESS, 16384) and p.src[0] == Lab.WAN_HOST]
    assert rtp["received"] == len(arrived) and rtp["duplicates"] == rtp["foreign"] == 0, (rtp, len(arrived))
    assert rtp["sent"] == ours.count.sent == 150
    # SIPp echoes what reached it (tcpdump sees packets before the lab's loss, which drops at ingress): some
    # were lost on the way out, and of its echoes some on the way back.
    assert rtp["received"] < theirs.count.sent < rtp["sent"]
    assert 5 <= rtp["loss_percent"] <= 40, rtp
    assert rtp["lost"] == rtp["sent"] - rtp["received"]


def test_the_test_call_to_another_autonat_s_echo_on_the_internet(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    echo = start(lab, tmp_path, started, WAN_ECHO, "wan", "--nonat")
    daemon = start(lab, tmp_path, started, PROFILE, "lan")
    wait_external(daemon)
    code, result = call_json(lab, daemon, f"sip:9196@{Lab.WAN_HOST2}:5060", 2)
    assert code == 0 and result["verdict"] == "ok: audio both ways through the NAT", result
    assert result["codec"] == "PCMU" and result["rtp"]["sent"] == 100
    assert result["rtp"]["received"] >= 97 and result["rtp"]["foreign"] == 0, result["rtp"]
    assert result["media"]["echo_from"] == [result["media"]["remote"]]
    eventually(lambda: control(echo, "calls") == [], 2, "the echo's side of the call ended")
    assert "(echo 9196) ended: bye from caller" in echo.log()  # by our BYE
    assert not listed(lab, "udp", external_port(result)) and rtp_mappings(daemon) == set()


def test_a_second_autonat_behind_the_double_nat_calls_the_first_one_s_echo(
    double_nat_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = double_nat_lab
    outer = start(lab, tmp_path, started, PROFILE, "lan")
    outer.wait_ready(timeout=15)
    inner = start(lab, tmp_path, started, INNER, "lan2")
    # The lab's router has no hairpin NAT: the inner instance reaches the outer one at its LAN address,
    # through the inner router's NAT (router2), which maps nothing (it is behind another NAT).
    code, result = call_json(lab, inner, f"sip:9196@{Lab.LAN_ADDRESS}:5060", 2, host="lan2")
    assert code == 0 and result["ok"] is True, result
    advertised = result["media"]["advertised"]
    assert advertised.startswith(f"{Lab.LAN2_ADDRESS}:") and result["media"]["mapping"] is None
    assert result["verdict"] == f"ok: audio both ways, not through a router mapping (our SDP gave {advertised})"
    assert result["rtp"]["sent"] == 100 and result["rtp"]["received"] >= 97, result["rtp"]
    assert result["media"]["echo_from"] == [result["media"]["remote"]]
    assert result["media"]["remote"].startswith(f"{Lab.LAN_ADDRESS}:")  # the outer echo, on the first LAN
    eventually(lambda: control(outer, "calls") == [], 2, "the outer echo's call ended")
    assert "(echo 9196) ended: bye from caller" in outer.log()  # by our BYE, through router2's NAT


def test_a_silent_peer_is_no_audio_back_within_the_call_time_and_a_busy_one_is_486(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    daemon = start(lab, tmp_path, started, PROFILE, "lan")
    wait_external(daemon)
    with start_sipp(lab, "wan", "uas_silent", None, local_ip=Lab.WAN_HOST, local_port=5060, media_port=ECHO_MEDIA,
                    calls=1, workdir=tmp_path) as sipp:  # fmt: skip
        began = time.monotonic()
        silent = call(lab, daemon, ECHO_URI, "--seconds", "2")
        took = time.monotonic() - began
        sipp_result = sipp.wait(timeout=10)
    assert silent.returncode == 1, silent.stdout + silent.stderr
    assert silent.stdout.startswith("fail: no audio back\n") and "sent 100, received back 0" in silent.stdout
    assert silent.stderr == "autonat: test call failed: no audio back\n"
    assert took < 2 + 1 + 4, took  # the signal, the drain, the BYE and the command's own start, generously
    assert sipp_result.ok, sipp_result.describe()  # it took our ACK and our BYE
    assert rtp_mappings(daemon) == set()
    with start_sipp(lab, "wan", "uas_busy", None, local_ip=Lab.WAN_HOST, local_port=5060, media_port=ECHO_MEDIA,
                    calls=1, workdir=tmp_path) as sipp:  # fmt: skip
        busy = call(lab, daemon, ECHO_URI, "--json")
        busy_sipp = sipp.wait(timeout=10)
    result = json.loads(busy.stdout)
    assert busy.returncode == 1 and result["verdict"] == "fail: call refused 486 Busy Here", result
    assert busy_sipp.ok, busy_sipp.describe()
    eventually(lambda: rtp_mappings(daemon) == set(), 2, "the busy call's RTP mapping released")


@pytest.mark.slow  # 7 s: two doctor --quick runs, one with a 2 s test call
def test_doctor_places_the_configured_test_call_and_reports_it(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    """`[doctor] call` (issue 14: "doctor runs it when an echo service is configured"): doctor asks the running
    daemon for the test call and gives it a line; with no daemon to ask, the line says so (a warning)."""
    lab = healthy_lab
    doctor_section = f'[doctor]\ncall = "{ECHO_URI}"\ncall-seconds = 2\n'
    daemon = start(lab, tmp_path, started, PROFILE + doctor_section, "lan")
    wait_external(daemon)
    config = tmp_path / "lan" / "autonat.toml"
    with start_sipp(
        lab,
        "wan",
        "uas_echo",
        None,
        local_ip=Lab.WAN_HOST,
        local_port=5060,
        media_port=ECHO_MEDIA,
        calls=1,
        workdir=tmp_path,
    ):
        done = lab.run("lan", [AUTONAT, "doctor", "--quick", "--json", "--config", str(config)], timeout=60)
    report = json.loads(done.stdout)
    [line] = [f for f in report["findings"] if f["check"] == "test call"]
    assert line["verdict"] == "ok" and "audio both ways through the NAT" in line["summary"], line
    assert report["measurements"]["call"]["media"]["through_mapping"] is True
    assert done.returncode == 0, done.stderr
    eventually(lambda: not rtp_mappings(daemon), 5, "the test call's RTP mapping released")
    held = control(daemon, "doctor-report")  # doctor handed the daemon its summary: the status page shows it
    assert held["status"] == 0 and "test call" in held["text"], held
    assert [f["verdict"] for f in held["findings"]] == [f["verdict"] for f in report["findings"]]

    lonely = tmp_path / "lonely"  # the same [doctor] call, but no daemon behind the config's socket
    lonely.mkdir()
    (lonely / "autonat.toml").write_text(doctor_section + f'[control]\nsocket = "{lonely / "control.sock"}"\n')
    done = lab.run(
        "lan", [AUTONAT, "doctor", "--quick", "--json", "--config", str(lonely / "autonat.toml")], timeout=60
    )
    report = json.loads(done.stdout)
    [line] = [f for f in report["findings"] if f["check"] == "test call"]
    assert line["verdict"] == "warning" and "no autonat daemon is running" in line["summary"], line
    assert done.returncode == 0, done.stderr
