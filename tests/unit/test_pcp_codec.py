"""PCP codec (RFC 6887): round trips, known answers, version negotiation, malformed input."""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.proto import natpmp, pcp
from autonat.proto.errors import DecodeError
from autonat.proto.pcp import (
    MapData,
    Opcode,
    Option,
    OptionCode,
    Request,
    Response,
    ResultCode,
    VersionNotSupported,
)
from autonat.proto.types import Transport, check_range

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
nonces = st.binary(min_size=12, max_size=12)
ipv4 = st.builds(IPv4Address, u32)
# Mapped IPv6 addresses decode as IPv4Address by design, so leave them to the ipv4 strategy.
ipv6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1)).filter(lambda a: a.ipv4_mapped is None)
addresses = st.one_of(ipv4, ipv6)

options = st.one_of(
    st.just(Option.prefer_failure()),
    st.builds(Option.third_party, addresses),
    st.builds(Option.filter, st.integers(0, 128), u16, addresses),
    # Unknown codes keep raw data of any length, which exercises all four paddings.
    st.builds(Option, st.integers(4, 255), st.binary(max_size=40)),
)
option_lists = st.lists(options, max_size=6).map(tuple)
map_data = st.builds(MapData, nonces, u8, u16, u16, addresses)

requests = st.one_of(
    st.builds(Request, st.just(Opcode.ANNOUNCE), u32, addresses, st.none(), option_lists),
    st.builds(Request, st.just(Opcode.MAP), u32, addresses, map_data, option_lists),
)
responses = st.one_of(
    st.builds(Response, st.just(2), st.just(Opcode.ANNOUNCE), u8, u32, u32, st.none(), option_lists),
    st.builds(Response, st.just(2), st.just(Opcode.MAP), u8, u32, u32, map_data, option_lists),
    st.builds(
        Response,
        st.just(2),
        st.just(Opcode.MAP),
        st.integers(1, 255),
        u32,
        u32,
        st.none(),
        st.just(()),
    ),
)

NONCE = bytes(range(1, 13))
CLIENT = IPv4Address("192.168.1.10")


def header(op_byte: int, result: int = 0, lifetime: int = 0, epoch: int = 0, version: int = 2) -> bytes:
    return struct.pack("!BBBBII12x", version, op_byte, 0, result, lifetime, epoch)


def map_body(nonce: bytes = NONCE, protocol: int = 17, internal: int = 5060, external: int = 0) -> bytes:
    return nonce + bytes([protocol, 0, 0, 0]) + struct.pack("!HH", internal, external) + bytes(16)


# --- constants, enums, descriptions ---------------------------------------------------------------


def test_constants() -> None:
    assert pcp.VERSION == 2
    assert pcp.SERVER_PORT == 5351
    assert pcp.CLIENT_PORT == 5350
    assert pcp.MAX_MESSAGE_SIZE == 1100
    assert pcp.NONCE_SIZE == 12
    assert [int(c) for c in ResultCode] == list(range(14))


@pytest.mark.parametrize("code", list(ResultCode))
def test_every_result_code_parses_and_is_described(code: ResultCode) -> None:
    response = pcp.parse_response(header(0x81, result=code, lifetime=30) + map_body())
    assert isinstance(response, Response)
    assert response.result == code
    text = pcp.describe_result(code)
    assert text.startswith(f"{code.name}: ")
    assert text.endswith(f"(PCP result {int(code)})")
    assert "\n" not in text


def test_describe_result_examples() -> None:
    assert pcp.describe_result(12) == (
        "ADDRESS_MISMATCH: the router sees our requests from another address (PCP result 12)"
    )
    assert pcp.describe_result(14) == "unknown PCP result 14"
    assert pcp.describe_result(255) == "unknown PCP result 255"


def test_long_lifetime_errors() -> None:
    long_ones = {1, 2, 3, 4, 5, 6, 9, 12, 13}
    for code in range(256):
        assert pcp.is_long_lifetime_error(code) is (code in long_ones)


def test_unknown_result_code_is_kept() -> None:
    response = pcp.parse_response(header(0x80, result=200))
    assert isinstance(response, Response)
    assert response.result == 200


# --- addresses ------------------------------------------------------------------------------------


def test_ipv4_is_encoded_mapped() -> None:
    assert pcp.encode_address(IPv4Address("203.0.113.1")) == bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 1])
    assert pcp.decode_address(bytes(10) + b"\xff\xff\xcb\x00\x71\x01") == IPv4Address("203.0.113.1")


