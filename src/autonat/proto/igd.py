"""UPnP IGD descriptions, SOAP control and WANIPConnection actions, sans-IO.

Covers the description step of UPnP Device Architecture 1.1 §2 (device and service descriptions),
the SOAP control step of §3.2 (request envelopes, responses, faults), and the actions of the
WANIPConnection service of IGD:1 and IGD:2 (WANIPConnection:1 and :2 service specs) that a port
mapping client needs; WANPPPConnection:1 shares those actions and their arguments.

The router is untrusted input. Every document goes through defusedxml with DTDs, entities and
external references forbidden (a gateway has no business sending any of them, and they are how the
billion-laughs and XXE attacks work), after a size check that happens before a single byte is
parsed. Element names are matched on their local part, case-sensitively as the specs spell them,
whatever namespace the router used or forgot. Every URL a description hands us must stay on the
scheme, host and port the description itself came from, so a router cannot point the client at
some other machine. Free text from the router (names, descriptions) has control characters
removed, so it can be logged or printed without letting the router write to a terminal.

Every `parse_*` and `*_from` function takes untrusted input and either returns a typed value or
raises `DecodeError` with a one-line reason; `parse_soap_response` may also raise `UpnpError`, the
router's well-formed refusal of an action.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Address
from urllib.parse import urljoin, urlsplit, urlunsplit
from xml.etree.ElementTree import Element, ParseError

import defusedxml
from defusedxml import ElementTree as DefusedET

from autonat.proto.errors import DecodeError
from autonat.proto.types import Transport

__all__ = [
    "CONNECTION_SERVICE_RANKING",
    "ERROR_NAMES",
    "MAX_DESCRIPTION_LENGTH",
    "MAX_DESCRIPTION_SIZE",
    "MAX_DEVICES",
    "MAX_DEVICE_DEPTH",
    "MAX_SERVICES",
    "MAX_SOAP_SIZE",
    "SOAP_ENCODING",
    "SOAP_ENVELOPE",
    "Device",
    "DeviceDescription",
    "PortMappingEntry",
    "Service",
    "SoapRequest",
    "StatusInfo",
    "UpnpError",
    "add_port_mapping",
    "delete_port_mapping",
    "external_ip_from",
    "generic_entry_from",
    "get_external_ip_address",
    "get_generic_port_mapping_entry",
    "get_list_of_port_mappings",
    "get_specific_port_mapping_entry",
    "get_status_info",
    "parse_device_description",
    "parse_scpd",
    "parse_soap_response",
    "port_listing_from",
    "reserved_port_from",
    "sanitize_description",
    "specific_entry_from",
    "status_info_from",
]

MAX_DESCRIPTION_SIZE = 256 * 1024
"""Largest device description or SCPD we parse; miniupnpd's are under 10 KiB."""

MAX_SOAP_SIZE = 64 * 1024
"""Largest SOAP response (and embedded port listing) we parse."""

MAX_DEVICE_DEPTH = 16
"""Nesting levels of devices, root included; an IGD uses three (IGD > WANDevice > WANConnectionDevice)."""

MAX_SERVICES = 64
MAX_DEVICES = 64

MAX_DESCRIPTION_LENGTH = 64
"""Port mapping descriptions are cut to this many UTF-8 bytes: miniupnpd reads them back into a
64-byte buffer (`char desc[64]` in its upnpsoap.c), so a longer one comes back cut and would no longer
carry our tag whole (docs/QUIRKS.md U6)."""

SOAP_ENVELOPE = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"

CONNECTION_SERVICE_RANKING: tuple[str, ...] = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
    "urn:dslforum-org:service:WANIPConnection:1",
    "urn:dslforum-org:service:WANPPPConnection:1",
)
"""WAN connection service types, best first: IGD:2's WANIPConnection adds AddAnyPortMapping and
GetListOfPortMappings; the dslforum (TR-064) types are the last resort."""

_RANK = {service_type.lower(): rank for rank, service_type in enumerate(CONNECTION_SERVICE_RANKING)}
_MAX_U16 = 0xFFFF
_MAX_U32 = 0xFFFF_FFFF
_MAX_TEXT = 256
_XML_WHITESPACE = " \t\r\n"
# Element content escapes for the request body; CR is escaped too, because XML parsers turn a raw
# CR into LF and the router would otherwise see a different value than the caller passed.
_ESCAPES = {'"': "&quot;", "'": "&apos;", "\r": "&#13;"}


def escape(text: str, entities: Mapping[str, str] = _ESCAPES) -> str:
    """Element content escaping, as `xml.sax.saxutils.escape` does it (& first, then < and >, then
    `entities`), without importing xml.sax, which pulls in urllib.request, http.client and email."""
    text = text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")
    for char, entity in entities.items():
        text = text.replace(char, entity)
    return text


# --- XML and text helpers -------------------------------------------------------------------------


