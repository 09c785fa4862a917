"""UPnP IGD:2 IPv6 firewall pinholes (WANIPv6FirewallControl:1), sans-IO.

On IPv6 there is no NAT to map through, but a home router's firewall drops unsolicited inbound traffic.
IGD:2's WANIPv6FirewallControl:1 service (UPnP Forum, 2010) lets a LAN host open a *pinhole*: inbound
traffic to one of its own addresses and ports. This module builds the service's SOAP actions and reads
their answers, on top of the envelope and fault handling of `autonat.proto.igd` (UPnP DA 1.1 §3.2):

- GetFirewallStatus (§2.4.1): is the firewall on, and are inbound pinholes allowed at all;
- GetOutboundPinholeTimeout (§2.4.2): how long the firewall keeps an outbound flow open;
- AddPinhole (§2.4.3): open one, answered with its UniqueID; UpdatePinhole (§2.4.4) renews it by that
  ID, DeletePinhole (§2.4.5) closes it;
- GetPinholePackets (§2.4.6) and CheckPinholeWorking (§2.4.7): does the pinhole still exist (and has
  traffic used it).

The service's error codes reuse numbers that mean other things in WANIPConnection (704 is
"ConnectionSetupFailed" there, "NoSuchEntry" here), so its faults are `PinholeError`s, named from this
service's table. Protocol is the IANA number (17 for UDP, 6 for TCP: §2.3.5, the same numbers PCP uses),
not the `UDP`/`TCP` text of WANIPConnection. LeaseTime is 1..86400 s (§2.3.7), UniqueID 0..65535
(§2.3.8): out-of-range values are caller bugs (ValueError), out-of-range answers router bugs (DecodeError).

Every `*_from` function takes the router's untrusted output arguments and either returns a typed value
or raises `DecodeError` with a one-line reason; `parse_response` may also raise `PinholeError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address

from autonat.proto import igd
from autonat.proto.errors import DecodeError
from autonat.proto.types import Transport, check_range

__all__ = [
    "ERROR_NAMES",
    "MAX_LEASE",
    "SERVICE_TYPE",
    "FirewallStatus",
    "PinholeError",
    "add_pinhole",
    "check_pinhole_working",
    "delete_pinhole",
    "firewall_service",
    "firewall_status_from",
    "get_firewall_status",
    "get_outbound_pinhole_timeout",
    "get_pinhole_packets",
    "is_working_from",
    "outbound_timeout_from",
    "parse_response",
    "pinhole_packets_from",
    "unique_id_from",
    "update_pinhole",
]

SERVICE_TYPE = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
MAX_LEASE = 86400
"""LeaseTime and NewLeaseTime are 1..86400 s (§2.3.7); miniupnpd answers 402 to anything longer."""
MAX_UNIQUE_ID = 0xFFFF
_MAX_U32 = 0xFFFF_FFFF

ERROR_NAMES: Mapping[int, str] = {
    **{code: name for code, name in igd.ERROR_NAMES.items() if code < 700},
    701: "PinholeSpaceExhausted",
    702: "FirewallDisabled",
    703: "InboundPinholeNotAllowed",
    704: "NoSuchEntry",
    705: "ProtocolNotSupported",
    706: "InternalPortWildcardingNotAllowed",
    707: "ProtocolWildcardingNotAllowed",
    708: "WildCardNotPermittedInSrcIP",
    709: "NoTrafficReceived",
}
"""UPnP error codes of WANIPv6FirewallControl:1 (§2.5): the 4xx-6xx of UDA 1.1 §3.2 and the service's own 7xx."""


class PinholeError(igd.UpnpError):
    """The router refused a WANIPv6FirewallControl action: `str()` is `UPnP error 704 (NoSuchEntry)`."""

    def __init__(self, code: int, description: str = "") -> None:
        super().__init__(code, description or ERROR_NAMES.get(code, ""))

    @property
    def name(self) -> str:
        return ERROR_NAMES.get(self.code) or self.description or "unknown error"


