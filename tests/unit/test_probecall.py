"""The test call's sans-IO parts (autonat.sip.probecall) on a fake clock: the URI, the signal and its schedule,
what is recognised in an echo (SIPp's verbatim one, autonat's re-originating one), RTT, loss, RFC 3550 §A.8
jitter, the verdicts; rtp_payload; hypothesis for everything that reads untrusted input."""

from __future__ import annotations

import ast
import itertools
import math
import struct
from ipaddress import ip_address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.sip import probecall
from autonat.sip.peer import Peer
from autonat.sip.probecall import Figures, Outcome, Signal, choose_answer, parse_target, report, verdict
from autonat.sip.rtp import EchoStream, rtp_payload
from autonat.sip.session import describe, echo_offer, first_audio

SOURCE = ("203.0.113.100", 6000)


def seeded(n: int) -> bytes:
    return bytes(range(1, n + 1))


def sipp_echo(packet: bytes) -> bytes:
    return packet  # SIPp -rtp_echo: the datagram back as it came


# --------------------------------------------------------------------------------------------- the target


@pytest.mark.parametrize(
    ("text", "uri", "peer"),
    [
        ("sip:9196@203.0.113.50", "sip:9196@203.0.113.50:5060", Peer("udp", "203.0.113.50", 5060)),
        (" sip:9196@203.0.113.50:5080 ", "sip:9196@203.0.113.50:5080", Peer("udp", "203.0.113.50", 5080)),
        ("SIP:echo@10.0.0.1;transport=TCP", "sip:echo@10.0.0.1:5060;transport=tcp", Peer("tcp", "10.0.0.1", 5060)),
        ("sips:9196@[2001:db8::1]", "sips:9196@[2001:db8::1]:5061", Peer("tls", "2001:db8::1", 5061)),
        ("sip:192.0.2.9:5070", "sip:192.0.2.9:5070", Peer("udp", "192.0.2.9", 5070)),
        ("sip:*9196@127.0.0.1:5060", "sip:*9196@127.0.0.1:5060", Peer("udp", "127.0.0.1", 5060)),
    ],
)
def test_a_target_is_a_sip_uri_with_an_ip_literal(text: str, uri: str, peer: Peer) -> None:
    target = parse_target(text)
    assert (target.uri, target.peer) == (uri, peer)
    assert parse_target(target.uri) == target  # the normalised form reads back as itself


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "the URI is empty"),
        ("tel:+15551234", "not a SIP URI: 'tel:+15551234'"),
        ("sip:9196@pbx.example.org", "the URI's host must be an IP address, not 'pbx.example.org' (no DNS lookups)"),
        ("sip:9196@203.0.113.50?subject=x", "the URI has headers (?...): not for a test call"),
        ("sip:9196@203.0.113.50;maddr=10.0.0.1", "unsupported URI parameter 'maddr=10.0.0.1'"),
        ("sip:9196@203.0.113.50;transport=sctp", "unsupported URI parameter 'transport=sctp'"),
        ("sips:9196@203.0.113.50;transport=udp", "a sips: URI is called over TLS only"),
        ("sip:9196@203.0.113.50:70000", "the URI's port must be 1-65535, not 70000"),
        ("sip:9196@203.0.113.50:0", "the URI's port must be 1-65535, not 0"),
        ("sip:9196@[203.0.113.50]", "only an IPv6 host goes in brackets"),
        ("sip:9196@2001:db8::1", "not a SIP URI"),
        ("sip:9196@0.0.0.0", "0.0.0.0 is not an address a call can go to"),
        ("sip:9196@224.0.0.1", "224.0.0.1 is not an address a call can go to"),
        ("sip:99é6@203.0.113.50", "the URI has characters a SIP URI cannot have"),
        ("sip:9196@203.0.113.50\r\nX: y", "the URI has characters a SIP URI cannot have"),
        ("sip:" + "9" * 300 + "@203.0.113.50", "the URI is longer than 256 characters"),
    ],
)
def test_a_bad_target_is_one_line(text: str, error: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_target(text)
    assert str(raised.value).startswith(error) and "\n" not in str(raised.value)


@given(st.text(max_size=300))
def test_any_text_is_a_target_or_a_one_line_value_error(text: str) -> None:
    try:
        target = parse_target(text)
    except ValueError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    assert parse_target(target.uri) == target and len(target.uri) <= probecall.MAX_URI + 30
    assert ip_address(target.peer.ip) and 0 < target.peer.port < 65536


@given(
    st.sampled_from(["sip", "sips"]),
    st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9*.\-_%]{1,12}", fullmatch=True)),
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.one_of(st.none(), st.integers(1, 65535)),
)
def test_every_well_formed_target_is_read_back(
    scheme: str, user: str | None, address: object, port: int | None
) -> None:
    ip = ip_address(str(address))
    if ip.is_unspecified or ip.is_multicast:
        return
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    text = f"{scheme}:{user + '@' if user else ''}{host}{'' if port is None else f':{port}'}"
    target = parse_target(text)
    assert target.peer == Peer(
        "tls" if scheme == "sips" else "udp", str(ip), port or (5061 if scheme == "sips" else 5060)
    )
    assert target.user == user