def _parse_xml(data: bytes, what: str, limit: int) -> Element:
    """Parse untrusted XML with every DTD feature forbidden, after the size check."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"{what} is not bytes")
    if len(data) > limit:
        raise DecodeError(f"{what} is {len(data)} bytes, over the {limit} byte limit")
    try:
        return DefusedET.fromstring(bytes(data), forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden:
        raise DecodeError(f"{what} contains a DTD") from None
    except defusedxml.EntitiesForbidden:
        raise DecodeError(f"{what} declares entities") from None
    except defusedxml.DefusedXmlException:
        raise DecodeError(f"{what} uses a forbidden XML feature") from None
    except ParseError:
        raise DecodeError(f"{what} is not well-formed XML") from None
    except (ValueError, LookupError, UnicodeError, OverflowError):
        # expat reports unknown encodings and some malformed declarations this way.
        raise DecodeError(f"{what} is not readable XML") from None


def _local(element: Element) -> str:
    tag = element.tag
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _children(element: Element, name: str) -> Iterator[Element]:
    return (child for child in element if _local(child) == name)


def _child(element: Element, name: str) -> Element | None:
    return next(_children(element, name), None)


def _text(element: Element | None) -> str:
    if element is None or element.text is None:
        return ""
    return element.text.strip(_XML_WHITESPACE)


def _child_text(element: Element, name: str) -> str:
    return _text(_child(element, name))


def _clean(text: str, limit: int = _MAX_TEXT) -> str:
    """Router free text made safe to print: no control or format characters, at most `limit` chars."""
    return "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf", "Cs"))[:limit]


# XML 1.0 §2.2 Char production: no C0 controls but tab/LF/CR, no surrogates, no U+FFFE/U+FFFF.
_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_NOT_IN_SERVICE_TYPE = re.compile('[\x00-\x20\x7f"<>&#\\\\]')


def _xml_char_ok(char: str) -> bool:
    return _NOT_XML_CHAR.match(char) is None


# --- device description (§2.3) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Service:
    """One `<service>` of a device (§2.3). URLs are absolute, resolved and origin-checked; a URL the
    router did not give is ""."""

    service_type: str
    service_id: str
    control_url: str
    scpd_url: str
    event_sub_url: str


@dataclass(frozen=True, slots=True)
class Device:
    """One `<device>` (§2.3) with its services and embedded devices, in document order."""

    device_type: str
    friendly_name: str
    manufacturer: str
    model_name: str
    model_number: str
    udn: str
    services: tuple[Service, ...]
    devices: tuple[Device, ...]


@dataclass(frozen=True, slots=True)
class DeviceDescription:
    """A parsed root description. `url_base` is the base every relative URL was resolved against:
    URLBase when the document had one, else the URL it was fetched from."""

    root: Device
    url_base: str

    def all_services(self) -> tuple[Service, ...]:
        """Every service, depth first: a device's own services, then each embedded device's."""
        found: list[Service] = []
        stack = [self.root]
        while stack:
            device = stack.pop()
            found.extend(device.services)
            stack.extend(reversed(device.devices))
        return tuple(found)

    def connection_services(self) -> tuple[Service, ...]:
        """The WAN connection services, best first per `CONNECTION_SERVICE_RANKING` (ties keep
        document order). Service types are compared case-insensitively (defensive, no router named yet:
        docs/QUIRKS.md). Several WAN services on one IGD: docs/QUIRKS.md U12."""
        ranked = [
            (_RANK[service.service_type.lower()], index, service)
            for index, service in enumerate(self.all_services())
            if service.service_type.lower() in _RANK
        ]
        return tuple(service for _, _, service in sorted(ranked, key=lambda item: item[:2]))


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    netloc: str

    @classmethod
    def of(cls, url: str, what: str) -> _Origin:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise DecodeError(f"{what} is not a valid URL") from None
        if parts.scheme.lower() != "http":
            raise DecodeError(f"{what} is not an http URL")
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise DecodeError(f"{what} must not carry user info")
        if not parts.hostname:
            raise DecodeError(f"{what} has no host")
        return cls("http", parts.hostname.lower(), 80 if port is None else port, parts.netloc)


def _check_url_text(url: str, what: str) -> None:
    if len(url) > _MAX_TEXT * 4 or not url.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise DecodeError(f"{what} contains characters not allowed in a URL")
    if "\\" in url:
        # Some HTTP stacks read a backslash as a slash and some do not: a way to split host parsing.
        raise DecodeError(f"{what} contains a backslash")


class _Resolver:
    """Resolves a description's URLs against its base and keeps them on the description's origin."""

    def __init__(self, description_url: str, url_base: str) -> None:
        self.origin = _Origin.of(description_url, "description URL")
        self.base = description_url
        if url_base:
            self.base = self.resolve(url_base, "URLBase")

    def resolve(self, reference: str, what: str) -> str:
        _check_url_text(reference, what)
        try:
            joined = urljoin(self.base, reference)
        except ValueError:
            raise DecodeError(f"{what} is not a valid URL") from None
        origin = _Origin.of(joined, what)
        if (origin.scheme, origin.host, origin.port) != (
            self.origin.scheme,
            self.origin.host,
            self.origin.port,
        ):
            raise DecodeError(f"{what} leaves the description's host ({origin.host}:{origin.port})")
        parts = urlsplit(joined)
        # Rebuilt on the description's own netloc, so the host text is exactly the one validated.
        return urlunsplit(("http", self.origin.netloc, parts.path or "/", parts.query, ""))


class _DeviceParser:
    def __init__(self, resolver: _Resolver) -> None:
        self.resolver = resolver
        self.services = 0
        self.devices = 0

    def device(self, element: Element, depth: int) -> Device:
        if depth > MAX_DEVICE_DEPTH:
            raise DecodeError(f"device description nests devices deeper than {MAX_DEVICE_DEPTH} levels")
        self.devices += 1
        if self.devices > MAX_DEVICES:
            raise DecodeError(f"device description has more than {MAX_DEVICES} devices")
        services: list[Service] = []
        for service_list in _children(element, "serviceList"):
            services.extend(self.service(node) for node in _children(service_list, "service"))
        devices: list[Device] = []
        for device_list in _children(element, "deviceList"):
            devices.extend(self.device(node, depth + 1) for node in _children(device_list, "device"))
        return Device(
            device_type=_clean(_child_text(element, "deviceType")),
            friendly_name=_clean(_child_text(element, "friendlyName")),
            manufacturer=_clean(_child_text(element, "manufacturer")),
            model_name=_clean(_child_text(element, "modelName")),
            model_number=_clean(_child_text(element, "modelNumber")),
            udn=_clean(_child_text(element, "UDN")),
            services=tuple(services),
            devices=tuple(devices),
        )

    def service(self, element: Element) -> Service:
        self.services += 1
        if self.services > MAX_SERVICES:
            raise DecodeError(f"device description has more than {MAX_SERVICES} services")
        service_type = _child_text(element, "serviceType")
        if not service_type:
            raise DecodeError("device description has a service without serviceType")
        _check_url_text(service_type, "serviceType")
        urls = {}
        for name in ("controlURL", "SCPDURL", "eventSubURL"):
            reference = _child_text(element, name)
            urls[name] = self.resolver.resolve(reference, name) if reference else ""
        if service_type.lower() in _RANK and not urls["controlURL"]:
            raise DecodeError(f"connection service {service_type} has no controlURL")
        return Service(
            service_type=service_type,
            service_id=_clean(_child_text(element, "serviceId")),
            control_url=urls["controlURL"],
            scpd_url=urls["SCPDURL"],
            event_sub_url=urls["eventSubURL"],
        )


def parse_device_description(data: bytes, description_url: str) -> DeviceDescription:
    """Decode a root device description (§2.3) fetched from `description_url`.

    `description_url` should be the `Location.url` that passed `ssdp.validate_location`. controlURL,
    SCPDURL and eventSubURL are resolved against URLBase if present (it is deprecated in UDA 1.1 but
    IGD:1 routers still send it), else against `description_url`, and each must keep the scheme,
    host and port of `description_url`; URLBase itself too. serviceType is required for every
    service; controlURL for every WAN connection service. Limits: `MAX_DESCRIPTION_SIZE` bytes,
    `MAX_DEVICE_DEPTH` levels, `MAX_DEVICES` devices, `MAX_SERVICES` services.
    """
    root = _parse_xml(data, "device description", MAX_DESCRIPTION_SIZE)
    if _local(root) != "root":
        raise DecodeError(f"device description root is <{_clean(_local(root), 40)}>, not <root>")
    device = _child(root, "device")
    if device is None:
        raise DecodeError("device description has no <device>")
    if not isinstance(description_url, str):
        raise DecodeError("description URL is not a string")
    _check_url_text(description_url, "description URL")
    resolver = _Resolver(description_url, _child_text(root, "URLBase"))
    return DeviceDescription(root=_DeviceParser(resolver).device(device, 1), url_base=resolver.base)


def parse_scpd(data: bytes) -> frozenset[str]:
    """The action names of a service description (§2.5), e.g. to learn whether AddAnyPortMapping or
    GetListOfPortMappings exists before calling it."""
    root = _parse_xml(data, "service description", MAX_DESCRIPTION_SIZE)
    if _local(root) != "scpd":
        raise DecodeError(f"service description root is <{_clean(_local(root), 40)}>, not <scpd>")
    names: set[str] = set()
    for action_list in _children(root, "actionList"):
        for action in _children(action_list, "action"):
            name = _child_text(action, "name")
            if name:
                names.add(_clean(name))
    return frozenset(names)


# --- SOAP (§3.2) ----------------------------------------------------------------------------------


def _check_name(value: str, what: str) -> None:
    # Action and argument names become element names: XML name characters only, no prefix.
    if not _plain_name(value):
        raise ValueError(f"{what} must be a plain XML name, not {value!r}")


# Names and service types come from the code, a handful each: each is judged once (lru_cache), not on
# every request.
@lru_cache(maxsize=256)
def _plain_name(value: str) -> bool:
    return bool(value) and value.isascii() and value.replace("_", "a").isalnum() and not value[0].isdigit()


@lru_cache(maxsize=256)
def _sendable_service_type(value: str) -> bool:
    return bool(value) and value.isascii() and _NOT_IN_SERVICE_TYPE.search(value) is None


# Element content that needs no escaping (the usual argument: a number, an address, a plain description).
_NEEDS_ESCAPE = re.compile("[&<>\"'\r]")


@dataclass(frozen=True, slots=True)
class SoapRequest:
    """One control action (§3.2): POST `body()` with `headers()` to the service's controlURL.

    `arguments` are sent in the given order: the specs fix the order (UPnP DA 1.1 §3.2.1), and a
    router reading them by position would be helped too (defensive, no router named: docs/QUIRKS.md).
    ValueError for names, service types or values that cannot be sent
    (caller bugs, not router input).
    """

    action: str
    service_type: str
    arguments: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.action, "action")
        st = self.service_type
        if not _sendable_service_type(st):
            raise ValueError(f"service_type cannot be sent in a SOAPAction header: {st!r}")
        for name, value in self.arguments:
            _check_name(name, "argument name")
            if not isinstance(value, str) or _NOT_XML_CHAR.search(value):
                raise ValueError(f"argument {name} has characters XML cannot carry: {value!r}")

    @property
    def soap_action(self) -> str:
        """The SOAPAction header value, double quotes included as §3.2 requires."""
        return f'"{self.service_type}#{self.action}"'

    def headers(self) -> dict[str, str]:
        """Content-Type and SOAPAction (§3.2); the HTTP layer adds Host and Content-Length."""
        return {"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": self.soap_action}

    def body(self) -> bytes:
        """The SOAP envelope of §3.2, UTF-8, on one line, as miniupnpc and libplum send it (against
        indentation a router might mis-parse; defensive, no router named: docs/QUIRKS.md). The
        envelope around the arguments is built once per action and service type."""
        head, tail = _envelope(self.action, self.service_type)
        if not self.arguments:
            return head + tail
        needs = _NEEDS_ESCAPE.search
        arguments = "".join(
            f"<{name}>{escape(value, _ESCAPES) if needs(value) else value}</{name}>" for name, value in self.arguments
        )
        return head + arguments.encode() + tail


@lru_cache(maxsize=64)
def _envelope(action: str, service_type: str) -> tuple[bytes, bytes]:
    head = (
        '<?xml version="1.0"?>'
        f'<s:Envelope xmlns:s="{SOAP_ENVELOPE}" s:encodingStyle="{SOAP_ENCODING}">'
        f'<s:Body><u:{action} xmlns:u="{service_type}">'
    )
    return head.encode(), f"</u:{action}></s:Body></s:Envelope>".encode()


ERROR_NAMES: Mapping[int, str] = {
    401: "Invalid Action",
    402: "Invalid Args",
    403: "Out of Sync",
    501: "Action Failed",
    600: "Argument Value Invalid",
    601: "Argument Value Out of Range",
    602: "Optional Action Not Implemented",
    603: "Out of Memory",
    604: "Human Intervention Required",
    605: "String Argument Too Long",
    606: "Action not authorized",
    703: "InactiveConnectionStateRequired",
    704: "ConnectionSetupFailed",
    705: "ConnectionSetupInProgress",
    706: "ConnectionNotConfigured",
    707: "DisconnectInProgress",
    708: "InvalidLayer2Address",
    709: "InternetAccessDisabled",
    710: "InvalidConnectionType",
    711: "ConnectionAlreadyTerminated",
    713: "SpecifiedArrayIndexInvalid",
    714: "NoSuchEntryInArray",
    715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry",
    724: "SamePortValuesRequired",
    725: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms",
    730: "PortMappingNotFound",
    731: "ReadOnly",
    732: "WildCardNotPermittedInIntPort",
    733: "InconsistentParameters",
}
"""UPnP error codes: 4xx/5xx/6xx from UDA 1.1 §3.2, 7xx from the WANIPConnection:1/2 specs."""


class UpnpError(Exception):
    """The router refused an action with a UPnP error (§3.2), e.g. 718 ConflictInMappingEntry.

    `description` is the router's errorDescription (control characters removed), or the standard
    name when it sent none. `str()` is one line: `UPnP error 718 (ConflictInMappingEntry)`.
    """

    def __init__(self, code: int, description: str = "") -> None:
        super().__init__(code, description)
        self.code = code
        self.description = description or ERROR_NAMES.get(code, "")

    @property
    def name(self) -> str:
        """The standard name of the code, else the router's description, else "unknown error"."""
        return ERROR_NAMES.get(self.code) or self.description or "unknown error"

    def __str__(self) -> str:
        return f"UPnP error {self.code} ({self.name})"


