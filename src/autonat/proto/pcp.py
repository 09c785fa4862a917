"""PCP wire codec (RFC 6887), sans-IO.

Covers the common request and response headers (§7.1, §7.2), options (§7.3), the result codes
(§7.4), the ANNOUNCE (§14.1) and MAP (§11.1) opcodes, and version negotiation with NAT-PMP-only or
older servers (§9). PEER (§12) is not implemented: this project only maps inbound ports.

Requests are parsed and responses encoded too, for the fake routers in the tests.

Every `parse_*`/`decode_*` function takes untrusted bytes and either returns a typed value or
raises `DecodeError` with a one-line reason.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from autonat.proto.errors import DecodeError
from autonat.proto.natpmp import ipv4_address
from autonat.proto.record import Record, from_wire, init_fields
from autonat.proto.types import Transport, check_range

__all__ = [
    "CLIENT_PORT",
    "HEADER_SIZE",
    "MAP_DATA_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_OPTIONS",
    "NONCE_SIZE",
    "SERVER_PORT",
    "UNSPECIFIED_IPV4",
    "UNSPECIFIED_IPV6",
    "VERSION",
    "MapData",
    "Opcode",
    "Option",
    "OptionCode",
    "Request",
    "Response",
    "ResultCode",
    "VersionNotSupported",
    "decode_address",
    "describe_result",
    "encode_address",
    "is_long_lifetime_error",
    "new_nonce",
    "parse_request",
    "parse_response",
]

VERSION = 2
SERVER_PORT = 5351
CLIENT_PORT = 5350
"""Port of the unsolicited ANNOUNCE multicast, sent to 224.0.0.1 and ff02::1 (§14.1)."""

MAX_MESSAGE_SIZE = 1100
"""Largest PCP message, header included (§7)."""

NONCE_SIZE = 12
HEADER_SIZE = 24
MAP_DATA_SIZE = 36

MAX_OPTIONS = 64
"""Refuse messages with more options than this. A MAP request filled with 24-byte FILTER options
holds at most 43, so no honest message comes near; the cap bounds the work a hostile one costs."""

UNSPECIFIED_IPV4 = IPv4Address(0)
"""The 'no preference' external address for IPv4, sent as ::ffff:0.0.0.0 (§11.1)."""

UNSPECIFIED_IPV6 = IPv6Address(0)

RESPONSE_BIT = 0x80
OPCODE_MASK = 0x7F
_MAP_MESSAGE_SIZE = HEADER_SIZE + MAP_DATA_SIZE  # the common header, then the MAP opcode data

MAX_U8 = 0xFF
MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFF_FFFF

_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_ADDRESS_SIZE = 16
_OPTION_HEADER_SIZE = 4
_MAX_OPTION_DATA = MAX_MESSAGE_SIZE - HEADER_SIZE - _OPTION_HEADER_SIZE

_REQUEST_HEADER = struct.Struct("!BBHI16s")
_RESPONSE_HEADER = struct.Struct("!BBBBII12x")
_MAP_DATA = struct.Struct("!12sB3xHH16s")
_OPTION_HEADER = struct.Struct("!BBH")
_FILTER_DATA = struct.Struct("!BBH16s")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class Opcode(enum.IntEnum):
    """Opcodes: ANNOUNCE (§14.1), MAP (§11), PEER (§12, not implemented here)."""

    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class ResultCode(enum.IntEnum):
    """Result codes of §7.4."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


# The members the per-message code compares with, as module names (an enum attribute costs a lookup more).
_OPCODE_ANNOUNCE = Opcode.ANNOUNCE
_OPCODE_MAP = Opcode.MAP
_SUCCESS = ResultCode.SUCCESS

