"""STUN codec (RFC 8489) and client: RFC 5769 vectors, what stund 0.97 really sends, malformed input,
and `stun_binding` against a scriptable fake server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.aio.stun import (
    STUN_SCHEDULE,
    StunError,
    StunTargetError,
    StunTimeout,
    parse_stun_target,
    resolve_server,
    stun_binding,
)
from autonat.errors import AutonatError, RouterTimeout
from autonat.proto import stun
from autonat.proto.errors import DecodeError
from autonat.proto.exchange import Exchange
from autonat.proto.stun import (
    Attribute,
    AttributeType,
    ErrorCode,
    MessageClass,
    Method,
    StunMessage,
    binding_success_address,
    build_binding_request,
    check_integrity,
    decode_address,
    encode_error_code,
    encode_mapped_address,
    encode_xor_mapped_address,
    error_code,
    parse_binding_response,
    parse_message,
    reply_key,
)

# --- RFC 5769 test vectors (§2.1-2.3), byte for byte ---------------------------------------------

RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "80220010" + b"STUN test client".hex() + "002400046e0001ff"
    "80290008932ff9b151263b36"
    "00060009657674" + "6a3a683676592020" + "20"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b" + b"test vector ".hex() + "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b" + b"test vector ".hex() + "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)

# --- a Binding answer captured from the lab's Debian stund 0.97 (tests/lab/test_stun_lab.py) ----------

STUND_TID = bytes.fromhex("c41ab9b5253140bbecb71638")
STUND_ANSWER = bytes.fromhex(
    "010100442112a442c41ab9b5253140bbecb71638"
    "000100080001cb16cb007101"  # MAPPED-ADDRESS 203.0.113.1:51990
    "0004000800010d96cb007164"  # SOURCE-ADDRESS 203.0.113.100:3478 (RFC 3489)
    "0005000800010d97cb007165"  # CHANGED-ADDRESS 203.0.113.101:3479 (RFC 3489)
    "002000080001ea04ea12d543"  # XOR-MAPPED-ADDRESS, type 0x0020
    "80220010" + b"Vovida.org 0.97\0".hex()  # its name in 0x8022, NUL-padded
)

TID = bytes(range(1, 13))


def message_integrity_ok(message: bytes, key: bytes) -> bool:
    """RFC 8489 §14.5 (HMAC-SHA1 with the length up to MESSAGE-INTEGRITY), to prove the vectors were copied
    right; the codec itself does not verify integrity."""
    end = message.index(b"\x00\x08\x00\x14", HEADER_END)
    header = message[:2] + struct.pack("!H", end + 24 - 20) + message[4:20]
    expected = hmac.new(key, header + message[20:end], hashlib.sha1).digest()
    return hmac.compare_digest(expected, message[end + 4 : end + 24])


HEADER_END = 20


def raw_message(type_: int, attributes: bytes, tid: bytes = TID, cookie: int = stun.MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI12s", type_, len(attributes), cookie, tid) + attributes


def tlv(type_: int, value: bytes, pad: bytes = b"\0") -> bytes:
    return struct.pack("!HH", type_, len(value)) + value + pad * (-len(value) % 4)


# --- constants and the message type layout -----------------------------------------------------------


def test_constants() -> None:
    assert stun.MAGIC_COOKIE == 0x2112A442
    assert (stun.HEADER_SIZE, stun.TRANSACTION_ID_SIZE, stun.DEFAULT_PORT) == (20, 12, 3478)
    assert (stun.MAX_MESSAGE_SIZE, stun.MAX_ATTRIBUTES) == (2048, 64)


@pytest.mark.parametrize(
    ("message_class", "wire_type"),
    [
        (MessageClass.REQUEST, 0x0001),
        (MessageClass.INDICATION, 0x0011),
        (MessageClass.SUCCESS, 0x0101),
        (MessageClass.ERROR, 0x0111),
    ],
)
def test_binding_message_types_follow_section_5(message_class: MessageClass, wire_type: int) -> None:
    encoded = StunMessage(message_class, Method.BINDING, TID).encode()
    assert struct.unpack("!H", encoded[:2])[0] == wire_type
    decoded = parse_message(encoded)
    assert (decoded.message_class, decoded.method) == (message_class, Method.BINDING)


@given(st.sampled_from(list(MessageClass)), st.integers(0, 0xFFF))
def test_class_and_method_bits_round_trip(message_class: MessageClass, method: int) -> None:
    decoded = parse_message(StunMessage(message_class, method, TID).encode())
    assert (decoded.message_class, decoded.method) == (message_class, method)


# --- the RFC 5769 vectors ---------------------------------------------------------------------------


def test_rfc5769_vectors_are_the_published_bytes() -> None:
    # Both authenticators check with the RFC's password: not one byte was mistyped.
    for vector in (RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE):
        assert message_integrity_ok(vector, RFC5769_PASSWORD)
    assert (len(RFC5769_REQUEST), len(RFC5769_IPV4_RESPONSE), len(RFC5769_IPV6_RESPONSE)) == (108, 80, 92)


def test_short_term_integrity_of_the_rfc5769_vectors() -> None:
    """RFC 8489 §14.5 with the RFC 5769 password: what an ICE-lite agent checks and signs (RFC 8445 §7.2.2)."""
    for vector in (RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE):
        assert check_integrity(vector, RFC5769_PASSWORD)
        assert not check_integrity(vector, b"another password")
    assert not check_integrity(build_binding_request(TID), RFC5769_PASSWORD)  # none to check


def test_a_signed_response_checks_out_and_keeps_its_fingerprint_last() -> None:
    attributes = (encode_xor_mapped_address(IPv4Address("203.0.113.100"), 40000, TID),)
    wire = StunMessage(MessageClass.SUCCESS, Method.BINDING, TID, attributes).encode(integrity=b"pwd", fingerprint=True)
    decoded = parse_message(wire)  # the FINGERPRINT is verified on the way
    assert [a.type for a in decoded.attributes] == [0x0020, 0x0008, 0x8028]
    assert check_integrity(wire, b"pwd") and not check_integrity(wire, b"pwe")
    tampered = bytearray(wire)
    tampered[27] ^= 1  # the mapped port, inside the signed part
    assert not check_integrity(bytes(tampered), b"pwd")


def test_rfc5769_sample_request() -> None:
    message = parse_message(RFC5769_REQUEST)  # its FINGERPRINT is verified on the way
    assert (message.message_class, message.method, message.transaction_id) == (
        MessageClass.REQUEST,
        Method.BINDING,
        RFC5769_TID,
    )
    assert message.software == "STUN test client"
    username = message.get(AttributeType.USERNAME)
    assert username is not None and username.value == b"evtj:h6vY"
    assert [a.type for a in message.attributes] == [0x8022, 0x0024, 0x8029, 0x0006, 0x0008, 0x8028]
    assert message.unknown_comprehension_required == ()  # PRIORITY (RFC 8445 §16.1) is known: ICE-lite reads it


def test_rfc5769_ipv4_response() -> None:
    message = parse_message(RFC5769_IPV4_RESPONSE)
    assert message.message_class is MessageClass.SUCCESS
    assert message.software == "test vector"
    assert binding_success_address(message) == (IPv4Address("192.0.2.1"), 32853)
    assert parse_binding_response(RFC5769_IPV4_RESPONSE, RFC5769_TID) == (IPv4Address("192.0.2.1"), 32853)


def test_rfc5769_ipv6_response() -> None:
    expected = (IPv6Address("2001:db8:1234:5678:11:2233:4455:6677"), 32853)
    assert binding_success_address(parse_message(RFC5769_IPV6_RESPONSE)) == expected
    assert parse_binding_response(RFC5769_IPV6_RESPONSE, RFC5769_TID) == expected


@pytest.mark.parametrize("vector", [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE])
def test_a_flipped_bit_breaks_the_fingerprint(vector: bytes) -> None:
    for index in (21, 30, len(vector) - 9):  # inside attributes, before the FINGERPRINT
        damaged = bytearray(vector)
        damaged[index] ^= 0x01
        with pytest.raises(DecodeError, match="FINGERPRINT does not match"):
            parse_message(bytes(damaged))


# --- what stund 0.97 sends -------------------------------------------------------------------------


def test_stund_answer_prefers_xor_mapped_address() -> None:
    message = parse_message(STUND_ANSWER)
    assert message.software == "Vovida.org 0.97"
    assert message.unknown_comprehension_required == ()  # SOURCE-/CHANGED-ADDRESS are known by name
    assert binding_success_address(message) == (IPv4Address("203.0.113.1"), 51990)
    source = message.get(AttributeType.SOURCE_ADDRESS)
    changed = message.get(AttributeType.CHANGED_ADDRESS)
    assert source is not None and decode_address(source.value) == (IPv4Address("203.0.113.100"), 3478)
    assert changed is not None and decode_address(changed.value) == (IPv4Address("203.0.113.101"), 3479)


def test_mapped_address_is_the_fallback_for_rfc3489_servers() -> None:
    message = parse_message(STUND_ANSWER)
    without_xor = StunMessage(
        message.message_class,
        message.method,
        message.transaction_id,
        tuple(a for a in message.attributes if a.type != AttributeType.XOR_MAPPED_ADDRESS),
    )
    assert binding_success_address(parse_message(without_xor.encode())) == (IPv4Address("203.0.113.1"), 51990)


def test_xor_mapped_wins_over_a_mapped_address_an_alg_rewrote() -> None:
    response = StunMessage(
        MessageClass.SUCCESS,
        Method.BINDING,
        TID,
        (
            encode_mapped_address(IPv4Address("192.168.77.10"), 5060),  # an ALG "fixed" it
            encode_xor_mapped_address(IPv4Address("203.0.113.1"), 40000, TID),
        ),
    ).encode()
    assert parse_binding_response(response, TID) == (IPv4Address("203.0.113.1"), 40000)


def test_only_the_first_of_repeated_attributes_counts() -> None:
    response = StunMessage(
        MessageClass.SUCCESS,
        Method.BINDING,
        TID,
        (
            encode_xor_mapped_address(IPv4Address("203.0.113.1"), 1, TID),
            encode_xor_mapped_address(IPv4Address("203.0.113.2"), 2, TID),
        ),
    ).encode()
    assert parse_binding_response(response, TID) == (IPv4Address("203.0.113.1"), 1)


def test_unknown_comprehension_required_attributes_are_tolerated_in_responses() -> None:
    response = StunMessage(
        MessageClass.SUCCESS,
        Method.BINDING,
        TID,
        (Attribute(0x7F01, b"whatever"), encode_xor_mapped_address(IPv4Address("203.0.113.1"), 9, TID)),
    )
    parsed = parse_message(response.encode())
    assert parsed.unknown_comprehension_required == (0x7F01,)
    assert parse_binding_response(response.encode(), TID) == (IPv4Address("203.0.113.1"), 9)


def test_attributes_after_message_integrity_are_ignored() -> None:
    attributes = (
        tlv(AttributeType.MAPPED_ADDRESS, encode_mapped_address(IPv4Address("198.51.100.1"), 1).value)
        + tlv(AttributeType.MESSAGE_INTEGRITY, bytes(20))
        + tlv(AttributeType.XOR_MAPPED_ADDRESS, encode_xor_mapped_address(IPv4Address("203.0.113.9"), 2, TID).value)
    )
    message = parse_message(raw_message(0x0101, attributes))
    assert [a.type for a in message.attributes] == [AttributeType.MAPPED_ADDRESS, AttributeType.MESSAGE_INTEGRITY]
    assert binding_success_address(message) == (IPv4Address("198.51.100.1"), 1)


# --- requests ----------------------------------------------------------------------------------------


def test_binding_request_is_the_bare_header() -> None:
    assert build_binding_request(TID) == bytes.fromhex("000100002112a442") + TID


def test_binding_request_with_software_is_space_padded_for_stund() -> None:
    request = build_binding_request(TID, software="autonat")
    assert request == bytes.fromhex("0001000c2112a442") + TID + bytes.fromhex("80220008") + b"autonat "
    assert parse_message(request).software == "autonat"


@given(st.text(min_size=0, max_size=100))
def test_software_length_is_always_a_multiple_of_four(text: str) -> None:
    request = build_binding_request(TID, software=text)
    message = parse_message(request)
    attribute = message.get(AttributeType.SOFTWARE)
    assert attribute is not None and len(attribute.value) % 4 == 0
    assert reply_key(request) == TID


def test_binding_request_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        build_binding_request(b"short")
    with pytest.raises(ValueError, match="too long"):
        build_binding_request(TID, software="x" * 800)


def test_new_transaction_id_is_96_random_bits() -> None:
    assert len(stun.new_transaction_id()) == 12
    assert stun.new_transaction_id(lambda n: b"\x07" * n) == b"\x07" * 12
    assert stun.new_transaction_id() != stun.new_transaction_id()


# --- round trips ------------------------------------------------------------------------------------

ipv4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
addresses = st.one_of(ipv4, ipv6)
ports = st.integers(0, 0xFFFF)
tids = st.binary(min_size=12, max_size=12)
attributes = st.builds(Attribute, st.integers(0, 0xFFFF).filter(lambda t: t != 0x8028), st.binary(max_size=40))


@given(addresses, ports, tids)
def test_xor_mapped_address_round_trip(address: IPv4Address | IPv6Address, port: int, tid: bytes) -> None:
    response = StunMessage(MessageClass.SUCCESS, Method.BINDING, tid, (encode_xor_mapped_address(address, port, tid),))
    assert parse_binding_response(response.encode(), tid) == (address, port)


@given(addresses, ports)
def test_mapped_address_round_trip(address: IPv4Address | IPv6Address, port: int) -> None:
    attribute = encode_mapped_address(address, port)
    assert decode_address(attribute.value) == (address, port)


@given(
    st.sampled_from(list(MessageClass)),
    tids,
    st.lists(attributes, max_size=8).map(tuple),
    st.booleans(),
)
def test_message_round_trip(
    message_class: MessageClass, tid: bytes, attrs: tuple[Attribute, ...], fingerprint: bool
) -> None:
    message = StunMessage(message_class, Method.BINDING, tid, attrs)
    encoded = message.encode(fingerprint=fingerprint)
    assert len(encoded) % 4 == 0
    decoded = parse_message(encoded)
    integrity = next((i for i, a in enumerate(attrs) if a.type in (0x0008, 0x001C)), None)
    expected = list(attrs)
    if integrity is not None:  # §14.5: only MI-SHA256 and FINGERPRINT count after MESSAGE-INTEGRITY
        expected = expected[: integrity + 1] + [a for a in expected[integrity + 1 :] if a.type == 0x001C]
    if fingerprint:
        expected.append(decoded.attributes[-1])
        assert decoded.attributes[-1].type == AttributeType.FINGERPRINT
    assert decoded.attributes == tuple(expected)
    assert (decoded.message_class, decoded.transaction_id) == (message_class, tid)
    assert reply_key(encoded) == tid


# --- error responses -------------------------------------------------------------------------------


def test_error_response_gives_a_typed_error_code() -> None:
    response = StunMessage(
        MessageClass.ERROR,
        Method.BINDING,
        TID,
        (encode_error_code(420, "Unknown Attribute"), Attribute(AttributeType.UNKNOWN_ATTRIBUTES, b"\x00\x30\x7f\x01")),
    ).encode()
    result = parse_binding_response(response, TID)
    assert result == ErrorCode(420, "Unknown Attribute", (0x0030, 0x7F01))
    assert isinstance(result, ErrorCode)
    assert result.describe() == "420 unknown comprehension-required attribute (Unknown Attribute): 0x0030, 0x7f01"


@pytest.mark.parametrize(
    ("code", "reason", "described"),
    [
        (400, "Bad Request", "400 bad request"),
        (500, "", "500 server error"),
        (699, "odd\nline\x07", "699 error (odd?line?)"),
        (300, "Try Alternate", "300 try an alternate server (Try Alternate)"),
    ],
)
def test_error_code_descriptions_are_one_line(code: int, reason: str, described: str) -> None:
    message = parse_message(
        StunMessage(MessageClass.ERROR, Method.BINDING, TID, (encode_error_code(code, reason),)).encode()
    )
    assert error_code(message).describe() == described


def test_error_reason_is_cut_to_128_characters() -> None:
    message = StunMessage(MessageClass.ERROR, Method.BINDING, TID, (encode_error_code(500, "x" * 500),))
    assert len(error_code(parse_message(message.encode())).reason) == 128


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\0\0\x02\x00", "out of range"),  # class 2 is not an error
        (b"\0\0\x07\x00", "out of range"),
        (b"\0\0\x04\x64", "out of range"),  # number 100
        (b"\0\0\x04", "too short"),
    ],
)
def test_malformed_error_codes(value: bytes, reason: str) -> None:
    message = parse_message(raw_message(0x0111, tlv(AttributeType.ERROR_CODE, value)))
    with pytest.raises(DecodeError, match=reason):
        error_code(message)


def test_error_response_without_error_code() -> None:
    with pytest.raises(DecodeError, match="without ERROR-CODE"):
        parse_binding_response(raw_message(0x0111, b""), TID)


def test_encode_error_code_checks_its_range() -> None:
    with pytest.raises(ValueError, match="300-699"):
        encode_error_code(200)


# --- what is not an answer to our request ------------------------------------------------------------


def test_reply_to_another_transaction_is_refused() -> None:
    with pytest.raises(DecodeError, match="another transaction"):
        parse_binding_response(STUND_ANSWER, TID)


@pytest.mark.parametrize(
    ("wire_type", "reason"),
    [(0x0001, "request where a response"), (0x0011, "indication where a response"), (0x0103, "not Binding")],
)
def test_requests_indications_and_other_methods_are_refused(wire_type: int, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        parse_binding_response(raw_message(wire_type, b""), TID)


def test_success_without_an_address() -> None:
    with pytest.raises(DecodeError, match="without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS"):
        parse_binding_response(raw_message(0x0101, tlv(AttributeType.SOFTWARE, b"x")), TID)
    with pytest.raises(DecodeError, match="not a STUN Binding success"):
        binding_success_address(parse_message(raw_message(0x0111, b"")))
    with pytest.raises(DecodeError, match="not a STUN error response"):
        error_code(parse_message(raw_message(0x0101, b"")))


# --- malformed messages ------------------------------------------------------------------------------

GOOD = raw_message(0x0101, tlv(0x0020, encode_xor_mapped_address(IPv4Address("203.0.113.1"), 9, TID).value))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than the 20-byte header"),
        (GOOD[:19], "shorter than the 20-byte header"),
        (GOOD[:-4], "length field says 12"),  # truncated
        (GOOD + bytes(4), "length field says 12"),  # trailing bytes
        (bytes(2049), "exceeds 2048"),
        (raw_message(0x0101, b"", cookie=0x01020304), "no magic cookie"),  # RFC 3489
        (b"\x80" + GOOD[1:], "top two bits"),
        (b"\x40" + GOOD[1:], "top two bits"),
        (GOOD[:2] + b"\x00\x0a" + GOOD[4:] + b"\0\0", "not a multiple of 4"),
        (raw_message(0x0101, b"\x00\x20\xff\xff"), "length 65535 overruns"),
        (raw_message(0x0101, b"\x00\x20\x00\x05" + bytes(4)), "overruns"),  # padding missing
        (raw_message(0x0101, b"\x00\x20\x00\x0c" + bytes(8)), "overruns"),
        (raw_message(0x0101, tlv(0x8022, b"x") * 65), "more than 64"),
        (raw_message(0x0101, tlv(0x8028, b"abcd") + tlv(0x8022, b"x")), "not the last"),
        (raw_message(0x0101, tlv(0x8028, b"abcdefgh")), "8 bytes, not 4"),
        (raw_message(0x0101, tlv(0x8028, b"abcd")), "does not match"),
    ],
)
def test_malformed_messages_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        parse_message(data)


def test_padding_values_are_ignored() -> None:
    # §14: padding bits are ignored by the receiver, whatever they are.
    data = raw_message(0x0101, tlv(0x8022, b"abcde", pad=b"\xff") + tlv(0x0020, GOOD[24:]))
    assert parse_binding_response(data, TID) == (IPv4Address("203.0.113.1"), 9)


def test_sixty_four_attributes_are_fine() -> None:
    assert len(parse_message(raw_message(0x0101, tlv(0x8022, b"x") * 64)).attributes) == 64


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\x00\x01\x00", "too short"),
        (b"\x00\x03\x00\x01" + bytes(4), "neither IPv4 nor IPv6"),
        (b"\x00\x01\x00\x01" + bytes(16), "IPv4 address of 16 bytes"),
        (b"\x00\x02\x00\x01" + bytes(4), "IPv6 address of 4 bytes"),
    ],
)
def test_malformed_addresses(value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        parse_binding_response(raw_message(0x0101, tlv(0x0020, value)), TID)
    with pytest.raises(DecodeError, match=reason):
        parse_binding_response(raw_message(0x0101, tlv(0x0001, value)), TID)


def test_reply_key() -> None:
    assert reply_key(STUND_ANSWER) == STUND_TID
    assert reply_key(RFC5769_IPV4_RESPONSE) == RFC5769_TID
    assert reply_key(GOOD[:20]) == TID  # a header is enough: the index only routes, parse decides
    assert reply_key(GOOD[:19]) is None
    assert reply_key(raw_message(0x0101, b"", cookie=0)) is None
    assert reply_key(b"\xc0" + GOOD[1:]) is None


def test_message_and_attribute_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        StunMessage(MessageClass.REQUEST, 1, b"x")
    with pytest.raises(ValueError, match="12 bits"):
        StunMessage(MessageClass.REQUEST, 0x1000, TID)
    with pytest.raises(ValueError, match="0-65535"):
        Attribute(0x10000, b"")
    with pytest.raises(ValueError, match="does not fit"):
        Attribute(1, bytes(3000))
    with pytest.raises(ValueError, match="larger than 2048"):
        StunMessage(MessageClass.REQUEST, 1, TID, (Attribute(0x8022, bytes(2000)),) * 2).encode()
    with pytest.raises(ValueError, match="0-65535"):
        encode_mapped_address(IPv4Address(1), 70000)
    with pytest.raises(ValueError, match="12 bytes"):
        encode_xor_mapped_address(IPv4Address(1), 1, b"x")


# --- hostile input: only DecodeError or a value --------------------------------------------------------


@settings(max_examples=1000)
@given(st.binary(max_size=2100))
def test_random_bytes_give_a_value_or_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parse_binding_response(data, TID)
    key = reply_key(data)
    assert key is None or len(key) == 12


@st.composite
def plausible_messages(draw: st.DrawFn) -> bytes:
    """A valid header in front of random attribute bytes: gets past the header checks, so the attribute
    walker and the address decoders see the hostile part."""
    body = draw(st.binary(max_size=300))
    body += bytes(-len(body) % 4)
    type_ = draw(st.sampled_from([0x0101, 0x0111, 0x0001]))
    return raw_message(type_, body)


@settings(max_examples=1000)
@given(plausible_messages())
def test_hostile_attributes_give_a_value_or_decode_error(data: bytes) -> None:
    try:
        result = parse_binding_response(data, TID)
    except DecodeError:
        return
    assert isinstance(result, ErrorCode) or isinstance(result[0], IPv4Address | IPv6Address)


@settings(max_examples=500)
@given(st.sampled_from([RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE, STUND_ANSWER]), st.data())
def test_mutated_real_messages_give_a_value_or_decode_error(vector: bytes, data: st.DataObject) -> None:
    mutated = bytearray(vector)
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    for candidate in (bytes(mutated), bytes(mutated[:cut])):
        with contextlib.suppress(DecodeError):
            parse_message(candidate)


# --- stun: targets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stun:stun.example.org", ("stun.example.org", 3478)),
        ("stun:stun.example.org:19302", ("stun.example.org", 19302)),
        ("  STUN:203.0.113.100:3478 ", ("203.0.113.100", 3478)),
        ("stun:203.0.113.100", ("203.0.113.100", 3478)),
        ("stun:[2001:db8::1]", ("2001:db8::1", 3478)),
        ("stun:[2001:DB8:0::1]:5349", ("2001:db8::1", 5349)),
        ("stun:2001:db8::1", ("2001:db8::1", 3478)),
        ("stun:stun.example.org.", ("stun.example.org.", 3478)),
    ],
)
def test_parse_stun_target(text: str, expected: tuple[str, int]) -> None:
    assert parse_stun_target(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("stun.example.org", "is not a stun:host"),
        ("turn:stun.example.org", "is not a stun:host"),
        ("stuns:stun.example.org", "not supported"),
        ("stun://stun.example.org", "no '//'"),
        ("stun:", "not a host name"),
        ("stun:host:0", "1-65535"),
        ("stun:host:65536", "1-65535"),
        ("stun:host:port", "1-65535"),
        ("stun:host:", "1-65535"),
        ("stun:[2001:db8::1", "unclosed"),
        ("stun:[2001:db8::1]x", "unexpected"),
        ("stun:[example.org]:3478", "not an IPv6 address"),
        ("stun:2001:db8::1:3478:x", "in brackets"),
        ("stun:host name", "only host"),
        ("stun:host?transport=udp", "only host"),
        ("stun:user@host", "only host"),
        ("stun:bücher.example", "punycode"),
        ("stun:" + "a" * 64 + ".example", "not a host name"),
        ("stun:a..b", "not a host name"),
    ],
)
def test_bad_stun_targets_give_one_line(text: str, reason: str) -> None:
    with pytest.raises(StunTargetError, match=reason) as caught:
        parse_stun_target(text)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, AutonatError)
    assert "\n" not in str(caught.value)


def test_schedule_is_rfc8489_rto() -> None:
    exchange = Exchange(b"r", (IPv4Address(1), 3478), bytes, now=0.0, deadline=39.5, schedule=STUN_SCHEDULE)
    sent = []
    now = 0.0
    while not exchange.done:
        if exchange.datagrams_to_send(now):
            sent.append(now)
        timer = exchange.timer()
        if timer is None:
            break
        now = timer
        exchange.handle_timer(now)
    assert sent == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # §6.2.1: Rc = 7 transmissions in 39.5 s


# --- stun_binding against a fake server ----------------------------------------------------------------

LOOPBACK = IPv4Address("127.0.0.1")
Script = Callable[[bytes, tuple[str, int]], list[bytes]]


@dataclass
class FakeStunServer(asyncio.DatagramProtocol):
    """Answers Binding requests with XOR-MAPPED-ADDRESS of the source, unless `script` says otherwise."""

    script: Script | None = None
    silent: bool = False
    received: list[bytes] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.append(data)
        if self.silent:
            return
        source = (str(addr[0]), int(addr[1]))
        replies = self.script(data, source) if self.script else [success(data, source)]
        assert self.transport is not None
        for reply in replies:
            self.transport.sendto(reply, addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])


def success(request: bytes, source: tuple[str, int], *, tid: bytes | None = None) -> bytes:
    transaction_id = tid if tid is not None else parse_message(request).transaction_id
    attribute = encode_xor_mapped_address(ip_address(source[0]), source[1], transaction_id)
    return StunMessage(MessageClass.SUCCESS, Method.BINDING, transaction_id, (attribute,)).encode()


@pytest.fixture
async def server() -> AsyncIterator[FakeStunServer]:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(FakeStunServer, local_addr=("127.0.0.1", 0))
    yield protocol
    assert protocol.transport is not None
    protocol.transport.close()


async def test_binding_returns_the_reflexive_address(server: FakeStunServer) -> None:
    address, port = await stun_binding(("127.0.0.1", server.port), deadline=1.0)
    assert address == LOOPBACK and 0 < port < 65536
    request = parse_message(server.received[0])
    assert (request.message_class, request.method, request.software) == (MessageClass.REQUEST, 1, "autonat")
    assert len(server.received) == 1


async def test_binding_over_ipv6_with_a_bracketed_literal() -> None:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(FakeStunServer, local_addr=("::1", 0))
    try:
        address, port = await stun_binding(("[::1]", protocol.port), deadline=1.0)
    finally:
        transport.close()
    assert address == IPv6Address("::1") and 0 < port < 65536  # XOR-MAPPED-ADDRESS with the 128-bit mask


async def test_binding_by_name_and_from_a_given_local_address(server: FakeStunServer) -> None:
    address, _ = await stun_binding(("localhost", server.port), local_address=LOOPBACK, deadline=1.0)
    assert address == LOOPBACK


async def test_silent_server_gives_one_line_within_the_deadline(server: FakeStunServer) -> None:
    server.silent = True
    started = time.monotonic()
    with pytest.raises(StunTimeout) as caught:
        await stun_binding(("127.0.0.1", server.port), deadline=0.7)
    elapsed = time.monotonic() - started
    assert 0.65 <= elapsed < 1.5
    assert str(caught.value) == f"no answer from STUN server 127.0.0.1:{server.port} within 0.7 s (2 tries)"
    assert isinstance(caught.value, RouterTimeout) and caught.value.exit_code == RouterTimeout.exit_code
    assert len(server.received) == 2 and server.received[0] == server.received[1]  # §6.2.1: same request


async def test_wrong_transaction_ids_and_garbage_are_dropped(server: FakeStunServer) -> None:
    def hostile(request: bytes, source: tuple[str, int]) -> list[bytes]:
        return [
            b"\x01\x01garbage",
            success(request, ("198.51.100.66", 6666), tid=b"z" * 12),  # another transaction
            StunMessage(MessageClass.REQUEST, 1, parse_message(request).transaction_id).encode(),  # not a response
            success(request, source),
        ]

    server.script = hostile
    address, _ = await stun_binding(("127.0.0.1", server.port), deadline=1.0)
    assert address == LOOPBACK
    assert len(server.received) == 1


async def test_only_wrong_answers_time_out(server: FakeStunServer) -> None:
    server.script = lambda request, source: [success(request, ("198.51.100.66", 6666), tid=b"z" * 12)]
    with pytest.raises(StunTimeout, match="no answer"):
        await stun_binding(("127.0.0.1", server.port), deadline=0.6)


async def test_a_lost_request_is_retransmitted_after_500_ms(server: FakeStunServer) -> None:
    server.script = lambda request, source: [] if len(server.received) == 1 else [success(request, source)]
    started = time.monotonic()
    address, _ = await stun_binding(("127.0.0.1", server.port), deadline=2.0)
    assert address == LOOPBACK
    assert 0.45 <= time.monotonic() - started < 1.4
    assert len(server.received) == 2


async def test_answer_from_another_port_is_dropped(server: FakeStunServer) -> None:
    loop = asyncio.get_running_loop()
    other, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))

    def from_elsewhere(request: bytes, source: tuple[str, int]) -> list[bytes]:
        other.sendto(success(request, source), source)
        return []

    server.script = from_elsewhere
    try:
        with pytest.raises(StunTimeout):
            await stun_binding(("127.0.0.1", server.port), deadline=0.6)
    finally:
        other.close()


async def test_rfc3489_style_mapped_address_answer(server: FakeStunServer) -> None:
    def legacy(request: bytes, source: tuple[str, int]) -> list[bytes]:
        tid = parse_message(request).transaction_id
        mapped = encode_mapped_address(IPv4Address("203.0.113.1"), 40000)
        return [StunMessage(MessageClass.SUCCESS, Method.BINDING, tid, (mapped,)).encode()]

    server.script = legacy
    assert await stun_binding(("127.0.0.1", server.port), deadline=1.0) == (IPv4Address("203.0.113.1"), 40000)


async def test_error_response_gives_stun_error_with_the_code(server: FakeStunServer) -> None:
    def refuse(request: bytes, source: tuple[str, int]) -> list[bytes]:
        tid = parse_message(request).transaction_id
        return [StunMessage(MessageClass.ERROR, Method.BINDING, tid, (encode_error_code(400, "Bad Request"),)).encode()]

    server.script = refuse
    with pytest.raises(StunError) as caught:
        await stun_binding(("127.0.0.1", server.port), deadline=1.0)
    assert caught.value.code == 400
    assert str(caught.value) == f"STUN server 127.0.0.1:{server.port} answered with an error: 400 bad request"


async def test_nonsense_mapped_address_is_refused(server: FakeStunServer) -> None:
    server.script = lambda request, source: [success(request, ("0.0.0.0", 0))]
    with pytest.raises(StunError, match=r"unusable address 0\.0\.0\.0:0"):
        await stun_binding(("127.0.0.1", server.port), deadline=1.0)


async def test_unresolvable_name_gives_one_line_within_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(StunError) as caught:  # StunTimeout if the resolver hangs, else "cannot resolve"
        await stun_binding(("stun.autonat-test.invalid", 3478), deadline=1.0)
    assert time.monotonic() - started < 1.5
    assert "stun.autonat-test.invalid" in str(caught.value) and "\n" not in str(caught.value)


async def test_family_mismatch_and_bad_arguments() -> None:
    with pytest.raises(StunError, match="is IPv6, the local address is IPv4"):
        await stun_binding(("::1", 3478), local_address=LOOPBACK, deadline=1.0)
    with pytest.raises(StunError, match="port 0 is not 1-65535"):
        await stun_binding(("127.0.0.1", 0))
    with pytest.raises(ValueError, match="deadline"):
        await stun_binding(("127.0.0.1", 3478), deadline=0)


async def test_socket_that_cannot_be_opened_gives_stun_error() -> None:
    with pytest.raises(StunError, match=r"cannot open a UDP socket on 192\.0\.2\.55"):
        await stun_binding(("127.0.0.1", 3478), local_address=IPv4Address("192.0.2.55"), deadline=1.0)


async def test_resolve_server() -> None:
    assert await resolve_server("192.0.2.1", 3478, timeout=1.0) == IPv4Address("192.0.2.1")
    assert await resolve_server("[2001:db8::1]", 3478, timeout=1.0) == IPv6Address("2001:db8::1")
    assert await resolve_server("::ffff:192.0.2.1", 3478, timeout=1.0) == IPv4Address("192.0.2.1")
    assert await resolve_server("localhost", 0, timeout=1.0, family=socket.AF_INET) == LOOPBACK
    with pytest.raises(StunError, match=r"^host 2001:db8::1 is IPv6, the local address is IPv4$"):
        await resolve_server("2001:db8::1", 1, timeout=1.0, family=socket.AF_INET)
    with pytest.raises(StunError, match=r"resolve sip server 'x\.autonat-test\.invalid'"):
        await resolve_server("x.autonat-test.invalid", 1, timeout=1.0, what="sip server")
