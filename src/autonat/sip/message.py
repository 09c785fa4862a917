"""SIP message codec, sans-IO (RFC 3261 §7, §18.3, §20, §25; RFC 3581; RFC 5626 keep-alives).

`parse_message` decodes one UDP datagram, `StreamParser` the byte stream of a TCP connection (framed by
Content-Length, §18.3). Both return `Request`, `Response` or `KeepAlive` values and raise nothing but
`DecodeError` (one-line reason) on hostile input; bad *arguments* to the builders are programming errors
and raise ValueError.

Lenient where real senders are sloppy and the meaning is unambiguous:
- lines may end in CRLF or a bare LF; obsolete header folding (§7.3.1: a line starting with SP/HTAB
  continues the previous header) is joined with one SP;
- CRLFs before the start line are ignored (§7.5); a datagram of CRLFs only is a `KeepAlive` (RFC 5626
  §3.5.1 ping), and over TCP each run of "\\r\\n\\r\\n" gives one `KeepAlive` (the caller answers the
  pong "\\r\\n"); a lone CRLF (a pong) is skipped;
- over UDP, bytes after the Content-Length body are discarded (§18.3 says MUST discard, not reject);
- RFC 2543 requests are accepted (RFC 4475 §3.4.1 inv2543): a top Via without a branch or without the
  z9hG4bK magic cookie (`Via.has_magic_cookie`; the transaction layer then matches the RFC 2543 way, §17.2.3),
  and no Max-Forwards;
- control characters (NUL, BEL, DEL ...) are accepted inside a quoted string as a quoted-pair (§25.1; RFC 4475
  §3.1.1.2 intmeth), nowhere else;
- header values keep non-UTF-8 bytes (surrogateescape), so serializing gives the same bytes back.

Strict where it protects us: size caps checked before any per-line work (`MAX_UDP_MESSAGE`,
`MAX_TCP_MESSAGE`, `MAX_HEADER_LINES`, `MAX_LINE`, `MAX_VIA`), control characters and bare CRs refused,
exactly one each of To, From, Call-ID, CSeq (and at most one Max-Forwards) and at most one
Content-Length, a parsable Via list, a response's top Via with a branch, CSeq method equal to the request
method (§8.1.1.5; ACK and CANCEL carry their own method there too, §17.1.1.3, §9.1).

A request that fails those checks raises `BadRequest` (a DecodeError) when an answer is still possible: it
carries the response RFC 3261 asks for (400 with the defect in the reason phrase, 505 for another SIP version,
501 for an unknown method whose CSeq disagrees, 513 over a size cap), built from the Via, From, To, Call-ID
and CSeq the request had (§8.2.6). Responses and ACKs are never answered, and neither is a request without
a Via (the answer could not be matched to anything, §18.2.2): those raise a plain DecodeError.

Invariant: every accessor of a message returned by the parsers succeeds. Parsed headers always hold
exactly one Content-Length, equal to the body length, so `parse_message(m.serialize()) == m`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Literal, Self

from autonat.proto.errors import DecodeError

# The project's Via/param scanners live with the other SIP header helpers; reused, not duplicated.
from autonat.proto.sdp import _match_via, _quoted_end, _scan_params, _skip_lws, add_received_rport

__all__ = [
    "KEEPALIVE",
    "BadRequest",
    "MAX_HEADER_LINES",
    "MAX_LINE",
    "MAX_TCP_MESSAGE",
    "MAX_UDP_MESSAGE",
    "MAX_VIA",
    "Headers",
    "KeepAlive",
    "Request",
    "Response",
    "StreamParser",
    "Via",
    "canonical_name",
    "make_response",
    "parse_message",
    "parse_name_addr",
    "split_list",
    "with_received",
]

MAX_UDP_MESSAGE = 64 * 1024
"""Largest datagram decoded (a UDP datagram cannot be larger anyway)."""
MAX_TCP_MESSAGE = 256 * 1024
"""Largest message (head and body) accepted on a stream; beyond it the connection must be closed."""
MAX_HEADER_LINES = 128
"""Physical header lines (folded continuations included), start line not counted."""
MAX_LINE = 8 * 1024
"""Longest physical line, and longest header value after unfolding."""
MAX_VIA = 70
"""Via entries: one per hop, and a request passes at most 70 hops (the Max-Forwards default, §8.1.1.6).
RFC 4475 §3.1.1.7 (longreq), a valid request, carries 34."""
MAX_HEADER_VALUES = 256
"""Header entries after splitting comma lists: bounds the work a line full of commas can cause."""
_MAX_CSEQ = 2**31 - 1  # §8.1.1.5: the sequence number MUST be expressible as a 32-bit unsigned integer; < 2**31
_MAX_FORWARDS = 255  # §20.22

_COMPACT = {
    "v": "Via",
    "f": "From",
    "t": "To",
    "i": "Call-ID",
    "m": "Contact",
    "l": "Content-Length",
    "c": "Content-Type",
    "k": "Supported",
    "e": "Content-Encoding",
    "s": "Subject",
    "o": "Event",  # RFC 6665
    "u": "Allow-Events",  # RFC 6665
    "r": "Refer-To",  # RFC 3515
    "b": "Referred-By",  # RFC 3892
    "x": "Session-Expires",  # RFC 4028
}
_KNOWN = (
    "Accept",
    "Accept-Encoding",
    "Accept-Language",
    "Alert-Info",
    "Allow",
    "Authentication-Info",
    "Authorization",
    "Call-ID",
    "Call-Info",
    "Contact",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Content-Length",
    "Content-Type",
    "CSeq",
    "Date",
    "Error-Info",
    "Expires",
    "From",
    "In-Reply-To",
    "Max-Forwards",
    "MIME-Version",
    "Min-Expires",
    "Organization",
    "Priority",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Require",
    "Record-Route",
    "Reply-To",
    "Require",
    "Retry-After",
    "Route",
    "Server",
    "Subject",
    "Supported",
    "Timestamp",
    "To",
    "Unsupported",
    "User-Agent",
    "Via",
    "Warning",
    "WWW-Authenticate",
    "Event",
    "Allow-Events",
    "Refer-To",
    "Referred-By",
    "Session-Expires",
    "Min-SE",
    "RSeq",
    "RAck",
    "Path",
)
_CANONICAL = {name.lower(): name for name in _KNOWN} | _COMPACT
# Headers whose values are comma-separated lists of entries with parameters (§7.3.1, §20): stored one
# entry per value so `get_all` sees each hop/contact. Token lists (Allow, Supported) stay as written.
_LIST_HEADERS = frozenset(("Via", "Contact", "Route", "Record-Route", "Path"))
# Headers a request (and, but Max-Forwards, a response) carries exactly once (§8.1.1, RFC 4475 §3.1.2.19).
_SINGLE = ("To", "From", "Call-ID", "CSeq", "Max-Forwards", "Content-Length", "Content-Type")

_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[!-~]+")  # scheme ":" then visible ASCII (§19.1, RFC 3986)
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# After CRLF -> LF: any remaining CR is bare, and no other control character but HTAB belongs in a head.
_BAD_CHAR = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,10}")


def _number(text: str) -> int | None:
    """1*DIGIT as an int, leading zeros allowed (RFC 4475 §3.1.1.1 "0000139122385"), or None. At most
    10 significant digits: every SIP number fits, and int() never sees a hostile 8 KiB string."""
    significant = text.lstrip("0") or "0"
    if text[:1].isdigit() and _DIGITS.fullmatch(significant):
        return int(significant)
    return None


_REASONS = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


def canonical_name(name: str) -> str:
    """The stored spelling of a header name: compact forms expanded (§7.3.3), known names in their
    RFC spelling, others as written (names compare case-insensitively, §7.3.1)."""
    return _CANONICAL.get(name.lower(), name)


@functools.lru_cache(maxsize=256)
def _key(name: str) -> str:
    """The lookup key of a header name: its canonical spelling, lower-cased."""
    return canonical_name(name).lower()


def _check_value(name: str, value: str) -> None:
    """Builder-side check: a value must not break the header block (CR/LF injection)."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError(f"header {name} value contains CR, LF or NUL")


