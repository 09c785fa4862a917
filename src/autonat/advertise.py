"""Which address a SIP service advertises to each peer: FreeSWITCH's ext-sip-ip / ext-rtp-ip, made exact.

FreeSWITCH's vocabulary is kept, its surprises are not:
- every value means the same whatever order the parameters come in (in FreeSWITCH, AUTO_NAT depends on
  whether ext-rtp-ip was parsed before ext-sip-ip);
- signalling and media are decided separately, each from its own ext value (FreeSWITCH keys the media
  decision off ext-sip-ip);
- a destination is resolved to an IP before it is judged, and an unknown ACL name is an error, never
  a silent "nothing is local".

Values (sofia's `ext-sip-ip` / `ext-rtp-ip`):
- `auto-nat`     the external address the router reports (none until discovery, or with --nonat)
- `autonat:IP`   the router's external address when there is one, else IP
- `auto`         the local address (no separate external one: advertise what we bind)
- `IP`           that address
- `stun:host[:port]`  the reflexive address a STUN server sees (RFC 8489), 3478 by default
- `host:fqdn`    the address a DNS name resolves to
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from autonat.addresses import IPAddress, parse_address, uri_host

DEFAULT_STUN_PORT = 3478
MAX_HOST_LENGTH = 253


class ExtKind(enum.StrEnum):
    AUTO_NAT = "auto-nat"
    AUTONAT_OR = "autonat"  # autonat:IP
    AUTO = "auto"
    IP = "ip"
    STUN = "stun"
    HOST = "host"


@dataclass(frozen=True, slots=True)
class ExtValue:
    """A parsed ext-sip-ip / ext-rtp-ip value."""

    kind: ExtKind
    address: IPAddress | None = None  # IP, or the fallback of autonat:IP
    host: str | None = None  # stun:/host: name (or IP literal)
    port: int | None = None  # stun: port

    @property
    def from_router(self) -> bool:
        """`auto-nat` and `autonat:IP` take the router's external address: the router is ours to map on."""
        return self.kind in (ExtKind.AUTO_NAT, ExtKind.AUTONAT_OR)

    @property
    def needs_lookup(self) -> bool:
        """STUN and DNS values are resolved by I/O (at start and when the network changes)."""
        return self.kind in (ExtKind.STUN, ExtKind.HOST)

    def __str__(self) -> str:
        if self.kind in (ExtKind.AUTO_NAT, ExtKind.AUTO):
            return str(self.kind)
        if self.kind is ExtKind.AUTONAT_OR:
            return f"autonat:{self.address}"
        if self.kind is ExtKind.IP:
            return str(self.address)
        if self.kind is ExtKind.STUN:
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"stun:{host}:{self.port}"
        return f"host:{self.host}"


def _check_host(host: str, text: str) -> str:
    valid = (
        0 < len(host) <= MAX_HOST_LENGTH
        and host.isascii()
        and all(label and len(label) <= 63 for label in host.rstrip(".").split("."))
        and all(c.isalnum() or c in "-._" for c in host)
    )
    if not valid:
        raise ValueError(f"{text!r}: {host!r} is not a host name")
    return host


def parse_ext_value(text: str) -> ExtValue:
    """Parse one value; ValueError with one line for anything else (config loading reports it)."""
    value = text.strip()
    lowered = value.lower()
    if lowered == "auto-nat":
        return ExtValue(ExtKind.AUTO_NAT)
    if lowered == "auto":
        return ExtValue(ExtKind.AUTO)
    if lowered.startswith("autonat:"):
        try:
            return ExtValue(ExtKind.AUTONAT_OR, address=parse_address(value[8:].strip()))
        except ValueError:
            raise ValueError(f"{text!r}: autonat: must be followed by an IP address") from None
    if lowered.startswith("stun:"):
        host, port = split_host_port(value[5:].strip(), DEFAULT_STUN_PORT, text)
        return ExtValue(ExtKind.STUN, host=host, port=port)
    if lowered.startswith("host:"):
        return ExtValue(ExtKind.HOST, host=_check_host(value[5:].strip(), text))
    try:
        return ExtValue(ExtKind.IP, address=parse_address(value))
    except ValueError:
        raise ValueError(
            f"{text!r} is not auto-nat, autonat:IP, auto, an IP address, stun:host[:port] or host:name"
        ) from None


def split_host_port(text: str, default_port: int, original: str) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 literal."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{original!r}: unclosed [ in the address")
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    elif text.count(":") > 1:  # a bare IPv6 literal: no port possible
        host, port_text = text, None
    else:
        host, _, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty or None
    if port_text is None:
        port = default_port
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise ValueError(f"{original!r}: the port must be 1-65535")
    try:
        return str(ip_address(host)), port
    except ValueError:
        return _check_host(host, original), port