def _raise_fault(fault: Element) -> None:
    detail = next((el for el in fault.iter() if _local(el) == "UPnPError"), None)
    if detail is None:
        reason = _clean(_child_text(fault, "faultstring"), 80)
        raise DecodeError(f"SOAP fault without UPnPError detail ({reason or 'no faultstring'})")
    code_text = _child_text(detail, "errorCode")
    if not (code_text.isascii() and code_text.isdigit() and len(code_text) <= 6):
        raise DecodeError(f"UPnP errorCode is not a number: {_clean(code_text, 20)!r}")
    raise UpnpError(int(code_text), _clean(_child_text(detail, "errorDescription"), 200))


def parse_soap_response(data: bytes, request: SoapRequest, http_status: int) -> dict[str, str]:
    """The output arguments of `request`'s response (§3.2), or UpnpError for a SOAP fault.

    A fault is honoured whatever the HTTP status (normally 500). Otherwise the status must be 200 and
    the Body must hold `<{action}Response>`; its children map local name to stripped text ("" when
    empty), in document order. The namespace of the response element is not checked, so that a :2
    request answered in the :1 namespace or in none still reads (defensive, no router named yet:
    docs/QUIRKS.md). A repeated output argument is a
    DecodeError: a router that sends two NewExternalIPAddress values has told us nothing.
    """
    if http_status == 200 and type(data) is bytes:
        outputs = _plain_response(data, request.action + "Response")
        if outputs is not None:
            return outputs
    envelope = _parse_xml(data, "SOAP response", MAX_SOAP_SIZE)
    if _local(envelope) != "Envelope":
        raise DecodeError("SOAP response is not an Envelope")
    body = _child(envelope, "Body")
    if body is None:
        raise DecodeError("SOAP response has no Body")
    fault = _child(body, "Fault")
    if fault is not None:
        _raise_fault(fault)
    if http_status != 200:
        raise DecodeError(f"HTTP status {http_status} without a SOAP fault")
    response = _child(body, f"{request.action}Response")
    if response is None:
        raise DecodeError(f"SOAP response has no {request.action}Response")
    return _arguments_of(response, "SOAP response")


