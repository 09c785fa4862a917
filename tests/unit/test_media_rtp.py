"""The echo's own RTP stream and RTCP (autonat.sip.rtp) and the ICE-lite responder (autonat.sip.ice), sans-IO."""

from __future__ import annotations

import itertools
import struct
from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from autonat.proto.stun import (
    Attribute,
    AttributeType,
    MessageClass,
    Method,
    StunMessage,
    binding_success_address,
    check_integrity,
    parse_message,
)
from autonat.sip.ice import IceResponder, is_stun, new_credentials
from autonat.sip.rtp import EchoStream, is_rtcp

CALLER_SSRC = 0x11223344


def rtp(seq: int, timestamp: int, *, ssrc: int = CALLER_SSRC, payload: bytes = b"voice", pt: int = 8) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc) + payload


def header(packet: bytes) -> tuple[int, int, int]:
    seq, timestamp, ssrc = struct.unpack_from("!HII", packet, 2)
    return seq, timestamp, ssrc


def fixed(seed: bytes) -> EchoStream:
    return EchoStream(rand=lambda n: seed[:n])


def test_the_echo_is_our_stream_with_the_callers_gaps_and_order() -> None:
    """RFC 3550 §5.1, §8.2: own SSRC, own random bases; what arrives with a gap or out of order leaves so."""
    stream = fixed(bytes.fromhex("0a0b0c0dfff000000100"))
    arrived = [(100, 1000), (101, 1160), (103, 1480), (102, 1320)]  # one lost then late
    out = [stream.rewrite(rtp(seq, ts, payload=bytes([seq]))) for seq, ts in arrived]
    assert all(packet is not None for packet in out)
    headers = [header(packet) for packet in out if packet is not None]
    assert {ssrc for _, _, ssrc in headers} == {0x0A0B0C0D} != {CALLER_SSRC}
    assert [seq for seq, _, _ in headers] == [0xFFF0, 0xFFF1, 0xFFF3, 0xFFF2]
    assert [ts for _, ts, _ in headers] == [0x100, 0x100 + 160, 0x100 + 480, 0x100 + 320]
    assert [packet[12:] for packet in out if packet is not None] == [
        bytes([100]),
        bytes([101]),
        bytes([103]),
        bytes([102]),
    ]
    assert (stream.packets, stream.octets) == (4, 4)


def test_sequence_numbers_wrap_and_a_new_caller_source_continues_our_numbering() -> None:
    stream = fixed(bytes.fromhex("00000001fffefffffff0"))
    first = [header(stream.rewrite(rtp(seq, seq * 160)) or b"")[:2] for seq in range(5)]
    assert [seq for seq, _ in first] == [0xFFFE, 0xFFFF, 0, 1, 2]  # 16-bit wrap
    assert [ts for _, ts in first] == [0xFFFFFFF0, 0x90, 0x130, 0x1D0, 0x270]  # 32-bit wrap
    other = stream.rewrite(rtp(5000, 99, ssrc=0x55555555))  # the caller restarted its stream
    assert other is not None
    seq, timestamp, ssrc = header(other)
    assert (seq, timestamp, ssrc) == (3, 0x270 + 160, 1)


def test_what_is_not_rtp_is_not_rewritten() -> None:
    assert EchoStream().rewrite(b"\x80\x08short") is None


def compound(data: bytes) -> list[tuple[int, bytes]]:
    """The RTCP packets of a compound packet (RFC 3550 §6.1): (type, packet), lengths checked."""
    packets = []
    offset = 0
    while offset < len(data):
        first, kind, words = struct.unpack_from("!BBH", data, offset)
        assert first >> 6 == 2
        size = (words + 1) * 4
        packets.append((kind, data[offset : offset + size]))
        offset += size
    assert offset == len(data)
    return packets


def test_our_rtcp_report_is_a_sender_report_with_our_cname() -> None:
    stream = fixed(bytes.fromhex("cafebabe000100000000"))
    for seq in range(3):
        stream.rewrite(rtp(seq, seq * 160, payload=b"x" * 160))
    report = stream.report(ntp=3_900_000_000.25)
    (sr_type, sr), (sdes_type, sdes) = compound(report)
    assert (sr_type, sdes_type) == (200, 202) and is_rtcp(report)
    ssrc, seconds, fraction, rtp_ts, packets, octets = struct.unpack_from("!IIIIII", sr, 4)
    assert (ssrc, seconds, fraction, rtp_ts, packets, octets) == (0xCAFEBABE, 3_900_000_000, 1 << 30, 320, 3, 480)
    assert struct.unpack_from("!I", sdes, 4)[0] == 0xCAFEBABE and b"autonat@echo" in sdes