@pytest.mark.parametrize("value", [1, 5, 60, 2.5])
def test_seconds_in_range(value: float) -> None:
    assert probecall.check_seconds(value) == value


@pytest.mark.parametrize("value", [0, 0.5, 61, -1, math.nan, math.inf, True, "5", None])
def test_seconds_out_of_range_is_one_line(value: object) -> None:
    with pytest.raises(ValueError, match=r"^seconds must be "):
        probecall.check_seconds(value)


# --------------------------------------------------------------------------------------------- the signal


def test_the_signal_is_20_ms_pcmu_with_rtp_headers_a_token_and_the_digital_milliwatt() -> None:
    signal = Signal(1, rand=seeded)
    assert signal.timer() is None and signal.due(100.0) == []  # nothing before the answer
    signal.start(100.0)
    first, *_ = signal.due(100.0)
    assert signal.timer() == pytest.approx(100.02)
    assert len(first) == 12 + 160
    byte0, byte1, seq, ts, ssrc = struct.unpack("!BBHII", first[:12])
    assert (byte0, byte1) == (0x80, 0x80)  # RTP version 2, marker on the first packet, payload type 0 (PCMU)
    assert (seq, ts, ssrc) == (0x0D0E, 0x0F101112, 0x090A0B0C)  # the random bases, the SSRC
    assert first[12:20] == signal.token and first[20:24] == bytes(4)  # the token, index 0
    assert first[24:32] == bytes.fromhex("9e8b8b9e1e0b0b1e")  # G.711 Table 5, from sample 12 on
    second = signal.due(100.02)[0]
    assert second[1] == 0 and struct.unpack("!HI", second[2:8]) == (0x0D0F, 0x0F101112 + 160)
    assert second[20:24] == (1).to_bytes(4, "big")


def test_pcma_when_the_answer_takes_only_that() -> None:
    signal = Signal(1, rand=seeded)
    signal.start(0.0, 8)
    packet = signal.due(0.0)[0]
    assert packet[1] == 0x88 and packet[24:32] == bytes.fromhex("b4a1a1b434212134")  # G.711 Table 6
    with pytest.raises(ValueError, match="PCMU"):
        Signal(1).start(0.0, 18)


def test_the_schedule_sends_50_packets_a_second_for_the_asked_seconds_and_stops() -> None:
    signal = Signal(2)
    signal.start(0.0)
    sent = 0
    now = 0.0
    while (when := signal.timer()) is not None:
        now = when
        sent += len(signal.due(now))
    assert sent == signal.sent == 100 and signal.skipped == 0
    assert now == pytest.approx(1.98) and signal.due(10.0) == []


