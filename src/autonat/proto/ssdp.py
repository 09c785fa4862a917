"""SSDP discovery messages (UPnP Device Architecture 1.1 §1), sans-IO.

Builds the M-SEARCH request of §1.3.2, decodes the search responses of §1.3.3 and the NOTIFY
advertisements of §1.2 (alive, byebye, update), and guards the LOCATION URL a responder hands us.

SSDP is unauthenticated multicast UDP: anything on the LAN can answer a search, and whatever it puts
in LOCATION is a URL the client is about to fetch. `validate_location` is therefore the SSRF guard
of the whole UPnP stack: only an `http` URL whose host is an IP literal, inside the local network,
and equal to the responder's own address or the gateway's is let through, and the URL handed on is
rebuilt from the parsed pieces rather than passed along as received.

Header handling is deliberately strict where ambiguity could be exploited and lenient where routers
are merely sloppy:

* header names are case-insensitive (Sagemcom F@st3890 sends `Location`, miniupnpd and TP-Link ER605
  `LOCATION`: docs/QUIRKS.md S5), values are trimmed, bare LF line endings are accepted, and a missing
  final blank line is tolerated (these last two defensive: no router named yet, docs/QUIRKS.md);
* a header repeated with the *same* value is harmless and ignored, but a header repeated with a
  *different* value is a `DecodeError`: two LOCATIONs in one reply is how a forged or spliced
  datagram would smuggle a second target past a "first wins" or "last wins" parser;
* a datagram is at most `MAX_DATAGRAM` bytes, with at most `MAX_HEADER_LINES` header lines of at
  most `MAX_LINE` bytes each; control characters (other than tab) are rejected anywhere;
* bytes that are not UTF-8 are read as Latin-1, which cannot fail.

Every `parse_*` function takes untrusted bytes and either returns a typed value or raises
`DecodeError` with a one-line reason; `validate_location` does the same for a string.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from autonat.proto.errors import DecodeError
from autonat.version import __version__

__all__ = [
    "DEFAULT_SEARCH_TARGETS",
    "MAX_DATAGRAM",
    "MAX_HEADER_LINES",
    "MAX_LINE",
    "MULTICAST_ADDRESS",
    "MULTICAST_ADDRESS6_LINK",
    "MULTICAST_ADDRESS6_SITE",
    "NTS_ALIVE",
    "NTS_BYEBYE",
    "NTS_UPDATE",
    "PORT",
    "ST_ALL",
    "ST_IGD1",
    "ST_IGD2",
    "ST_WANIP1",
    "ST_WANIP2",
    "ST_WANPPP1",
    "USER_AGENT",
    "Location",
    "Notify",
    "SearchResponse",
    "build_msearch",
    "parse_datagram",
    "parse_notify",
    "parse_search_response",
    "validate_location",
]

MULTICAST_ADDRESS = IPv4Address("239.255.255.250")
"""The SSDP IPv4 multicast group (§1)."""

MULTICAST_ADDRESS6_LINK = IPv6Address("ff02::c")
"""The SSDP IPv6 link-local group (§1.1.2): every host on our link, the router included."""

MULTICAST_ADDRESS6_SITE = IPv6Address("ff05::c")
"""The SSDP IPv6 site-local group (§1.1.2): miniupnpd answers and advertises on both groups."""

PORT = 1900
"""The SSDP UDP port (§1)."""

MAX_DATAGRAM = 8192
"""Largest datagram we decode; real responses are a few hundred bytes."""

MAX_HEADER_LINES = 64
MAX_LINE = 1024

ST_IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
ST_IGD2 = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
ST_WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
ST_WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
ST_WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
ST_ALL = "ssdp:all"

DEFAULT_SEARCH_TARGETS: tuple[str, ...] = (ST_IGD2, ST_IGD1, ST_WANIP2, ST_WANIP1, ST_WANPPP1, ST_ALL)
"""Most specific and most capable first: an IGD:2 root answers with the richest description, the
service types catch gateways that only answer for their services, and `ssdp:all` is the last resort
for devices that ignore every specific target (it also draws replies from every media player on the
LAN, so it is tried last)."""

NTS_ALIVE = "ssdp:alive"
NTS_BYEBYE = "ssdp:byebye"
NTS_UPDATE = "ssdp:update"
_NOTIFICATION_SUBTYPES = frozenset({NTS_ALIVE, NTS_BYEBYE, NTS_UPDATE})

USER_AGENT = f"Python/{sys.version_info.major}.{sys.version_info.minor} UPnP/1.1 autonat/{__version__}"
"""§1.3.2 asks for `OS/version UPnP/1.1 product/version`."""

_MX_MIN = 1
_MX_MAX = 5
_MAX_AGE_LIMIT = 2**31 - 1
_MAX_PORT = 65535
_HTTP_VERSIONS = ("HTTP/1.0", "HTTP/1.1")
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Characters RFC 3986 never allows raw in a URL; a backslash in particular is read as a slash by
# some HTTP stacks and not by others, the classic way to make two parsers disagree on the host.
_URL_FORBIDDEN = frozenset('\\<>"{}|^`')

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


# --- M-SEARCH -------------------------------------------------------------------------------------


def _check_header_value(name: str, value: str) -> None:
    if not value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value) or value != value.strip():
        raise ValueError(f"{name} must be a non-empty single-line value, not {value!r}")


def build_msearch(search_target: str, mx: int = 1, host: str = "239.255.255.250:1900") -> bytes:
    """The M-SEARCH request of §1.3.2 for `search_target`.

    `mx` (seconds a device may wait before answering) is clamped to 1..5: §1.3.2 asks control points
    for at least 1, and a large value only delays discovery. `host` is the HOST header; the caller
    passes `gateway:1900` when it sends the same request unicast. ValueError for a target or host
    that would break the header block (these are caller bugs, not hostile input).
    """
    _check_header_value("search_target", search_target)
    _check_header_value("host", host)
    if isinstance(mx, bool) or not isinstance(mx, int):
        raise ValueError(f"mx must be an integer, not {mx!r}")
    mx = min(max(mx, _MX_MIN), _MX_MAX)
    lines = (
        "M-SEARCH * HTTP/1.1",
        f"HOST: {host}",
        'MAN: "ssdp:discover"',
        f"MX: {mx}",
        f"ST: {search_target}",
        f"USER-AGENT: {USER_AGENT}",
        "",
        "",
    )
    return "\r\n".join(lines).encode("utf-8")


# --- header block ---------------------------------------------------------------------------------


def _split_message(data: bytes) -> tuple[str, dict[str, str]]:
    """The start line and the headers (upper-cased names) of an SSDP datagram."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("SSDP datagram is not bytes")
    data = bytes(data)
    if len(data) > MAX_DATAGRAM:
        raise DecodeError(f"SSDP datagram is {len(data)} bytes, over the {MAX_DATAGRAM} byte limit")
    if not data:
        raise DecodeError("empty SSDP datagram")
    raw_lines = data.split(b"\n")
    start_raw, header_raw = raw_lines[0], raw_lines[1:]
    lines: list[bytes] = []
    for raw in header_raw:
        stripped = raw.removesuffix(b"\r")
        if not stripped:
            # End of the header block; SSDP messages carry no body worth reading.
            break
        if len(lines) == MAX_HEADER_LINES:
            raise DecodeError(f"SSDP message has more than {MAX_HEADER_LINES} header lines")
        lines.append(stripped)
    start = _decode_line(start_raw.removesuffix(b"\r"))
    headers: dict[str, str] = {}
    for raw_line in lines:
        line = _decode_line(raw_line)
        if line[0] in " \t":
            raise DecodeError("SSDP header continuation lines are not supported")
        name, colon, value = line.partition(":")
        name = name.strip(" \t")
        if not colon or not name or not set(name) <= _TOKEN_CHARS:
            raise DecodeError("malformed SSDP header line")
        key = name.upper()
        value = value.strip(" \t")
        previous = headers.setdefault(key, value)
        if previous != value:
            raise DecodeError(f"SSDP header {key} repeated with different values")
    return start, headers