# The plainest SOAP reply, miniupnpd's every time, read without a tree: XML 1.0 §2.3 names narrowed to
# ASCII, attribute values free of `<` and `&`, white space as §2.3 S.
_S = rb"[ \t\r\n]"
_PLAIN_NAME = rb"[A-Za-z_][A-Za-z0-9._-]*"
_PLAIN_ATTRIBUTES = (
    rb"(?:" + _S + rb"+[A-Za-z_][A-Za-z0-9._:-]*" + _S + rb"*=" + _S + rb"""*(?:"[^"<&]*"|'[^'<&]*'))*"""
)
_PLAIN_DECLARATION = (
    rb"<\?xml"
    + _S
    + rb"+version"
    + _S
    + rb"*="
    + _S
    + rb"""*(?:"1\.0"|'1\.0')(?:"""
    + _S
    + rb"+encoding"
    + _S
    + rb"*="
    + _S
    + rb"""*(?:"(?:utf-8|UTF-8)"|'(?:utf-8|UTF-8)'))?"""
    + _S
    + rb"*\?>"
)
_PLAIN_REPLY = re.compile(
    rb"(?:"
    + _PLAIN_DECLARATION
    + rb")?"
    + _S
    + rb"*<(?P<envelope>(?:"
    + _PLAIN_NAME
    + rb":)?Envelope)(?P<ea>"
    + _PLAIN_ATTRIBUTES
    + rb")"
    + _S
    + rb"*>"
    + _S
    + rb"*<(?P<body>(?:"
    + _PLAIN_NAME
    + rb":)?Body)(?P<ba>"
    + _PLAIN_ATTRIBUTES
    + rb")"
    + _S
    + rb"*>"
    + _S
    + rb"*<(?P<response>(?:"
    + _PLAIN_NAME
    + rb":)?"
    + _PLAIN_NAME
    + rb")(?P<ra>"
    + _PLAIN_ATTRIBUTES
    + rb")"
    + _S
    + rb"*(?:/>|>(?P<children>[^&]*?)</(?P=response)"
    + _S
    + rb"*>)"
    + _S
    + rb"*</(?P=body)"
    + _S
    + rb"*>"
    + _S
    + rb"*</(?P=envelope)"
    + _S
    + rb"*>"
    + _S
    + rb"*"
)
_PLAIN_CHILD = re.compile(
    _S + rb"*<(" + _PLAIN_NAME + rb")" + _S + rb"*(?:/>|>([^<\r]*)</\1" + _S + rb"*>)" + _S + rb"*"
)
_PLAIN_ATTRIBUTE = re.compile(rb"([A-Za-z0-9._:-]+)" + _S + rb"*=" + _S + rb"""*(?:"([^"]*)"|'([^']*)')""")