def test_a_late_loop_sends_at_most_a_burst_and_skips_the_stale_packets() -> None:
    signal = Signal(5)
    signal.start(0.0)
    assert len(signal.due(0.0)) == 1
    late = signal.due(1.0)  # the loop was stuck for a second: packets 1-50 are due
    assert len(late) == probecall.MAX_BURST and signal.skipped == 50 - probecall.MAX_BURST
    indexes = [int.from_bytes(packet[20:24], "big") for packet in late]
    assert indexes == list(range(41, 51))  # the newest ones: stale audio is not sent in a burst
    for packet in late:
        signal.receive(packet, SOURCE, 1.0)
    for skipped in range(1, 41):  # a forged "echo" of a packet we never sent is not an echo
        forged = late[0][:20] + skipped.to_bytes(4, "big") + late[0][24:]
        signal.receive(forged, SOURCE, 1.0)
    assert signal.received == 10 and signal.foreign == 40


def test_echoes_verbatim_or_re_originated_give_rtt_loss_duplicates_and_reordering() -> None:
    for echo in (sipp_echo, EchoStream(rand=seeded).rewrite):
        signal = Signal(1)
        signal.start(0.0)
        packets: list[tuple[float, bytes]] = []
        while (when := signal.timer()) is not None:
            packets += [(when, packet) for packet in signal.due(when)]
        # Back after 30 ms, but packet 10 is lost, 20 comes twice, and 30 is held back 25 ms (31 overtakes it).
        arrivals: list[tuple[float, bytes]] = []
        for index, (sent_at, packet) in enumerate(packets):
            if index != 10:
                arrivals.append((sent_at + (0.055 if index == 30 else 0.030), packet))
            if index == 20:
                arrivals.append((sent_at + 0.031, packet))
        for at, packet in sorted(arrivals, key=lambda arrival: arrival[0]):
            back = echo(packet)
            assert back is not None
            signal.receive(back, SOURCE, at)
        figures = signal.figures()
        assert (figures.sent, figures.received, figures.duplicates, figures.reordered) == (50, 49, 1, 1)
        assert figures.foreign == 0 and figures.loss == pytest.approx(0.02)
        assert figures.rtt_min == pytest.approx(0.030) and figures.rtt_max == pytest.approx(0.055)
        assert figures.rtt_avg == pytest.approx((48 * 0.030 + 0.055) / 49)
        assert figures.sources == (SOURCE,)


def test_jitter_is_rfc_3550_a8_on_the_moments_the_packets_left() -> None:
    signal = Signal(1)
    signal.start(0.0)
    due: list[bytes] = []
    now = 0.0
    while (when := signal.timer()) is not None:
        now = when
        due += signal.due(now)
    delays = list(itertools.islice(itertools.cycle([0.010, 0.030]), len(due)))  # 20 ms of variation each time
    for index, (packet, delay) in enumerate(zip(due, delays, strict=True)):
        signal.receive(packet, SOURCE, index * 0.020 + delay)
    expected = 0.0
    for _ in range(len(due) - 1):  # J += (|D| - J) / 16 with |D| = 20 ms = 160 timestamp units each step
        expected += (160 - expected) / 16
    assert signal.figures().jitter == pytest.approx(expected / 8000)
    steady = Signal(1)
    steady.start(0.0)
    while (when := steady.timer()) is not None:
        late = when + 0.001 * (steady.sent % 2)  # our loop wakes up a millisecond late every other packet ...
        for packet in steady.due(late):
            steady.receive(packet, SOURCE, late + 0.030)  # ... but the path's transit is constant: no jitter
    assert steady.figures().received == 50 and steady.figures().jitter == pytest.approx(0.0, abs=1e-9)


def test_what_is_not_an_echo_of_ours_is_foreign_and_rtcp_is_counted_apart() -> None:
    signal = Signal(1)
    signal.start(0.0)
    packet = signal.due(0.0)[0]
    other = Signal(1)  # another call's signal: another token
    other.start(0.0)
    rtcp = EchoStream().report(3_900_000_000.0)
    for datagram in (other.due(0.0)[0], rtcp, b"", b"\x80", packet[:20], b"\x00" * 200):
        signal.receive(datagram, SOURCE, 0.01)
    signal.receive_rtcp()
    figures = signal.figures()
    assert (figures.received, figures.foreign, figures.rtcp, figures.rtt_min, figures.jitter) == (0, 6, 1, None, None)


