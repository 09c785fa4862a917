"""NAT-PMP codec (RFC 6886): round trips, known answers, malformed input."""

from __future__ import annotations

import contextlib
import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.proto import natpmp
from autonat.proto.errors import DecodeError
from autonat.proto.natpmp import (
    ErrorResponse,
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    Opcode,
    ResultCode,
)
from autonat.proto.types import Transport

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
transports = st.sampled_from(list(Transport))
ipv4 = st.builds(IPv4Address, u32)

map_requests = st.one_of(
    st.builds(MapRequest, transports, st.integers(1, 0xFFFF), u16, u32),
    st.builds(MapRequest.delete_all, transports),
)
external_address_responses = st.builds(ExternalAddressResponse, u16, u32, ipv4)
map_responses = st.builds(MapResponse, transports, u16, u32, u16, u16, u32)
error_responses = st.builds(ErrorResponse, st.integers(0, 127), st.integers(1, 0xFFFF), u32)


# --- constants and enums --------------------------------------------------------------------------


def test_constants() -> None:
    assert natpmp.SERVER_PORT == 5351
    assert natpmp.CLIENT_PORT == 5350
    assert natpmp.VERSION == 0


def test_opcode_transport_helpers() -> None:
    assert Opcode.for_transport(Transport.UDP) is Opcode.MAP_UDP
    assert Opcode.for_transport(Transport.TCP) is Opcode.MAP_TCP
    assert Opcode.MAP_UDP.transport is Transport.UDP
    assert Opcode.MAP_TCP.transport is Transport.TCP
    with pytest.raises(ValueError, match="no transport"):
        _ = Opcode.EXTERNAL_ADDRESS.transport


@pytest.mark.parametrize("code", list(ResultCode))
def test_every_result_code_parses_and_is_described(code: ResultCode) -> None:
    wire = struct.pack("!BBHI4s", 0, 128, code, 7, IPv4Address("192.0.2.1").packed)
    response = natpmp.parse_response(wire)
    assert isinstance(response, ExternalAddressResponse)
    assert response.result == code
    text = natpmp.describe_result(code)
    assert text.endswith(f"(NAT-PMP result {int(code)})")
    assert "\n" not in text
    assert not text.startswith("unknown")


def test_describe_result_examples() -> None:
    assert natpmp.describe_result(2) == "not authorized/refused (NAT-PMP result 2)"
    assert natpmp.describe_result(6) == "unknown NAT-PMP result 6"
    assert natpmp.describe_result(65535) == "unknown NAT-PMP result 65535"


def test_unknown_result_code_is_kept_as_int() -> None:
    wire = struct.pack("!BBHIHHI", 0, 129, 99, 1, 1234, 0, 0)
    response = natpmp.parse_response(wire)
    assert isinstance(response, MapResponse)
    assert response.result == 99


# --- known answers --------------------------------------------------------------------------------


def test_external_address_request_bytes() -> None:
    assert ExternalAddressRequest().encode() == b"\x00\x00"


def test_map_request_bytes() -> None:
    request = MapRequest(Transport.TCP, 8080, 8081, 7200)
    assert request.encode() == bytes.fromhex("00 02 0000 1f90 1f91 00001c20")
    assert request.opcode is Opcode.MAP_TCP


def test_delete_request_bytes() -> None:
    assert MapRequest.delete(Transport.UDP, 5060).encode() == bytes.fromhex("00 01 0000 13c4 0000 00000000")
    assert MapRequest.delete_all(Transport.TCP).encode() == bytes.fromhex("00 02 0000 0000 0000 00000000")


def test_external_address_response_known_answer() -> None:
    # version 0, opcode 128, result 0, epoch 42, address 203.0.113.1
    wire = bytes.fromhex("00 80 0000 0000002a cb007101")
    response = natpmp.parse_response(wire)
    assert response == ExternalAddressResponse(0, 42, IPv4Address("203.0.113.1"))
    assert response.encode() == wire


def test_map_response_known_answer() -> None:
    # UDP (128 + 1), success, epoch 3600, internal 5060 -> external 40000, lifetime 7200
    wire = bytes.fromhex("00 81 0000 00000e10 13c4 9c40 00001c20")
    response = natpmp.parse_response(wire)
    assert response == MapResponse(Transport.UDP, 0, 3600, 5060, 40000, 7200)
    assert response.encode() == wire


def test_unsupported_version_short_reply() -> None:
    # §3.5: 8 bytes, version 0, opcode 128 + request opcode, result 1, epoch
    wire = bytes.fromhex("00 82 0001 00000100")
    assert natpmp.parse_response(wire) == ErrorResponse(opcode=2, result=1, epoch=256)


