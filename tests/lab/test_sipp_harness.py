"""The SIPp tooling (tests/lab/sipp.py + tests/lab/sipp/*.xml) proven against SIPp stand-ins.

There is no autonat SIP service to call yet, and the router forwards 5060 only once it is mapped, so
everything here stays inside the `wan` namespace: the stand-in UAS/registrar on 203.0.113.101:5060,
the caller/phone on 203.0.113.100. What is proven: a call passes its checks and carries RTP both
ways; each check (c= address, m= port, Contact host) fails the call on a mismatch; the no-ACK caller
gets the UAS's BYE; TCP works with the same files; the phone registers with digest auth, answers an
incoming call with a new Call-ID and plays RTP, and fails with a wrong password.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.sipp import (
    SippProcess,
    Transport,
    count_rtp,
    default_pcap,
    read_pcap_udp,
    run_sipp,
    sipp_argv,
    start_sipp,
    tally,
)

pytestmark = pytest.mark.lab

CALLER = Lab.WAN_HOST  # 203.0.113.100
UAS = Lab.WAN_HOST2  # 203.0.113.101: the stand-in for our service
CALLER_RTP = 6000
UAS_RTP = 7000
USER, PASSWORD = "alice", "s3cret"


@pytest.fixture(autouse=True, scope="module")
def _tools() -> None:
    missing = [tool for tool in ("sipp", "tcpdump") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing (run ./scripts/install.sh as root: sip-tester, tcpdump)")
    default_pcap()  # fails with the reason if the packaged pcap is gone


def echo_uas(lab: Lab, tmp_path: Path, transport: Transport = "udp", media_ip: str = UAS) -> SippProcess:
    return start_sipp(
        lab,
        "wan",
        "uas_echo",
        None,
        transport=transport,
        local_ip=UAS,
        local_port=5060,
        media_ip=media_ip,
        media_port=UAS_RTP,
        timeout=60,
        workdir=tmp_path,
    )


def test_call_passes_its_checks_and_carries_rtp_both_ways(lab: Lab, tmp_path: Path) -> None:
    with echo_uas(lab, tmp_path) as uas, count_rtp(lab, "wan", CALLER_RTP, local_ip=CALLER) as rtp:
        result = run_sipp(
            lab,
            "wan",
            "uac_call",
            f"{UAS}:5060",
            local_ip=CALLER,
            media_port=CALLER_RTP,
            variables={"expect_ip": UAS, "expect_port": str(UAS_RTP), "hold_ms": "1000"},
            timeout=20,
            workdir=tmp_path,
        )
    assert result.ok, result.describe()
    assert (result.successful, result.failed) == (1, 0)
    assert f"200: c={UAS} m={UAS_RTP} contact host={UAS}" in result.logs
    assert result.sent("INVITE ") == 1 and result.sent("ACK ") == 1 and result.sent("BYE ") == 1
    assert result.received("SIP/2.0 200 OK") == 2  # the INVITE's and the BYE's
    assert uas.result is not None and uas.result.received("BYE ") == 1
    # g711a.pcap holds one packet per 30 ms: ~33 in 1 s; SIPp's -rtp_echo sends every one back.
    assert rtp.count.sent >= 25, rtp.count
    assert rtp.count.received >= 25, rtp.count
    assert rtp.count.sent_to == {(UAS, UAS_RTP)}
    assert rtp.count.received_from == {(UAS, UAS_RTP)}


@pytest.mark.parametrize(
    ("media_ip", "variables", "reason"),
    [
        (UAS, {"expect_ip": Lab.ROUTER_WAN}, "strcmp sdp_ip"),  # c= is not the expected address
        (UAS, {"expect_ip": UAS, "expect_port": str(UAS_RTP + 2)}, "port_cmp"),  # wrong m= port
        (CALLER, {"expect_ip": CALLER}, "strcmp ct_host"),  # c= right, Contact host wrong
    ],
    ids=["c-address", "m-port", "contact-host"],
)
def test_each_answer_check_fails_the_call(
    lab: Lab, tmp_path: Path, media_ip: str, variables: dict[str, str], reason: str
) -> None:
    with echo_uas(lab, tmp_path, media_ip=media_ip):
        result = run_sipp(
            lab,
            "wan",
            "uac_call",
            f"{UAS}:5060",
            local_ip=CALLER,
            media_port=CALLER_RTP,
            variables={**variables, "hold_ms": "200"},
            timeout=20,
            workdir=tmp_path,
        )
    assert result.returncode == 1, result.describe()
    assert (result.successful, result.failed) == (0, 1)
    assert reason in result.errors, result.errors
    assert result.sent("BYE ") == 1  # SIPp still hangs up the call it aborts


def test_no_ack_caller_gets_the_uas_bye(lab: Lab, tmp_path: Path) -> None:
    with echo_uas(lab, tmp_path):
        result = run_sipp(
            lab,
            "wan",
            "uac_no_ack",
            f"{UAS}:5060",
            local_ip=CALLER,
            media_port=CALLER_RTP,
            timeout=15,
            workdir=tmp_path,
        )
    assert result.ok, result.describe()
    assert result.sent("ACK ") == 0
    assert result.received("SIP/2.0 200 OK") >= 2  # the UAS retransmitted its 200
    assert result.received("BYE ") == 1 and result.sent("SIP/2.0 200 OK") == 1


def test_the_same_call_over_tcp(lab: Lab, tmp_path: Path) -> None:
    with echo_uas(lab, tmp_path, transport="tcp"), count_rtp(lab, "wan", CALLER_RTP, local_ip=CALLER) as rtp:
        result = run_sipp(
            lab,
            "wan",
            "uac_call",
            f"{UAS}:5060",
            transport="tcp",
            local_ip=CALLER,
            media_port=CALLER_RTP,
            variables={"expect_ip": UAS, "hold_ms": "500"},
            timeout=20,
            workdir=tmp_path,
        )
    assert result.ok, result.describe()
    assert "TCP message received" in result.messages and "UDP message" not in result.messages
    assert rtp.count.sent >= 10 and rtp.count.received >= 10, rtp.count  # 0.5 s of 30 ms packets


def test_a_second_uas_on_a_taken_port_is_refused(lab: Lab, tmp_path: Path) -> None:
    # Over UDP SIPp itself would start (SO_REUSEADDR) and silently share the port's traffic.
    with echo_uas(lab, tmp_path) as first:
        with pytest.raises(RuntimeError, match="already taken"):
            echo_uas(lab, tmp_path)
        assert first.running()


def registrar(lab: Lab, tmp_path: Path) -> SippProcess:
    return start_sipp(
        lab,
        "wan",
        "registrar_standin",
        None,
        local_ip=UAS,
        local_port=5060,
        media_port=UAS_RTP,
        variables={"user": USER, "pass": PASSWORD, "hold_ms": "1000"},
        timeout=60,
        workdir=tmp_path,
    )


def test_phone_registers_with_digest_answers_and_plays_rtp(lab: Lab, tmp_path: Path) -> None:
    with registrar(lab, tmp_path) as reg, count_rtp(lab, "wan", CALLER_RTP, local_ip=CALLER) as rtp:
        result = run_sipp(
            lab,
            "wan",
            "uas_phone",
            f"{UAS}:5060",
            local_ip=CALLER,
            media_port=CALLER_RTP,
            variables={"user": USER, "answer_wait_ms": "8000"},
            auth=(USER, PASSWORD),
            timeout=20,
            workdir=tmp_path,
        )
    assert result.ok, result.describe()
    assert result.sent("REGISTER ") == 2 and result.received("SIP/2.0 401") == 1
    assert 'Authorization: Digest username="alice"' in result.messages
    # The INVITE came with a Call-ID the phone had never used: the out-of-call half answered it.
    assert result.received("INVITE ") == 1 and result.received("BYE ") == 1
    assert "Received out-of-call INVITE message" in result.errors
    assert reg.result is not None and reg.result.received("SIP/2.0 200 OK") >= 1
    assert rtp.count.sent >= 25 and rtp.count.received >= 25, rtp.count
    assert rtp.count.received_from == {(UAS, UAS_RTP)}


def test_phone_with_a_wrong_password_fails(lab: Lab, tmp_path: Path) -> None:
    with registrar(lab, tmp_path):
        result = run_sipp(
            lab,
            "wan",
            "uas_phone",
            f"{UAS}:5060",
            local_ip=CALLER,
            media_port=CALLER_RTP,
            variables={"user": USER, "answer_wait_ms": "3000"},
            auth=(USER, "wrong"),
            timeout=15,
            workdir=tmp_path,
        )
    assert result.returncode == 1 and (result.successful, result.failed) == (0, 1), result.describe()
    assert "SIP/2.0 403 Forbidden" in result.errors
    assert result.sent("BYE ") == 0  # -default_behaviors all,-bye: no BYE into a REGISTER dialog


# ---------------------------------------------------------------- the harness's own parts, no network


def test_variables_are_checked_before_sipp_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs -set \\['expect_ip'\\]"):
        sipp_argv("uac_call", "x:5060", logdir=tmp_path, local_ip=CALLER, media_port=6000)
    with pytest.raises(ValueError, match="declares no global \\['typo'\\]"):
        sipp_argv(
            "uac_call",
            "x:5060",
            logdir=tmp_path,
            local_ip=CALLER,
            media_port=6000,
            variables={"expect_ip": "a", "typo": "b"},
        )
    argv = sipp_argv(
        "uac_call", "x:5060", logdir=tmp_path, local_ip=CALLER, media_port=6000, variables={"expect_ip": "a"}
    )
    assert argv[argv.index("hold_ms") - 1 : argv.index("hold_ms") + 2] == ["-set", "hold_ms", "3000"]


def _pcap(linktype: int, frames: list[bytes], nanoseconds: bool = False) -> bytes:
    magic = 0xA1B23C4D if nanoseconds else 0xA1B2C3D4
    out = struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for index, frame in enumerate(frames):
        out += struct.pack("<IIII", 1000 + index, 500, len(frame), len(frame)) + frame
    return out


def _udp4(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    ip = bytes([0x45, 0]) + struct.pack("!HHHBBH", 28 + len(payload), 0, 0, 64, 17, 0)
    ip += bytes(int(x) for x in src.split(".")) + bytes(int(x) for x in dst.split("."))
    return ip + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def test_pcap_reader_counts_both_directions(tmp_path: Path) -> None:
    out = _udp4(CALLER, 6000, UAS, 7000, b"x" * 172)
    back = _udp4(UAS, 7000, CALLER, 6000, b"y" * 172)
    sll2 = struct.pack("!HHIHBB8s", 0x0800, 0, 1, 1, 0, 6, bytes(8))  # Linux cooked v2 (tcpdump -i any)
    ether = bytes(12) + b"\x08\x00"
    for linktype, head in ((276, sll2), (1, ether), (101, b"")):
        path = tmp_path / f"{linktype}.pcap"
        data = _pcap(linktype, [head + out, head + back, head + out])
        path.write_bytes(data + data[-20:])  # plus a truncated record, as a stopped capture can leave
        count = tally(read_pcap_udp(path), 6000, CALLER)
        assert (count.sent, count.received) == (2, 1), linktype
        assert count.sent_to == {(UAS, 7000)} and count.received_from == {(UAS, 7000)}
        assert count.packets[0].length == 172
    (tmp_path / "bad.pcap").write_bytes(b"not a pcap at all, really")
    with pytest.raises(ValueError, match="not a pcap"):
        read_pcap_udp(tmp_path / "bad.pcap")
