"""The wire trace: every exchange with the router, the STUN server and SIP peers, decoded, one line each.

`--trace pcp,natpmp,upnp,stun,sip` (or `all`) on `autonat run`, `probe`, `map` and `doctor`, and `[log]
trace` in the daemon's config, turn it on. Each datagram or HTTP exchange becomes one record: the
direction (`->` sent, `<-` received), the peer's address and port, the time since the request it answers
(where there is one), and what it says, decoded by the project's own sans-IO parsers:

    trace pcp -> 192.168.77.1:5351 MAP request lifetime=7200 protocol=udp internal=192.168.77.10:5060 ...
    trace pcp <- 192.168.77.1:5351 (0.41 ms) MAP SUCCESS lifetime=7200 epoch=3012 protocol=udp ...
    trace upnp -> 192.168.77.1:5000 POST http://192.168.77.1:5000/ctl/IPConn SOAPAction=...#GetExternal...
    trace sip <- 203.0.113.9:5073 udp REGISTER sip:203.0.113.5:5060 SIP/2.0 | Via: ... | CSeq: 2 REGISTER ...

Input that does not decode is shown as a bounded, escaped preview (text, or hex when it is mostly not
text), never an exception: the hooks run on the network path.

The shells call the hooks (`datagram_sent`, `datagram_received`, `unreachable`, `ssdp_sent`,
`ssdp_received`, `http_sent`, `http_received`, `http_failed`, `sip_sent`, `sip_received`), each behind
`if trace.ON:`. That module flag is the whole cost while tracing is off: no formatting, no clock read,
no call. The shells decide nothing: which protocol a datagram belongs to, whether it is traced, and how
it reads is decided here.

Bounds, because what is traced is untrusted input and a flood must not become a log flood:
- every record is at most `RECORD_CAP` bytes (UTF-8), cut with a "…[cut N bytes]" mark; every decoded
  value at most `FIELD` characters, every preview `PREVIEW` bytes of input;
- at most `RATE` records a second per protocol; past that, records are counted, not formatted, and one
  "trace: N ... records suppressed" line per second says how many (written with the next record, or when
  `records()` is read: no timer runs for the trace);
- the last `RING_SIZE` records are kept in memory (`records()`), for `doctor --share`;
- the requests remembered for the elapsed time: at most `PENDING` (oldest forgotten first).

Redaction: SIP digest `response=` and `cnonce=` values and anything named like a password, secret or
token are replaced by `<redacted>` before a record is cut, in decoded values and in previews alike
(`redact`). PCP nonces are shown short (their first 4 bytes): they only name a mapping.

Output goes through `logging` (logger "autonat.trace", level DEBUG, structured fields `protocol`,
`direction`, `peer`, `elapsed_ms`), so daemon/logs.py's line formats hold: a level on every line, ISO
times or journald priorities, one JSON object per line. Enabling the trace sets that logger's level, so
its records show whatever `--log-level` says. `keep` protocols (doctor --share) go to the ring only.

The state is one `Tracer`, a sans-IO core (`now` passed in; unit tests drive it with a fake clock); the
module functions feed it the monotonic clock. `configure()` may be called again at any time (a reload):
the ring and the rate windows carry over. `pin()` holds the command line's `--trace` on across reloads.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Final

__all__ = [
    "FIELD",
    "PROTOCOLS",
    "RATE",
    "RECORD_CAP",
    "RING_SIZE",
    "HttpToken",
    "Tracer",
    "configure",
    "datagram_received",
    "datagram_sent",
    "enabled",
    "http_failed",
    "http_received",
    "http_sent",
    "parse",
    "pin",
    "records",
    "redact",
    "reset",
    "sip_received",
    "sip_sent",
    "ssdp_received",
    "ssdp_sent",
    "unreachable",
]

PROTOCOLS: Final = ("pcp", "natpmp", "upnp", "stun", "sip")
LOGGER: Final = "autonat.trace"
RECORD_CAP: Final = 2048
"""Bytes (UTF-8) of one record's text, the cut mark included."""
FIELD: Final = 200
"""Characters of one decoded value (a header, a URL, an argument)."""
PREVIEW: Final = 96
"""Bytes of undecodable input shown."""
RATE: Final = 200
"""Records a second per protocol: a SIP scan at 5,000 requests a second logs 200 lines and one count."""
RING_SIZE: Final = 1000
PENDING: Final = 256
PENDING_AGE: Final = 64.0
"""Seconds a request is waited for (SIP's 64*T1): an older entry gives no elapsed time."""
_PCP_PORTS: Final = (5350, 5351)  # RFC 6887 §19.1, RFC 6886 §3: PCP and NAT-PMP share them
_STUN_COOKIE: Final = b"\x21\x12\xa4\x42"  # RFC 8489 §5
_STUN_PORTS: Final = (3478, 3479)  # RFC 8489 §18.6; RFC 3489 servers answer CHANGE-REQUEST from 3479
_SHOWN_ATTRIBUTES: Final = 24
_SHOWN_VIAS: Final = 3
_SHOWN_SDP_LINES: Final = 8
_SHOWN_ARGUMENTS: Final = 24

ON: bool = False
"""Is any protocol traced? The shells' hooks test this before calling anything."""

# --- redaction ----------------------------------------------------------------------------------------

REDACTED: Final = "<redacted>"