def test_unspecified_ipv4_is_mapped_zero() -> None:
    wire = pcp.encode_address(pcp.UNSPECIFIED_IPV4)
    assert wire == bytes(10) + b"\xff\xff" + bytes(4)
    assert pcp.decode_address(wire) == IPv4Address(0)
    assert pcp.decode_address(bytes(16)) == IPv6Address("::")


@given(addresses)
def test_address_round_trip(ip: IPv4Address | IPv6Address) -> None:
    wire = pcp.encode_address(ip)
    assert len(wire) == 16
    assert pcp.decode_address(wire) == ip


@pytest.mark.parametrize("size", [0, 4, 15, 17])
def test_decode_address_wrong_length(size: int) -> None:
    with pytest.raises(DecodeError, match="not 16"):
        pcp.decode_address(bytes(size))


def test_mapped_ipv6_is_normalized_to_ipv4() -> None:
    data = MapData(NONCE, 6, 80, 0, IPv6Address("::ffff:198.51.100.1"))
    assert data.external_address == IPv4Address("198.51.100.1")
    request = Request.announce(IPv6Address("::ffff:10.0.0.1"))
    assert request.client_address == IPv4Address("10.0.0.1")


# --- options --------------------------------------------------------------------------------------


def test_option_known_answers() -> None:
    assert Option.prefer_failure().encode() == bytes.fromhex("02 00 0000")
    assert Option.third_party(IPv4Address("10.0.0.2")).encode() == (
        bytes.fromhex("01 00 0010") + bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 2])
    )
    assert Option.filter(32, 443, IPv4Address("192.0.2.9")).encode() == (
        bytes.fromhex("03 00 0014 00 20 01bb") + bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 9])
    )


@pytest.mark.parametrize(("size", "padding"), [(0, 0), (1, 3), (2, 2), (3, 1), (4, 0), (5, 3)])
def test_option_padding(size: int, padding: int) -> None:
    option = Option(200, b"\xaa" * size)
    wire = option.encode()
    assert wire[:4] == struct.pack("!BBH", 200, 0, size)
    assert wire[4:] == b"\xaa" * size + bytes(padding)
    assert option.encoded_size == len(wire)
    assert option.is_optional


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="PREFER_FAILURE"):
        Option(OptionCode.PREFER_FAILURE, b"\x00")
    with pytest.raises(ValueError, match="THIRD_PARTY"):
        Option(OptionCode.THIRD_PARTY, bytes(4))
    with pytest.raises(ValueError, match="option code"):
        Option(256)
    with pytest.raises(ValueError, match="prefix_length"):
        Option.filter(129, 0, IPv4Address(0))
    with pytest.raises(ValueError, match="cannot fit"):
        Option(200, bytes(1100))


# --- requests -------------------------------------------------------------------------------------


def test_announce_request_known_answer() -> None:
    wire = Request.announce(CLIENT).encode()
    assert wire == bytes.fromhex("02 00 0000 00000000") + pcp.encode_address(CLIENT)


def test_map_request_known_answer() -> None:
    request = Request.new_map(
        CLIENT,
        NONCE,
        Transport.UDP,
        5060,
        7200,
        suggested_external_port=5060,
        prefer_failure=True,
    )
    expected = (
        bytes.fromhex("02 01 0000 00001c20")
        + bytes(10)
        + b"\xff\xff\xc0\xa8\x01\x0a"
        + NONCE
        + bytes.fromhex("11 000000 13c4 13c4")
        + bytes(10)
        + b"\xff\xff"
        + bytes(4)
        + bytes.fromhex("02 00 0000")
    )
    assert request.encode() == expected
    assert pcp.parse_request(expected) == request


def test_delete_request() -> None:
    request = Request.delete(CLIENT, NONCE, Transport.TCP, 22)
    assert request.lifetime == 0
    assert request.map == MapData(NONCE, 6, 22, 0, IPv4Address(0))
    assert request.map.transport is Transport.TCP
    assert request.options == ()