def _plain_response(data: bytes, element: str) -> dict[str, str] | None:
    """The out arguments of the plainest reply (§3.2.2), exactly as `parse_soap_response` reads them from
    the tree, or None for anything else (which the tree parser then reads, or refuses).

    Plainest: ASCII with no `<!` (so no DOCTYPE, hence none of what defusedxml guards against, XML 1.0
    §2.8), no `&`, no comment or processing instruction but a version 1.0 UTF-8 declaration; Envelope >
    Body > `element`, each alone, every prefix bound (Namespaces in XML §5), no attribute twice; the
    children unprefixed elements with text only (no `\r`, which XML reads as `\n`) and distinct names,
    or none (`<u:AddPortMappingResponse .../>`, miniupnpd's answer to AddPortMapping).
    Why: on the warm path with cold caches (bench/peers.py interleaves processes) a tree parse cost
    ~115 us of a ~0.38 ms call, this ~13 us, and ~3 us once the router's envelope is known (`_KNOWN`);
    the same reply as the last one is a comparison.
    tests/unit/test_igd_plain_reply.py holds it to the tree."""
    known = _KNOWN.get(element)
    if known is not None and data == known[2]:  # the very reply read last time (GetExternalIPAddress's often is)
        return dict(known[3])
    if b"<!" in data or not data.isascii():
        return None
    if known is not None:
        before, after = known[0], known[1]
        if (
            after is not None
            and data.startswith(before)
            and data.endswith(after)
            and len(data) >= len(before) + len(after)
        ):
            # The same envelope as a reply read in full before: only the children are new. Equal bytes
            # around them match the full pattern the same way (the children cannot hold the closing tags:
            # they parse as unprefixed elements with text only), so the full reading gives what this does.
            known_outputs = _plain_children(data[len(before) : len(data) - len(after)])
            if known_outputs is not None:
                _KNOWN[element] = (before, after, data, known_outputs)
                return dict(known_outputs)
    match = _PLAIN_REPLY.fullmatch(data)
    if match is None or match["response"].rpartition(b":")[2] != element.encode():
        return None
    bound: set[bytes] = set()  # prefixes in scope: the outer elements' and its own
    for tag, attributes in (
        (match["envelope"], match["ea"]),
        (match["body"], match["ba"]),
        (match["response"], match["ra"]),
    ):
        if attributes and not _plain_attributes(attributes, bound):
            return None
        prefix, colon, _ = tag.partition(b":")
        if colon and prefix not in bound:
            return None  # unbound: the tree parser's to refuse
    children = match["children"]
    tail: bytes | None
    if children is None:  # <response/>: no out arguments
        outputs: dict[str, str] = {}
        head, tail = data, None
    else:
        read = _plain_children(children)
        if read is None:
            return None
        outputs = read
        head, tail = data[: match.start("children")], data[match.end("children") :]
    if len(_KNOWN) >= MAX_KNOWN_ENVELOPES:
        _KNOWN.clear()
    _KNOWN[element] = (head, tail, data, outputs)
    return dict(outputs)