@functools.cache
def _secrets() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The redaction patterns, compiled on first use (1 ms a process that never traces need not pay)."""
    value = re.compile(
        r"""(?ix)
        (?<![\w-])(response|cnonce|[\w-]*(?:password|passwd|passphrase|secret|token)[\w-]*)  # the name
        (\s*"?\s*[=:]\s*)                                                                     # = or :
        ("[^"]*"?|[^\s,;&"<>|]+)                                                              # the value
        """
    )
    element = re.compile(r"(?i)(<[\w:.-]*(?:password|passwd|secret|token)[\w.-]*>)([^<]*)")
    return value, element


def redact(text: str) -> str:
    """`text` with secret values replaced by `<redacted>`: digest `response=` / `cnonce=`, and any
    `...password...`, `...secret...`, `...token...` field (name=value, name: value, <name>value)."""
    value, element = _secrets()
    text = value.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    return element.sub(lambda m: f"{m[1]}{REDACTED}", text)


# --- text helpers -------------------------------------------------------------------------------------

_CONTROL_ESCAPES: Final = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escape(text: str) -> str:
    """Control and other unprintable characters as escapes: a record is one line of plain text."""
    if text.isprintable():
        return text
    return "".join(
        c
        if c.isprintable()
        else _CONTROL_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        for c in text
    )


def _clean(text: str, limit: int = FIELD) -> str:
    """Untrusted text for a record: redacted first (so a cut cannot leave half a secret), escaped, and at
    most `limit` characters (then "…")."""
    window = redact(text[: limit + 512])  # a secret starting before the cut is matched whole
    shown = _escape(window[:limit])
    return shown + "…" if len(text) > limit or len(window) > limit else shown


def _short(data: bytes, size: int = 4) -> str:
    """An identifier shown short (a nonce, a transaction id): its first bytes in hex, then "…"."""
    return data[:size].hex() + ("…" if len(data) > size else "")


def preview(data: bytes, limit: int = PREVIEW) -> str:
    """Undecodable input: its size, then the first `limit` bytes as escaped text, or as hex when they
    are mostly not text; secrets redacted first."""
    data = bytes(data[: limit + 512])
    window = redact(data.decode("latin-1")).encode("latin-1", "replace")  # latin-1: one char per byte
    head = window[:limit]
    more = "…" if len(window) > limit else ""
    texty = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if head and texty * 10 >= len(head) * 8:
        return f'"{_escape(head.decode("latin-1"))}"{more}'
    return f"hex {head.hex()}{more}"


def _undecodable(data: bytes, reason: object) -> str:
    return f"undecodable ({_clean(str(reason), 120)}): {len(data)} bytes {preview(data)}"


def _peer(peer: tuple[Any, ...] | None) -> str:
    if peer is None or len(peer) < 2:
        return "?"
    host = str(peer[0])
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"


def _cap(text: str, cap: int) -> str:
    """At most `cap` bytes of UTF-8, the cut marked with the number of bytes left out."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= cap:
        return text
    mark = f"…[cut {len(raw)} bytes]"
    keep = max(0, cap - len(mark.encode()))
    return raw[:keep].decode("utf-8", "ignore") + f"…[cut {len(raw) - keep} bytes]"


def _name(enum_type: Any, value: int, unknown: str = "") -> str:
    """An enum member's name, or `unknown` and the number for a value the enum does not know."""
    try:
        return str(enum_type(value).name)
    except ValueError:
        return f"{unknown}{value}"


def _decoded(describe: Callable[[bytes], str], data: bytes) -> str:
    """`describe(data)`, or the undecodable preview with the parser's reason."""
    try:
        return describe(data)
    except Exception as exc:
        return _undecodable(data, exc)


# --- PCP (RFC 6887) and NAT-PMP (RFC 6886) ------------------------------------------------------------


def describe_pcp(data: bytes) -> str:
    """A PCP message (RFC 6887 §7.1 request, §7.2 response, §11.1 MAP, §14.1 ANNOUNCE, §9 version
    negotiation): opcode, result code name, lifetime, epoch, protocol, ports and addresses, nonce short."""
    from autonat.proto import pcp

    if len(data) >= 2 and data[1] & pcp.RESPONSE_BIT:
        reply = pcp.parse_response(data)
        if isinstance(reply, pcp.VersionNotSupported):
            return f"UNSUPP_VERSION: the server speaks version {reply.server_version} epoch={reply.epoch}"
        parts = [_name(pcp.Opcode, reply.opcode, "opcode "), _name(pcp.ResultCode, reply.result, "result ")]
        parts += [f"lifetime={reply.lifetime}", f"epoch={reply.epoch}"]
        if reply.map is not None:
            m = reply.map
            parts += [
                f"protocol={m.transport or m.protocol}",
                f"internal=:{m.internal_port}",
                f"external={_peer((m.external_address, m.external_port))}",
                f"nonce={_short(m.nonce)}",
            ]
        options = reply.options
    else:
        request = pcp.parse_request(data)
        parts = [_name(pcp.Opcode, request.opcode, "opcode "), "request", f"lifetime={request.lifetime}"]
        if request.map is not None:
            m = request.map
            parts += [
                f"protocol={m.transport or m.protocol}",
                f"internal={_peer((request.client_address, m.internal_port))}",
                f"external={_peer((m.external_address, m.external_port))}",
                f"nonce={_short(m.nonce)}",
            ]
        else:
            parts.append(f"client={request.client_address}")
        options = request.options
    if options:
        parts.append("options=" + ",".join(_name(pcp.OptionCode, o.code) for o in options[:8]))
    return " ".join(parts)