def test_request_validation() -> None:
    with pytest.raises(ValueError, match="needs MAP data"):
        Request(Opcode.MAP, 60, CLIENT)
    with pytest.raises(ValueError, match="carries no MAP data"):
        Request(Opcode.ANNOUNCE, 0, CLIENT, MapData(NONCE, 17, 1, 0, IPv4Address(0)))
    with pytest.raises(ValueError, match="nonce"):
        Request.new_map(CLIENT, b"short", Transport.UDP, 1, 60)
    with pytest.raises(ValueError, match="internal_port"):
        Request.new_map(CLIENT, NONCE, Transport.UDP, 0, 60)
    with pytest.raises(ValueError, match="lifetime"):
        Request.new_map(CLIENT, NONCE, Transport.UDP, 1, 2**32)
    with pytest.raises(ValueError, match="opcode"):
        Request(128, 0, CLIENT)
    with pytest.raises(ValueError, match="exceeds 1100"):
        Request(Opcode.ANNOUNCE, 0, CLIENT, None, (Option(200, bytes(1000)), Option(201, bytes(100))))
    with pytest.raises(ValueError, match="at most 64"):
        Request(Opcode.ANNOUNCE, 0, CLIENT, None, (Option(200),) * 65)


def test_response_validation() -> None:
    with pytest.raises(ValueError, match="cannot carry options"):
        Response(2, Opcode.MAP, 2, 0, 0, None, (Option.prefer_failure(),))
    with pytest.raises(ValueError, match="carries no MAP data"):
        Response(2, Opcode.ANNOUNCE, 0, 0, 0, MapData(NONCE, 17, 1, 0, IPv4Address(0)))
    with pytest.raises(ValueError, match="epoch"):
        Response(2, Opcode.ANNOUNCE, 0, 0, -1)
    with pytest.raises(ValueError, match="result"):
        Response(2, Opcode.ANNOUNCE, 256, 0, 0)


@given(requests)
def test_request_round_trip(request: Request) -> None:
    wire = request.encode()
    assert len(wire) % 4 == 0
    assert len(wire) == request.encoded_size
    parsed = pcp.parse_request(wire)
    assert parsed == request
    assert parsed.encode() == wire


# --- responses ------------------------------------------------------------------------------------


def test_map_response_known_answer() -> None:
    wire = (
        bytes.fromhex("02 81 00 00 00001c20 0000002a")
        + bytes(12)
        + NONCE
        + bytes.fromhex("11 000000 13c4 9c40")
        + bytes(10)
        + b"\xff\xff\xcb\x00\x71\x01"
    )
    response = pcp.parse_response(wire)
    assert response == Response(
        version=2,
        opcode=Opcode.MAP,
        result=ResultCode.SUCCESS,
        lifetime=7200,
        epoch=42,
        map=MapData(NONCE, 17, 5060, 40000, IPv4Address("203.0.113.1")),
        options=(),
    )
    assert isinstance(response, Response)
    assert response.encode() == wire


def test_announce_response_known_answer() -> None:
    wire = bytes.fromhex("02 80 00 00 00000000 00000e10") + bytes(12)
    assert pcp.parse_response(wire) == Response(2, Opcode.ANNOUNCE, 0, 0, 3600)


def test_map_error_may_be_header_only() -> None:
    wire = header(0x81, result=ResultCode.NOT_AUTHORIZED, lifetime=1800, epoch=5)
    response = pcp.parse_response(wire)
    assert response == Response(2, Opcode.MAP, 2, 1800, 5, None, ())


def test_reserved_fields_are_ignored() -> None:
    wire = bytearray(header(0x80, epoch=9))
    wire[2] = 0xAA
    wire[12:24] = b"\xbb" * 12
    assert pcp.parse_response(bytes(wire)) == Response(2, Opcode.ANNOUNCE, 0, 0, 9)


def test_unknown_option_is_kept() -> None:
    wire = header(0x80) + bytes.fromhex("c8 00 0005 0102030405 000000")
    response = pcp.parse_response(wire)
    assert isinstance(response, Response)
    assert response.options == (Option(200, bytes([1, 2, 3, 4, 5])),)


@given(responses)
def test_response_round_trip(response: Response) -> None:
    wire = response.encode()
    assert len(wire) % 4 == 0
    parsed = pcp.parse_response(wire)
    assert parsed == response
    assert isinstance(parsed, Response)
    assert parsed.encode() == wire


# --- version negotiation (§9) ---------------------------------------------------------------------


def test_natpmp_unsupported_version_reply() -> None:
    # What a NAT-PMP-only gateway sends back for our PCP MAP request (opcode byte 1).
    wire = natpmp.ErrorResponse(opcode=1, result=natpmp.ResultCode.UNSUPPORTED_VERSION, epoch=77).encode()
    assert len(wire) == 8
    assert pcp.parse_response(wire) == VersionNotSupported(server_version=0, result=1, epoch=77)