def test_unsupported_opcode_echo_is_error_response() -> None:
    # §3.5: an unknown request opcode comes back with the top bit set and result 5; the echo may
    # be longer than 8 bytes.
    wire = bytes.fromhex("00 83 0005 00000009 deadbeef")
    assert natpmp.parse_response(wire) == ErrorResponse(opcode=3, result=5, epoch=9)


def test_non_zero_result_in_full_form_keeps_full_type() -> None:
    wire = bytes.fromhex("00 80 0003 00000005 00000000")
    assert natpmp.parse_response(wire) == ExternalAddressResponse(3, 5, IPv4Address(0))


def test_non_zero_result_of_intermediate_length_is_error_response() -> None:
    wire = bytes.fromhex("00 81 0002 00000005 1234")
    assert natpmp.parse_response(wire) == ErrorResponse(opcode=1, result=2, epoch=5)


def test_announcement_is_an_external_address_response() -> None:
    # §3.2.1: the multicast announcement has the external-address response format.
    wire = ExternalAddressResponse(0, 0, IPv4Address("198.51.100.7")).encode()
    assert natpmp.parse_response(wire) == ExternalAddressResponse(0, 0, IPv4Address("198.51.100.7"))


def test_reserved_field_of_map_request_is_ignored() -> None:
    wire = bytes.fromhex("00 01 abcd 13c4 0000 00000e10")
    assert natpmp.parse_request(wire) == MapRequest(Transport.UDP, 5060, 0, 3600)


# --- round trips ----------------------------------------------------------------------------------


def test_external_address_request_round_trip() -> None:
    wire = ExternalAddressRequest().encode()
    assert natpmp.parse_request(wire) == ExternalAddressRequest()


@given(map_requests)
def test_map_request_round_trip(request: MapRequest) -> None:
    wire = request.encode()
    assert len(wire) == 12
    parsed = natpmp.parse_request(wire)
    assert parsed == request
    assert parsed.encode() == wire


@given(st.one_of(external_address_responses, map_responses, error_responses))
def test_response_round_trip(response: ExternalAddressResponse | MapResponse | ErrorResponse) -> None:
    wire = response.encode()
    expected_size = {ExternalAddressResponse: 12, MapResponse: 16, ErrorResponse: 8}[type(response)]
    assert len(wire) == expected_size
    parsed = natpmp.parse_response(wire)
    assert parsed == response
    assert parsed.encode() == wire


# --- malformed input ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(8))
def test_response_shorter_than_eight_bytes_is_rejected(size: int) -> None:
    wire = ExternalAddressResponse(0, 42, IPv4Address("203.0.113.1")).encode()[:size]
    with pytest.raises(DecodeError, match="truncated"):
        natpmp.parse_response(wire)


@given(st.one_of(external_address_responses, map_responses).filter(lambda r: r.result == 0))
def test_success_of_wrong_length_is_rejected(response: ExternalAddressResponse | MapResponse) -> None:
    wire = response.encode()
    for bad in (wire[:-1], wire[:8], wire + b"\x00", wire + bytes(4)):
        with pytest.raises(DecodeError, match="wrong length"):
            natpmp.parse_response(bad)


def test_response_wrong_version() -> None:
    wire = bytearray(ExternalAddressResponse(0, 1, IPv4Address(1)).encode())
    wire[0] = 2
    with pytest.raises(DecodeError, match="version 2"):
        natpmp.parse_response(bytes(wire))


def test_response_without_response_bit() -> None:
    with pytest.raises(DecodeError, match="is a request"):
        natpmp.parse_response(bytes.fromhex("00 01 0000 00000001 00000000 00000000"))