MAX_KNOWN_ENVELOPES = 32  # distinct response elements remembered; a client uses a handful
# element -> (bytes before the children, bytes after them, the last reply read, its outputs): the envelope of
# the last reply `_plain_response` read in full, None after it for one without children (`<response/>`),
# where only the same bytes take the short way. Callers get copies of the outputs: they are theirs to change.
_KNOWN: dict[str, tuple[bytes, bytes | None, bytes, dict[str, str]]] = {}


def _plain_children(children: bytes) -> dict[str, str] | None:
    """The children of a plain reply's response element, name -> text, or None if they are not plain
    (a reference, `&`, is the tree parser's to read)."""
    if b"&" in children:
        return None
    outputs: dict[str, str] = {}
    position, end = 0, len(children)
    while position < end:
        child = _PLAIN_CHILD.match(children, position)
        if child is None:
            return None
        name = child[1].decode()
        if name in outputs:
            return None  # the tree parser says which argument repeats
        outputs[name] = (child[2] or b"").decode().strip(_XML_WHITESPACE)
        position = child.end()
    return outputs


def _plain_attributes(attributes: bytes, bound: set[bytes]) -> bool:
    """One element's attributes: each local name once whatever the prefix, at most one colon, every prefix
    bound (here or by an outer element), no empty or reserved binding. Adds its bindings to `bound`."""
    pairs = _PLAIN_ATTRIBUTE.findall(attributes)
    locals_ = [name.rpartition(b":")[2] for name, _, _ in pairs]
    if len(set(locals_)) != len(locals_):
        return False
    for name, double, single in pairs:
        if name.count(b":") > 1:
            return False
        if name.startswith(b"xmlns:"):
            if not (double or single) or name[6:] in (b"xml", b"xmlns"):
                return False
            bound.add(name[6:])
    return all(name.partition(b":")[0] in bound for name, _, _ in pairs if b":" in name and name[:6] != b"xmlns:")


def _arguments_of(element: Element, what: str) -> dict[str, str]:
    arguments: dict[str, str] = {}
    for child in element:
        name = _local(child)
        if name in arguments:
            raise DecodeError(f"{what} repeats {_clean(name, 40)}")
        arguments[name] = _text(child)
    return arguments


# --- strict value parsing -------------------------------------------------------------------------


def _number(text: str, what: str, low: int, high: int) -> int:
    # isdigit alone accepts superscripts and other scripts' digits; routers send ASCII or garbage.
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or not low <= int(text) <= high:
        raise DecodeError(f"{what} is not an integer in {low}..{high}: {_clean(text, 20)!r}")
    return int(text)


def _transport(text: str) -> Transport:
    try:
        return Transport.parse(text)
    except ValueError:
        raise DecodeError(f"protocol is neither UDP nor TCP: {_clean(text, 20)!r}") from None


def _boolean(text: str, what: str) -> bool:
    # UDA 1.1 §2.5 boolean: 0/1, false/true, no/yes.
    value = text.lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise DecodeError(f"{what} is not a boolean: {_clean(text, 20)!r}")


def _required(outputs: Mapping[str, str], name: str) -> str:
    value = outputs.get(name)
    if value is None:
        raise DecodeError(f"response has no {name}")
    return value


# --- actions --------------------------------------------------------------------------------------


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, not {value!r}")


def _protocol(transport: Transport) -> str:
    # Upper case always: TP-Link ER605 rejects "udp" (docs/QUIRKS.md U7).
    if not isinstance(transport, Transport):
        raise ValueError(f"transport must be a Transport, not {transport!r}")
    return transport.value.upper()


def get_external_ip_address(service_type: str) -> SoapRequest:
    """GetExternalIPAddress (WANIPConnection:1 and :2); read the result with `external_ip_from`."""
    return SoapRequest("GetExternalIPAddress", service_type)


def external_ip_from(outputs: Mapping[str, str]) -> IPv4Address | None:
    """NewExternalIPAddress; None when empty, missing or 0.0.0.0: routers without a WAN address say so
    (miniupnpd behind another NAT answers empty; FreeSWITCH and Tailscale met 0.0.0.0: docs/QUIRKS.md
    U8). Anything else that is not an IPv4 address is a DecodeError."""
    text = outputs.get("NewExternalIPAddress", "")
    if not text:
        return None
    try:
        address = _ipv4_of_text(text)
    except ValueError:
        raise DecodeError(f"NewExternalIPAddress is not an IPv4 address: {_clean(text, 40)!r}") from None
    return None if address.is_unspecified else address