def test_natpmp_unsupported_version_reply_without_epoch() -> None:
    assert pcp.parse_response(bytes.fromhex("00 81 0001")) == VersionNotSupported(0, 1, None)


def test_pcp_v1_unsupported_version_reply() -> None:
    wire = header(0x81, result=1, lifetime=1800, epoch=12, version=1)
    assert pcp.parse_response(wire) == VersionNotSupported(server_version=1, result=1, epoch=12)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (bytes.fromhex("00 81 0003 00000001"), "not unsupported version"),
        (bytes.fromhex("00 01 0001 00000001"), "not a response"),
        (bytes.fromhex("00 81 01"), "truncated"),
        (header(0x81, result=0, version=1), "not unsupported version"),
        (header(0x81, result=1, version=3) + bytes(1100), "exceeds 1100"),
        (b"\x47ET / HTTP/1.1\r\n", "not a response"),
    ],
)
def test_other_versions_that_are_not_negotiation(wire: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        pcp.parse_response(wire)


# --- malformed responses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"", "empty"),
        (header(0x80)[:20], "truncated"),
        (header(0x80)[:23], "truncated"),
        (header(0x80) + bytes(1100 - 24 + 4), "exceeds 1100"),
        (header(0x80) + bytes(2), "not a multiple of 4"),
        (header(0x01) + map_body(), "R bit clear"),
        (header(0x82), "unsupported PCP response opcode 2"),
        (header(0x85), "unsupported PCP response opcode 5"),
        (header(0x81) + map_body()[:32], "MAP response truncated"),
        (header(0x81), "MAP response truncated"),
        (header(0x81, result=8) + map_body()[:20], "MAP response truncated"),
        (header(0x80) + bytes.fromhex("c8 00 0005 01020304"), "overruns"),
        (header(0x80) + bytes.fromhex("c8 00 0004"), "overruns"),
        (header(0x80) + bytes.fromhex("02 00 0004 00000000"), "PREFER_FAILURE option has length 4"),
        (header(0x80) + bytes.fromhex("01 00 0004 00000000"), "THIRD_PARTY option has length 4"),
        (header(0x80) + bytes.fromhex("03 00 0010") + bytes(16), "FILTER option has length 16"),
        (header(0x80) + bytes.fromhex("c8 00 0000") * 65, "more than 64"),
    ],
)
def test_malformed_responses(wire: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        pcp.parse_response(wire)


def test_maximum_size_response_is_accepted() -> None:
    option = Option(200, bytes(1100 - 24 - 4))
    wire = header(0x80) + option.encode()
    assert len(wire) == 1100
    response = pcp.parse_response(wire)
    assert isinstance(response, Response)
    assert response.options == (option,)


# --- malformed requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"", "empty"),
        (bytes.fromhex("00 00"), "version 0"),
        (Request.announce(CLIENT).encode()[:20], "truncated"),
        (Request.announce(CLIENT).encode() + bytes(1080), "exceeds 1100"),
        (Request.announce(CLIENT).encode() + bytes(3), "not a multiple of 4"),
        (header(0x80), "R bit set"),
        (Request.announce(CLIENT).encode()[:1] + b"\x02" + bytes(22), "unsupported PCP opcode 2"),
        (Request.announce(CLIENT).encode()[:1] + b"\x01" + bytes(22), "MAP request truncated"),
        (Request.announce(CLIENT).encode() + bytes.fromhex("03 00 0014"), "overruns"),
    ],
)
def test_malformed_requests(wire: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        pcp.parse_request(wire)


# --- nonce ----------------------------------------------------------------------------------------


def test_new_nonce_uses_the_given_source() -> None:
    assert pcp.new_nonce(lambda n: b"\x07" * n) == b"\x07" * 12
    assert len(pcp.new_nonce()) == 12
    with pytest.raises(ValueError, match="not 12"):
        pcp.new_nonce(lambda n: b"\x00")


# --- fuzzing --------------------------------------------------------------------------------------


def _parse_everything(data: bytes) -> None:
    for parse in (pcp.parse_request, pcp.parse_response, pcp.decode_address, MapData.decode):
        try:
            parse(data)
        except DecodeError as exc:
            assert exc.reason
            assert "\n" not in exc.reason


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    _parse_everything(data)


@settings(max_examples=300)
@given(
    st.one_of(requests.map(Request.encode), responses.map(Response.encode)),
    st.lists(st.tuples(st.integers(0, 1099), u8), max_size=6),
    st.integers(0, 1100),
)
def test_mutated_valid_messages_never_raise_anything_but_decode_error(
    wire: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    # Random bytes rarely get past the version and length checks; mutating real messages
    # reaches the opcode data and option parsers.
    mutated = bytearray(wire)
    for position, value in flips:
        if position < len(mutated):
            mutated[position] = value
    _parse_everything(bytes(mutated))
    _parse_everything(bytes(mutated[:cut]))


# --- the warm path's constructions are the general ones (differential) ---------------------------

# Arguments a caller may pass, valid or not: each check must fire exactly as the constructors' do.
any_ports = st.one_of(u16, st.sampled_from([-1, 0, 0x1_0000, True]))
any_lifetimes = st.one_of(u32, st.sampled_from([-1, 2**32]))
any_nonces = st.one_of(nonces, st.binary(max_size=13))
any_addresses = st.one_of(addresses, st.just("192.168.1.10"))


def _outcome(build: Callable[[], Request]) -> Request | tuple[str, str]:
    try:
        return build()
    except ValueError as exc:
        return ("ValueError", str(exc))


@given(any_addresses, any_nonces, st.sampled_from(list(Transport)), any_ports, any_lifetimes, any_ports, addresses)
def test_new_map_is_exactly_the_checked_constructors(
    client: IPv4Address | IPv6Address,
    nonce: bytes,
    transport: Transport,
    internal_port: int,
    lifetime: int,
    external_port: int,
    external: IPv4Address | IPv6Address,
) -> None:
    """new_map builds the Request without its __init__ (§11.1): the same value, or the same error in the
    same words, as the general constructors give (new_map's own port check first, as it always had)."""

    def general() -> Request:
        check_range("internal_port", internal_port, 1, 0xFFFF)
        data = MapData(nonce, transport.iana_number, internal_port, external_port, external)
        return Request(Opcode.MAP, lifetime, client, data)

    def fast() -> Request:
        return Request.new_map(
            client,
            nonce,
            transport,
            internal_port,
            lifetime,
            suggested_external_port=external_port,
            suggested_external_address=external,
        )

    expected = _outcome(general)
    got = _outcome(fast)
    assert got == expected
    if isinstance(got, Request) and isinstance(expected, Request):
        assert type(got.options) is tuple and got.opcode is Opcode.MAP
        assert got.encode() == expected.encode()
        assert pcp.parse_request(got.encode()) == got


@given(responses)
def test_map_data_read_in_place_is_the_36_bytes_decoded(response: Response) -> None:
    """parse_response reads the MAP data in place (MapData._decode_at); MapData.decode of the same 36
    bytes copied out gives the same value."""
    wire = response.encode()
    parsed = pcp.parse_response(wire)
    assert isinstance(parsed, Response)
    if parsed.map is not None:
        assert parsed.map == MapData.decode(wire[pcp.HEADER_SIZE : pcp.HEADER_SIZE + pcp.MAP_DATA_SIZE])


@given(st.lists(st.binary(min_size=16, max_size=16), max_size=8), st.lists(ipv4, max_size=8))
def test_decode_address_with_its_kept_ipv4_is_the_plain_decoding(raws: list[bytes], mapped: list[IPv4Address]) -> None:
    """The last IPv4 address decoded is returned again for the same bytes: equal to a fresh decoding,
    whatever came before (IPv6, another IPv4, the same one twice)."""
    for raw in [*raws, *(pcp.encode_address(ip) for ip in mapped for _ in range(2))]:
        decoded = pcp.decode_address(raw)
        if raw.startswith(bytes(10) + b"\xff\xff"):
            assert decoded == IPv4Address(raw[12:]) and isinstance(decoded, IPv4Address)
        else:
            assert decoded == IPv6Address(raw)


@given(
    st.lists(st.one_of(addresses, st.sampled_from([CLIENT, pcp.UNSPECIFIED_IPV4, pcp.UNSPECIFIED_IPV6])), max_size=30)
)
def test_encode_address_with_its_kept_forms_is_the_plain_encoding(sequence: list[IPv4Address | IPv6Address]) -> None:
    """The forms kept by identity (the same client address request after request) are the §5 encoding of
    that very object, however many others were encoded between (the table is emptied when full)."""
    for ip in [*sequence, *sequence]:
        expected = bytes(10) + b"\xff\xff" + ip.packed if isinstance(ip, IPv4Address) else ip.packed
        assert pcp.encode_address(ip) == expected