def describe_natpmp(data: bytes) -> str:
    """A NAT-PMP message (RFC 6886 §3.2 external address, §3.3 mapping, §3.5 result codes): opcode,
    result, epoch, ports, lifetime, address."""
    from autonat.proto import natpmp

    if len(data) >= 2 and data[1] >= natpmp.RESPONSE_BIT:
        reply = natpmp.parse_response(data)
        if isinstance(reply, natpmp.ExternalAddressResponse):
            head = f"EXTERNAL_ADDRESS {_name(natpmp.ResultCode, reply.result)} epoch={reply.epoch}"
            return f"{head} address={reply.external_address}"
        if isinstance(reply, natpmp.MapResponse):
            opcode = natpmp.Opcode.for_transport(reply.transport).name
            return (
                f"{opcode} {_name(natpmp.ResultCode, reply.result)} epoch={reply.epoch}"
                f" internal={reply.internal_port} external={reply.external_port} lifetime={reply.lifetime}"
            )
        opcode, result = (
            _name(natpmp.Opcode, reply.opcode, "opcode "),
            _name(natpmp.ResultCode, reply.result, "result "),
        )
        return f"{opcode} {result} epoch={reply.epoch}"
    request = natpmp.parse_request(data)
    if isinstance(request, natpmp.ExternalAddressRequest):
        return "EXTERNAL_ADDRESS request"
    return (
        f"{request.opcode.name} request internal={request.internal_port} external={request.external_port}"
        f" lifetime={request.lifetime}"
    )


# --- STUN (RFC 8489, RFC 5780) ------------------------------------------------------------------------

_CHANGE_FLAGS: Final = {0x04: "ip", 0x02: "port"}  # RFC 5780 §7.2


def describe_stun(data: bytes) -> str:
    """A STUN message (RFC 8489 §5, §14): method and class, transaction id short, the address
    attributes decoded (XOR-MAPPED-ADDRESS §14.2, MAPPED-ADDRESS §14.1, RFC 5780's RESPONSE-ORIGIN and
    OTHER-ADDRESS, RFC 3489's CHANGED-ADDRESS), CHANGE-REQUEST's flags (RFC 5780 §7.2), ERROR-CODE."""
    from autonat.proto import stun

    message = stun.parse_message(data)
    method = "Binding" if message.method == stun.Method.BINDING else f"method 0x{message.method:03x}"
    parts = [method, message.message_class.name.lower(), f"tid={_short(message.transaction_id)}"]
    address_types = {
        stun.AttributeType.MAPPED_ADDRESS,
        stun.AttributeType.RESPONSE_ADDRESS,
        stun.AttributeType.SOURCE_ADDRESS,
        stun.AttributeType.CHANGED_ADDRESS,
        stun.AttributeType.RESPONSE_ORIGIN,
        stun.AttributeType.OTHER_ADDRESS,
        stun.AttributeType.ALTERNATE_SERVER,
    }
    for attribute in message.attributes[:_SHOWN_ATTRIBUTES]:
        name = _name(stun.AttributeType, attribute.type).replace("_", "-")
        if not name[0].isalpha():
            name = f"0x{attribute.type:04x}"
        value = attribute.value
        try:
            if attribute.type == stun.AttributeType.XOR_MAPPED_ADDRESS:
                parts.append(f"{name}={_peer(stun.decode_address(value, message.transaction_id))}")
            elif attribute.type in address_types:
                parts.append(f"{name}={_peer(stun.decode_address(value))}")
            elif attribute.type == stun.AttributeType.CHANGE_REQUEST:
                flags = int.from_bytes(value[:4], "big")
                parts.append(f"{name}={'+'.join(t for b, t in _CHANGE_FLAGS.items() if flags & b) or 'none'}")
            elif attribute.type == stun.AttributeType.ERROR_CODE:
                parts.append(f"{name}={stun.error_code(message).describe()}")
            elif attribute.type in (stun.AttributeType.SOFTWARE, stun.AttributeType.USERNAME):
                text = value.decode("utf-8", "replace").rstrip(" \0")  # stund pads with NULs
                parts.append(f'{name}="{_clean(text, 60)}"')
            else:
                parts.append(name)
        except Exception as exc:  # one bad attribute does not hide the others
            parts.append(f"{name}=({_clean(str(exc), 60)})")
    if len(message.attributes) > _SHOWN_ATTRIBUTES:
        parts.append(f"+{len(message.attributes) - _SHOWN_ATTRIBUTES} more attributes")
    return " ".join(parts)


# --- SSDP (UPnP DA 1.1 §1) ----------------------------------------------------------------------------

_MAX_HEAD_LINES: Final = 64


def _head(data: bytes, limit: int = 8192) -> tuple[str, dict[str, str]]:
    """The start line and the first value of each header of an HTTP-like head, bounded (a preview of
    what the message says, not a validation: the parsers validate)."""
    text = bytes(data[:limit]).decode("latin-1")
    lines = text.split("\n", _MAX_HEAD_LINES + 1)[: _MAX_HEAD_LINES + 1]
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        line = raw.rstrip("\r")
        if not line:
            break
        name, colon, value = line.partition(":")
        if colon:
            headers.setdefault(name.strip().upper(), value.strip())
    return lines[0].rstrip("\r"), headers