# A router's answer rarely changes, and making an IPv4Address from text is the dearest step of reading it:
# the last few are kept (an address is immutable; text that is no address raises, and is not kept).
_ipv4_of_text = lru_cache(maxsize=8)(IPv4Address)


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """GetStatusInfo outputs (WANIPConnection:1 and :2); `uptime` in seconds, None when absent."""

    connection_status: str
    last_connection_error: str
    uptime: int | None


def get_status_info(service_type: str) -> SoapRequest:
    """GetStatusInfo; read the result with `status_info_from`."""
    return SoapRequest("GetStatusInfo", service_type)


def status_info_from(outputs: Mapping[str, str]) -> StatusInfo:
    """Connection status (e.g. "Connected"), last error (e.g. "ERROR_NONE") and uptime (ui4).

    The uptime is `NewUptime` (WANIPConnection:1 §2.4.14), or `NewUpTime` as the legacy DSL Forum
    (TR-064, `urn:dslforum-org`) services spell it (docs/QUIRKS.md U13; Tailscale `legacy_upnp.go`)."""
    uptime_text = outputs.get("NewUptime", "") or outputs.get("NewUpTime", "")
    return StatusInfo(
        connection_status=_clean(outputs.get("NewConnectionStatus", ""), 64),
        last_connection_error=_clean(outputs.get("NewLastConnectionError", ""), 64),
        uptime=_number(uptime_text, "NewUptime", 0, _MAX_U32) if uptime_text else None,
    )


def sanitize_description(text: str) -> str:
    """A port mapping description routers accept: control and non-XML characters removed, trimmed,
    at most `MAX_DESCRIPTION_LENGTH` UTF-8 bytes without splitting a character."""
    if text.isascii() and text.isprintable():
        kept = text.strip()  # printable ASCII: every character an XML Char, none Cc or Cf (the usual case)
    else:
        kept = "".join(c for c in text if _xml_char_ok(c) and unicodedata.category(c) not in ("Cc", "Cf"))
        kept = kept.strip()
    encoded = kept.encode("utf-8")[:MAX_DESCRIPTION_LENGTH]
    return encoded.decode("utf-8", errors="ignore").strip()


def _mapping_arguments(
    *,
    external_port: int,
    transport: Transport,
    internal_port: int,
    internal_client: str,
    description: str,
    lease: int,
    remote_host: str,
    enabled: bool,
) -> tuple[tuple[str, str], ...]:
    _check_range("external_port", external_port, 0, _MAX_U16)
    _check_range("internal_port", internal_port, 1, _MAX_U16)
    _check_range("lease", lease, 0, _MAX_U32)
    if not isinstance(internal_client, str) or not internal_client:
        raise ValueError("internal_client must be a non-empty string")
    return (
        ("NewRemoteHost", remote_host),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", _protocol(transport)),
        ("NewInternalPort", str(internal_port)),
        ("NewInternalClient", internal_client),
        ("NewEnabled", "1" if enabled else "0"),
        ("NewPortMappingDescription", sanitize_description(description)),
        ("NewLeaseDuration", str(lease)),
    )


def add_port_mapping(
    service_type: str,
    *,
    external_port: int,
    transport: Transport,
    internal_port: int,
    internal_client: str,
    description: str,
    lease: int,
    remote_host: str = "",
    enabled: bool = True,
    any_port: bool = False,
) -> SoapRequest:
    """AddPortMapping (WANIPConnection:1 and :2), or with `any_port` AddAnyPortMapping (IGD:2 only),
    where the router picks another external port instead of failing (read it with
    `reserved_port_from`). `lease` 0 asks for a permanent mapping (IGD:2 routers may answer 725
    OnlyPermanentLeasesSupported the other way round); `remote_host` "" is the wildcard. The
    description is passed through `sanitize_description`."""
    arguments = _mapping_arguments(
        external_port=external_port,
        transport=transport,
        internal_port=internal_port,
        internal_client=internal_client,
        description=description,
        lease=lease,
        remote_host=remote_host,
        enabled=enabled,
    )
    return SoapRequest("AddAnyPortMapping" if any_port else "AddPortMapping", service_type, arguments)


def reserved_port_from(outputs: Mapping[str, str]) -> int:
    """NewReservedPort of AddAnyPortMapping: the external port actually mapped (1..65535)."""
    return _number(_required(outputs, "NewReservedPort"), "NewReservedPort", 1, _MAX_U16)


def delete_port_mapping(
    service_type: str, *, external_port: int, transport: Transport, remote_host: str = ""
) -> SoapRequest:
    """DeletePortMapping (WANIPConnection:1 and :2)."""
    return SoapRequest("DeletePortMapping", service_type, _mapping_key(external_port, transport, remote_host))


def _mapping_key(external_port: int, transport: Transport, remote_host: str) -> tuple[tuple[str, str], ...]:
    """The three arguments that name one mapping (remote host, external port, protocol), in spec order."""
    _check_range("external_port", external_port, 0, _MAX_U16)
    return (
        ("NewRemoteHost", remote_host),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", _protocol(transport)),
    )


