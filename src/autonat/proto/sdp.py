"""SDP (RFC 8866, formerly RFC 4566) and SIP header (RFC 3261) address rewriting, sans-IO.

What a SIP service behind a NAT must change in what it sends so that the far end can reach it: the
addresses and ports in its SDP (`rewrite_sdp`), the sent-by of its own Via (`rewrite_via_sent_by`) and
its Contact (`rewrite_contact`); and, as a server, what RFC 3581 asks of a received request's Via
(`add_received_rport`).

Every function changes only what it must. Every other byte stays as it was, line endings included: SDP
lines may end in CRLF (RFC 8866 §5) or, from sloppy senders, a bare LF, and each line keeps its own.
Malformed SDP lines are left as they are: the far end may cope with them, and we are not the one to
decide. Rewriting is deterministic (the same input gives the same output), which is why the `o=`
session version is not incremented: a re-offer that did not change keeps the version it had, and one
that did change already carries its sender's increment (RFC 3264 §8).

Hostile input (a body from the network) yields a result or `DecodeError`, nothing else: SDP bodies are
capped at MAX_SDP_SIZE bytes and MAX_SDP_LINES lines, header values at MAX_HEADER_SIZE. Bad *arguments*
(a port of 0, a host with a space) are programming errors and raise ValueError.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from autonat.proto.errors import DecodeError

__all__ = [
    "MAX_HEADER_SIZE",
    "MAX_SDP_LINES",
    "MAX_SDP_SIZE",
    "Connection",
    "Media",
    "Rtcp",
    "SdpSummary",
    "add_received_rport",
    "parse_sdp_addresses",
    "rewrite_contact",
    "rewrite_sdp",
    "rewrite_via_sent_by",
]

MAX_SDP_SIZE = 64 * 1024
"""Largest SDP body accepted, in UTF-8 bytes. A video offer with ICE candidates is a few KiB."""

MAX_SDP_LINES = 1000
MAX_HEADER_SIZE = 8 * 1024
"""Largest Via or Contact header value accepted."""

IPAddress = IPv4Address | IPv6Address

_SP = r"[ \t]+"
# c=<nettype> <addrtype> <connection-address> (RFC 8866 §5.7); the address may carry /ttl[/count].
_C_LINE = re.compile(rf"c=(?P<net>IN){_SP}(?P<type>IP[46]){_SP}(?P<addr>[^ \t/]+)(?P<suffix>/[^ \t]*)?[ \t]*", re.I)
# o=<username> <sess-id> <sess-version> <nettype> <addrtype> <unicast-address> (§5.2)
_O_LINE = re.compile(
    rf"o=[^ \t]+{_SP}[^ \t]+{_SP}[^ \t]+{_SP}(?P<net>IN){_SP}(?P<type>IP[46]){_SP}(?P<addr>[^ \t]+)[ \t]*", re.I
)
# m=<media> <port>[/<number of ports>] <proto> <fmt> ... (§5.14)
_M_LINE = re.compile(
    rf"m=(?P<media>[^ \t]+){_SP}(?P<port>[0-9]{{1,5}})(?:/(?P<count>[0-9]{{1,5}}))?{_SP}(?P<proto>[^ \t]+)(?P<fmts>.*)"
)
# a=rtcp:<port> [<nettype> <addrtype> <connection-address>] (RFC 3605 §2.1)
_RTCP_LINE = re.compile(
    rf"a=rtcp:(?P<port>[0-9]{{1,5}})(?:{_SP}(?P<net>IN){_SP}(?P<type>IP[46]){_SP}(?P<addr>[^ \t]+))?[ \t]*", re.I
)
# The lines this module reads or rewrites start with one of these. Splitting the body at the LF before
# each of them is one C-level scan (the pattern starts with a literal); the lines in between (most of a
# body: rtpmap, fmtp, candidates) are copied through untouched, by construction and at no cost in Python.
_ADDRESS_HEADS = ("c=", "o=", "m=", "a=rtcp:")
_BEFORE_ADDRESS_LINE = re.compile(r"\n(?=[com]=|a=rtcp:)")
_ADDRESS_TOKEN = re.compile(r"[A-Za-z0-9._:\-]+")  # an IP literal or an FQDN; anything else is left alone
_HOST_NAME = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9\-_]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-_]*[A-Za-z0-9])?)*\.?"
)


# --------------------------------------------------------------------------------------------- SDP


@dataclass(frozen=True, slots=True)
class Connection:
    """An address from a `c=`, `o=` or `a=rtcp` line, as written: `IP4`/`IP6` and the address text
    (with a multicast `/ttl` suffix if there was one)."""

    addrtype: str
    address: str

    @property
    def ip(self) -> IPAddress | None:
        """The address as an IP, or None for an FQDN (or anything unparsable)."""
        try:
            return ip_address(self.address.partition("/")[0])
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Rtcp:
    """An RFC 3605 `a=rtcp:` attribute: the RTCP port and, optionally, its address."""

    port: int
    connection: Connection | None = None


@dataclass(frozen=True, slots=True)
class Media:
    """One media description: the `m=` line (port None when it is malformed) and its own `c=` and `a=rtcp`."""

    media: str
    port: int | None
    port_count: int | None
    proto: str
    formats: tuple[str, ...]
    connection: Connection | None = None
    rtcp: Rtcp | None = None


@dataclass(frozen=True, slots=True)
class SdpSummary:
    """The addresses of an SDP body: origin, session-level `c=`, and each media description."""

    origin: Connection | None
    connection: Connection | None
    media: tuple[Media, ...]
    line_count: int

    def connection_for(self, index: int) -> Connection | None:
        """§5.7: a media-level `c=` overrides the session-level one."""
        own = self.media[index].connection
        return own if own is not None else self.connection


def _line_count(sdp: str) -> int:
    """Lines are separated by LF (CRLF's LF included); a last line without one still counts."""
    return sdp.count("\n") + (1 if sdp and not sdp.endswith("\n") else 0)


def _check_sdp(sdp: str) -> int:
    """The line count of an SDP body within the caps, or DecodeError."""
    # Cheap tests first: a str of more than MAX_SDP_SIZE characters is too big in any encoding.
    if len(sdp) > MAX_SDP_SIZE or (not sdp.isascii() and len(sdp.encode("utf-8", "surrogatepass")) > MAX_SDP_SIZE):
        raise DecodeError(f"SDP body larger than {MAX_SDP_SIZE} bytes")
    lines = _line_count(sdp)
    if lines > MAX_SDP_LINES:
        raise DecodeError(f"SDP body has more than {MAX_SDP_LINES} lines")
    return lines


def _address_line(part: str) -> tuple[str, str]:
    """Split a part of the body that starts with an address line into (line, the rest). The line has no
    ending: LF ends a line, and a CR just before it (or at the very end of the body) belongs to the
    ending, so CRLF and LF lines both keep theirs. A lone CR elsewhere is content: no SDP line ends so."""
    end = part.find("\n")
    line, rest = (part, "") if end < 0 else (part[:end], part[end:])
    if line.endswith("\r"):
        return line[:-1], "\r" + rest
    return line, rest


def _address_lines(sdp: str) -> list[str]:
    """The address lines of a body in order, without their endings."""
    parts = _BEFORE_ADDRESS_LINE.split(sdp)
    start = 0 if parts[0].startswith(_ADDRESS_HEADS) else 1
    return [_address_line(part)[0] for part in parts[start:]]


def _check_ports(name: str, ports: Mapping[int, int] | None) -> None:
    if ports is None:
        return
    for original, mapped in ports.items():
        if not (0 < original <= 0xFFFF and 0 < mapped <= 0xFFFF):
            raise ValueError(f"{name}: ports must be 1-65535, got {original} -> {mapped}")


def _family(address: IPAddress) -> str:
    return "IP4" if address.version == 4 else "IP6"


@functools.lru_cache(maxsize=256)  # a body repeats its few addresses, and ip_address() is slow
def _rewritable(text: str) -> bool:
    """A unicast, specified address (or an FQDN) that stands for "where to send": rewritten.

    Left alone: 0.0.0.0 / :: (RFC 3264 §8.4 hold, "do not send here") and multicast groups, which are
    no one's private address.
    """
    if not _ADDRESS_TOKEN.fullmatch(text):
        return False
    try:
        ip = ip_address(text)
    except ValueError:
        return True
    return not (ip.is_unspecified or ip.is_multicast)


def _replace_address(line: str, match: re.Match[str], address: str, family: str) -> str:
    """Replace the addrtype and address groups of a match, nothing else."""
    type_start, type_end = match.span("type")
    addr_start, addr_end = match.span("addr")
    return line[:type_start] + family + line[type_end:addr_start] + address + line[addr_end:]


def rewrite_sdp(
    sdp: str,
    *,
    address: IPAddress,
    ports: Mapping[int, int] | None = None,
    rtcp_ports: Mapping[int, int] | None = None,
) -> str:
    """Advertise `address` (and mapped ports) in an SDP body instead of the local ones.

    - `o=` (RFC 8866 §5.2): the unicast address and its `IN IP4`/`IN IP6` addrtype become `address`.
    - `c=` (§5.7), session and media level: likewise, except hold addresses (0.0.0.0, ::) and
      multicast groups, which keep their meaning. FQDNs are replaced too.
    - `m=` (§5.14): the port goes through `ports` (original -> mapped) when it is listed there; port 0
      (a rejected or disabled stream, RFC 3264 §6) always stays 0, and `/<count>` is kept.
    - `a=rtcp:` (RFC 3605): the port goes through `rtcp_ports`, the address (if any) becomes `address`.
      A stream without `a=rtcp` uses RTP port + 1 for RTCP (RFC 3550 §11): map it that way, or add the
      attribute yourself; no line is ever added here.
    - Everything else, `a=candidate` included (ICE gathers its own addresses, RFC 8445), is untouched.
    """
    _check_sdp(sdp)
    _check_ports("ports", ports)
    _check_ports("rtcp_ports", rtcp_ports)
    family, text = _family(address), str(address)
    parts = _BEFORE_ADDRESS_LINE.split(sdp)
    for index, part in enumerate(parts):
        if index or part.startswith(_ADDRESS_HEADS):
            line, rest = _address_line(part)
            parts[index] = _rewrite_line(line, text, family, ports, rtcp_ports) + rest
    return "\n".join(parts)


def _rewrite_line(
    content: str,
    address: str,
    family: str,
    ports: Mapping[int, int] | None,
    rtcp_ports: Mapping[int, int] | None,
) -> str:
    head = content[:2]
    if head == "c=":
        match = _C_LINE.fullmatch(content)
        if match and match["suffix"] is None and _rewritable(match["addr"]):
            return _replace_address(content, match, address, family)
    elif head == "o=":
        match = _O_LINE.fullmatch(content)
        if match and _ADDRESS_TOKEN.fullmatch(match["addr"]):
            return _replace_address(content, match, address, family)
    elif head == "m=":
        match = _M_LINE.fullmatch(content) if ports else None
        if match:
            port = int(match["port"])
            mapped = ports.get(port) if ports and port else None
            if mapped is not None:
                start, end = match.span("port")
                return f"{content[:start]}{mapped}{content[end:]}"
    elif content.startswith("a=rtcp:"):
        return _rewrite_rtcp(content, address, family, rtcp_ports)
    return content


def _rewrite_rtcp(content: str, address: str, family: str, rtcp_ports: Mapping[int, int] | None) -> str:
    match = _RTCP_LINE.fullmatch(content)
    if not match:
        return content
    if match["addr"] is not None and _rewritable(match["addr"]):
        content = _replace_address(content, match, address, family)
    port = int(match["port"])
    mapped = rtcp_ports.get(port) if rtcp_ports and port else None
    if mapped is not None:
        start, end = match.span("port")  # before the address: its offsets did not move
        content = f"{content[:start]}{mapped}{content[end:]}"
    return content


def parse_sdp_addresses(sdp: str) -> SdpSummary:
    """The origin, session `c=` and per-media port, `c=` and `a=rtcp` of an SDP body.

    Tolerant like `rewrite_sdp`: a malformed `c=`/`o=`/`a=rtcp` line counts as absent, a malformed
    `m=` line still opens a media description (with port None), and the first of repeated lines wins.
    """
    line_count = _check_sdp(sdp)
    origin: Connection | None = None
    session: Connection | None = None
    media: list[Media] = []
    for content in _address_lines(sdp):
        head = content[:2]
        if head == "m=":
            media.append(_parse_m(content))
        elif head == "c=":
            match = _C_LINE.fullmatch(content)
            if match:
                connection = Connection(match["type"].upper(), match["addr"] + (match["suffix"] or ""))
                if not media:
                    session = session or connection
                elif media[-1].connection is None:
                    media[-1] = _with(media[-1], connection=connection)
        elif head == "o=" and not media and origin is None:
            match = _O_LINE.fullmatch(content)
            if match:
                origin = Connection(match["type"].upper(), match["addr"])
        elif media and media[-1].rtcp is None and content.startswith("a=rtcp:"):
            match = _RTCP_LINE.fullmatch(content)
            if match:
                rtcp_connection = None if match["addr"] is None else Connection(match["type"].upper(), match["addr"])
                media[-1] = _with(media[-1], rtcp=Rtcp(int(match["port"]), rtcp_connection))
    return SdpSummary(origin, session, tuple(media), line_count)


def _parse_m(content: str) -> Media:
    match = _M_LINE.fullmatch(content)
    if match is None or int(match["port"]) > 0xFFFF:
        name = content[2:].split(" ", 1)[0]
        return Media(name, None, None, "", ())
    count = match["count"]
    return Media(
        match["media"],
        int(match["port"]),
        None if count is None else int(count),
        match["proto"],
        tuple(match["fmts"].split()),
    )


def _with(media: Media, *, connection: Connection | None = None, rtcp: Rtcp | None = None) -> Media:
    return Media(
        media.media,
        media.port,
        media.port_count,
        media.proto,
        media.formats,
        connection if connection is not None else media.connection,
        rtcp if rtcp is not None else media.rtcp,
    )


# --------------------------------------------------------------------------------------------- SIP

_LWS = " \t\r\n"
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
# A param value: token, host (IPv6 references in brackets) or, handled apart, a quoted string.
_VALUE_CHARS = _TOKEN_CHARS | frozenset(":[]")
_VIA = re.compile(
    r"[ \t\r\n]*(?P<protocol>[^ \t\r\n/]+[ \t]*/[ \t]*[^ \t\r\n/]+[ \t]*/[ \t]*[^ \t\r\n/;,]+)[ \t\r\n]+"
    r"(?P<host>\[[^\]\s]*\]|[A-Za-z0-9._\-]+)(?:[ \t]*:[ \t]*(?P<port>[0-9]+))?"
)
_SIP_HOST = re.compile(r"\[[^\]\s]*\]|[A-Za-z0-9._\-]+")


def _check_header(value: str, name: str) -> None:
    if len(value) > MAX_HEADER_SIZE:
        raise DecodeError(f"{name} header value larger than {MAX_HEADER_SIZE} bytes")


def _host_text(host: str) -> str:
    """A host argument as it goes into a SIP header: IPv6 in brackets (RFC 3261 §25.1, RFC 5118)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ip_address(bare)
    except ValueError:
        if not _HOST_NAME.fullmatch(host) or len(host) > 253:
            raise ValueError(f"{host!r} is not an IP address or host name") from None
        return host
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _hostport(host: str, port: int | None) -> str:
    if port is not None and not 0 < port <= 0xFFFF:
        raise ValueError(f"port {port} is not 1-65535")
    text = _host_text(host)
    return text if port is None else f"{text}:{port}"


def _match_via(via_value: str) -> re.Match[str]:
    _check_header(via_value, "Via")
    match = _VIA.match(via_value)
    if match is None:
        raise DecodeError("malformed Via header (expected SIP/2.0/<transport> <host>[:<port>])")
    after = _skip_lws(via_value, match.end())
    if after < len(via_value) and via_value[after] not in ";,":
        raise DecodeError(f"unexpected {via_value[after]!r} after the Via sent-by")
    return match


def rewrite_via_sent_by(via_value: str, host: str, port: int | None) -> str:
    """Our own Via with `host[:port]` as its sent-by (RFC 3261 §18.1.1, §20.42), everything else kept.

    Only the first via-parm of the value is ours (the topmost, when a header folds several with
    commas); `port` None drops the port, which then defaults to 5060 (5061 for TLS).
    """
    match = _match_via(via_value)
    start = match.start("host")
    end = match.end("port") if match["port"] is not None else match.end("host")
    return via_value[:start] + _hostport(host, port) + via_value[end:]


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    name_end: int
    value_start: int | None
    value_end: int | None


def _skip_lws(text: str, index: int) -> int:
    while index < len(text) and text[index] in _LWS:
        index += 1
    return index


def _quoted_end(text: str, start: int) -> int:
    """Index just after the quoted string opening at `start` (RFC 3261 §25.1: backslash escapes)."""
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            return index + 1
        index += 1
    raise DecodeError("unterminated quoted string in a SIP header")


def _scan_params(text: str, index: int) -> tuple[list[_Param], int]:
    """`;name[=value]` parameters from `index`, with LWS around `;` and `=`. Returns them and the
    index just after the last one; what follows must be the end or a `,` (another header entry)."""
    params: list[_Param] = []
    end = index
    while True:
        cursor = _skip_lws(text, end)
        if cursor >= len(text) or text[cursor] != ";":
            break
        cursor = _skip_lws(text, cursor + 1)
        name_start = cursor
        while cursor < len(text) and text[cursor] in _TOKEN_CHARS:
            cursor += 1
        if cursor == name_start:
            raise DecodeError("empty parameter name in a SIP header")
        name, name_end = text[name_start:cursor], cursor
        value_start = value_end = None
        after = _skip_lws(text, cursor)
        if after < len(text) and text[after] == "=":
            value_start = _skip_lws(text, after + 1)
            if value_start < len(text) and text[value_start] == '"':
                value_end = _quoted_end(text, value_start)
            else:
                value_end = value_start
                while value_end < len(text) and text[value_end] in _VALUE_CHARS:
                    value_end += 1
                if value_end == value_start:
                    raise DecodeError(f"parameter {name!r} has an empty value in a SIP header")
            cursor = value_end
        params.append(_Param(name.lower(), name_end, value_start, value_end))
        if len(params) > 64:
            raise DecodeError("more than 64 parameters in a SIP header")
        end = cursor
    rest = _skip_lws(text, end)
    if rest < len(text) and text[rest] != ",":
        raise DecodeError(f"unexpected {text[rest]!r} in a SIP header's parameters")
    return params, end


def add_received_rport(via_value: str, source_ip: IPAddress, source_port: int) -> str:
    """A server's treatment of a received request's topmost Via, so the response finds its way back
    through the client's NAT.

    - RFC 3581 §4: an `rport` without a value gets the request's source port, and then `received` is
      added even if it equals the sent-by host.
    - RFC 3261 §18.2.1: `received` with the source address is added when the sent-by host is a name
      or an address other than the source. An existing `received` gets the new value.
    IPv6 `received` values go without brackets (RFC 3261 §25.1 grammar, RFC 5118 §4.5).
    """
    if not 0 < source_port <= 0xFFFF:
        raise ValueError(f"source port {source_port} is not 1-65535")
    match = _match_via(via_value)
    params, params_end = _scan_params(via_value, match.end())
    host_text = match["host"]
    try:
        sent_by: IPAddress | None = ip_address(host_text[1:-1] if host_text.startswith("[") else host_text)
    except ValueError:
        sent_by = None
    source = source_ip.ipv4_mapped if isinstance(source_ip, IPv6Address) and source_ip.ipv4_mapped else source_ip
    rport = next((p for p in params if p.name == "rport"), None)
    received = next((p for p in params if p.name == "received"), None)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement)
    if rport is not None and rport.value_start is None:
        edits.append((rport.name_end, rport.name_end, f"={source_port}"))
    if rport is not None or sent_by != source:
        if received is None:
            edits.append((params_end, params_end, f";received={source}"))
        elif received.value_start is None:
            edits.append((received.name_end, received.name_end, f"={source}"))
        else:
            assert received.value_end is not None
            edits.append((received.value_start, received.value_end, str(source)))
    result = via_value
    # Back to front, so earlier offsets stay valid; at one offset the later edit goes in first, which
    # keeps "rport=PORT;received=IP" in that order when rport is the last parameter.
    for start, end, replacement in sorted(edits, key=lambda edit: (edit[0], edits.index(edit)), reverse=True):
        result = result[:start] + replacement + result[end:]
    return result


def _contact_uri_span(value: str) -> tuple[int, int]:
    """Start and end of the first Contact entry's URI: inside `<...>` (name-addr), else the bare
    addr-spec, which cannot contain `;`, `,` or `?` (RFC 3261 §20.10: those force the brackets)."""
    index = _skip_lws(value, 0)
    cursor = index
    while cursor < len(value):
        char = value[cursor]
        if char == '"':
            cursor = _quoted_end(value, cursor)
            continue
        if char == "<":
            close = value.find(">", cursor + 1)
            if close < 0:
                raise DecodeError("Contact header with an unclosed <")
            return cursor + 1, close
        if char in ";,":
            break
        cursor += 1
    end = index
    while end < len(value) and value[end] not in ";,?" + _LWS:
        end += 1
    return index, end


def rewrite_contact(contact_value: str, host: str, port: int | None) -> str:
    """The first Contact entry with `host[:port]` in its SIP URI's hostport (RFC 3261 §20.10, §19.1.1).

    Kept: display name, scheme, user part (password too), URI parameters and headers, header
    parameters (`;expires=60`, `;q=0.5`), other entries. `*` (the REGISTER wildcard) comes back as it
    is. `port` None drops the port. DecodeError for a value without a sip:/sips: URI.
    """
    _check_header(contact_value, "Contact")
    if contact_value.strip() == "*":
        return contact_value
    uri_start, uri_end = _contact_uri_span(contact_value)
    uri = contact_value[uri_start:uri_end]
    scheme, colon, _ = uri.partition(":")
    if not colon or scheme.lower() not in ("sip", "sips"):
        raise DecodeError("Contact header without a sip: or sips: URI")
    # The userinfo ends at the first "@": neither it nor anything after the host may hold a bare one.
    at = uri.find("@", len(scheme) + 1)
    host_start = at + 1 if at >= 0 else len(scheme) + 1
    match = _SIP_HOST.match(uri, host_start)
    if match is None:
        raise DecodeError("Contact URI without a host")
    end = match.end()
    if end < len(uri) and uri[end] == ":":
        digits = end + 1
        while digits < len(uri) and uri[digits].isdigit():
            digits += 1
        end = digits
    start = uri_start + host_start
    return contact_value[:start] + _hostport(host, port) + contact_value[uri_start + end :]