def test_our_bye_speaks_for_our_ssrc_only() -> None:
    stream = fixed(bytes.fromhex("01020304000100000000"))
    kinds = compound(stream.bye())
    assert [kind for kind, _ in kinds] == [201, 202, 203]  # §6.1: a report first, SDES, then BYE
    assert struct.unpack_from("!I", kinds[2][1], 4)[0] == 0x01020304


def test_rtcp_and_rtp_tell_apart_on_one_port() -> None:
    """RFC 5761 §4: payload types 64-95 (second byte 192-223 with the marker bit) are RTCP's."""
    assert all(is_rtcp(bytes([0x80, kind]) + b"\x00" * 6) for kind in (200, 201, 202, 203, 204, 205, 206))
    assert not any(is_rtcp(rtp(1, 1, pt=pt)) for pt in (0, 8, 9, 18, 96, 101, 127))
    assert not is_rtcp(bytes([0x80 | 0, 0x80 | 8]) + b"\x00" * 10)  # PCMA with the marker bit


# --------------------------------------------------------------------------------------------- ICE-lite

UFRAG, PWD = "ufrg0001", "p" * 24
SOURCE = ("203.0.113.100", 24276)


def check(username: bytes, key: bytes, *, tid: bytes = b"t" * 12, nominate: bool = False) -> bytes:
    attributes = [Attribute(AttributeType.USERNAME, username), Attribute(AttributeType.PRIORITY, b"\x6e\x00\x01\xff")]
    if nominate:
        attributes.append(Attribute(AttributeType.USE_CANDIDATE, b""))
    message = StunMessage(MessageClass.REQUEST, Method.BINDING, tid, tuple(attributes))
    return message.encode(integrity=key, fingerprint=True)


def test_a_check_with_our_credentials_gets_a_signed_success_naming_its_source() -> None:
    responder = IceResponder(UFRAG, PWD)
    answered = responder.answer(check(f"{UFRAG}:theirs".encode(), PWD.encode(), nominate=True), SOURCE)
    assert answered is not None
    response, nominated = answered
    assert nominated
    message = parse_message(response)  # FINGERPRINT verified
    assert message.message_class is MessageClass.SUCCESS and message.transaction_id == b"t" * 12
    assert binding_success_address(message) == (IPv4Address(SOURCE[0]), SOURCE[1])
    assert check_integrity(response, PWD.encode())
    plain = responder.answer(check(f"{UFRAG}:theirs".encode(), PWD.encode()), ("::ffff:203.0.113.9", 9))
    assert plain is not None and not plain[1]
    assert binding_success_address(parse_message(plain[0])) == (IPv4Address("203.0.113.9"), 9)


def test_anything_else_gets_no_answer() -> None:
    responder = IceResponder(UFRAG, PWD)
    for data in (
        check(b"other:theirs", PWD.encode()),  # not our ufrag
        check(f"{UFRAG}theirs".encode(), PWD.encode()),  # no colon after it
        check(f"{UFRAG}:theirs".encode(), b"a guess"),  # wrong integrity
        StunMessage(MessageClass.INDICATION, Method.BINDING, b"t" * 12).encode(),  # a keepalive indication
        StunMessage(MessageClass.SUCCESS, Method.BINDING, b"t" * 12).encode(),
        b"\x00\x01\x00\x00" + b"\x00" * 16,  # no magic cookie
    ):
        assert responder.answer(data, SOURCE) is None


@given(st.binary(max_size=200))
def test_hostile_bytes_never_raise(data: bytes) -> None:
    assert IceResponder(UFRAG, PWD).answer(data, SOURCE) is None or is_stun(data)


def test_credentials_are_ice_chars_of_the_lengths_rfc_8445_asks() -> None:
    counter = itertools.count()
    ufrag, pwd = new_credentials(rand=lambda n: bytes((next(counter) * 37) % 256 for _ in range(n)))
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
    assert len(ufrag) >= 4 and len(pwd) >= 22 and set(ufrag + pwd) <= alphabet
    assert new_credentials() != new_credentials()