@dataclass(frozen=True, slots=True)
class Resolved:
    """What an ext value means right now."""

    address: IPAddress | None
    source: str  # "router", "fallback", "local", "static", "stun", "dns", or why there is none


def resolve(
    value: ExtValue | None,
    *,
    router_external: IPAddress | None,
    local: IPAddress,
    looked_up: IPAddress | None = None,
) -> Resolved:
    """The address an ext value stands for, given the router's external address (None: not found)
    and, for stun:/host: values, the result of their last lookup."""
    if value is None:
        return Resolved(None, "not set")
    if value.kind is ExtKind.AUTO_NAT:
        return Resolved(router_external, "router" if router_external else "no router found (yet)")
    if value.kind is ExtKind.AUTONAT_OR:
        return Resolved(router_external, "router") if router_external else Resolved(value.address, "fallback")
    if value.kind is ExtKind.AUTO:
        return Resolved(local, "local")
    if value.kind is ExtKind.IP:
        return Resolved(value.address, "static")
    source = "stun" if value.kind is ExtKind.STUN else "dns"
    return Resolved(looked_up, source if looked_up else f"{source} lookup pending or failed")


def choose(
    destination: str | IPAddress,
    *,
    local: IPAddress,
    external: IPAddress | None,
    is_local_network: Callable[[IPAddress], bool] | None,
) -> IPAddress:
    """The decision, one function for signalling and media alike: advertise the external address if
    one is set, the destination is not loopback, and it is not in the local-network ACL."""
    peer = parse_address(destination)
    if external is None or peer.is_loopback:
        return local
    if is_local_network is not None and is_local_network(peer):
        return local
    return external


@dataclass(frozen=True, slots=True)
class Addressing:
    """A profile's addressing (sofia's parameter names, in snake case): what it binds and what it advertises.
    Part of the one settings type of a profile, autonat.service.settings.ProfileSettings."""

    sip_ip: IPAddress | None = None  # None: the local address of the route to the router
    rtp_ip: IPAddress | None = None  # None: sip_ip
    sip_port: int = 5060
    tls_sip_port: int | None = None
    ext_sip_ip: ExtValue | None = None
    ext_rtp_ip: ExtValue | None = None
    local_network_acl: str | None = "localnet.auto"  # None: "none", every peer gets the external address


@dataclass(frozen=True, slots=True)
class ProfileStatus:
    """What `sofia status profile NAME` shows, as values; the CLI renders FreeSWITCH's layout (its labels,
    "true"/"false", empty for none) and `--json` is `to_dict()`."""

    name: str
    auto_nat: bool
    rtp_ip: IPAddress
    ext_rtp_ip: IPAddress | None
    sip_ip: IPAddress
    ext_sip_ip: IPAddress | None
    url: str
    bind_url: str
    tls_url: str | None
    tls_bind_url: str | None
    local_network_acl: str | None
    ext_sip_ip_source: str
    ext_rtp_ip_source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            key: (str(value) if isinstance(value, IPv4Address | IPv6Address) else value)
            for key, value in ((f, getattr(self, f)) for f in self.__dataclass_fields__)
        }


def profile_status(
    name: str,
    settings: Addressing,
    *,
    local: IPAddress,
    sip: Resolved,
    rtp: Resolved,
    auto_nat: bool,
) -> ProfileStatus:
    """The fields of `sofia status profile NAME`."""
    sip_ip = settings.sip_ip or local
    rtp_ip = settings.rtp_ip or sip_ip
    advertised = sip.address or sip_ip
    host = uri_host(advertised)
    bind = uri_host(sip_ip)
    tls = settings.tls_sip_port
    return ProfileStatus(
        name=name,
        auto_nat=auto_nat,
        rtp_ip=rtp_ip,
        ext_rtp_ip=rtp.address,
        sip_ip=sip_ip,
        ext_sip_ip=sip.address,
        url=f"sip:mod_sofia@{host}:{settings.sip_port}",
        bind_url=f"sip:mod_sofia@{bind}:{settings.sip_port};transport=udp,tcp",
        tls_url=f"sips:mod_sofia@{host}:{tls}" if tls else None,
        tls_bind_url=f"sips:mod_sofia@{bind}:{tls};transport=tls" if tls else None,
        local_network_acl=settings.local_network_acl,
        ext_sip_ip_source=sip.source,
        ext_rtp_ip_source=rtp.source,
    )