def describe_ssdp(data: bytes) -> str:
    """An SSDP datagram (UPnP DA 1.1 §1.2 NOTIFY, §1.3.2 M-SEARCH, §1.3.3 search response): the start
    line, ST or NT/NTS, LOCATION, SERVER, USN. Responses and NOTIFYs go through proto/ssdp.py's parser
    (a refusal is named); our own M-SEARCH is read from its head."""
    from autonat.proto import ssdp
    from autonat.proto.errors import DecodeError

    start, headers = _head(data)
    if start.upper().startswith("M-SEARCH"):
        parts = [_clean(start, 80)]
        parts += [f"{name}={_clean(headers[name], 120)}" for name in ("ST", "MX", "HOST") if name in headers]
        return " ".join(parts)
    try:
        message = ssdp.parse_datagram(data)
    except DecodeError as exc:
        return _undecodable(data, f"SSDP: {exc}")
    parts = [_clean(start, 80)]
    if isinstance(message, ssdp.SearchResponse):
        fields = {"ST": message.search_target, "LOCATION": message.location, "SERVER": message.server}
    else:
        fields = {"NT": message.nt, "NTS": message.nts, "LOCATION": message.location}
        if message.boot_id is not None:
            fields["BOOTID"] = str(message.boot_id)
    fields["USN"] = message.usn or None
    parts += [f"{name}={_clean(value, 120)}" for name, value in fields.items() if value]
    return " ".join(parts)


# --- HTTP and SOAP (UPnP DA 1.1 §2.3 descriptions, §3.2 control) ------------------------------------------


class HttpToken:
    """One HTTP exchange in flight, from `http_sent` to `http_received` / `http_failed`."""

    __slots__ = ("action", "peer", "service_type", "started", "url")

    def __init__(self, url: str, peer: str, action: str, service_type: str, started: float) -> None:
        self.url = url
        self.peer = peer
        self.action = action
        self.service_type = service_type
        self.started = started


def _soap_action(headers: Mapping[str, str]) -> tuple[str, str]:
    """(service type, action) of a SOAPAction header (§3.2.1: `"urn:...:service:X:1#Action"`)."""
    value = next((v for k, v in headers.items() if k.lower() == "soapaction"), "")
    service_type, _, action = value.strip().strip('"').partition("#")
    return service_type, action


def _soap_arguments(body: bytes) -> list[tuple[str, str]]:
    """The arguments of our own SOAP request: the children of the Body's action element."""
    from defusedxml import ElementTree

    root = ElementTree.fromstring(bytes(body[:65536]))
    for body_element in root:
        if body_element.tag.rpartition("}")[2] == "Body":
            for action in body_element:
                return [(child.tag.rpartition("}")[2], child.text or "") for child in action]
    return []


def describe_http_request(method: str, url: str, headers: Mapping[str, str], content: bytes) -> str:
    """An HTTP request to the router: method, URL, and for a SOAP action (UPnP DA 1.1 §3.2.1) the
    SOAPAction and the arguments."""
    parts = [_clean(method, 16), _clean(url)]
    service_type, action = _soap_action(headers)
    if action:
        parts.append(f"SOAPAction={_clean(service_type, 80)}#{_clean(action, 60)}")
        try:
            arguments = _soap_arguments(content)
        except Exception as exc:
            parts.append(_undecodable(content, exc))
        else:
            parts += [f"{_clean(n, 40)}={_clean(v, 80)}" for n, v in arguments[:_SHOWN_ARGUMENTS]]
    elif content:
        parts.append(f"{len(content)} bytes")
    return " ".join(parts)


def describe_http_reply(token: HttpToken, status: int, body: bytes) -> str:
    """The router's reply: the status, and for a SOAP action the out arguments or the fault's code and
    description (UPnP DA 1.1 §3.2.2), read by proto/igd.py; for a device description (§2.3) the device
    it names, for a service description (§2.5) its actions."""
    from autonat.proto import igd
    from autonat.proto.errors import DecodeError

    head = f"HTTP {status}"
    if token.action:
        try:
            request = igd.SoapRequest(token.action, token.service_type)
            outputs = igd.parse_soap_response(body, request, status)
        except igd.UpnpError as fault:
            return f"{head} fault {fault.code} {_clean(fault.name, 60)}: {_clean(fault.description, 120)}"
        except (DecodeError, ValueError) as exc:
            return f"{head} {_undecodable(body, exc)}"
        arguments = list(outputs.items())[:_SHOWN_ARGUMENTS]
        return " ".join([head, f"{_clean(token.action, 60)}Response", *(f"{n}={_clean(v, 80)}" for n, v in arguments)])
    if status == 200 and b"<scpd" in body[:512]:
        try:
            actions = sorted(igd.parse_scpd(body))
        except (DecodeError, ValueError) as exc:
            return f"{head} {len(body)} bytes, not a service description ({_clean(str(exc), 120)})"
        shown = ", ".join(actions[:_SHOWN_ARGUMENTS]) + (", …" if len(actions) > _SHOWN_ARGUMENTS else "")
        return f"{head} {len(body)} bytes: service description, {len(actions)} actions: {_clean(shown, 600)}"
    if status == 200 and body.lstrip()[:5] in (b"<?xml", b"<root"):
        try:
            description = igd.parse_device_description(body, token.url)
        except (DecodeError, ValueError) as exc:
            return f"{head} {len(body)} bytes, not a device description ({_clean(str(exc), 120)})"
        root = description.root
        model = " ".join(x for x in (root.manufacturer, root.model_name, root.model_number) if x)
        services = ", ".join(s.service_type.rpartition(":service:")[2] for s in description.connection_services())
        return (
            f"{head} {len(body)} bytes: {_clean(root.friendly_name, 80)} ({_clean(model, 80)})"
            f" WAN services: {_clean(services or 'none', 120)}"
        )
    return f"{head} {len(body)} bytes" + (f" {preview(body)}" if body else "")


# --- SIP (RFC 3261) -----------------------------------------------------------------------------------

_SIP_SHOWN: Final = (
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Contact",
    "Expires",
    "Authorization",
    "Proxy-Authorization",
    "WWW-Authenticate",
    "Proxy-Authenticate",
)