# --------------------------------------------------------------------------------------------- headers


@dataclass(frozen=True, slots=True)
class Headers:
    """An ordered multi-map of header fields (§7.3): `items` are (name, value) pairs in message order.

    Names are stored by `canonical_name`, so lookups are case-insensitive and compact forms match their
    long names. List headers (Via, Contact, Route, Record-Route, Path) hold one entry per comma-separated
    value, in order. Values are stripped of surrounding whitespace and unfolded.
    """

    items: tuple[tuple[str, str], ...] = ()
    # Built at the first lookup (headers never change): a message's To, From, Call-ID and CSeq are read by the
    # codec, the transaction layer and the call core, several times each.
    _index: dict[str, list[str]] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, *pairs: tuple[str, str]) -> Headers:
        """Headers built by hand: names canonicalized, values checked for CR/LF injection."""
        checked = []
        for name, value in pairs:
            _check_value(name, value)
            checked.append((canonical_name(name), value))
        return cls(tuple(checked))

    def _lookup(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = {}
            for item_name, value in self.items:
                index.setdefault(item_name.lower(), []).append(value)
            object.__setattr__(self, "_index", index)
        return index

    def get(self, name: str) -> str | None:
        """The first value of `name`, or None."""
        values = self._lookup().get(_key(name))
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Every value of `name`, in message order."""
        return list(self._lookup().get(_key(name), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def with_header(self, name: str, value: str, *, first: bool = False) -> Headers:
        """A copy with `name: value` appended (or, with `first`, put before everything: a new top Via)."""
        _check_value(name, value)
        item = (canonical_name(name), value)
        return Headers((item, *self.items) if first else (*self.items, item))

    def without(self, name: str) -> Headers:
        """A copy without any `name` field."""
        key = canonical_name(name).lower()
        return Headers(tuple(item for item in self.items if item[0].lower() != key))

    def replace(self, name: str, *values: str) -> Headers:
        """A copy where `values` stand in place of every `name` field (at the first one's position, or
        appended when there was none). No values removes the header."""
        for value in values:
            _check_value(name, value)
        key = canonical_name(name).lower()
        canonical = canonical_name(name)
        result: list[tuple[str, str]] = []
        placed = False
        for item in self.items:
            if item[0].lower() != key:
                result.append(item)
            elif not placed:
                result.extend((canonical, value) for value in values)
                placed = True
        if not placed:
            result.extend((canonical, value) for value in values)
        return Headers(tuple(result))

    def _replace_first(self, name: str, value: str) -> Headers:
        """A copy where only the first `name` entry (the top Via) becomes `value`."""
        key = canonical_name(name).lower()
        items = list(self.items)
        for index, (item_name, _) in enumerate(items):
            if item_name.lower() == key:
                items[index] = (item_name, value)
                break
        return Headers(tuple(items))


# --------------------------------------------------------------------------------------------- Via


@dataclass(frozen=True, slots=True)
class Via:
    """One via-parm (§20.42, RFC 3581): `SIP/2.0/<transport> <host>[:<port>];params`.

    `transport` is upper-cased (UDP, TCP, TLS, SCTP, WS, WSS); `host` is the sent-by host without the
    brackets of an IPv6 reference; `port` None when absent (5060, or 5061 for TLS). `params` keep their
    order with lower-cased names; a flag parameter has value None, quoted values keep their quotes.
    """

    transport: str
    host: str
    port: int | None
    params: tuple[tuple[str, str | None], ...]

    def param(self, name: str) -> str | None:
        """The value of parameter `name` ("" for a flag like `;rport`), or None when absent."""
        key = name.lower()
        for param_name, value in self.params:
            if param_name == key:
                return "" if value is None else value
        return None

    @property
    def branch(self) -> str | None:
        return self.param("branch")

    @property
    def has_magic_cookie(self) -> bool:
        """§8.1.1.7: RFC 3261 branches start with z9hG4bK; without it, match transactions the RFC 2543 way."""
        branch = self.branch
        # RFC 4475 §3.2.1 (badbranch): the cookie with nothing after it identifies no transaction, so such a
        # request is matched the RFC 2543 way like one without the cookie.
        return branch is not None and len(branch) > 7 and branch.startswith("z9hG4bK")

    @property
    def received(self) -> str | None:
        return self.param("received")

    @property
    def rport(self) -> int | Literal[""] | None:
        """RFC 3581: None when absent, "" when requested (`;rport`), the port once a server filled it."""
        value = self.param("rport")
        if value is None:
            return None
        if value == "":
            return ""
        return int(value)  # checked to be 1-65535 by `parse`

    @classmethod
    def parse(cls, value: str) -> Via:
        """One via-parm (a list header value already split at its commas), or DecodeError."""
        if len(value) <= _CACHED_VALUE:
            return _parse_via_cached(value)
        return _parse_via(value)


def _parse_via(value: str) -> Via:
    """Via.parse without the cache."""
    match = _match_via(value)
    protocol = "".join(match["protocol"].split()).split("/")
    if len(protocol) != 3 or protocol[0].upper() != "SIP" or protocol[1] != "2.0":
        raise DecodeError("Via protocol is not SIP/2.0")
    transport = protocol[2].upper()
    if not _TOKEN.fullmatch(transport):
        raise DecodeError("Via transport is not a token")
    host = match["host"]
    if host.startswith("["):
        try:
            if ip_address(host[1:-1]).version != 6:
                raise DecodeError("Via brackets must hold an IPv6 address")
        except ValueError:
            raise DecodeError("Via brackets must hold an IPv6 address") from None
        host = host[1:-1]
    port: int | None = None
    if match["port"] is not None:
        port = _port(match["port"], "Via sent-by port")
    scanned, end = _scan_params(value, match.end())
    if _skip_lws(value, end) != len(value):
        raise DecodeError("junk after the Via parameters")
    params = tuple((p.name, None if p.value_start is None else value[p.value_start : p.value_end]) for p in scanned)
    via = Via(transport, host, port, params)
    rport = via.param("rport")
    if rport:
        _port(rport, "Via rport")
    return via


# Parsed header values are immutable, so one parse can serve every access to the same text: a message's
# Via and tags are read by the codec, the transaction layer and the service, and retransmissions repeat them.
# Only short values are cached, so hostile 8 KiB lines cannot fill memory (4096 x 512 chars at most).
_CACHED_VALUE = 512
_parse_via_cached = functools.lru_cache(maxsize=4096)(_parse_via)


def _port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) <= 0xFFFF):
        raise DecodeError(f"{what} {text[:8]!r} is not 1-65535")
    return int(text)


# --------------------------------------------------------------------------------------------- messages


def _tag(value: str, what: str) -> str | None:
    """The `tag` parameter of a From/To value (§19.3), None when absent or empty."""
    if len(value) <= _CACHED_VALUE:
        return _tag_cached(value, what)
    return _name_addr_params(value, what).get("tag") or None


@functools.lru_cache(maxsize=4096)
def _tag_cached(value: str, what: str) -> str | None:
    return _name_addr_params(value, what).get("tag") or None


def parse_name_addr(value: str, what: str) -> tuple[str, list[tuple[str, str | None]]]:
    """The URI and header parameters of a name-addr or addr-spec value (§20.10, §20.20, §20.39): the URI
    inside `<...>`, or, in the addr-spec form, up to the first `;` (every `;` then starts a header
    parameter). Parameter names lower-cased, in order; a flag has the value None. DecodeError otherwise."""
    index = _skip_lws(value, 0)
    cursor = index
    uri_start = uri_end = -1
    while cursor < len(value):
        char = value[cursor]
        if char == '"':
            cursor = _quoted_end(value, cursor)
            continue
        if char == "<":
            close = value.find(">", cursor + 1)
            if close < 0:
                raise DecodeError(f"{what} header with an unclosed <")
            _check_display_name(value[index:cursor], what)
            uri_start, uri_end = cursor + 1, close
            cursor = close + 1
            break
        if char == ";":
            break
        cursor += 1
    if uri_start < 0:
        cursor = index
        while cursor < len(value) and value[cursor] not in "; \t":
            cursor += 1
        uri_start, uri_end = index, cursor
    uri = value[uri_start:uri_end]
    if not _URI.fullmatch(uri):
        raise DecodeError(f"{what} header has no valid URI")
    params, end = _scan_params(value, cursor)
    if _skip_lws(value, end) != len(value):
        raise DecodeError(f"junk after the {what} header parameters")
    return uri, [(p.name, None if p.value_start is None else value[p.value_start : p.value_end]) for p in params]


# RFC 3261 §25.1 separators: an unquoted display name is tokens, which contain none of them. Bytes beyond
# ASCII are let through: phones send unquoted UTF-8 names, and they cannot be mistaken for structure.
_SEPARATORS = frozenset('()<>@,;:\\"/[]?={}')


def _check_display_name(text: str, what: str) -> None:
    """§20.10 display-name = *(token LWS) / quoted-string; RFC 4475 §3.1.2.15 (baddn) is the case refused."""
    name = text.strip(" \t")
    if not name or name.startswith('"'):
        return
    if any(char in _SEPARATORS for char in name):
        raise DecodeError(f"{what} display name with separators must be quoted")


def _name_addr_params(value: str, what: str) -> dict[str, str]:
    """The header parameters of a From/To value, the first of each name, a flag as ""."""
    result: dict[str, str] = {}
    for name, param in parse_name_addr(value, what)[1]:
        result.setdefault(name, "" if param is None else param)
    return result


class _Message:
    """Accessors shared by requests and responses; they raise DecodeError on a hand-built message that
    lacks what they read, never on a parsed one."""

    __slots__ = ()
    version: str
    headers: Headers
    body: bytes

    def with_header(self, name: str, value: str, *, first: bool = False) -> Self:
        return dataclasses.replace(self, headers=self.headers.with_header(name, value, first=first))  # type: ignore[type-var]

    def _changed(self, **changes: object) -> Self:
        """A copy with the given fields changed; None means "keep"."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[type-var]

    def _required(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise DecodeError(f"missing {name} header")
        return value

    def cseq(self) -> tuple[int, str]:
        """§20.16: the sequence number and method."""
        parts = self._required("CSeq").split()
        number = _number(parts[0]) if len(parts) == 2 else None
        if number is None or not _TOKEN.fullmatch(parts[1]):
            raise DecodeError("CSeq is not <number> <method>")
        if number > _MAX_CSEQ:
            raise DecodeError("CSeq number is 2**31 or more")
        return number, parts[1]

    def call_id(self) -> str:
        """§20.8: `word["@"word]`, compared byte for byte."""
        value = self._required("Call-ID")
        if not value or any(c in value for c in " \t"):
            raise DecodeError("Call-ID is empty or contains whitespace")
        return value

    def vias(self) -> list[Via]:
        """Every via-parm, top first (§20.42)."""
        return [Via.parse(value) for value in self.headers.get_all("Via")]

    def top_via(self) -> Via:
        """The topmost via-parm (§8.1.1.7, §17.2.3); its branch may be missing in an RFC 2543 request."""
        return Via.parse(self._required("Via"))

    def from_tag(self) -> str | None:
        return _tag(self._required("From"), "From")

    def to_tag(self) -> str | None:
        return _tag(self._required("To"), "To")

    def content_length(self) -> int:
        """The body length; parsed messages have a Content-Length equal to it (§20.14)."""
        return len(self.body)

    def max_forwards(self) -> int | None:
        """§20.22: 0-255, None when absent (responses)."""
        value = self.headers.get("Max-Forwards")
        if value is None:
            return None
        number = _number(value)
        if number is None or number > _MAX_FORWARDS:
            raise DecodeError("Max-Forwards is not 0-255")
        return number

    def _start_line(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        """The wire form (§7): CRLF line endings, long header names, Content-Length from the body."""
        lines = [self._start_line()]
        length_written = False
        for name, value in self.headers.items:
            if name == "Content-Length":
                if not length_written:
                    lines.append(f"Content-Length: {len(self.body)}")
                    length_written = True
                continue
            lines.append(f"{name}: {value}")
        if not length_written:
            lines.append(f"Content-Length: {len(self.body)}")
        lines.extend(("", ""))
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + self.body


@dataclass(frozen=True, slots=True)
class Request(_Message):
    """A request (§7.1): `method` is case-sensitive, `uri` the Request-URI as written."""

    method: str
    uri: str
    version: str
    headers: Headers
    body: bytes = b""

    def _start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def replace(
        self,
        *,
        method: str | None = None,
        uri: str | None = None,
        headers: Headers | None = None,
        body: bytes | None = None,
    ) -> Request:
        return self._changed(method=method, uri=uri, headers=headers, body=body)


@dataclass(frozen=True, slots=True)
class Response(_Message):
    """A response (§7.2): `status` 100-699, `reason` as written (may be empty)."""

    status: int
    reason: str
    version: str
    headers: Headers
    body: bytes = b""

    def _start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def replace(
        self,
        *,
        status: int | None = None,
        reason: str | None = None,
        headers: Headers | None = None,
        body: bytes | None = None,
    ) -> Response:
        return self._changed(status=status, reason=reason, headers=headers, body=body)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """A CRLF keep-alive (RFC 5626 §3.5.1): over a stream, answer with one CRLF (the pong)."""


KEEPALIVE = KeepAlive()

Message = Request | Response


# --------------------------------------------------------------------------------------------- parsing


def split_list(value: str) -> list[str]:
    """Entries of a comma-separated list header; commas inside quotes or `<...>` do not count."""
    if "," not in value:
        return [value]
    entries: list[str] = []
    start = cursor = 0
    while cursor < len(value):
        char = value[cursor]
        if char == '"':
            cursor = _quoted_end(value, cursor)
            continue
        if char == "<":
            close = value.find(">", cursor + 1)
            if close < 0:
                raise DecodeError("unclosed < in a list header")
            cursor = close + 1
            continue
        if char == ",":
            entries.append(value[start:cursor].strip(" \t"))
            start = cursor + 1
        cursor += 1
    entries.append(value[start:].strip(" \t"))
    if not all(entries):
        raise DecodeError("empty entry in a comma-separated header")
    return entries


class _Oversize(DecodeError):
    """A size cap was hit: answered 513 Message Too Large when the request can be answered at all."""


class BadRequest(DecodeError):
    """A request that failed to parse, and the response it gets (RFC 3261 §8.2: 400, 505, 501 or 513).

    `response(to_tag)` builds it from the raw Via, From, To, Call-ID and CSeq values the request carried
    (§8.2.6.2), the ones it lacks left out: a UAS answers a broken request with what it can, and the peer
    matches the answer on its Via branch. `method` is the request line's method (never ACK: §17.1.1.3).
    """

    def __init__(self, reason: str, *, status: int, phrase: str, method: str, headers: tuple[tuple[str, str], ...]):
        super().__init__(reason)
        self.status = status
        self.phrase = phrase
        self.method = method
        self.headers = headers

    def response(self, to_tag: str | None = None) -> Response:
        """The answer; `to_tag` is added to a To without a tag (§8.2.6.2; not for a 100)."""
        items: list[tuple[str, str]] = []
        for name, value in self.headers:
            tagged = name == "To" and to_tag is not None and _TOKEN.fullmatch(to_tag) and not _HAS_TAG.search(value)
            items.append((name, f"{value};tag={to_tag}" if tagged else value))
        extra = [("Allow", _ALLOW_501)] if self.status == 501 else []
        items += [*extra, ("Content-Length", "0")]
        return Response(self.status, self.phrase, "SIP/2.0", Headers(tuple(items)))


_HAS_TAG = re.compile(r";\s*tag\s*=", re.I)
_ALLOW_501 = "INVITE, ACK, BYE, CANCEL, OPTIONS, REGISTER, INFO, UPDATE"  # what the service accepts
_COPIED = ("Via", "From", "To", "Call-ID", "CSeq")
_MAX_PHRASE = 120
_KNOWN_METHODS = frozenset(
    [
        "INVITE",
        "ACK",
        "BYE",
        "CANCEL",
        "OPTIONS",
        "REGISTER",
        "INFO",
        "UPDATE",
        "PRACK",
        "SUBSCRIBE",
        "NOTIFY",
        "PUBLISH",
        "MESSAGE",
        "REFER",
    ]
)


def _phrase(text: str) -> str:
    """A reason phrase from our own one-line reason: printable ASCII, bounded."""
    cleaned = "".join(char if " " <= char <= "~" else "?" for char in text)
    return cleaned[:_MAX_PHRASE]


def _salvage(head: bytes, error: DecodeError) -> DecodeError:
    """What to raise for a message whose head is `head` and which failed with `error`: a `BadRequest` when it
    is a request that can be answered, else `error` itself (a response, an ACK, no Via, no request line).

    A tolerant second look, only ever taken on the error path: header lines are split without the caps on
    their content (the head itself is bounded by the caller's message cap), only the five fields a response
    copies are kept, the first of each (every Via), unfolded."""
    lines = head.split(b"\n", MAX_HEADER_LINES + 1)[: MAX_HEADER_LINES + 1]
    start = lines[0].rstrip(b"\r").decode("utf-8", "surrogateescape")
    parts = start.split(" ")
    if start[:4].upper() == "SIP/" or not _TOKEN.fullmatch(parts[0]) or parts[0] == "ACK":
        return error
    fields: list[list[str]] = []
    for raw in lines[1:]:
        line = raw.rstrip(b"\r").decode("utf-8", "surrogateescape")
        if line[:1] in (" ", "\t"):
            if fields:
                fields[-1][1] = (fields[-1][1] + " " + line.strip(" \t")).strip(" ")
            continue
        name, colon, value = line.partition(":")
        name = canonical_name(name.strip(" \t"))
        if colon and name in _COPIED:
            fields.append([name, value.strip(" \t")])
    headers: list[tuple[str, str]] = []
    for name, value in fields:
        if not value or len(value) > MAX_LINE or "\r" in value or _BAD_CHAR.search(value):
            if name == "Via":
                return error  # a Via we cannot copy as it was: the answer would reach no transaction
            continue
        if name == "Via" or all(name != seen for seen, _ in headers):
            headers.append((name, value))
    vias = sum(name == "Via" for name, _ in headers)
    if not vias or vias > MAX_VIA:
        return error
    method = parts[0]
    if isinstance(error, _Oversize):
        status, phrase = 513, "Message Too Large"
    elif len(parts) == 3 and parts[2].upper().startswith("SIP/") and parts[2].upper() != "SIP/2.0":
        status, phrase = 505, "Version Not Supported"
    elif method not in _KNOWN_METHODS and "does not match request method" in error.reason:
        # RFC 4475 §3.1.2.18 (mismatch02): an unknown method is better answered 501 than 400.
        status, phrase = 501, "Not Implemented"
    else:
        status, phrase = 400, _phrase(f"Bad Request: {error.reason}")
    return BadRequest(error.reason, status=status, phrase=phrase, method=method, headers=tuple(headers))


def _controls_quoted(text: str) -> bool:
    """Whether every control character of `text` is the second half of a quoted-pair inside a quoted string
    (§25.1: quoted-pair = "\\" (%x00-09 / %x0B-0C / %x0E-7F)). Only reached when a control character is there at
    all, so valid messages never pay for the scan."""
    for line in text.split("\n"):
        quoted = False
        index = 0
        while index < len(line):
            char = line[index]
            if quoted and char == "\\" and index + 1 < len(line):
                index += 2
                continue
            if char == '"':
                quoted = not quoted
            elif _BAD_CHAR.match(char):
                return False
            index += 1
    return True


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Start line and (canonical name, value) pairs of a head (everything before the empty line)."""
    if head.count(b"\n") > MAX_HEADER_LINES:
        raise _Oversize(f"more than {MAX_HEADER_LINES} header lines")
    raw_lines = head.split(b"\n")
    if max(map(len, raw_lines)) > MAX_LINE + 1:  # +1: the CR of a CRLF ending
        raise _Oversize(f"line longer than {MAX_LINE} bytes")
    text = head.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
    if "\r" in text or (_BAD_CHAR.search(text) and not _controls_quoted(text)):
        raise DecodeError("control character or bare CR in the message head")
    lines = text.split("\n")
    start = lines[0]
    fields: list[list[str]] = []  # [name, value] so folded continuations can extend the value
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            # §7.3.1: a continuation of the previous header; the folding whitespace becomes one SP.
            if not fields:
                raise DecodeError("header continuation line before any header")
            fields[-1][1] = (fields[-1][1] + " " + line.strip(" \t")).strip(" ")
            if len(fields[-1][1]) > MAX_LINE:
                raise _Oversize(f"header value longer than {MAX_LINE} bytes")
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")  # HCOLON allows whitespace before the colon (§25.1)
        if not colon or not _TOKEN.fullmatch(name):
            raise DecodeError("malformed header line")
        fields.append([canonical_name(name), value.strip(" \t")])
    items: list[tuple[str, str]] = []
    for name, value in fields:
        if name in _LIST_HEADERS:
            entries = split_list(value)
            if name == "Contact" and "*" in entries and len(entries) > 1:
                raise DecodeError("Contact * combined with other contacts")  # §10.2.2
            items.extend((name, entry) for entry in entries)
        else:
            items.append((name, value))
        if len(items) > MAX_HEADER_VALUES:
            raise _Oversize(f"more than {MAX_HEADER_VALUES} header values")
    return start, items


def _content_length(items: list[tuple[str, str]]) -> int | None:
    values = [value for name, value in items if name == "Content-Length"]
    if not values:
        return None
    number = _number(values[0])
    if number is None:
        raise DecodeError("Content-Length is not a number")
    return number


def _build(start: str, items: list[tuple[str, str]], body: bytes) -> Request | Response:
    """The message of a parsed head and its body, validated (§7.1, §7.2, §8.1.1)."""
    counts: dict[str, int] = {}
    for name, _ in items:
        counts[name] = counts.get(name, 0) + 1
    for name in _SINGLE:
        if counts.get(name, 0) > 1:
            raise DecodeError(f"more than one {name} header")
    if counts.get("Via", 0) > MAX_VIA:
        raise _Oversize(f"more than {MAX_VIA} Via values")
    # Normalize Content-Length to the body's length in decimal (validated equal by the callers), at its
    # own position or appended, so that parse(serialize(m)) == m.
    length = str(len(body))
    if "Content-Length" in counts:
        items = [(name, length if name == "Content-Length" else value) for name, value in items]
    else:
        items = [*items, ("Content-Length", length)]
    headers = Headers(tuple(items))
    message: Request | Response
    if start[:4].upper() == "SIP/":
        version, _, rest = start.partition(" ")
        status, reason = rest[:3], rest[4:]
        if version.upper() != "SIP/2.0":
            raise DecodeError("unsupported SIP version")
        if not (status.isascii() and status.isdigit()) or rest[3:4] not in ("", " ") or not 100 <= int(status) <= 699:
            raise DecodeError("malformed status line")
        message = Response(int(status), reason, "SIP/2.0", headers, body)
    else:
        parts = start.split(" ")
        if len(parts) != 3:
            raise DecodeError("malformed request line")
        method, uri, version = parts
        if not _TOKEN.fullmatch(method):
            raise DecodeError("request method is not a token")
        if not _URI.fullmatch(uri):
            raise DecodeError("malformed Request-URI")
        if version.upper() != "SIP/2.0":
            raise DecodeError("unsupported SIP version")
        message = Request(method, uri, "SIP/2.0", headers, body)
    _validate(message)
    return message


def _validate(message: Request | Response) -> None:
    """§8.1.1: the mandatory headers exist and parse; every Via parses."""
    vias = message.vias()  # parsed once here: top_via() would parse the top entry a second time
    if not vias:
        raise DecodeError("missing Via header")
    if isinstance(message, Response) and not vias[0].branch:
        raise DecodeError("top Via has no branch")  # it could match no transaction of ours (§17.1.3)
    message.from_tag()
    message.to_tag()
    message.call_id()
    _, method = message.cseq()
    if isinstance(message, Request):
        message.max_forwards()  # absent in RFC 2543 requests: that is allowed
        if method != message.method:
            raise DecodeError(f"CSeq method {method[:32]} does not match request method {message.method[:32]}")


def _strip_leading_crlf(data: bytes) -> bytes:
    index = 0
    while index < len(data) and data[index] in b"\r\n":
        index += 1
    return data[index:]


def parse_message(data: bytes) -> Request | Response | KeepAlive:
    """One UDP datagram (§18.3): a request, a response, or `KEEPALIVE` for a datagram of CRLFs only.

    Without Content-Length the body is the rest of the datagram; with it, a shorter datagram is an error
    and extra bytes are discarded (§18.3).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("SIP datagram is not bytes")
    if len(data) > MAX_UDP_MESSAGE:
        raise DecodeError(f"SIP datagram larger than {MAX_UDP_MESSAGE} bytes")
    if not data:
        raise DecodeError("empty SIP datagram")
    data = _strip_leading_crlf(bytes(data))  # §7.5
    if not data:
        return KEEPALIVE
    match = _HEAD_END.search(data)
    if match is None:
        raise DecodeError("no empty line after the SIP headers")
    head = data[: match.start()]
    try:
        start, items = _parse_head(head)
        body = data[match.end() :]
        length = _content_length(items)
        if length is not None:
            if length > len(body):
                raise DecodeError("SIP datagram shorter than its Content-Length")
            body = body[:length]
        return _build(start, items, body)
    except DecodeError as error:
        raise _salvage(head, error) from None


class StreamParser:
    """SIP over a stream (TCP, TLS): bytes in, messages out, framed by Content-Length (§18.3).

    Content-Length is required. A message over `max_message` bytes, a head that never ends, or any
    malformed message raises DecodeError: the stream cannot be resynchronized, so the caller closes the
    connection, and every later `feed` raises again. Buffered data stays under `max_message` bytes
    between calls.
    """

    __slots__ = ("_buffer", "_failed", "_max_message", "_scanned")

    def __init__(self, max_message: int = MAX_TCP_MESSAGE) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # head bytes already searched for the empty line, so byte-wise feeds stay linear
        self._max_message = max_message
        self._failed: str | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Request | Response | KeepAlive | BadRequest]:
        if self._failed is not None:
            raise DecodeError(f"stream already failed: {self._failed}")
        self._buffer += data
        try:
            return self._drain()
        except DecodeError as error:
            self._failed = error.reason
            self._buffer.clear()
            raise

    def _drain(self) -> list[Request | Response | KeepAlive | BadRequest]:
        buffer = self._buffer
        out: list[Request | Response | KeepAlive | BadRequest] = []
        offset = 0
        while offset < len(buffer):
            if buffer[offset] in b"\r\n":
                end = offset
                while end < len(buffer) and buffer[end] in b"\r\n":
                    end += 1
                run = bytes(buffer[offset:end])
                if run.count(b"\n") >= 2:
                    # A ping (double CRLF): report one per run, however long the run.
                    if not out or out[-1] is not KEEPALIVE:
                        out.append(KEEPALIVE)
                    offset = end
                    continue
                if end == len(buffer):
                    break  # maybe the first half of a ping: wait
                offset = end  # a pong, or stray CRLF before a start line (§7.5)
                self._scanned = 0
                continue
            search_from = max(offset, offset + self._scanned - 3)
            match = _HEAD_END.search(buffer, search_from)
            if match is None:
                self._scanned = len(buffer) - offset
                if self._scanned > self._max_message:
                    raise DecodeError(f"SIP message head larger than {self._max_message} bytes")
                if buffer.count(b"\n", offset) > MAX_HEADER_LINES + 1:
                    raise DecodeError(f"more than {MAX_HEADER_LINES} header lines")
                break
            head = bytes(buffer[offset : match.start()])
            start, items = _parse_head(head)
            length = _content_length(items)
            if length is None:
                raise DecodeError("SIP message over a stream without Content-Length")
            total = match.end() - offset + length
            if total > self._max_message:
                # The stream cannot go on (its framing would have to skip the body): answer 513 if
                # possible, and the caller closes the connection after the answer.
                raise _salvage(head, _Oversize(f"SIP message larger than {self._max_message} bytes"))
            if len(buffer) < match.end() + length:
                # Wait for the body; the head will be parsed again, which costs less than keeping state.
                self._scanned = match.start() - offset
                break
            body = bytes(buffer[match.end() : match.end() + length])
            try:
                out.append(_build(start, items, body))
            except DecodeError as error:
                # The framing held (Content-Length was sound): answer this one and read on.
                salvaged = _salvage(head, error)
                if not isinstance(salvaged, BadRequest):
                    raise salvaged from None
                out.append(salvaged)
            offset = match.end() + length
            self._scanned = 0
        del buffer[:offset]
        return out


# --------------------------------------------------------------------------------------------- building


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> Response:
    """A response to `request` built per §8.2.6.

    Copied in this order: every Via (in order, §8.2.6.2), From, To (with `;tag=to_tag` added when the
    request's To has no tag; an existing tag is kept, §8.2.6.2), Call-ID, CSeq; then Timestamp for a
    100 (§8.2.6.1) and Record-Route for 101-299 (§12.1.1, a dialog-creating response); then
    `extra_headers` in order (any Content-Length among them is ignored: it is computed from `body`).
    `reason` defaults to the RFC's phrase for the status.
    """
    if not 100 <= status <= 699:
        raise ValueError(f"status {status} is not 100-699")
    if reason is None:
        reason = _REASONS.get(status, "")
    if "\r" in reason or "\n" in reason:
        raise ValueError("reason phrase contains CR or LF")
    headers = request.headers
    items: list[tuple[str, str]] = [("Via", value) for value in headers.get_all("Via")]
    to_value = request._required("To")
    if to_tag is not None:
        if not _TOKEN.fullmatch(to_tag):
            raise ValueError(f"to_tag {to_tag!r} is not a token")
        if request.to_tag() is None:
            to_value = f"{to_value};tag={to_tag}"
    items += [
        ("From", request._required("From")),
        ("To", to_value),
        ("Call-ID", request._required("Call-ID")),
        ("CSeq", request._required("CSeq")),
    ]
    if status == 100:
        items += [("Timestamp", value) for value in headers.get_all("Timestamp")]
    elif 101 <= status <= 299:
        items += [("Record-Route", value) for value in headers.get_all("Record-Route")]
    for name, value in extra_headers:
        _check_value(name, value)
        if canonical_name(name) != "Content-Length":
            items.append((canonical_name(name), value))
    items.append(("Content-Length", str(len(body))))
    return Response(status, reason, "SIP/2.0", Headers(tuple(items)), body)


def with_received(request: Request, source_ip: str | IPv4Address | IPv6Address, source_port: int) -> Request:
    """The request with its top Via marked for the return path (RFC 3581 §4, §18.2.1): `received` set to
    the source address when it differs from the sent-by (or `rport` was asked for) and a bare `rport`
    filled with the source port. Delegates to `autonat.proto.sdp.add_received_rport`."""
    address = ip_address(source_ip) if isinstance(source_ip, str) else source_ip
    top = request._required("Via")
    return request.replace(headers=request.headers._replace_first("Via", add_received_rport(top, address, source_port)))