def firewall_service(description: igd.DeviceDescription) -> igd.Service | None:
    """The WANIPv6FirewallControl service of a device description (it sits in the WANConnectionDevice,
    beside WANIPConnection:2, on miniupnpd), or None when the IGD has none (IGD:1 devices, or IGD:2
    built without IPv6). Any version of the service type is taken, compared case-insensitively."""
    prefix = SERVICE_TYPE.rsplit(":", 1)[0].lower() + ":"
    for service in description.all_services():
        if service.service_type.lower().startswith(prefix) and service.control_url:
            return service
    return None


def parse_response(data: bytes, request: igd.SoapRequest, http_status: int) -> dict[str, str]:
    """`igd.parse_soap_response`, with a fault raised as the `PinholeError` of this service's table."""
    try:
        return igd.parse_soap_response(data, request, http_status)
    except PinholeError:
        raise
    except igd.UpnpError as error:
        raise PinholeError(error.code, error.description if error.description != error.name else "") from None


# --- values sent --------------------------------------------------------------------------------------


def _protocol(transport: Transport) -> str:
    # §2.3.5: the IANA protocol number, as PCP carries it (RFC 6887 §11.1).
    if not isinstance(transport, Transport):
        raise ValueError(f"transport must be a Transport, not {transport!r}")
    return str(transport.iana_number)


def _host(address: IPv6Address | None, what: str) -> str:
    """An IPv6 address as the service's string arguments carry it; None (RemoteHost only) is the
    wildcard, the empty string (§2.3.1). A zone never leaves the host."""
    if address is None:
        return ""
    if not isinstance(address, IPv6Address):
        raise ValueError(f"{what} must be an IPv6Address, not {address!r}")
    if address.scope_id is not None:
        raise ValueError(f"{what} must not carry a zone: {address}")
    if address.ipv4_mapped is not None or address.is_unspecified or address.is_multicast:
        raise ValueError(f"{what} must be a unicast IPv6 address, not {address}")
    return str(address)


def _tuple_arguments(
    remote_host: IPv6Address | None,
    remote_port: int,
    internal_client: IPv6Address,
    internal_port: int,
    transport: Transport,
) -> tuple[tuple[str, str], ...]:
    check_range("remote_port", remote_port, 0, 0xFFFF)
    check_range("internal_port", internal_port, 1, 0xFFFF)
    return (
        ("RemoteHost", _host(remote_host, "remote_host")),
        ("RemotePort", str(remote_port)),
        ("InternalClient", _host(internal_client, "internal_client")),
        ("InternalPort", str(internal_port)),
        ("Protocol", _protocol(transport)),
    )


def _unique_id(unique_id: int) -> tuple[str, str]:
    check_range("unique_id", unique_id, 0, MAX_UNIQUE_ID)
    return ("UniqueID", str(unique_id))


# --- actions --------------------------------------------------------------------------------------------


def get_firewall_status(service_type: str = SERVICE_TYPE) -> igd.SoapRequest:
    """GetFirewallStatus (§2.4.1); read with `firewall_status_from`."""
    return igd.SoapRequest("GetFirewallStatus", service_type)


@dataclass(frozen=True, slots=True)
class FirewallStatus:
    """GetFirewallStatus: a firewall that is off needs no pinhole; one that allows none cannot open any."""

    enabled: bool
    inbound_pinhole_allowed: bool


def firewall_status_from(outputs: Mapping[str, str]) -> FirewallStatus:
    return FirewallStatus(
        enabled=_boolean(_required(outputs, "FirewallEnabled"), "FirewallEnabled"),
        inbound_pinhole_allowed=_boolean(_required(outputs, "InboundPinholeAllowed"), "InboundPinholeAllowed"),
    )


def get_outbound_pinhole_timeout(
    service_type: str = SERVICE_TYPE,
    *,
    remote_host: IPv6Address | None = None,
    remote_port: int = 0,
    internal_client: IPv6Address,
    internal_port: int,
    transport: Transport,
) -> igd.SoapRequest:
    """GetOutboundPinholeTimeout (§2.4.2): seconds an outbound flow of this 5-tuple stays open without
    traffic; read with `outbound_timeout_from`. (miniupnpd 2.3.1 answers 501: docs/QUIRKS.md U17.)"""
    arguments = _tuple_arguments(remote_host, remote_port, internal_client, internal_port, transport)
    return igd.SoapRequest("GetOutboundPinholeTimeout", service_type, arguments)