def _sdp_summary(body: bytes) -> str:
    """The c= and m= lines of an SDP body (RFC 8866 §5.7, §5.14): where the media goes."""
    lines = [
        line.strip() for line in body[:8192].decode("utf-8", "replace").splitlines() if line.startswith(("c=", "m="))
    ]
    shown = [_clean(line, 100) for line in lines[:_SHOWN_SDP_LINES]]
    return "SDP " + (" ".join(shown) if shown else "without c=/m= lines")


def describe_sip(message: Any) -> str:
    """A SIP message (RFC 3261 §7): the start line, Via (§20.42), From, To, Call-ID, CSeq, Contact,
    Expires and the authentication headers (digest response and cnonce redacted), and the body's
    summary (SDP's c= and m= lines)."""
    from autonat.sip.message import Request

    if isinstance(message, Request):
        start = f"{message.method} {message.uri} {message.version}"
    else:
        start = f"{message.version} {message.status} {message.reason}"
    parts = [_clean(start, 160)]
    headers = message.headers
    vias = headers.get_all("Via")
    for via in vias[:_SHOWN_VIAS]:
        parts.append(f"Via: {_clean(via, 160)}")
    if len(vias) > _SHOWN_VIAS:
        parts.append(f"(+{len(vias) - _SHOWN_VIAS} Via)")
    for name in _SIP_SHOWN:
        value = headers.get(name)
        if value is not None:
            parts.append(f"{name}: {_clean(value, 240)}")
    body: bytes = message.body
    if body:
        kind = headers.get("Content-Type") or ""
        if "sdp" in kind.lower() or body.lstrip()[:4] == b"v=0":
            parts.append(_sdp_summary(body))
        else:
            parts.append(f"body: {_clean(kind, 60) or 'untyped'} {len(body)} bytes")
    return " | ".join(parts)


class _Undecodable:
    """Bytes a parser refused, and why."""

    __slots__ = ("data", "error")

    def __init__(self, data: bytes, error: BaseException) -> None:
        self.data = data
        self.error = error


def _describe_sip_item(item: object) -> str:
    """A parsed message, a keep-alive, a request the codec refused (BadRequest: answered all the same,
    RFC 3261 §8.2), bytes that are not SIP, or a stream's framing error."""
    from autonat.sip.message import BadRequest, KeepAlive, Request, Response

    if isinstance(item, Request | Response):
        return describe_sip(item)
    if isinstance(item, KeepAlive):
        return "keep-alive (CRLF)"
    data = item.data if isinstance(item, _Undecodable) else b""
    error = item.error if isinstance(item, _Undecodable) else item
    if isinstance(error, BadRequest):
        head = f"malformed {_clean(error.method, 20)} request, answered {error.status} ({_clean(str(error), 160)})"
        return f"{head}: {len(data)} bytes {preview(data)}" if data else head
    if data:
        return _undecodable(data, error)
    return f"malformed ({_clean(str(error), 160)})"


def _sip_key(message: Any) -> Hashable:
    """Which request a response answers: Call-ID and CSeq (RFC 3261 §17.1.3 matches on the branch too;
    for a trace's elapsed time this is plenty)."""
    headers = message.headers
    return ("sip", headers.get("Call-ID"), headers.get("CSeq"))


# --- the tracer ---------------------------------------------------------------------------------------

Emit = Callable[[str, str, Mapping[str, object]], None]
"""(protocol, record text, structured fields) -> None: where records that are logged go."""


