"""STUN Binding codec (RFC 8489), sans-IO: enough to learn our reflexive address from a STUN server, and to
answer ICE connectivity checks as an ICE-lite agent (RFC 8445 §7.3) on the media ports of a call.

Covers the message header (§5), the Binding method, the attributes a Binding transaction needs
(XOR-MAPPED-ADDRESS §14.2, MAPPED-ADDRESS §14.1, ERROR-CODE §14.8, UNKNOWN-ATTRIBUTES §14.9,
SOFTWARE §14.14, FINGERPRINT §14.7) and encoders for the fake servers in the tests.

What we send: a 20-byte Binding request, optionally with SOFTWARE, never with FINGERPRINT. FINGERPRINT
only serves to tell STUN from other protocols multiplexed on one port (§7), and we talk to a dedicated
server port. A FINGERPRINT *received* is verified, though: it costs one CRC and catches corruption.
MESSAGE-INTEGRITY (§14.5) is not checked on those replies: a plain Binding carries no credentials. ICE
checks do carry short-term credentials (RFC 8445 §7.2.2: the key is the answering agent's ice-pwd):
`check_integrity` verifies a request's HMAC-SHA1 and `encode(integrity=key)` signs a response.

What Debian's `stund` 0.97 (the Vovida server in the lab) actually answers, measured:
MAPPED-ADDRESS, SOURCE-ADDRESS (0x0004), CHANGED-ADDRESS (0x0005), XOR-MAPPED-ADDRESS with the RFC 8489
type 0x0020, and its name in 0x8022 ("Vovida.org 0.97"). It echoes the whole 16-byte RFC 3489 transaction
id and XORs with its first 32 bits, which is the magic cookie because we send one, so its replies are
RFC 8489 messages and no RFC 3489 (cookie-less) fallback is needed: a reply without the cookie is refused.
Two more findings shape the encoder: stund silently drops a request whose 0x8022 attribute length is
not a multiple of 4 ("Bad length string 7" in its log), so SOFTWARE is padded with spaces to a multiple
of 4 (the RFC 5769 vectors pad the same way); and it ignores a FINGERPRINT, which is harmless.

Every `parse_*` function takes untrusted bytes and returns a typed value or raises `DecodeError`
with a one-line reason; no other exception escapes, whatever the input.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from autonat.proto.errors import DecodeError

__all__ = [
    "DEFAULT_PORT",
    "HEADER_SIZE",
    "MAGIC_COOKIE",
    "MAX_ATTRIBUTES",
    "MAX_MESSAGE_SIZE",
    "SOFTWARE",
    "TRANSACTION_ID_SIZE",
    "Attribute",
    "AttributeType",
    "ErrorCode",
    "MessageClass",
    "Method",
    "StunMessage",
    "binding_success_address",
    "build_binding_request",
    "check_integrity",
    "decode_address",
    "encode_error_code",
    "encode_mapped_address",
    "encode_xor_mapped_address",
    "error_code",
    "new_transaction_id",
    "parse_binding_response",
    "parse_message",
    "reply_key",
]

DEFAULT_PORT = 3478
"""The `stun:` URI default port (RFC 7064 §3.2, RFC 8489 §18.6)."""

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
TRANSACTION_ID_SIZE = 12

MAX_MESSAGE_SIZE = 2048
"""Largest message accepted. RFC 8489 §6.2.1 keeps UDP messages under the path MTU (576 bytes for IPv4
without discovery); 2 KiB leaves room for a chatty server and still bounds what a hostile one costs."""

MAX_ATTRIBUTES = 64
"""Attribute cap: an honest Binding response has about five; the cap bounds the parsing work."""

SOFTWARE = "autonat"
"""Our SOFTWARE value (§14.14), for server logs."""

MAX_REASON_LENGTH = 128
"""ERROR-CODE reason phrases are at most 128 characters (§14.8); longer ones are cut, not refused."""

_HEADER = struct.Struct("!HHI12s")
_ATTRIBUTE_HEADER = struct.Struct("!HH")
_ADDRESS_HEAD = struct.Struct("!xBH")
_U32 = struct.Struct("!I")
_MAGIC_BYTES = _U32.pack(MAGIC_COOKIE)

_FINGERPRINT_XOR = 0x5354554E  # §14.7: CRC-32 of the message XOR "STUN"
_COMPREHENSION_OPTIONAL = 0x8000  # §14: types 0x8000-0xFFFF may be ignored by a receiver
_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02
_ADDRESS_SIZE = {_FAMILY_IPV4: 4, _FAMILY_IPV6: 16}
_MAX_SOFTWARE_BYTES = 763  # §14.14: fewer than 128 characters, at most 763 bytes


class MessageClass(enum.IntEnum):
    """The two class bits C1 C0 of the message type (§5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Method(enum.IntEnum):
    """The only method of RFC 8489 (§18.2); TURN and others define more."""

    BINDING = 0x001


class AttributeType(enum.IntEnum):
    """Attribute types this module knows by name (§18.3), plus the RFC 3489 ones old servers still send."""

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489, reserved since RFC 5389
    CHANGE_REQUEST = 0x0003  # RFC 3489 / RFC 5780
    SOURCE_ADDRESS = 0x0004  # RFC 3489, stund still sends it
    CHANGED_ADDRESS = 0x0005  # RFC 3489, stund still sends it
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024  # RFC 8445 §16.1
    USE_CANDIDATE = 0x0025
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B  # RFC 5780
    OTHER_ADDRESS = 0x802C  # RFC 5780
    ICE_CONTROLLED = 0x8029  # RFC 8445 §16.1
    ICE_CONTROLLING = 0x802A


_KNOWN_TYPES = frozenset(int(t) for t in AttributeType)

_ERROR_TEXT = {
    300: "try an alternate server",
    400: "bad request",
    401: "unauthenticated (the server wants credentials)",
    403: "forbidden",
    420: "unknown comprehension-required attribute",
    438: "stale nonce",
    500: "server error",
}


@dataclass(frozen=True, slots=True)
class Attribute:
    """One TLV (§14), the value without its padding."""

    type: int
    value: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 0xFFFF:
            raise ValueError("attribute type must be 0-65535")
        if len(self.value) > MAX_MESSAGE_SIZE - HEADER_SIZE - _ATTRIBUTE_HEADER.size:
            raise ValueError("attribute value does not fit in a STUN message")

    @property
    def comprehension_required(self) -> bool:
        """§14: 0x0000-0x7FFF must be understood by the receiver, 0x8000-0xFFFF may be skipped."""
        return self.type < _COMPREHENSION_OPTIONAL

    def encode(self) -> bytes:
        # §14: values are padded to a multiple of 4 bytes; the padding is not counted in the length.
        return _ATTRIBUTE_HEADER.pack(self.type, len(self.value)) + self.value + bytes(-len(self.value) % 4)


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """An ERROR-CODE (§14.8) from an error response: `code` 300-699, the server's reason phrase, and
    the types an UNKNOWN-ATTRIBUTES attribute (§14.9) listed (with a 420)."""

    code: int
    reason: str = ""
    unknown_attributes: tuple[int, ...] = ()

    def describe(self) -> str:
        """One line for a user: the code, our words for it, and the server's phrase when it adds something."""
        ours = _ERROR_TEXT.get(self.code, "error")
        text = f"{self.code} {ours}"
        if self.reason and self.reason.lower() != ours:
            text += f" ({self.reason})"
        if self.unknown_attributes:
            text += ": " + ", ".join(f"0x{t:04x}" for t in self.unknown_attributes)
        return text


@dataclass(frozen=True, slots=True)
class StunMessage:
    """A decoded message: class, method, 96-bit transaction id and the attributes in order.

    Attributes after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are dropped
    at parse time, as §14.5 says receivers must ignore them.
    """

    message_class: MessageClass
    method: int
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()

    def __post_init__(self) -> None:
        if len(self.transaction_id) != TRANSACTION_ID_SIZE:
            raise ValueError(f"a STUN transaction id is {TRANSACTION_ID_SIZE} bytes")
        if not 0 <= self.method <= 0xFFF:
            raise ValueError("a STUN method is 12 bits")

    def get(self, attribute_type: int) -> Attribute | None:
        """The first attribute of this type: §14 says only the first of a repeated attribute counts."""
        for attribute in self.attributes:
            if attribute.type == attribute_type:
                return attribute
        return None

    @property
    def unknown_comprehension_required(self) -> tuple[int, ...]:
        """Types in 0x0000-0x7FFF this module does not know (a response's are tolerated, see parse)."""
        return tuple(a.type for a in self.attributes if a.comprehension_required and a.type not in _KNOWN_TYPES)

    @property
    def software(self) -> str | None:
        attribute = self.get(AttributeType.SOFTWARE)
        return None if attribute is None else _printable(attribute.value.decode("utf-8", "replace").rstrip(" \0"))

    def encode(self, *, fingerprint: bool = False, integrity: bytes | None = None) -> bytes:
        """The message on the wire; with `integrity` (a short-term key, RFC 8489 §9.1.1) a MESSAGE-INTEGRITY
        attribute (§14.5) follows the attributes, and with `fingerprint` a FINGERPRINT (§14.7) comes last."""
        body = b"".join(a.encode() for a in self.attributes)
        message_type = _message_type(self.message_class, self.method)
        if integrity is not None:
            # §14.5: the HMAC covers the header with the length already counting MESSAGE-INTEGRITY (24 bytes).
            head = _HEADER.pack(message_type, len(body) + 24, MAGIC_COOKIE, self.transaction_id)
            mac = hmac.new(integrity, head + body, hashlib.sha1).digest()
            body += Attribute(AttributeType.MESSAGE_INTEGRITY, mac).encode()
        if fingerprint:
            # §14.7: the CRC covers the header with the length already counting the FINGERPRINT.
            head = _HEADER.pack(message_type, len(body) + 8, MAGIC_COOKIE, self.transaction_id)
            crc = (zlib.crc32(head + body) ^ _FINGERPRINT_XOR) & 0xFFFF_FFFF
            body += Attribute(AttributeType.FINGERPRINT, _U32.pack(crc)).encode()
        if HEADER_SIZE + len(body) > MAX_MESSAGE_SIZE:
            raise ValueError(f"STUN message larger than {MAX_MESSAGE_SIZE} bytes")
        return _HEADER.pack(message_type, len(body), MAGIC_COOKIE, self.transaction_id) + body


def _message_type(message_class: int, method: int) -> int:
    """§5: the 14-bit type interleaves the class bits C1 C0 into the method at bits 8 and 4."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 0b01) << 4)
        | ((message_class & 0b10) << 7)
    )


def _split_type(message_type: int) -> tuple[MessageClass, int]:
    message_class = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    method = (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    return MessageClass(message_class), method


def _printable(text: str) -> str:
    """Server-supplied text ends up in one-line errors and logs: no control characters, bounded length."""
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_REASON_LENGTH])


def new_transaction_id(rand: Callable[[int], bytes] = os.urandom) -> bytes:
    """§6: the transaction id must be uniformly random, so an off-path attacker cannot guess it."""
    return rand(TRANSACTION_ID_SIZE)


def _software_value(text: str) -> bytes:
    value = text.encode("utf-8")
    # stund 0.97 drops requests whose 0x8022 length is not a multiple of 4 (see the module docstring);
    # trailing spaces keep the text readable, where NUL padding inside the value would not.
    value += b" " * (-len(value) % 4)
    if len(value) > _MAX_SOFTWARE_BYTES:
        raise ValueError("SOFTWARE value too long")
    return value


def build_binding_request(transaction_id: bytes, *, software: str | None = None) -> bytes:
    """A Binding request (§6.1): the 20-byte header, plus SOFTWARE (§14.14) when `software` is given.

    No FINGERPRINT (see the module docstring) and no credentials: a Binding needs none (§9).
    """
    attributes = () if software is None else (Attribute(AttributeType.SOFTWARE, _software_value(software)),)
    return StunMessage(MessageClass.REQUEST, Method.BINDING, transaction_id, attributes).encode()


def reply_key(data: bytes) -> bytes | None:
    """The transaction id of a datagram that looks like an RFC 8489 message, for the `Exchange` key."""
    if len(data) < HEADER_SIZE or data[0] & 0xC0 or data[4:8] != _MAGIC_BYTES:
        return None
    return bytes(data[8:HEADER_SIZE])


def parse_message(data: bytes) -> StunMessage:
    """Decode and validate one STUN message (§5, §6.3, §14).

    Refused (DecodeError): over MAX_MESSAGE_SIZE, shorter than the header, the two top bits set, no
    magic cookie, a length field that is not a multiple of 4 or disagrees with the datagram, an
    attribute (padding included) overrunning the message, more than MAX_ATTRIBUTES attributes, a
    FINGERPRINT that is not last or does not match. The padding bytes' values are not checked: §14 says
    receivers must ignore them.
    Unknown comprehension-required attributes are kept (see `parse_binding_response` for why).
    """
    size = len(data)
    if size > MAX_MESSAGE_SIZE:
        raise DecodeError(f"STUN message of {size} bytes exceeds {MAX_MESSAGE_SIZE}")
    if size < HEADER_SIZE:
        raise DecodeError(f"STUN message of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    message_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if message_type & 0xC000:
        raise DecodeError("not a STUN message (top two bits set)")
    if cookie != MAGIC_COOKIE:
        raise DecodeError("not an RFC 8489 STUN message (no magic cookie)")
    if length % 4:
        raise DecodeError(f"STUN length {length} is not a multiple of 4")
    if HEADER_SIZE + length != size:
        raise DecodeError(f"STUN length field says {length} bytes of attributes, the datagram has {size - HEADER_SIZE}")
    message_class, method = _split_type(message_type)
    attributes: list[Attribute] = []
    offset = HEADER_SIZE
    after_integrity = False
    count = 0
    while offset < size:
        count += 1
        if count > MAX_ATTRIBUTES:
            raise DecodeError(f"more than {MAX_ATTRIBUTES} STUN attributes")
        if offset + _ATTRIBUTE_HEADER.size > size:
            raise DecodeError("STUN attribute header truncated")
        attribute_type, attribute_length = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        start = offset + _ATTRIBUTE_HEADER.size
        end = start + attribute_length
        if end + (-attribute_length % 4) > size:
            raise DecodeError(
                f"STUN attribute 0x{attribute_type:04x} of length {attribute_length} overruns the message"
            )
        value = bytes(data[start:end])
        offset = end + (-attribute_length % 4)
        if attribute_type == AttributeType.FINGERPRINT:
            _check_fingerprint(data, start, value, last=offset == size)
        elif after_integrity and attribute_type != AttributeType.MESSAGE_INTEGRITY_SHA256:
            continue  # §14.5: ignored after MESSAGE-INTEGRITY
        if attribute_type in (AttributeType.MESSAGE_INTEGRITY, AttributeType.MESSAGE_INTEGRITY_SHA256):
            after_integrity = True
        attributes.append(Attribute(attribute_type, value))
    return StunMessage(message_class, method, bytes(transaction_id), tuple(attributes))


def _check_fingerprint(data: bytes, value_start: int, value: bytes, *, last: bool) -> None:
    """§14.7: FINGERPRINT is the last attribute and holds CRC-32(message up to it) XOR 0x5354554E."""
    if not last:
        raise DecodeError("STUN FINGERPRINT is not the last attribute")
    if len(value) != 4:
        raise DecodeError(f"STUN FINGERPRINT of {len(value)} bytes, not 4")
    covered = data[: value_start - _ATTRIBUTE_HEADER.size]
    if (zlib.crc32(covered) ^ _FINGERPRINT_XOR) & 0xFFFF_FFFF != _U32.unpack(value)[0]:
        raise DecodeError("STUN FINGERPRINT does not match the message")


def check_integrity(data: bytes, key: bytes) -> bool:
    """Whether the MESSAGE-INTEGRITY of `data` (a message `parse_message` accepted) is the HMAC-SHA1 of what
    precedes it under `key` (§14.5: the length field counts up to the end of MESSAGE-INTEGRITY). False when
    there is none. Compared in constant time."""
    offset = HEADER_SIZE
    size = len(data)
    while offset + _ATTRIBUTE_HEADER.size <= size:
        attribute_type, attribute_length = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        start = offset + _ATTRIBUTE_HEADER.size
        if attribute_type == AttributeType.MESSAGE_INTEGRITY:
            if attribute_length != 20 or start + 20 > size:
                return False
            head = data[:2] + struct.pack("!H", start + 20 - HEADER_SIZE) + data[4:HEADER_SIZE]
            mac = hmac.new(key, head + data[HEADER_SIZE:offset], hashlib.sha1).digest()
            return hmac.compare_digest(mac, data[start : start + 20])
        offset = start + attribute_length + (-attribute_length % 4)
    return False


def decode_address(value: bytes, transaction_id: bytes | None = None) -> tuple[IPv4Address | IPv6Address, int]:
    """MAPPED-ADDRESS (§14.1), or XOR-MAPPED-ADDRESS (§14.2) when the transaction id is given.

    §14.2: the port is XORed with the cookie's top 16 bits, an IPv4 address with the cookie, an IPv6
    address with the cookie followed by the transaction id. The leading reserved byte is ignored (§14.1).
    """
    if len(value) < _ADDRESS_HEAD.size:
        raise DecodeError(f"STUN address attribute of {len(value)} bytes is too short")
    family, port = _ADDRESS_HEAD.unpack_from(value)
    size = _ADDRESS_SIZE.get(family)
    if size is None:
        raise DecodeError(f"STUN address family 0x{family:02x} is neither IPv4 nor IPv6")
    raw = value[_ADDRESS_HEAD.size :]
    if len(raw) != size:
        raise DecodeError(f"STUN {'IPv4' if size == 4 else 'IPv6'} address of {len(raw)} bytes, not {size}")
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        mask = (_MAGIC_BYTES + transaction_id)[:size]
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=True))
    address: IPv4Address | IPv6Address = IPv4Address(raw) if size == 4 else IPv6Address(raw)
    return address, port


def _encode_address(address: IPv4Address | IPv6Address, port: int, transaction_id: bytes | None) -> bytes:
    if not 0 <= port <= 0xFFFF:
        raise ValueError("port must be 0-65535")
    family = _FAMILY_IPV4 if isinstance(address, IPv4Address) else _FAMILY_IPV6
    raw = address.packed
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, (_MAGIC_BYTES + transaction_id)[: len(raw)], strict=True))
    return _ADDRESS_HEAD.pack(family, port) + raw


def encode_mapped_address(address: IPv4Address | IPv6Address, port: int) -> Attribute:
    """A MAPPED-ADDRESS attribute (§14.1), as RFC 3489 servers send it; for fake servers."""
    return Attribute(AttributeType.MAPPED_ADDRESS, _encode_address(address, port, None))


def encode_xor_mapped_address(address: IPv4Address | IPv6Address, port: int, transaction_id: bytes) -> Attribute:
    """An XOR-MAPPED-ADDRESS attribute (§14.2) for the transaction `transaction_id`; for fake servers."""
    if len(transaction_id) != TRANSACTION_ID_SIZE:
        raise ValueError(f"a STUN transaction id is {TRANSACTION_ID_SIZE} bytes")
    return Attribute(AttributeType.XOR_MAPPED_ADDRESS, _encode_address(address, port, transaction_id))


def encode_error_code(code: int, reason: str = "") -> Attribute:
    """An ERROR-CODE attribute (§14.8): 21 zero bits, the hundreds in 3 bits, the rest in 8 bits, the phrase."""
    if not 300 <= code <= 699:
        raise ValueError("a STUN error code is 300-699")
    return Attribute(AttributeType.ERROR_CODE, struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode())


def binding_success_address(message: StunMessage) -> tuple[IPv4Address | IPv6Address, int]:
    """The reflexive transport address of a Binding success response (§6.3.3).

    XOR-MAPPED-ADDRESS (§14.2) is preferred: NATs with a protocol-unaware ALG rewrite any address
    they find in a payload, which is why it exists. MAPPED-ADDRESS (§14.1) is the fallback for RFC
    3489 servers that send nothing else. Both are first-occurrence only (§14).
    """
    if message.message_class is not MessageClass.SUCCESS or message.method != Method.BINDING:
        raise DecodeError("not a STUN Binding success response")
    xor_mapped = message.get(AttributeType.XOR_MAPPED_ADDRESS)
    if xor_mapped is not None:
        return decode_address(xor_mapped.value, message.transaction_id)
    mapped = message.get(AttributeType.MAPPED_ADDRESS)
    if mapped is not None:
        return decode_address(mapped.value)
    raise DecodeError("STUN Binding response without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS")


def error_code(message: StunMessage) -> ErrorCode:
    """The ERROR-CODE (and UNKNOWN-ATTRIBUTES) of an error response (§14.8, §14.9)."""
    if message.message_class is not MessageClass.ERROR:
        raise DecodeError("not a STUN error response")
    attribute = message.get(AttributeType.ERROR_CODE)
    if attribute is None:
        raise DecodeError("STUN error response without ERROR-CODE")
    value = attribute.value
    if len(value) < 4:
        raise DecodeError(f"STUN ERROR-CODE of {len(value)} bytes is too short")
    hundreds, number = value[2] & 0x07, value[3]
    # §14.8: class 3-6 and number 0-99; anything else cannot be an error this client acts on.
    if not 3 <= hundreds <= 6 or number > 99:
        raise DecodeError(f"STUN ERROR-CODE class {hundreds} number {number} is out of range")
    reason = _printable(value[4:].decode("utf-8", "replace").strip())
    unknown: tuple[int, ...] = ()
    listed = message.get(AttributeType.UNKNOWN_ATTRIBUTES)
    if listed is not None:
        # §14.9: a list of 16-bit types; an odd trailing byte is ignored rather than fatal, this is diagnostics.
        raw = listed.value
        unknown = tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw) - 1, 2))[:MAX_ATTRIBUTES]
    return ErrorCode(hundreds * 100 + number, reason, unknown)


def parse_binding_response(data: bytes, transaction_id: bytes) -> tuple[IPv4Address | IPv6Address, int] | ErrorCode:
    """A datagram as the answer to our Binding request `transaction_id` (§6.3): the reflexive address
    from a success response, or the ErrorCode of an error response.

    DecodeError when it is malformed or not an answer to this request (another transaction, another
    method, a request or an indication), which is what `Exchange` needs to drop it and keep waiting.

    Deviation from §6.3.3/§6.3.4: unknown comprehension-required attributes in a response do not fail
    the transaction. stund 0.97 sends the RFC 3489 SOURCE-ADDRESS and CHANGED-ADDRESS, and a Binding
    response has no attribute that could change what the mapped address means; refusing would turn a
    working server into a timeout.
    """
    message = parse_message(data)
    if message.transaction_id != transaction_id:
        raise DecodeError("STUN reply to another transaction")
    if message.method != Method.BINDING:
        raise DecodeError(f"STUN reply for method 0x{message.method:03x}, not Binding")
    if message.message_class is MessageClass.SUCCESS:
        return binding_success_address(message)
    if message.message_class is MessageClass.ERROR:
        return error_code(message)
    raise DecodeError(f"STUN {message.message_class.name.lower()} where a response was expected")