def outbound_timeout_from(outputs: Mapping[str, str]) -> int:
    return _number(_required(outputs, "OutboundPinholeTimeout"), "OutboundPinholeTimeout", 0, _MAX_U32)


def add_pinhole(
    service_type: str = SERVICE_TYPE,
    *,
    remote_host: IPv6Address | None = None,
    remote_port: int = 0,
    internal_client: IPv6Address,
    internal_port: int,
    transport: Transport,
    lease: int,
) -> igd.SoapRequest:
    """AddPinhole (§2.4.3): inbound `transport` traffic from `remote_host`:`remote_port` (None and 0:
    anyone) to `internal_client`:`internal_port`, for `lease` s (1..86400). The internal client must be
    the address the request comes from (miniupnpd answers 606 otherwise: docs/QUIRKS.md U16). Read the
    pinhole's UniqueID with `unique_id_from`."""
    check_range("lease", lease, 1, MAX_LEASE)
    arguments = _tuple_arguments(remote_host, remote_port, internal_client, internal_port, transport)
    return igd.SoapRequest("AddPinhole", service_type, (*arguments, ("LeaseTime", str(lease))))


def unique_id_from(outputs: Mapping[str, str]) -> int:
    """AddPinhole's UniqueID (0..65535)."""
    return _number(_required(outputs, "UniqueID"), "UniqueID", 0, MAX_UNIQUE_ID)


def update_pinhole(service_type: str = SERVICE_TYPE, *, unique_id: int, lease: int) -> igd.SoapRequest:
    """UpdatePinhole (§2.4.4): the pinhole's lease starts again at `lease` s; no output arguments."""
    check_range("lease", lease, 1, MAX_LEASE)
    return igd.SoapRequest("UpdatePinhole", service_type, (_unique_id(unique_id), ("NewLeaseTime", str(lease))))


def delete_pinhole(service_type: str = SERVICE_TYPE, *, unique_id: int) -> igd.SoapRequest:
    """DeletePinhole (§2.4.5); no output arguments."""
    return igd.SoapRequest("DeletePinhole", service_type, (_unique_id(unique_id),))


def get_pinhole_packets(service_type: str = SERVICE_TYPE, *, unique_id: int) -> igd.SoapRequest:
    """GetPinholePackets (§2.4.6); read with `pinhole_packets_from`."""
    return igd.SoapRequest("GetPinholePackets", service_type, (_unique_id(unique_id),))


def pinhole_packets_from(outputs: Mapping[str, str]) -> int:
    return _number(_required(outputs, "PinholePackets"), "PinholePackets", 0, _MAX_U32)


def check_pinhole_working(service_type: str = SERVICE_TYPE, *, unique_id: int) -> igd.SoapRequest:
    """CheckPinholeWorking (§2.4.7); read with `is_working_from`. A router that cannot tell answers 709
    NoTrafficReceived, which still says the pinhole exists (miniupnpd 2.3.1: docs/QUIRKS.md U18)."""
    return igd.SoapRequest("CheckPinholeWorking", service_type, (_unique_id(unique_id),))


def is_working_from(outputs: Mapping[str, str]) -> bool:
    return _boolean(_required(outputs, "IsWorking"), "IsWorking")


# --- strict value parsing (the router's answers) ------------------------------------------------------


def _required(outputs: Mapping[str, str], name: str) -> str:
    value = outputs.get(name)
    if value is None:
        raise DecodeError(f"response has no {name}")
    return value


def _number(text: str, what: str, low: int, high: int) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or not low <= int(text) <= high:
        raise DecodeError(f"{what} is not an integer in {low}..{high}: {text[:20]!r}")
    return int(text)


def _boolean(text: str, what: str) -> bool:
    # UDA 1.1 §2.5 boolean: 0/1, false/true, no/yes.
    value = text.lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise DecodeError(f"{what} is not a boolean: {text[:20]!r}")