class _Window:
    __slots__ = ("count", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0


class Tracer:
    """The trace's state, sans-IO: which protocols are traced, the rate windows, the ring, the requests
    awaiting an answer. Every hook takes `now` (seconds, monotonic); nothing here reads a clock.

    `logged` protocols go to `emit` (logging, in the module's tracer) and the ring; `kept` ones to the
    ring only. A hook never raises for any input (`internal_errors` counts what would have).
    """

    def __init__(
        self,
        *,
        emit: Emit | None = None,
        rate: int = RATE,
        ring_size: int = RING_SIZE,
        cap: int = RECORD_CAP,
        pending: int = PENDING,
    ) -> None:
        self.emit = emit
        self.rate = rate
        self.cap = cap
        self.logged: frozenset[str] = frozenset()
        self.kept: frozenset[str] = frozenset()
        self.ring: deque[str] = deque(maxlen=ring_size)
        self.internal_errors = 0
        self._pending_size = pending
        self._pending: OrderedDict[Hashable, float] = OrderedDict()
        self._windows: dict[str, _Window] = {}
        self._origin: float | None = None

    def set(self, logged: Iterable[str], kept: Iterable[str] = ()) -> None:
        """Trace `logged` (to the log and the ring) and `kept` (the ring only); the rest is off."""
        self.logged = frozenset(logged)
        self.kept = frozenset(kept) | self.logged

    def wants(self, protocol: str) -> bool:
        return protocol in self.kept

    def clear(self) -> None:
        """Forget the ring, the rate windows, the requests awaiting an answer, the error count."""
        self.ring.clear()
        self._pending.clear()
        self._windows.clear()
        self._origin = None
        self.internal_errors = 0

    # --- records ------------------------------------------------------------------------------------

    def _admit(self, protocol: str, now: float) -> bool:
        """Under the protocol's rate? Also writes the suppressed counts of windows that have ended."""
        self.flush(now)
        window = self._windows.get(protocol)
        if window is None:
            window = self._windows[protocol] = _Window(now)
        if window.count >= self.rate:
            window.suppressed += 1
            return False
        window.count += 1
        return True

    def _saturated(self, protocol: str, now: float) -> bool:
        """Over the protocol's rate already? Then the record is counted as suppressed here, before any
        parsing: a flood traced costs a counter, not a second parse of every datagram."""
        self.flush(now)
        window = self._windows.get(protocol)
        if window is None or window.count < self.rate:
            return False
        window.suppressed += 1
        return True

    def flush(self, now: float) -> None:
        """End the rate windows a second old, writing one line for each that suppressed records. (A
        clock a second behind the window's start ends it too: the channel passes the event loop's time,
        which uvloop caches per loop turn, the other hooks the monotonic clock: the same clock, a few
        milliseconds apart at most.)"""
        for protocol, window in list(self._windows.items()):
            if abs(now - window.start) >= 1.0:
                del self._windows[protocol]
                if window.suppressed:
                    self._write(
                        protocol,
                        f"trace: {window.suppressed} {protocol} records suppressed (over {self.rate} a second)",
                        {"protocol": protocol, "suppressed": window.suppressed},
                        now,
                    )

    def _write(self, protocol: str, text: str, fields: Mapping[str, object], now: float) -> None:
        text = _cap(redact(text), self.cap)
        if self._origin is None:
            self._origin = now
        self.ring.append(f"+{max(0.0, now - self._origin):.3f}s {text}")
        if self.emit is not None and protocol in self.logged:
            self.emit(protocol, text, fields)

    def record(
        self,
        protocol: str,
        direction: str,
        peer: str,
        describe: Callable[[], str],
        now: float,
        *,
        elapsed: float | None = None,
        extra: str = "",
    ) -> None:
        """One record, if the protocol is traced and under its rate; `describe()` is only called then,
        and whatever it raises becomes part of the record, never the caller's problem."""
        if protocol not in self.kept or not self._admit(protocol, now):
            return
        try:
            summary = describe()
        except Exception as exc:
            summary = f"undecodable ({_clean(f'{type(exc).__name__}: {exc}', 160)})"
        took = f" ({elapsed * 1000:.2f} ms)" if elapsed is not None and elapsed >= 0 else ""
        fields: dict[str, object] = {"protocol": protocol, "direction": direction, "peer": peer}
        if took:
            fields["elapsed_ms"] = round(elapsed * 1000, 3) if elapsed is not None else None
        self._write(protocol, f"trace {protocol} {direction} {peer}{extra}{took} {summary}", fields, now)

    def records(self, now: float) -> list[str]:
        """The ring: the last `ring_size` records, oldest first, each prefixed with its time since the
        first record ("+1.234s")."""
        self.flush(now)
        return list(self.ring)

    # --- requests and their answers ------------------------------------------------------------------

    def _remember(self, key: Hashable, started: float) -> None:
        self._pending[key] = started
        self._pending.move_to_end(key)
        while len(self._pending) > self._pending_size:
            self._pending.popitem(last=False)

    def _elapsed(self, key: Hashable, now: float, *, forget: bool = True) -> float | None:
        started = self._pending.pop(key, None) if forget else self._pending.get(key)
        if started is None or not 0 <= now - started <= PENDING_AGE:
            return None
        return now - started

    # --- datagrams: PCP, NAT-PMP, STUN ----------------------------------------------------------------

    @staticmethod
    def classify(data: bytes, port: int) -> str:
        """Which protocol a datagram to or from the router or a STUN server speaks. On the PCP/NAT-PMP
        ports (5351, and 5350 for announcements) PCP and NAT-PMP are told apart by the version byte (0 is
        NAT-PMP, RFC 6887 §9); elsewhere STUN by its magic cookie (RFC 8489 §5) or its ports (3478, 3479
        for RFC 3489 servers without the cookie), then the version byte again (a test's router on
        another port), then STUN."""
        if port in _PCP_PORTS:
            return "natpmp" if data[:1] == b"\x00" else "pcp"
        if (len(data) >= 20 and data[4:8] == _STUN_COOKIE and not data[0] & 0xC0) or port in _STUN_PORTS:
            return "stun"
        if data[:1] == b"\x00":
            return "natpmp"
        return "pcp" if data[:1] in (b"\x01", b"\x02") else "stun"

    @staticmethod
    def _datagram_key(protocol: str, data: bytes, peer: str, response: bool) -> Hashable:
        """What ties a reply to its request, read from fixed offsets: PCP's opcode and MAP nonce (§7,
        §11.1), NAT-PMP's opcode and internal port (§3.3), STUN's transaction id (§5)."""
        if protocol == "pcp":
            return ("pcp", peer, data[1] & 0x7F if len(data) > 1 else None, bytes(data[24:36]))
        if protocol == "natpmp":
            opcode = (data[1] - 128 if response else data[1]) if len(data) >= 2 else None
            port = bytes(data[8:10] if response else data[4:6]) if opcode in (1, 2) else b""
            return ("natpmp", peer, opcode, port)
        return ("stun", peer, bytes(data[8:20]))

    def datagram(
        self,
        direction: str,
        data: bytes,
        peer: tuple[Any, ...],
        now: float,
        *,
        started: float | None = None,
        attempt: int = 1,
    ) -> None:
        """A PCP, NAT-PMP or STUN datagram sent (`->`, with the request's `started` time and `attempt`
        number) or received (`<-`)."""
        protocol = self.classify(data, int(peer[1]) if len(peer) > 1 else 0)
        if protocol not in self.kept:
            return
        where = _peer(peer)
        sent = direction == "->"
        response = self._is_response(protocol, data)
        key = self._datagram_key(protocol, data, where, response)
        elapsed = None
        if sent and not response:
            self._remember(key, now if started is None else started)
        elif not sent and response:
            elapsed = self._elapsed(key, now)
        describe = {"pcp": describe_pcp, "natpmp": describe_natpmp, "stun": describe_stun}[protocol]
        extra = f" try {attempt}" if sent and attempt > 1 else ""
        self.record(
            protocol, direction, where, functools.partial(_decoded, describe, data), now, elapsed=elapsed, extra=extra
        )

    @staticmethod
    def _is_response(protocol: str, data: bytes) -> bool:
        if protocol == "stun":
            return len(data) >= 2 and bool(data[0] & 0x01)  # class bit C1: success or error response (§5)
        return len(data) >= 2 and bool(data[1] & 0x80)  # the R bit / opcode + 128

    def unreachable(self, peer: tuple[Any, ...], now: float, protocol: str | None = None) -> None:
        """An ICMP port unreachable from `peer`: nothing listens there (a router whose daemon is
        stopped). Without `protocol`, named by the port (5351: PCP, else NAT-PMP if only it is traced)."""
        if protocol is None:
            port = int(peer[1]) if len(peer) > 1 else 0
            if port in _PCP_PORTS:
                protocol = "pcp" if "pcp" in self.kept or "natpmp" not in self.kept else "natpmp"
            else:
                protocol = "stun"
        self.record(protocol, "<-", _peer(peer), lambda: "ICMP port unreachable (nothing listens there)", now)

    # --- SSDP -----------------------------------------------------------------------------------------

    def ssdp(self, direction: str, data: bytes, peer: tuple[Any, ...], now: float) -> None:
        """An SSDP datagram: our M-SEARCH (`->`) or a reply or NOTIFY (`<-`); a reply's elapsed time is
        from the latest M-SEARCH for its search target."""
        if "upnp" not in self.kept or self._saturated("upnp", now):
            return
        from autonat.proto.ssdp import ST_ALL as ssdp_all

        start, headers = _head(data, 2048)
        elapsed = None
        if direction == "->":
            self._remember(("ssdp", headers.get("ST", "")), now)
        elif start.upper().startswith("HTTP/"):
            # A reply to `ssdp:all` names its own target (UPnP DA 1.1 §1.3.3): timed from that search.
            elapsed = self._elapsed(("ssdp", headers.get("ST", "")), now, forget=False)
            if elapsed is None:
                elapsed = self._elapsed(("ssdp", ssdp_all), now, forget=False)
        describe = functools.partial(_decoded, describe_ssdp, data)
        self.record("upnp", direction, _peer(peer), describe, now, elapsed=elapsed)

    # --- HTTP and SOAP --------------------------------------------------------------------------------

    def http_request(
        self, method: str, url: str, headers: Mapping[str, str], content: bytes, peer: tuple[Any, ...], now: float
    ) -> HttpToken | None:
        """An HTTP request to the router; the token goes back with its answer (None: upnp not traced)."""
        if "upnp" not in self.kept:
            return None
        service_type, action = _soap_action(headers)
        token = HttpToken(url, _peer(peer), action, service_type, now)
        self.record("upnp", "->", token.peer, lambda: describe_http_request(method, url, headers, content), now)
        return token

    def http_reply(self, token: HttpToken, status: int, body: bytes, now: float) -> None:
        self.record(
            "upnp", "<-", token.peer, lambda: describe_http_reply(token, status, body), now, elapsed=now - token.started
        )

    def http_error(self, token: HttpToken, error: BaseException, now: float) -> None:
        what = f"{token.action} " if token.action else ""
        self.record(
            "upnp",
            "<-",
            token.peer,
            lambda: f"{what}failed: {_clean(str(error) or type(error).__name__, 300)}",
            now,
            elapsed=now - token.started,
        )

    # --- SIP ------------------------------------------------------------------------------------------

    def sip(self, direction: str, item: object, transport: str, peer: tuple[Any, ...], now: float) -> None:
        """A SIP message sent or received over `transport` ("udp", "tcp", "tls"): a parsed Request or
        Response, the raw datagram, or the DecodeError a stream's framing raised."""
        if "sip" not in self.kept or self._saturated("sip", now):
            return
        from autonat.sip.message import Request, Response, parse_message

        message: object = item
        if isinstance(item, bytes | bytearray | memoryview):
            data = bytes(item)
            try:
                message = parse_message(data)
            except Exception as exc:  # BadRequest (answered all the same) or plain garbage
                message = _Undecodable(data, exc)
        elapsed = None
        if isinstance(message, Request | Response):
            key = _sip_key(message)
            if isinstance(message, Request):
                if message.method != "ACK":  # an ACK gets no answer (§17.1.1.3)
                    self._remember(key, now)
            else:
                elapsed = self._elapsed(key, now, forget=message.status >= 200)
        where, extra = _peer(peer), f" {_clean(transport, 8)}"
        describe = functools.partial(_describe_sip_item, message)
        self.record("sip", direction, where, describe, now, elapsed=elapsed, extra=extra)


# --- the process's tracer -----------------------------------------------------------------------------


def _log(protocol: str, text: str, fields: Mapping[str, object]) -> None:
    logging.getLogger(LOGGER).debug(text, extra={"fields": dict(fields)})


class _Settings:
    """What was asked for: the config's protocols, the ring-only ones, the command line's pins."""

    configured: frozenset[str] = frozenset()
    kept: frozenset[str] = frozenset()
    pinned: frozenset[str] = frozenset()


_tracer = Tracer(emit=_log)
_settings = _Settings()


def parse(protocols: str | Iterable[str]) -> frozenset[str]:
    """Protocol names from a list (or a comma-separated string): any of PROTOCOLS, or "all".
    ValueError with one line naming the valid names for anything else."""
    items = protocols.split(",") if isinstance(protocols, str) else list(protocols)
    names: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"trace protocols are names, not {type(item).__name__}: use {', '.join(PROTOCOLS)} or all")
        name = item.strip().lower()
        if not name:
            continue
        if name == "all":
            names.update(PROTOCOLS)
        elif name in PROTOCOLS:
            names.add(name)
        else:
            raise ValueError(f"unknown trace protocol {item.strip()[:40]!r}: use {', '.join(PROTOCOLS)} or all")
    return frozenset(names)