_RESULT_TEXT = {
    ResultCode.SUCCESS: "the request succeeded",
    ResultCode.UNSUPP_VERSION: "the router does not speak this PCP version",
    ResultCode.NOT_AUTHORIZED: "the router refuses this operation (disabled or forbidden by policy)",
    ResultCode.MALFORMED_REQUEST: "the router could not parse our request",
    ResultCode.UNSUPP_OPCODE: "the router does not support this opcode",
    ResultCode.UNSUPP_OPTION: "the router does not support a mandatory option we sent",
    ResultCode.MALFORMED_OPTION: "an option we sent is malformed or repeated",
    ResultCode.NETWORK_FAILURE: "the router has a network failure (e.g. no external address yet)",
    ResultCode.NO_RESOURCES: "the router is out of resources for now",
    ResultCode.UNSUPP_PROTOCOL: "the router cannot map this transport protocol",
    ResultCode.USER_EX_QUOTA: "this client has used up its port quota",
    ResultCode.CANNOT_PROVIDE_EXTERNAL: "the suggested external port or address is not available",
    ResultCode.ADDRESS_MISMATCH: "the router sees our requests from another address",
    ResultCode.EXCESSIVE_REMOTE_PEERS: "the router cannot install the requested filters",
}

# §7.4 marks each error long or short lifetime; CANNOT_PROVIDE_EXTERNAL is neither ("depends on
# the reason"), so only the response's lifetime field can tell.
_LONG_LIFETIME_ERRORS = frozenset(
    {
        ResultCode.UNSUPP_VERSION,
        ResultCode.NOT_AUTHORIZED,
        ResultCode.MALFORMED_REQUEST,
        ResultCode.UNSUPP_OPCODE,
        ResultCode.UNSUPP_OPTION,
        ResultCode.MALFORMED_OPTION,
        ResultCode.UNSUPP_PROTOCOL,
        ResultCode.ADDRESS_MISMATCH,
        ResultCode.EXCESSIVE_REMOTE_PEERS,
    }
)


def describe_result(code: int) -> str:
    """One line of human text for a PCP result code (§7.4)."""
    try:
        member = ResultCode(code)
    except ValueError:
        return f"unknown PCP result {code}"
    return f"{member.name}: {_RESULT_TEXT[member]} (PCP result {code})"


def is_long_lifetime_error(code: int) -> bool:
    """True for the errors §7.4 calls long lifetime: retrying soon with the same request is futile.

    The response's lifetime field says how long the condition is expected to last (§7.2); unknown
    codes and CANNOT_PROVIDE_EXTERNAL return False.
    """
    return code in _LONG_LIFETIME_ERRORS


