"""NAT-PMP wire codec (RFC 6886), sans-IO.

Encodes the two client requests of RFC 6886 (§3.2 external address, §3.3 port mapping) and decodes
the gateway's replies, including the short 8-byte error form of §3.5. The same module serves the
fake routers in the tests, so requests can be parsed and responses encoded as well.

Gateway announcements (§3.2.1) — the external-address response the gateway multicasts to
224.0.0.1:5350 after a reboot or an address change — have exactly the response format, so
`parse_response` decodes them as an `ExternalAddressResponse`; there is no separate type.

Every `parse_*` function takes untrusted bytes and either returns a typed value or raises
`DecodeError` with a one-line reason.
"""

from __future__ import annotations

import enum
import struct
from functools import lru_cache
from ipaddress import IPv4Address

from autonat.proto.errors import DecodeError
from autonat.proto.record import Record, from_wire, init_fields
from autonat.proto.types import Transport, check_range

__all__ = [
    "CLIENT_PORT",
    "SERVER_PORT",
    "VERSION",
    "ErrorResponse",
    "ExternalAddressRequest",
    "ExternalAddressResponse",
    "MapRequest",
    "MapResponse",
    "Opcode",
    "ResultCode",
    "describe_result",
    "ipv4_address",
    "parse_request",
    "parse_response",
]

SERVER_PORT = 5351
"""UDP port the gateway listens on (§3)."""

CLIENT_PORT = 5350
"""UDP port announcements are multicast to, on 224.0.0.1 (§3.2.1)."""

VERSION = 0

RESPONSE_BIT = 128
"""Added to the request opcode to form the response opcode (§3.2)."""

MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFF_FFFF

_EXTERNAL_ADDRESS_REQUEST_SIZE = 2
_MAP_REQUEST_SIZE = 12
_ERROR_RESPONSE_SIZE = 8
_EXTERNAL_ADDRESS_RESPONSE_SIZE = 12
_MAP_RESPONSE_SIZE = 16

_UDP = Transport.UDP
_TCP = Transport.TCP

_HEAD = struct.Struct("!BB")
_MAP_REQUEST = struct.Struct("!BBHHHI")
_RESPONSE_HEAD = struct.Struct("!BBHI")
_EXTERNAL_ADDRESS_RESPONSE = struct.Struct("!BBHI4s")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")


class Opcode(enum.IntEnum):
    """Request opcodes (§3.2, §3.3); a response carries the opcode plus 128."""

    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2

    @classmethod
    def for_transport(cls, transport: Transport) -> Opcode:
        """The mapping opcode for `transport` (§3.3: 1 for UDP, 2 for TCP)."""
        return _MAP_UDP if transport is _UDP else _MAP_TCP

    @property
    def transport(self) -> Transport:
        """The transport a mapping opcode maps; ValueError for EXTERNAL_ADDRESS."""
        if self is Opcode.MAP_UDP:
            return Transport.UDP
        if self is Opcode.MAP_TCP:
            return Transport.TCP
        raise ValueError("the external address opcode has no transport")