def _decode_line(raw: bytes) -> str:
    if len(raw) > MAX_LINE:
        raise DecodeError(f"SSDP line longer than {MAX_LINE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text):
        raise DecodeError("control character in SSDP message")
    return text


def _parse_max_age(cache_control: str | None) -> int | None:
    """The max-age directive of CACHE-CONTROL (§1.2.2), or None when absent or unreadable.

    Lenient on purpose: the value only schedules a re-search, so `max-age = 1800`, `MAX-AGE="1800"`
    and `no-cache="Ext", max-age=120` are all read, and garbage means "unknown" rather than an error
    (routers spell the header freely: docs/QUIRKS.md S5).
    """
    if cache_control is None:
        return None
    for directive in cache_control.split(","):
        name, eq, value = directive.partition("=")
        if not eq or name.strip(" \t").lower() != "max-age":
            continue
        value = value.strip(" \t").strip('"').strip(" \t")
        if value.isascii() and value.isdigit() and len(value) <= 10:
            number = int(value)
            if number <= _MAX_AGE_LIMIT:
                return number
        return None
    return None


def _check_http_version(version: str) -> None:
    if version.upper() not in _HTTP_VERSIONS:
        raise DecodeError("SSDP message is not HTTP/1.0 or HTTP/1.1")


def _required(headers: dict[str, str], name: str, what: str) -> str:
    value = headers.get(name, "")
    if not value:
        raise DecodeError(f"{what} has no {name} header")
    return value


# --- search responses -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchResponse:
    """A unicast reply to an M-SEARCH (§1.3.3).

    `location` is as received: run it through `validate_location` before fetching it. `usn` is ""
    when the device left it out (it is required by the spec, but only used to tell devices apart).
    `max_age` is None when CACHE-CONTROL is missing or unreadable.
    """

    location: str
    search_target: str
    usn: str
    server: str | None
    max_age: int | None


def _search_response_from(start: str, headers: dict[str, str]) -> SearchResponse:
    parts = start.split(None, 2)
    if len(parts) < 2:
        raise DecodeError("malformed SSDP status line")
    _check_http_version(parts[0])
    if parts[1] != "200":
        raise DecodeError(f"SSDP response status is {parts[1][:16]!r}, not 200")
    return SearchResponse(
        location=_required(headers, "LOCATION", "SSDP response"),
        search_target=_required(headers, "ST", "SSDP response"),
        usn=headers.get("USN", ""),
        server=headers.get("SERVER") or None,
        max_age=_parse_max_age(headers.get("CACHE-CONTROL")),
    )


def parse_search_response(data: bytes) -> SearchResponse:
    """Decode an M-SEARCH response (§1.3.3): `HTTP/1.1 200 OK` (or 1.0) with LOCATION and ST."""
    start, headers = _split_message(data)
    if not start.upper().startswith("HTTP/"):
        raise DecodeError("not an SSDP search response")
    return _search_response_from(start, headers)


# --- NOTIFY ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notify:
    """A multicast advertisement (§1.2): `nts` is `ssdp:alive`, `ssdp:byebye` or `ssdp:update`.

    `nts` is lower-cased. `location` is required for alive and update (§1.2.2, §1.2.4) and kept if a
    byebye carries one; like a search response's, it must pass `validate_location` before use.
    `boot_id` is BOOTID.UPNP.ORG (UDA 1.1 only), None when absent or not a number: it is a hint for
    spotting reboots, not something worth dropping an advertisement over.
    """

    nt: str
    nts: str
    usn: str
    location: str | None
    max_age: int | None
    boot_id: int | None


def _parse_boot_id(value: str | None) -> int | None:
    # §1.2.2: BOOTID.UPNP.ORG is a non-negative 31-bit integer.
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 10:
        return None
    number = int(value)
    return number if number <= _MAX_AGE_LIMIT else None


def _notify_from(start: str, headers: dict[str, str]) -> Notify:
    parts = start.split()
    if len(parts) != 3 or parts[0].upper() != "NOTIFY" or parts[1] != "*":
        raise DecodeError("malformed SSDP NOTIFY request line")
    _check_http_version(parts[2])
    nts = _required(headers, "NTS", "SSDP NOTIFY").lower()
    if nts not in _NOTIFICATION_SUBTYPES:
        raise DecodeError(f"unknown SSDP NTS {nts[:40]!r}")
    location = headers.get("LOCATION") or None
    if location is None and nts != NTS_BYEBYE:
        raise DecodeError(f"SSDP NOTIFY {nts} has no LOCATION header")
    return Notify(
        nt=_required(headers, "NT", "SSDP NOTIFY"),
        nts=nts,
        usn=_required(headers, "USN", "SSDP NOTIFY"),
        location=location,
        max_age=_parse_max_age(headers.get("CACHE-CONTROL")),
        boot_id=_parse_boot_id(headers.get("BOOTID.UPNP.ORG")),
    )


def parse_notify(data: bytes) -> Notify:
    """Decode a `NOTIFY * HTTP/1.1` advertisement (§1.2.2 alive, §1.2.3 byebye, §1.2.4 update)."""
    start, headers = _split_message(data)
    return _notify_from(start, headers)


def parse_datagram(data: bytes) -> SearchResponse | Notify:
    """Decode whatever arrived on an SSDP socket: a search response or a NOTIFY.

    Other control points' M-SEARCH requests also reach a multicast listener; they are not for us and
    raise DecodeError("not a response").
    """
    start, headers = _split_message(data)
    method = start.split(None, 1)[0].upper() if start.strip() else ""
    if method.startswith("HTTP/"):
        return _search_response_from(start, headers)
    if method == "NOTIFY":
        return _notify_from(start, headers)
    if method == "M-SEARCH":
        raise DecodeError("not a response")
    raise DecodeError("not an SSDP message")


# --- LOCATION: the SSRF guard ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Location:
    """A LOCATION URL that passed `validate_location`.

    `url` is rebuilt from the parts, e.g. `http://192.168.77.1:5000/rootDesc.xml` (the port is always
    explicit, the fragment dropped). `path` is the request target: path plus `?query` if any.
    """

    url: str
    host: IPv4Address | IPv6Address
    port: int
    path: str


def _address_class(address: Address, local_network: Network) -> str | None:
    """Why `address` can never be a gateway's description server, or None if it might be."""
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, IPv4Address):
        if address == IPv4Address("255.255.255.255"):
            return "broadcast"
        if address.is_reserved:
            return "reserved"
        # The subnet's own network and broadcast addresses are never a host (except in /31, /32).
        if (
            isinstance(local_network, IPv4Network)
            and local_network.prefixlen < 31
            and address in (local_network.broadcast_address, local_network.network_address)
        ):
            return "broadcast"
    elif address.ipv4_mapped is not None:
        # Python 3.11's checks above do not look inside ::ffff:a.b.c.d, so refuse the form outright.
        return "IPv4-mapped"
    return None