def _apply() -> None:
    # The one global: the hooks' guard must be a single module attribute read.
    global ON  # noqa: PLW0603
    logged = _settings.configured | _settings.pinned
    _tracer.set(logged, _settings.kept)
    logging.getLogger(LOGGER).setLevel(logging.DEBUG if logged else logging.NOTSET)
    ON = bool(_tracer.kept)


def configure(protocols: str | Iterable[str], *, keep: str | Iterable[str] = ()) -> None:
    """Trace `protocols` (names from PROTOCOLS, or "all"; an empty list turns the config's trace off) to
    the log and the ring, and `keep` to the ring only (doctor --share). Safe to call again at any time
    (a reload): the change applies to the next datagram, the ring and the rate windows carry over.
    Protocols `pin()`ned by the command line stay on. ValueError (one line, naming the valid names) for
    an unknown name; nothing changes then."""
    _settings.configured, _settings.kept = parse(protocols), parse(keep)
    _apply()


def pin(protocols: str | Iterable[str]) -> None:
    """The command line's `--trace`: traced whatever a later `configure()` (a reload's `[log] trace`)
    says. ValueError as `configure`."""
    _settings.pinned = parse(protocols)
    _apply()


def enabled(protocol: str) -> bool:
    """Is `protocol` traced (to the log, or to the ring only)?"""
    return _tracer.wants(protocol)