class ResultCode(enum.IntEnum):
    """Result codes of §3.5."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


_RESULT_TEXT = {
    ResultCode.SUCCESS: "success",
    ResultCode.UNSUPPORTED_VERSION: "unsupported version",
    ResultCode.NOT_AUTHORIZED: "not authorized/refused",
    ResultCode.NETWORK_FAILURE: "network failure (e.g. the gateway has no external address yet)",
    ResultCode.OUT_OF_RESOURCES: "out of resources (no more mappings available)",
    ResultCode.UNSUPPORTED_OPCODE: "unsupported opcode",
}


# The opcodes the per-reply code compares with, as module names (an enum attribute costs a lookup more).
_EXTERNAL_ADDRESS = Opcode.EXTERNAL_ADDRESS
_MAP_UDP = Opcode.MAP_UDP
_MAP_TCP = Opcode.MAP_TCP

_MAP_OPCODES = frozenset({_MAP_UDP, _MAP_TCP})


@lru_cache(maxsize=8)
def ipv4_address(packed: bytes) -> IPv4Address:
    """`IPv4Address(packed)` for 4 bytes off the wire (§3.2's external address; PCP's IPv4-mapped
    addresses reuse it). A gateway names the same external address in reply after reply, and an address
    is immutable, so the ones made last are kept and returned again: no object built per reply
    (bench/peers.py)."""
    return IPv4Address(packed)


def describe_result(code: int) -> str:
    """One line of human text for a NAT-PMP result code (§3.5)."""
    try:
        text = _RESULT_TEXT[ResultCode(code)]
    except ValueError:
        return f"unknown NAT-PMP result {code}"
    return f"{text} (NAT-PMP result {code})"


# --- requests -------------------------------------------------------------------------------------


class ExternalAddressRequest(Record):
    """Ask the gateway for its external IPv4 address (§3.2)."""

    __slots__ = ()

    def encode(self) -> bytes:
        return _HEAD.pack(VERSION, Opcode.EXTERNAL_ADDRESS)


class MapRequest(Record):
    """Create, renew or delete a port mapping (§3.3, deletion §3.4).

    `external_port` is only a suggestion; 0 means no preference. A lifetime of 0 deletes the
    mapping. An internal port of 0 is allowed only with lifetime 0: that is the §3.4 request that
    deletes every mapping of this transport held by the client.
    """

    _fields = ("transport", "internal_port", "external_port", "lifetime")
    __slots__ = _fields
    transport: Transport
    internal_port: int
    external_port: int
    lifetime: int

    def __init__(self, transport: Transport, internal_port: int, external_port: int, lifetime: int) -> None:
        if not isinstance(transport, Transport):
            raise ValueError(f"transport must be a Transport, not {transport!r}")
        check_range("internal_port", internal_port, 0, MAX_U16)
        check_range("external_port", external_port, 0, MAX_U16)
        check_range("lifetime", lifetime, 0, MAX_U32)
        if internal_port == 0 and lifetime != 0:
            raise ValueError("internal_port 0 is only valid in a delete-all request (lifetime 0)")
        init_fields(self, transport, internal_port, external_port, lifetime)

    @classmethod
    def delete(cls, transport: Transport, internal_port: int) -> MapRequest:
        """Delete the mapping of `internal_port` (§3.4: lifetime 0, external port 0)."""
        check_range("internal_port", internal_port, 1, MAX_U16)
        return cls(transport, internal_port, 0, 0)

    @classmethod
    def delete_all(cls, transport: Transport) -> MapRequest:
        """Delete every mapping of `transport` this client holds (§3.4: all three fields 0)."""
        return cls(transport, 0, 0, 0)

    @property
    def opcode(self) -> Opcode:
        return Opcode.for_transport(self.transport)

    def encode(self) -> bytes:
        return _MAP_REQUEST.pack(VERSION, self.opcode, 0, self.internal_port, self.external_port, self.lifetime)


def parse_request(data: bytes) -> ExternalAddressRequest | MapRequest:
    """Decode a client request (§3.2, §3.3); meant for fake gateways in tests.

    Lengths must be exact. The reserved field of a mapping request is ignored, as §3.3 requires.
    """
    if len(data) < _HEAD.size:
        raise DecodeError(f"NAT-PMP request truncated ({len(data)} bytes)")
    version, opcode = _HEAD.unpack_from(data)
    if version != VERSION:
        raise DecodeError(f"unsupported NAT-PMP version {version}")
    if opcode >= RESPONSE_BIT:
        raise DecodeError(f"NAT-PMP opcode {opcode} is a response, not a request")
    if opcode == Opcode.EXTERNAL_ADDRESS:
        if len(data) != _EXTERNAL_ADDRESS_REQUEST_SIZE:
            raise DecodeError(f"NAT-PMP external address request is {len(data)} bytes, not 2")
        return ExternalAddressRequest()
    if opcode not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        raise DecodeError(f"unsupported NAT-PMP opcode {opcode}")
    if len(data) != _MAP_REQUEST_SIZE:
        raise DecodeError(f"NAT-PMP map request is {len(data)} bytes, not 12")
    _, _, _reserved, internal_port, external_port, lifetime = _MAP_REQUEST.unpack(data)
    try:
        return MapRequest(Opcode(opcode).transport, internal_port, external_port, lifetime)
    except ValueError as exc:
        raise DecodeError(f"invalid NAT-PMP map request: {exc}") from None


# --- responses ------------------------------------------------------------------------------------


def _check_response_fields(result: int, epoch: int) -> None:
    check_range("result", result, 0, MAX_U16)
    check_range("epoch", epoch, 0, MAX_U32)


class ExternalAddressResponse(Record):
    """The gateway's external IPv4 address (§3.2); also the format of announcements (§3.2.1).

    With a non-zero result §3.2 makes the address meaningless; it is kept as received.
    `epoch` is the Seconds Since Start of Epoch field (§3.6).
    """

    _fields = ("result", "epoch", "external_address")
    __slots__ = _fields
    result: int
    epoch: int
    external_address: IPv4Address

    def __init__(self, result: int, epoch: int, external_address: IPv4Address) -> None:
        _check_response_fields(result, epoch)
        if not isinstance(external_address, IPv4Address):
            raise ValueError(f"external_address must be an IPv4Address, not {external_address!r}")
        init_fields(self, result, epoch, external_address)

    def encode(self) -> bytes:
        return _EXTERNAL_ADDRESS_RESPONSE.pack(
            VERSION,
            RESPONSE_BIT + Opcode.EXTERNAL_ADDRESS,
            self.result,
            self.epoch,
            self.external_address.packed,
        )


class MapResponse(Record):
    """Reply to a mapping request (§3.3): the port actually mapped and the granted lifetime."""

    _fields = ("transport", "result", "epoch", "internal_port", "external_port", "lifetime")
    __slots__ = _fields
    transport: Transport
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int

    def __init__(
        self, transport: Transport, result: int, epoch: int, internal_port: int, external_port: int, lifetime: int
    ) -> None:
        if not isinstance(transport, Transport):
            raise ValueError(f"transport must be a Transport, not {transport!r}")
        _check_response_fields(result, epoch)
        check_range("internal_port", internal_port, 0, MAX_U16)
        check_range("external_port", external_port, 0, MAX_U16)
        check_range("lifetime", lifetime, 0, MAX_U32)
        init_fields(self, transport, result, epoch, internal_port, external_port, lifetime)

    def encode(self) -> bytes:
        return _MAP_RESPONSE.pack(
            VERSION,
            RESPONSE_BIT + Opcode.for_transport(self.transport),
            self.result,
            self.epoch,
            self.internal_port,
            self.external_port,
            self.lifetime,
        )


class ErrorResponse(Record):
    """The short 8-byte reply of §3.5: version, opcode + 128, result, epoch, nothing else.

    Servers send it for an unsupported version or opcode, where they cannot build the full form.
    `opcode` is the request opcode (the response byte minus 128) and may be one this module does
    not know, which is precisely the unsupported-opcode case.
    """

    _fields = ("opcode", "result", "epoch")
    __slots__ = _fields
    opcode: int
    result: int
    epoch: int

    def __init__(self, opcode: int, result: int, epoch: int) -> None:
        check_range("opcode", opcode, 0, RESPONSE_BIT - 1)
        _check_response_fields(result, epoch)
        init_fields(self, opcode, result, epoch)

    def encode(self) -> bytes:
        return _RESPONSE_HEAD.pack(VERSION, RESPONSE_BIT + self.opcode, self.result, self.epoch)


def parse_response(
    data: bytes,
) -> ExternalAddressResponse | MapResponse | ErrorResponse:
    """Decode a gateway reply or announcement (§3.2, §3.2.1, §3.3, §3.5).

    A success must have exactly the length of its full form. A non-zero result in the full form's
    exact length decodes to that form; any other non-zero result of at least 8 bytes decodes to
    `ErrorResponse` (trailing bytes, such as an echoed request, are ignored). Result codes this
    module does not know are kept as plain ints.
    """
    if len(data) < _ERROR_RESPONSE_SIZE:
        raise DecodeError(f"NAT-PMP response truncated ({len(data)} bytes)")
    version, op_byte, result, epoch = _RESPONSE_HEAD.unpack_from(data)
    if version != VERSION:
        raise DecodeError(f"not a NAT-PMP response (version {version})")
    if op_byte < RESPONSE_BIT:
        raise DecodeError(f"NAT-PMP opcode {op_byte} is a request, not a response")
    opcode = op_byte - RESPONSE_BIT

    size = len(data)
    if opcode == _EXTERNAL_ADDRESS and size == _EXTERNAL_ADDRESS_RESPONSE_SIZE:
        address = _EXTERNAL_ADDRESS_RESPONSE.unpack(data)[4]
        return from_wire(ExternalAddressResponse, result, epoch, ipv4_address(address))
    # Fields in range by their width (from_wire: no checks meant for a caller's values on every reply).
    if opcode in _MAP_OPCODES and size == _MAP_RESPONSE_SIZE:
        _, _, _, _, internal_port, external_port, lifetime = _MAP_RESPONSE.unpack(data)
        transport = _UDP if opcode == _MAP_UDP else _TCP
        return from_wire(MapResponse, transport, result, epoch, internal_port, external_port, lifetime)
    if result != ResultCode.SUCCESS:
        return from_wire(ErrorResponse, opcode, result, epoch)
    if opcode in (Opcode.EXTERNAL_ADDRESS, Opcode.MAP_UDP, Opcode.MAP_TCP):
        raise DecodeError(f"NAT-PMP success response for opcode {opcode} has wrong length {len(data)}")
    raise DecodeError(f"unknown NAT-PMP response opcode {op_byte}")


def reply_key(data: bytes) -> tuple[str, int, int | None] | None:
    """Which request a datagram answers, read from fixed offsets without a full parse (§3.2, §3.3):
    ("natpmp", request opcode, internal port for mapping replies). None if it can't be a reply."""
    if len(data) < 8 or data[0] != VERSION or data[1] < RESPONSE_BIT:
        return None
    opcode = data[1] - RESPONSE_BIT
    if opcode in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        return ("natpmp", opcode, int.from_bytes(data[8:10], "big") if len(data) >= 10 else None)
    return ("natpmp", opcode, None)


def request_key(request: ExternalAddressRequest | MapRequest) -> tuple[str, int, int | None]:
    """The `reply_key` of this request's answers."""
    if isinstance(request, MapRequest):
        return ("natpmp", request.opcode, request.internal_port)
    return ("natpmp", Opcode.EXTERNAL_ADDRESS, None)