@given(st.lists(st.binary(max_size=300), max_size=30), st.integers(0, 20))
def test_any_datagrams_are_counted_once_and_never_raise(datagrams: list[bytes], echoes: int) -> None:
    signal = Signal(1)
    signal.start(0.0)
    ours = signal.due(1.0)[:echoes]
    for data in datagrams + ours:
        signal.receive(data, SOURCE, 2.0)
    figures = signal.figures()
    assert figures.received + figures.duplicates + figures.foreign == len(datagrams) + len(ours)
    assert figures.received <= figures.sent


def test_stop_ends_the_sending_and_echoes_still_count() -> None:
    signal = Signal(5)
    signal.start(0.0)
    packet = signal.due(0.0)[0]
    signal.stop()
    assert signal.timer() is None and signal.due(1.0) == []
    signal.receive(packet, SOURCE, 0.5)
    assert signal.figures().received == 1


# --------------------------------------------------------------------------------------------- rtp_payload


def test_rtp_payload_skips_csrcs_the_extension_and_padding() -> None:
    header = bytes([0x80 | 0x20 | 0x10 | 2, 0]) + bytes(10)  # padding, extension, two CSRCs
    packet = header + bytes(8) + b"\xbe\xde\x00\x01" + bytes(4) + b"payload" + b"\x00\x00\x03"
    payload = rtp_payload(packet)
    assert payload is not None and bytes(payload) == b"payload"
    assert rtp_payload(b"\x40" + bytes(20)) is None  # version 1
    assert rtp_payload(bytes([0x8F]) + bytes(20)) is None  # 15 CSRCs do not fit
    assert rtp_payload(bytes([0xA0]) + bytes(10) + b"\xff") is None  # padding longer than the packet


@given(st.binary(max_size=200))
def test_rtp_payload_never_raises_and_stays_inside_the_packet(data: bytes) -> None:
    payload = rtp_payload(data)
    if payload is not None:
        assert len(payload) <= len(data) - 12 and bytes(payload) in data


# --------------------------------------------------------------------------------------------- answers


def answer(
    formats: str, *, direction: str = "sendrecv", address: str = "203.0.113.100", proto: str = "RTP/AVP"
) -> bytes:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {address}\r\ns=-\r\nc=IN IP4 {address}\r\nt=0 0\r\n"
        f"m=audio 6000 {proto} {formats}\r\na={direction}\r\n"
    ).encode()


def test_the_answer_says_where_to_send_and_in_which_codec() -> None:
    assert choose_answer(describe(answer("0"))) == probecall.Answer(SOURCE, 0, "PCMU")
    assert choose_answer(describe(answer("8 0"))) == probecall.Answer(SOURCE, 8, "PCMA")  # its preference
    assert choose_answer(describe(answer("9"))) == "the answer accepts neither PCMU nor PCMA"
    assert choose_answer(describe(answer("0", direction="sendonly"))) == "the answer does not take audio (a=sendonly)"
    assert choose_answer(describe(answer("0", address="0.0.0.0"))) == "the answer gives no address to send audio to"
    assert choose_answer(describe(answer("0", proto="RTP/SAVP"))) == "the answer wants SRTP"
    assert choose_answer(describe(answer("0", direction="recvonly"))) == probecall.Answer(SOURCE, 0, "PCMU")
    assert choose_answer(None) == "the answer has no audio stream we can use"


def test_the_offer_is_g711_only() -> None:
    sdp = echo_offer(
        address=ip_address("203.0.113.1"),
        port=30000,
        rtcp_port=30001,
        session_id=7,
        version=7,
        formats=probecall.OFFERED,
    )
    audio = first_audio(sdp)
    assert audio is not None and audio.formats == ("0", "8") and audio.port == 30000
    assert "a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=ptime:20\r\na=sendrecv\r\n" in sdp
    assert "fmtp" not in sdp and "a=rtcp:" not in sdp