@dataclass(frozen=True, slots=True)
class PortMappingEntry:
    """One port mapping as the router reports it; `lease_duration` 0 means permanent."""

    remote_host: str
    external_port: int
    transport: Transport
    internal_port: int
    internal_client: str
    enabled: bool
    description: str
    lease_duration: int


def get_specific_port_mapping_entry(
    service_type: str, *, external_port: int, transport: Transport, remote_host: str = ""
) -> SoapRequest:
    """GetSpecificPortMappingEntry (WANIPConnection:1 and :2); read with `specific_entry_from`."""
    return SoapRequest("GetSpecificPortMappingEntry", service_type, _mapping_key(external_port, transport, remote_host))


def _entry(
    outputs: Mapping[str, str],
    *,
    remote_host: str,
    external_port: int,
    transport: Transport,
    description_key: str,
    lease_key: str,
) -> PortMappingEntry:
    # Optional fields default the way the spec's defaults read: enabled, no description, permanent.
    enabled_text = outputs.get("NewEnabled", "")
    lease_text = outputs.get(lease_key, "")
    return PortMappingEntry(
        remote_host=_clean(remote_host),
        external_port=external_port,
        transport=transport,
        internal_port=_number(_required(outputs, "NewInternalPort"), "NewInternalPort", 0, _MAX_U16),
        internal_client=_clean(_required(outputs, "NewInternalClient")),
        enabled=_boolean(enabled_text, "NewEnabled") if enabled_text else True,
        description=_clean(outputs.get(description_key, "")),
        lease_duration=_number(lease_text, lease_key, 0, _MAX_U32) if lease_text else 0,
    )


def specific_entry_from(
    outputs: Mapping[str, str], external_port: int, transport: Transport, *, remote_host: str = ""
) -> PortMappingEntry:
    """GetSpecificPortMappingEntry outputs as an entry; the key fields come from the request, since
    the response does not repeat them."""
    return _entry(
        outputs,
        remote_host=remote_host,
        external_port=external_port,
        transport=transport,
        description_key="NewPortMappingDescription",
        lease_key="NewLeaseDuration",
    )


def get_generic_port_mapping_entry(service_type: str, index: int) -> SoapRequest:
    """GetGenericPortMappingEntry (WANIPConnection:1 and :2): the `index`-th mapping; the router
    answers 713 SpecifiedArrayIndexInvalid past the end. Read with `generic_entry_from`."""
    _check_range("index", index, 0, _MAX_U16)
    return SoapRequest("GetGenericPortMappingEntry", service_type, (("NewPortMappingIndex", str(index)),))


def generic_entry_from(outputs: Mapping[str, str]) -> PortMappingEntry:
    """GetGenericPortMappingEntry outputs as an entry."""
    return _entry(
        outputs,
        remote_host=outputs.get("NewRemoteHost", ""),
        external_port=_number(_required(outputs, "NewExternalPort"), "NewExternalPort", 0, _MAX_U16),
        transport=_transport(_required(outputs, "NewProtocol")),
        description_key="NewPortMappingDescription",
        lease_key="NewLeaseDuration",
    )


def get_list_of_port_mappings(
    service_type: str,
    *,
    start_port: int = 0,
    end_port: int = 65535,
    transport: Transport,
    manage: bool = False,
    count: int = 1000,
) -> SoapRequest:
    """GetListOfPortMappings (IGD:2, WANIPConnection:2 only); read with `port_listing_from`.

    `manage` False lists only this client's mappings, which is what a client cleaning up after
    itself wants; `count` caps the number of entries the router returns (0 means no cap).
    """
    _check_range("start_port", start_port, 0, _MAX_U16)
    _check_range("end_port", end_port, 0, _MAX_U16)
    _check_range("count", count, 0, _MAX_U16)
    if start_port > end_port:
        raise ValueError(f"start_port {start_port} is above end_port {end_port}")
    arguments = (
        ("NewStartPort", str(start_port)),
        ("NewEndPort", str(end_port)),
        ("NewProtocol", _protocol(transport)),
        ("NewManage", "1" if manage else "0"),
        ("NewNumberOfPorts", str(count)),
    )
    return SoapRequest("GetListOfPortMappings", service_type, arguments)


def port_listing_from(outputs: Mapping[str, str]) -> list[PortMappingEntry]:
    """The entries of NewPortListing (A_ARG_TYPE_PortListing of WANIPConnection:2): an XML document
    that arrived escaped inside the SOAP response. It is parsed with the same defused parser and size
    cap; an empty listing is an empty list."""
    listing = outputs.get("NewPortListing", "")
    if not listing:
        return []
    root = _parse_xml(listing.encode("utf-8"), "port listing", MAX_SOAP_SIZE)
    if _local(root) != "PortMappingList":
        raise DecodeError("port listing is not a PortMappingList")
    entries: list[PortMappingEntry] = []
    for node in _children(root, "PortMappingEntry"):
        fields = _arguments_of(node, "port listing entry")
        entries.append(
            _entry(
                fields,
                remote_host=fields.get("NewRemoteHost", ""),
                external_port=_number(_required(fields, "NewExternalPort"), "NewExternalPort", 0, _MAX_U16),
                transport=_transport(_required(fields, "NewProtocol")),
                description_key="NewDescription",
                lease_key="NewLeaseTime",
            )
        )
    return entries