def _split_host_port(netloc: str) -> tuple[str, str]:
    if netloc.startswith("["):
        host, bracket, rest = netloc[1:].partition("]")
        if not bracket:
            raise DecodeError("LOCATION has an unterminated IPv6 bracket")
        if rest and not rest.startswith(":"):
            raise DecodeError("LOCATION has junk after the IPv6 address")
        if not host or ":" not in host:
            raise DecodeError("LOCATION brackets must hold an IPv6 address")
        return host, rest[1:]
    if netloc.count(":") > 1:
        raise DecodeError("LOCATION IPv6 host must be in brackets")
    host, _, port = netloc.partition(":")
    return host, port


def validate_location(
    location: str,
    *,
    responder: IPv4Address | IPv6Address,
    gateway: IPv4Address | IPv6Address,
    local_network: IPv4Network | IPv6Network,
    pinned: bool = False,
) -> Location:
    """Check a LOCATION URL before anything fetches it; DecodeError with the reason if unsafe.

    Accepted: `http` (any case), no user info, an IP literal host (IPv6 in brackets, no zone) that is
    not loopback, link-local, multicast, unspecified, reserved or a broadcast address, lies inside
    `local_network`, and is the address the reply came from (`responder`) or the `gateway` (an
    OPNsense/pfSense CARP pair answers from its own LAN address, not the virtual gateway:
    docs/QUIRKS.md S3); port 1..65535 (TP-Link ER605 serves on 1900: S4), 80 when absent; the path
    defaults to "/". A host name is refused even if it would
    resolve to the gateway: resolution is exactly the step an attacker controls. With `pinned` (the user
    named the gateway), both the responder and the LOCATION host must be that gateway: the CARP leniency
    gives way to what the user asked for.

    An IPv6 link-local host (fe80::/10) is the one exception to "not link-local", with the same
    strictness: it must be the responder itself (or the gateway, when that is link-local on the same
    link), and the responder must carry its zone, the interface the reply arrived on (an
    `IPv6Address` with a scope id, as the search socket reports it). The zone comes from there and
    never from the URL (a LOCATION with a zone is refused), so a reply can only send us to the host that
    sent it, on the link it came from; `Location.url` carries it as RFC 6874 writes it (`%25`).

    The parsing is done by hand rather than with urllib.parse, whose lenient corners (brackets,
    backslashes, `@` in odd places) are where two URL parsers disagree about the host.
    """
    if not isinstance(location, str):
        raise DecodeError("LOCATION is not a string")
    url = location.strip(" \t")
    if len(url) > MAX_LINE:
        raise DecodeError("LOCATION is too long")
    if not url.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F or c in _URL_FORBIDDEN for c in url):
        raise DecodeError("LOCATION contains characters not allowed in a URL")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        raise DecodeError("LOCATION must be an http URL")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc, target = rest[:cut], rest[cut:]
    if "@" in netloc:
        raise DecodeError("LOCATION must not carry user info")
    if not netloc:
        raise DecodeError("LOCATION has no host")
    host_text, port_text = _split_host_port(netloc)
    if not host_text:
        raise DecodeError("LOCATION has no host")
    if "%" in host_text:
        raise DecodeError("LOCATION host must not carry an IPv6 zone")
    try:
        host = ip_address(host_text)
    except ValueError:
        raise DecodeError("LOCATION host must be an IP address, not a name") from None
    if netloc.startswith("[") != isinstance(host, IPv6Address):
        raise DecodeError("LOCATION brackets must hold an IPv6 address")
    if port_text == "":
        port = 80
    elif port_text.isdigit() and len(port_text) <= 5 and 1 <= int(port_text) <= _MAX_PORT:
        port = int(port_text)
    else:
        raise DecodeError(f"LOCATION port {port_text[:8]!r} is invalid")

    if isinstance(host, IPv6Address) and host.is_link_local and host.version == local_network.version:
        host = _link_local_host(host, responder, gateway, pinned)
    else:
        bad = _address_class(host, local_network)
        if bad is not None:
            raise DecodeError(f"LOCATION points to {host}: {bad}")
        if host.version != local_network.version or host not in local_network:
            raise DecodeError(f"LOCATION host {host} is outside the local network {local_network}")
        if pinned and responder != gateway:
            raise DecodeError(f"answered by {responder}, not the gateway {gateway} asked for (--gateway)")
        if pinned and host != gateway:
            raise DecodeError(f"LOCATION host {host} is not the gateway {gateway} asked for (--gateway)")
        if host not in (responder, gateway):
            raise DecodeError(f"LOCATION host {host} is neither the responder nor the gateway")

    target = target.partition("#")[0]
    if not target.startswith("/"):
        target = "/" + target
    if isinstance(host, IPv6Address):
        zone = f"%25{host.scope_id}" if host.scope_id else ""
        shown = f"[{_unscoped(host)}{zone}]"
    else:
        shown = str(host)
    return Location(url=f"http://{shown}:{port}{target}", host=host, port=port, path=target)


def _unscoped(address: IPv6Address) -> IPv6Address:
    return IPv6Address(address.packed)


def _link_local_host(host: IPv6Address, responder: Address, gateway: Address, pinned: bool) -> IPv6Address:
    """A link-local LOCATION host, checked as strictly as any other (see `validate_location`), with the
    zone of the reply it came in."""
    zone = responder.scope_id if isinstance(responder, IPv6Address) else None
    if not zone or not isinstance(responder, IPv6Address) or not responder.is_link_local:
        raise DecodeError(f"LOCATION points to {host}: link-local, and the reply did not come from that link")
    scoped = IPv6Address(f"{host}%{zone}")
    if pinned and responder != gateway:
        raise DecodeError(f"answered by {responder}, not the gateway {gateway} asked for (--gateway)")
    if pinned and scoped != gateway:
        raise DecodeError(f"LOCATION host {host} is not the gateway {gateway} asked for (--gateway)")
    if scoped not in (responder, gateway):
        raise DecodeError(f"LOCATION host {host} (link-local) is neither the responder nor the gateway")
    return scoped