# --------------------------------------------------------------------------------------------- verdicts


def outcome(**changes: object) -> Outcome:
    base: dict[str, object] = {
        "uri": "sip:9196@203.0.113.100:5060",
        "profile": "external",
        "call_id": "abc@203.0.113.1",
        "seconds": 5.0,
        "answered": True,
        "status": 200,
        "phrase": "OK",
        "reason": "test call done",
        "setup": 0.0021,
        "duration": 6.0,
        "local": ("192.168.77.10", 30000),
        "advertised": ("203.0.113.1", 30000),
        "mapping": ("203.0.113.1", 30000),
        "remote": SOURCE,
        "codec": "PCMU",
    }
    base.update(changes)
    return Outcome(**base)  # type: ignore[arg-type]


GOOD = Figures(250, 250, rtt_min=0.0003, rtt_avg=0.0004, rtt_max=0.002, jitter=0.0001, sources=(SOURCE,))


@pytest.mark.parametrize(
    ("case", "figures", "line"),
    [
        (outcome(), GOOD, "ok: audio both ways through the NAT"),
        (outcome(), Figures(250, 100), "ok: audio both ways through the NAT, but 60.0 % lost"),
        (
            outcome(mapping=("2001:db8::10", 30000), advertised=("2001:db8::10", 30000)),
            GOOD,
            "ok: audio both ways through the router's IPv6 firewall (pinholes)",
        ),
        (
            outcome(mapping=None, advertised=("192.168.77.10", 30000)),
            GOOD,
            "ok: audio both ways, not through a router mapping (our SDP gave 192.168.77.10:30000)",
        ),
        (outcome(), Figures(250, 0), "fail: no audio back"),
        (outcome(reason="the answer wants SRTP"), Figures(0, 0), "fail: no audio sent (the answer wants SRTP)"),
        (
            outcome(answered=False, status=486, phrase="Busy Here", reason="refused"),
            None,
            "fail: call refused 486 Busy Here",
        ),
        (outcome(answered=False, status=None, reason="no answer"), None, "fail: no answer"),
        (outcome(answered=False, status=408, phrase="Request Timeout", reason="x"), None, "fail: no answer"),
        (outcome(answered=False, status=None, reason="peer unreachable"), None, "fail: peer unreachable"),
    ],
)
def test_the_verdict(case: Outcome, figures: Figures | None, line: str) -> None:
    assert verdict(case, figures) == (line.startswith("ok"), line)
    assert report(case, figures)["verdict"] == line


def test_the_report_has_every_figure_in_milliseconds_and_the_media_addresses() -> None:
    shown = report(outcome(), GOOD)
    assert shown["schema"] == 1 and shown["ok"] is True and shown["setup_ms"] == 2.1 and shown["duration_s"] == 6.0
    assert shown["rtp"] == {
        "sent": 250,
        "received": 250,
        "lost": 0,
        "loss_percent": 0.0,
        "duplicates": 0,
        "reordered": 0,
        "foreign": 0,
        "skipped": 0,
        "rtcp_received": 0,
    }
    assert shown["rtt_ms"] == {"min": 0.3, "avg": 0.4, "max": 2.0} and shown["jitter_ms"] == 0.1
    assert shown["media"] == {
        "local": "192.168.77.10:30000",
        "advertised": "203.0.113.1:30000",
        "mapping": "203.0.113.1:30000",
        "remote": "203.0.113.100:6000",
        "echo_from": ["203.0.113.100:6000"],
        "through_mapping": True,
    }
    refused = report(outcome(answered=False, status=486, phrase="Busy Here", local=None, advertised=None), None)
    assert refused["rtp"] is None and refused["rtt_ms"] is None and refused["media"]["local"] is None


def test_the_measurement_core_does_no_io() -> None:
    # Sans-IO like the other cores (tests/unit/test_architecture.py lists them): no sockets, no clock.
    tree = ast.parse(Path(probecall.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"asyncio", "socket", "time", "threading", "selectors"}