def test_success_with_unknown_opcode() -> None:
    with pytest.raises(DecodeError, match="unknown NAT-PMP response opcode 131"):
        natpmp.parse_response(bytes.fromhex("00 83 0000 00000001 00000000 00000000"))


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"", "truncated"),
        (b"\x00", "truncated"),
        (b"\x01\x00", "version 1"),
        (b"\x00\x80", "is a response"),
        (b"\x00\x03" + bytes(10), "unsupported NAT-PMP opcode 3"),
        (b"\x00\x00\x00", "not 2"),
        (bytes.fromhex("00 01 0000 13c4 0000"), "not 12"),
        (bytes.fromhex("00 01 0000 13c4 0000 00000000 00"), "not 12"),
        (bytes.fromhex("00 01 0000 0000 0000 00000e10"), "delete-all"),
    ],
)
def test_malformed_requests(wire: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        natpmp.parse_request(wire)


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    for parse in (natpmp.parse_request, natpmp.parse_response):
        try:
            parse(data)
        except DecodeError as exc:
            assert exc.reason
            assert "\n" not in exc.reason


@settings(max_examples=300)
@given(
    st.sampled_from([b"\x00\x80", b"\x00\x81", b"\x00\x82", b"\x00\x01", b"\x00\x02", b"\x00\x00"]),
    st.binary(max_size=24),
)
def test_plausible_prefixes_never_raise_anything_but_decode_error(head: bytes, tail: bytes) -> None:
    for parse in (natpmp.parse_request, natpmp.parse_response):
        with contextlib.suppress(DecodeError):
            parse(head + tail)


# --- constructor validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        (Transport.UDP, 0, 0, 60),
        (Transport.UDP, 65536, 0, 60),
        (Transport.UDP, -1, 0, 0),
        (Transport.UDP, 80, 65536, 60),
        (Transport.UDP, 80, 0, 2**32),
        (Transport.UDP, 80, 0, -1),
        (Transport.UDP, True, 0, 60),
        ("udp", 80, 0, 60),
    ],
)
def test_map_request_rejects_out_of_range(args: tuple[object, ...]) -> None:
    with pytest.raises(ValueError, match=r"must be|only valid"):
        MapRequest(*args)  # type: ignore[arg-type]


def test_delete_needs_a_real_internal_port() -> None:
    with pytest.raises(ValueError, match="internal_port"):
        MapRequest.delete(Transport.TCP, 0)
    assert MapRequest.delete(Transport.TCP, 22) == MapRequest(Transport.TCP, 22, 0, 0)


def test_response_constructors_validate() -> None:
    with pytest.raises(ValueError, match="epoch"):
        ExternalAddressResponse(0, 2**32, IPv4Address(0))
    with pytest.raises(ValueError, match="result"):
        MapResponse(Transport.UDP, 65536, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="opcode"):
        ErrorResponse(128, 1, 0)
    with pytest.raises(ValueError, match="IPv4Address"):
        ExternalAddressResponse(0, 0, "1.2.3.4")  # type: ignore[arg-type]


# --- the warm path (differential: the fast reading is the general one) ----------------------------


@given(
    st.lists(st.one_of(st.binary(min_size=4, max_size=4), st.sampled_from([bytes(4), b"\xcb\x00q\x01"])), max_size=10)
)
def test_ipv4_address_keeps_the_last_one_and_equals_a_fresh_one(sequence: list[bytes]) -> None:
    """ipv4_address returns the object it made for the same bytes last time (§3.2: one gateway, one
    address); whatever the order, the value is IPv4Address(packed)."""
    previous: tuple[bytes, IPv4Address] | None = None
    for packed in sequence:
        address = natpmp.ipv4_address(packed)
        assert address == IPv4Address(packed) and type(address) is IPv4Address
        if previous is not None and previous[0] == packed:
            assert address is previous[1]
        previous = (packed, address)


replies = st.one_of(external_address_responses, map_responses, error_responses)


@given(replies, transports, st.integers(1, 0xFFFF))
def test_a_map_reply_is_accepted_exactly_when_its_opcode_and_port_are_ours(
    reply: ExternalAddressResponse | MapResponse | ErrorResponse, transport: Transport, internal_port: int
) -> None:
    """RFC 6886 §3.3: the map exchange's reading (the full form checked first) accepts a reply iff its
    opcode is the request's (+128) and, in the full form, its internal port is the request's."""
    from autonat.aio.natpmp import _expect_map

    opcode = Opcode.for_transport(transport)
    if isinstance(reply, MapResponse):
        ours = Opcode.for_transport(reply.transport) == opcode
        reason = "reply to another NAT-PMP request" if not ours else "NAT-PMP reply for another internal port"
        ours = ours and reply.internal_port == internal_port
    else:
        ours = isinstance(reply, ErrorResponse) and reply.opcode == opcode
        reason = "reply to another NAT-PMP request"
    parse = _expect_map(transport, internal_port)
    if ours:
        assert parse(reply.encode()) == reply
    else:
        with pytest.raises(DecodeError) as info:
            parse(reply.encode())
        assert info.value.reason == reason


@given(replies)
def test_an_external_address_reply_is_accepted_exactly_when_its_opcode_is_128(
    reply: ExternalAddressResponse | MapResponse | ErrorResponse,
) -> None:
    from autonat.aio.natpmp import _expect_external_address

    if isinstance(reply, ExternalAddressResponse) or (
        isinstance(reply, ErrorResponse) and reply.opcode == Opcode.EXTERNAL_ADDRESS
    ):
        assert _expect_external_address(reply.encode()) == reply
    else:
        with pytest.raises(DecodeError, match="reply to another NAT-PMP request"):
            _expect_external_address(reply.encode())