def records() -> list[str]:
    """The last RING_SIZE records, oldest first (what `doctor --share` attaches)."""
    return _tracer.records(time.monotonic())


def reset() -> None:
    """Everything off and forgotten: the ring, the rate windows, the pins (for tests)."""
    _tracer.clear()
    _settings.configured = _settings.kept = _settings.pinned = frozenset()
    _apply()


# --- the hooks (each called as `if trace.ON: trace.hook(...)`; none raises) -----------------------------


def datagram_sent(data: bytes, peer: tuple[Any, ...], started: float | None = None, attempt: int = 1) -> None:
    """aio/channel.py sent a PCP, NAT-PMP or STUN request; `started` is its exchange's start on the
    loop's clock (time.monotonic), `attempt` its transmission number."""
    try:
        _tracer.datagram("->", data, peer, time.monotonic(), started=started, attempt=attempt)
    except Exception:
        _tracer.internal_errors += 1


def datagram_received(data: bytes, peer: tuple[Any, ...], now: float | None = None) -> None:
    """aio/channel.py received a datagram (`now` on the loop's clock when it has it)."""
    try:
        _tracer.datagram("<-", data, peer, time.monotonic() if now is None else now)
    except Exception:
        _tracer.internal_errors += 1


def unreachable(peer: tuple[Any, ...] | None, protocol: str | None = None) -> None:
    """An ICMP port unreachable from `peer` (a connected channel; SSDP's error queue)."""
    try:
        if peer is not None:
            _tracer.unreachable(peer, time.monotonic(), protocol)
    except Exception:
        _tracer.internal_errors += 1


def ssdp_sent(data: bytes, peer: tuple[Any, ...]) -> None:
    """aio/ssdp.py sent an M-SEARCH."""
    try:
        _tracer.ssdp("->", data, peer, time.monotonic())
    except Exception:
        _tracer.internal_errors += 1


def ssdp_received(data: bytes, peer: tuple[Any, ...]) -> None:
    """aio/ssdp.py received a datagram (a search response, a NOTIFY, someone else's M-SEARCH)."""
    try:
        _tracer.ssdp("<-", data, peer, time.monotonic())
    except Exception:
        _tracer.internal_errors += 1


def http_sent(
    method: str, url: str, headers: Mapping[str, str], content: bytes, peer: tuple[Any, ...]
) -> HttpToken | None:
    """aio/http.py is sending a request; pass the token to `http_received` or `http_failed`."""
    try:
        return _tracer.http_request(method, url, headers, content, peer, time.monotonic())
    except Exception:
        _tracer.internal_errors += 1
        return None


def http_received(token: HttpToken | None, status: int, body: bytes) -> None:
    try:
        if token is not None:
            _tracer.http_reply(token, status, body, time.monotonic())
    except Exception:
        _tracer.internal_errors += 1


def http_failed(token: HttpToken | None, error: BaseException) -> None:
    try:
        if token is not None:
            _tracer.http_error(token, error, time.monotonic())
    except Exception:
        _tracer.internal_errors += 1


def sip_sent(message: object, transport: str, peer: tuple[Any, ...]) -> None:
    """service/transport.py sent a SIP message."""
    try:
        _tracer.sip("->", message, transport, peer, time.monotonic())
    except Exception:
        _tracer.internal_errors += 1


def sip_received(item: object, transport: str, peer: tuple[Any, ...]) -> None:
    """service/transport.py received a datagram (raw bytes), a framed message, or a framing error."""
    try:
        _tracer.sip("<-", item, transport, peer, time.monotonic())
    except Exception:
        _tracer.internal_errors += 1