def _normalize_address(name: str, ip: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    # An IPv4-mapped IPv6Address and the IPv4Address have one wire form; folding them keeps
    # decode(encode(x)) == x.
    if isinstance(ip, IPv6Address):
        return ip.ipv4_mapped or ip
    if isinstance(ip, IPv4Address):
        return ip
    raise ValueError(f"{name} must be an IPv4Address or IPv6Address, not {ip!r}")


# --- addresses (§5) -------------------------------------------------------------------------------


def encode_address(ip: IPv4Address | IPv6Address) -> bytes:
    """The 16-byte form of §5: IPv6 as is, IPv4 as the IPv4-mapped address ::ffff:a.b.c.d.

    Every request carries the client's address and a MAP request the suggested external one, the same
    two objects request after request: the forms of the last few objects encoded are kept, by identity
    (an address is immutable; the entry holds the object, so its id is not reused meanwhile)."""
    known = _ENCODED.get(id(ip))
    if known is not None and known[0] is ip:
        return known[1]
    if isinstance(ip, IPv4Address):
        wire = _MAPPED_PREFIX + ip.packed
    elif isinstance(ip, IPv6Address):
        wire = ip.packed
    else:
        raise TypeError(f"not an IP address: {ip!r}")
    if len(_ENCODED) >= _ENCODED_KEPT:
        _ENCODED.clear()
    _ENCODED[id(ip)] = (ip, wire)
    return wire


_ENCODED_KEPT = 8  # a client address or two (IPv4, IPv6), the unspecified ones, a few others
_ENCODED: dict[int, tuple[IPv4Address | IPv6Address, bytes]] = {}


def decode_address(b: bytes) -> IPv4Address | IPv6Address:
    """Inverse of `encode_address` (§5); IPv4-mapped addresses, ::ffff:0.0.0.0 included, decode to
    IPv4Address."""
    if len(b) != _ADDRESS_SIZE:
        raise DecodeError(f"PCP address field is {len(b)} bytes, not 16")
    raw = bytes(b)
    if raw.startswith(_MAPPED_PREFIX):
        return ipv4_address(raw[12:])
    return IPv6Address(raw)


def new_nonce(rand: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh mapping nonce (§11.1); `rand` is injectable so tests stay deterministic."""
    nonce = rand(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"rand returned {len(nonce)} bytes, not {NONCE_SIZE}")
    return bytes(nonce)


# --- options (§7.3, §13) --------------------------------------------------------------------------


class OptionCode(enum.IntEnum):
    """Options of §13. Codes 0-127 are mandatory to process, 128-255 optional (§7.3)."""

    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3


_OPTION_DATA_SIZE: dict[int, int] = {
    OptionCode.THIRD_PARTY: 16,
    OptionCode.PREFER_FAILURE: 0,
    OptionCode.FILTER: 20,
}


class Option(Record):
    """One option (§7.3). `data` is unpadded; unknown codes are kept with their raw data."""

    _fields = ("code", "data")
    __slots__ = _fields
    code: int
    data: bytes

    def __init__(self, code: int, data: bytes = b"") -> None:
        check_range("option code", code, 0, MAX_U8)
        if not isinstance(data, bytes):
            raise ValueError(f"option data must be bytes, not {type(data).__name__}")
        if len(data) > _MAX_OPTION_DATA:
            raise ValueError(f"option data of {len(data)} bytes cannot fit in a PCP message")
        expected = _OPTION_DATA_SIZE.get(code)
        if expected is not None and len(data) != expected:
            raise ValueError(f"{OptionCode(code).name} option data is {len(data)} bytes, not {expected}")
        init_fields(self, code, data)

    @classmethod
    def prefer_failure(cls) -> Option:
        """PREFER_FAILURE (§13.2): fail rather than map a port other than the suggested one."""
        return cls(OptionCode.PREFER_FAILURE)

    @classmethod
    def third_party(cls, ip: IPv4Address | IPv6Address) -> Option:
        """THIRD_PARTY (§13.1): map on behalf of another internal host."""
        return cls(OptionCode.THIRD_PARTY, encode_address(_normalize_address("ip", ip)))

    @classmethod
    def filter(cls, prefix_length: int, remote_port: int, remote_ip: IPv4Address | IPv6Address) -> Option:
        """FILTER (§13.3): accept inbound traffic only from `remote_ip`/`prefix_length`.

        Remote port 0 means all ports; prefix length 0 means no filter and clears earlier ones.
        Whether an IPv4 prefix counts the 96 bits of the mapped prefix is the server's business;
        only the field's range is checked here.
        """
        check_range("prefix_length", prefix_length, 0, 128)
        check_range("remote_port", remote_port, 0, MAX_U16)
        remote = encode_address(_normalize_address("remote_ip", remote_ip))
        return cls(OptionCode.FILTER, _FILTER_DATA.pack(0, prefix_length, remote_port, remote))

    @property
    def is_optional(self) -> bool:
        """Codes 128-255 may be ignored by a server that does not know them (§7.3)."""
        return self.code >= RESPONSE_BIT

    @property
    def encoded_size(self) -> int:
        return _OPTION_HEADER_SIZE + _padded(len(self.data))

    def encode(self) -> bytes:
        padding = bytes(_padded(len(self.data)) - len(self.data))
        return _OPTION_HEADER.pack(self.code, 0, len(self.data)) + self.data + padding


def _padded(length: int) -> int:
    return (length + 3) & ~3


def _check_options(options: tuple[Option, ...]) -> None:
    if len(options) > MAX_OPTIONS:
        raise ValueError(f"{len(options)} options, at most {MAX_OPTIONS} allowed")
    for option in options:
        if not isinstance(option, Option):
            raise ValueError(f"options must be Option values, not {option!r}")


def _decode_options(body: bytes) -> tuple[Option, ...]:
    """Decode the option list that fills the rest of a message (§7.3).

    Reserved bytes and padding are ignored on reception, as §7.3 has it for reserved fields.
    """
    options: list[Option] = []
    offset = 0
    while offset < len(body):
        if len(options) == MAX_OPTIONS:
            raise DecodeError(f"more than {MAX_OPTIONS} PCP options")
        if len(body) - offset < _OPTION_HEADER_SIZE:
            raise DecodeError("PCP option header truncated")
        code, _reserved, length = _OPTION_HEADER.unpack_from(body, offset)
        offset += _OPTION_HEADER_SIZE
        if _padded(length) > len(body) - offset:
            raise DecodeError(f"PCP option {code} length {length} overruns the message")
        expected = _OPTION_DATA_SIZE.get(code)
        if expected is not None and length != expected:
            raise DecodeError(f"PCP {OptionCode(code).name} option has length {length}, not {expected}")
        options.append(Option(code, bytes(body[offset : offset + length])))
        offset += _padded(length)
    return tuple(options)


# --- MAP opcode data (§11.1) ----------------------------------------------------------------------


class MapData(Record):
    """The 36 bytes of MAP opcode data (§11.1).

    In a request the external port and address are suggestions (0 and the all-zeros address mean
    no preference); in a response they are what the server assigned. `protocol` is the IANA
    protocol number, 0 meaning all protocols.
    """

    _fields = ("nonce", "protocol", "internal_port", "external_port", "external_address")
    __slots__ = _fields
    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: IPv4Address | IPv6Address

    def __init__(
        self,
        nonce: bytes,
        protocol: int,
        internal_port: int,
        external_port: int,
        external_address: IPv4Address | IPv6Address,
    ) -> None:
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes, not {nonce!r}")
        check_range("protocol", protocol, 0, MAX_U8)
        check_range("internal_port", internal_port, 0, MAX_U16)
        check_range("external_port", external_port, 0, MAX_U16)
        address = _normalize_address("external_address", external_address)
        init_fields(self, nonce, protocol, internal_port, external_port, address)

    @property
    def transport(self) -> Transport | None:
        """UDP or TCP, or None for another protocol or 'all protocols' (0)."""
        try:
            return Transport.from_iana_number(self.protocol)
        except ValueError:
            return None

    def encode(self) -> bytes:
        return _MAP_DATA.pack(
            self.nonce,
            self.protocol,
            self.internal_port,
            self.external_port,
            encode_address(self.external_address),
        )

    @classmethod
    def decode(cls, data: bytes) -> MapData:
        """Decode exactly 36 bytes; the reserved bytes are ignored (§11.1)."""
        if len(data) != MAP_DATA_SIZE:
            raise DecodeError(f"PCP MAP data is {len(data)} bytes, not {MAP_DATA_SIZE}")
        return cls._decode_at(data, 0)

    @classmethod
    def _decode_at(cls, message: bytes, offset: int) -> MapData:
        """The 36 bytes at `offset` of a message the caller checked is long enough, read in place: a
        reply's MAP data is not copied out of it first."""
        nonce, protocol, internal_port, external_port, address = _MAP_DATA.unpack_from(message, offset)
        return from_wire(cls, nonce, protocol, internal_port, external_port, decode_address(address))


def _check_map(opcode: int, map_data: MapData | None, *, required: bool) -> None:
    if map_data is not None and not isinstance(map_data, MapData):
        raise ValueError(f"map must be MapData or None, not {map_data!r}")
    if opcode != Opcode.MAP and map_data is not None:
        raise ValueError(f"opcode {opcode} carries no MAP data")
    if required and opcode == Opcode.MAP and map_data is None:
        raise ValueError("a MAP request needs MAP data")


def _check_size(size: int) -> None:
    if size > MAX_MESSAGE_SIZE:
        raise ValueError(f"PCP message of {size} bytes exceeds {MAX_MESSAGE_SIZE}")


# --- requests (§7.1) ------------------------------------------------------------------------------


class Request(Record):
    """A PCP request (§7.1): header, opcode data (MAP only here), options.

    `client_address` is the address the client sends from; the server compares it with the
    packet's source to detect an unexpected NAT on the way (ADDRESS_MISMATCH, §8.2).
    """

    _fields = ("opcode", "lifetime", "client_address", "map", "options")
    __slots__ = _fields
    opcode: int
    lifetime: int
    client_address: IPv4Address | IPv6Address
    map: MapData | None
    options: tuple[Option, ...]

    def __init__(
        self,
        opcode: int,
        lifetime: int,
        client_address: IPv4Address | IPv6Address,
        map: MapData | None = None,
        options: tuple[Option, ...] = (),
    ) -> None:
        check_range("opcode", opcode, 0, OPCODE_MASK)
        check_range("lifetime", lifetime, 0, MAX_U32)
        address = _normalize_address("client_address", client_address)
        _check_map(opcode, map, required=True)
        if options.__class__ is not tuple:
            options = tuple(options)
        init_fields(self, opcode, lifetime, address, map, options)
        if options:  # without options the size is fixed and within the cap
            _check_options(options)
            _check_size(self.encoded_size)

    @classmethod
    def announce(cls, client_address: IPv4Address | IPv6Address) -> Request:
        """ANNOUNCE (§14.1): cheap probe for a PCP server and its epoch; lifetime 0."""
        return cls(Opcode.ANNOUNCE, 0, client_address)

    @classmethod
    def new_map(
        cls,
        client_address: IPv4Address | IPv6Address,
        nonce: bytes,
        transport: Transport,
        internal_port: int,
        lifetime: int,
        *,
        suggested_external_port: int = 0,
        suggested_external_address: IPv4Address | IPv6Address = UNSPECIFIED_IPV4,
        prefer_failure: bool = False,
    ) -> Request:
        """MAP request (§11.1) for one UDP or TCP port; renewals reuse the same nonce (§11.2.1).

        Each argument is checked once: the MAP data by its constructor, the lifetime and client address
        here, in the constructor's order and words. The rest of what `Request.__init__` checks holds by
        construction (a MAP opcode with its MAP data, no options), so without PREFER_FAILURE the request
        is built as a decoded one is (`from_wire`): every map and delete makes one (bench/peers.py)."""
        check_range("internal_port", internal_port, 1, MAX_U16)
        data = MapData(
            nonce,
            transport.iana_number,
            internal_port,
            suggested_external_port,
            suggested_external_address,
        )
        if prefer_failure:
            return cls(Opcode.MAP, lifetime, client_address, data, (Option.prefer_failure(),))
        check_range("lifetime", lifetime, 0, MAX_U32)
        client = _normalize_address("client_address", client_address)
        return from_wire(cls, _OPCODE_MAP, lifetime, client, data, ())

    @classmethod
    def delete(
        cls,
        client_address: IPv4Address | IPv6Address,
        nonce: bytes,
        transport: Transport,
        internal_port: int,
    ) -> Request:
        """Delete a mapping (§15): MAP with lifetime 0 and the nonce that created it."""
        return cls.new_map(client_address, nonce, transport, internal_port, 0)

    @property
    def encoded_size(self) -> int:
        data_size = MAP_DATA_SIZE if self.map is not None else 0
        return HEADER_SIZE + data_size + sum(option.encoded_size for option in self.options)

    def encode(self) -> bytes:
        header = _REQUEST_HEADER.pack(VERSION, self.opcode, 0, self.lifetime, encode_address(self.client_address))
        data = self.map.encode() if self.map is not None else b""
        if not self.options:
            return header + data
        return header + data + b"".join(option.encode() for option in self.options)


def _check_message_length(data: bytes, kind: str) -> None:
    if len(data) < HEADER_SIZE:
        raise DecodeError(f"PCP {kind} truncated ({len(data)} bytes)")
    if len(data) > MAX_MESSAGE_SIZE:
        raise DecodeError(f"PCP {kind} of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    if len(data) % 4:
        raise DecodeError(f"PCP {kind} length {len(data)} is not a multiple of 4")


def parse_request(data: bytes) -> Request:
    """Decode a client request (§7.1, §11.1, §14.1); meant for fake routers in tests.

    Only ANNOUNCE and MAP are understood; any other opcode is a DecodeError.
    """
    if len(data) < 1:
        raise DecodeError("empty PCP request")
    if data[0] != VERSION:
        raise DecodeError(f"unsupported PCP version {data[0]}")
    _check_message_length(data, "request")
    _, op_byte, _reserved, lifetime, client = _REQUEST_HEADER.unpack_from(data)
    if op_byte & RESPONSE_BIT:
        raise DecodeError("PCP message is a response (R bit set), not a request")
    opcode = op_byte & OPCODE_MASK
    offset = HEADER_SIZE
    map_data = None
    if opcode == _OPCODE_MAP:
        if len(data) < _MAP_MESSAGE_SIZE:
            raise DecodeError("PCP MAP request truncated")
        map_data = MapData._decode_at(data, HEADER_SIZE)
        offset = _MAP_MESSAGE_SIZE
    elif opcode != _OPCODE_ANNOUNCE:
        raise DecodeError(f"unsupported PCP opcode {opcode}")
    options = _decode_options(bytes(data[offset:]))
    try:
        return Request(opcode, lifetime, decode_address(client), map_data, options)
    except ValueError as exc:
        raise DecodeError(f"invalid PCP request: {exc}") from None


# --- responses (§7.2) -----------------------------------------------------------------------------


class Response(Record):
    """A PCP response (§7.2).

    For an error, `lifetime` is how long the error is expected to persist (§7.2, §7.4). `map` is
    None for ANNOUNCE, and for a MAP error response the server cut back to the bare header.
    """

    _fields = ("version", "opcode", "result", "lifetime", "epoch", "map", "options")
    __slots__ = _fields
    version: int
    opcode: int
    result: int
    lifetime: int
    epoch: int
    map: MapData | None
    options: tuple[Option, ...]

    def __init__(
        self,
        version: int,
        opcode: int,
        result: int,
        lifetime: int,
        epoch: int,
        map: MapData | None = None,
        options: tuple[Option, ...] = (),
    ) -> None:
        check_range("version", version, 0, MAX_U8)
        check_range("opcode", opcode, 0, OPCODE_MASK)
        check_range("result", result, 0, MAX_U8)
        check_range("lifetime", lifetime, 0, MAX_U32)
        check_range("epoch", epoch, 0, MAX_U32)
        options = tuple(options)
        _check_map(opcode, map, required=False)
        if opcode == Opcode.MAP and map is None and options:
            # Options follow the MAP data on the wire, so without it they would be misread.
            raise ValueError("a MAP response without MAP data cannot carry options")
        _check_options(options)
        init_fields(self, version, opcode, result, lifetime, epoch, map, options)
        _check_size(self.encoded_size)

    @property
    def encoded_size(self) -> int:
        data_size = MAP_DATA_SIZE if self.map is not None else 0
        return HEADER_SIZE + data_size + sum(option.encoded_size for option in self.options)

    def encode(self) -> bytes:
        header = _RESPONSE_HEADER.pack(
            self.version, RESPONSE_BIT | self.opcode, 0, self.result, self.lifetime, self.epoch
        )
        data = self.map.encode() if self.map is not None else b""
        return header + data + b"".join(option.encode() for option in self.options)


class VersionNotSupported(Record):
    """The server does not speak PCP version 2 (§9).

    `server_version` 0 is a NAT-PMP-only gateway answering with its 'unsupported version' reply
    (RFC 6886 §3.5); 1 (or another value) is a PCP server naming the version it does support.
    `epoch` is None when the reply was too short to carry one.
    """

    _fields = ("server_version", "result", "epoch")
    __slots__ = _fields
    server_version: int
    result: int
    epoch: int | None

    def __init__(self, server_version: int, result: int, epoch: int | None) -> None:
        init_fields(self, server_version, result, epoch)


def _parse_other_version(data: bytes) -> VersionNotSupported:
    """Recognise the §9 version-negotiation replies; anything else with a wrong version is bogus."""
    version = data[0]
    if len(data) > MAX_MESSAGE_SIZE:
        raise DecodeError(f"PCP response of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    if len(data) < 4:
        raise DecodeError(f"version {version} reply truncated ({len(data)} bytes)")
    if not data[1] & RESPONSE_BIT:
        raise DecodeError(f"version {version} message is not a response")
    if version == 0:
        # NAT-PMP layout (RFC 6886 §3.5): 16-bit result at 2, epoch at 4.
        result = _U16.unpack_from(data, 2)[0]
        epoch_offset = 4
    else:
        # PCP layout (§7.2): 8-bit result at 3, epoch at 8.
        result = data[3]
        epoch_offset = 8
    if result != ResultCode.UNSUPP_VERSION:
        raise DecodeError(f"version {version} reply with result {result}, not unsupported version")
    epoch = _U32.unpack_from(data, epoch_offset)[0] if len(data) >= epoch_offset + 4 else None
    return VersionNotSupported(version, result, epoch)


def parse_response(data: bytes) -> Response | VersionNotSupported:
    """Decode a server response or unsolicited ANNOUNCE (§7.2, §8.3, §9, §11.1, §14.1).

    A MAP response must carry the 36 bytes of MAP data, except that an error may come back as the
    bare 24-byte header (then `map` is None). PEER and unknown opcodes are a DecodeError.
    """
    if len(data) < 1:
        raise DecodeError("empty PCP response")
    if data[0] != VERSION:
        return _parse_other_version(data)
    _check_message_length(data, "response")
    version, op_byte, _reserved, result, lifetime, epoch = _RESPONSE_HEADER.unpack_from(data)
    if not op_byte & RESPONSE_BIT:
        raise DecodeError("PCP message is a request (R bit clear), not a response")
    opcode = op_byte & OPCODE_MASK
    size = len(data)
    offset = HEADER_SIZE  # the MAP data and the options are read in place, not copied out first
    map_data = None
    if opcode == _OPCODE_MAP:
        if size > HEADER_SIZE or result == _SUCCESS:
            if size < _MAP_MESSAGE_SIZE:
                raise DecodeError("PCP MAP response truncated")
            map_data = MapData._decode_at(data, HEADER_SIZE)
            offset = _MAP_MESSAGE_SIZE
    elif opcode != _OPCODE_ANNOUNCE:
        raise DecodeError(f"unsupported PCP response opcode {opcode}")
    options = _decode_options(bytes(data[offset:])) if size > offset else ()
    # Every field is in range by its width, the MAP data is where the opcode wants it and the length
    # was checked above: nothing for Response's own checks to find.
    return from_wire(Response, version, opcode, result, lifetime, epoch, map_data, options)


def reply_key(data: bytes) -> tuple[str, int, bytes | None] | None:
    """Which request a datagram answers, from fixed offsets (§7.2, §11.1): ("pcp", opcode, nonce for
    MAP). None if it can't be a PCP reply (a NAT-PMP-only server's answer included)."""
    if len(data) < HEADER_SIZE or data[0] != VERSION or not data[1] & RESPONSE_BIT:
        return None
    opcode = data[1] & OPCODE_MASK
    if opcode == Opcode.MAP and len(data) >= HEADER_SIZE + NONCE_SIZE:
        return ("pcp", opcode, bytes(data[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]))
    return ("pcp", opcode, None)


def request_key(request: Request) -> tuple[str, int, bytes | None]:
    """The `reply_key` of this request's answers."""
    return ("pcp", request.opcode, None if request.map is None else request.map.nonce)
