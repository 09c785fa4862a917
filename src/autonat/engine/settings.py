"""What the NAT engine is told: the `[nat]` table of the config file, and the engine's constructor argument."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from autonat.mapper import DEFAULT_LIFETIME
from autonat.proto.exchange import DEFAULT_DEADLINE

ProtocolName = Literal["auto", "pcp", "natpmp", "upnp"]
PinholeProtocolName = Literal["auto", "pcp", "upnp"]  # NAT-PMP is IPv4 only (RFC 6886 §1)
DEFAULT_UPNP_LEASE: Final = 3600
DEFAULT_MAX_LEASE: Final = 86400  # a day: longer grants are taken as this (a 2**32-1 s lease is a router bug)


@dataclass(frozen=True, slots=True)
class NatSettings:
    """How to find the router and keep mappings on it. Durations are seconds.

    `gateway`, `interface` and `root_url` are None for "find it myself", which is what
    `RouterSession.open` takes. `enabled` False is `--nonat` (no discovery at all); `mapping` False
    is `--nonatmap` (discovery and the external address, no mappings).

    `ipv6` True also keeps IPv6 firewall pinholes (`Wanted(..., family=6)`) with the IPv6 gateway, by
    `ipv6_protocol` (PCP or UPnP IGD:2, "auto" probes both), for the host's stable IPv6 address
    (`ipv6_address` names another of its addresses) and through `ipv6_gateway` when given; leases,
    renewal, verification and the journal as for IPv4 mappings (`upnp_lease` for UPnP pinholes too).
    """

    enabled: bool = True
    mapping: bool = True
    protocol: ProtocolName = "auto"
    gateway: str | None = None
    interface: str | None = None
    root_url: str | None = None
    lease: int = DEFAULT_LIFETIME
    upnp_lease: int = DEFAULT_UPNP_LEASE
    verify_interval: float = 60
    external_ip_interval: float = 60
    timeout: float = DEFAULT_DEADLINE
    shutdown_timeout: float = 2.0
    stun: str | None = None  # "stun:host[:port]": cross-check the router's external address (double NAT)
    map_rate: float = 10.0  # new mappings a second towards the router (0: no limit); refreshes are not held back
    max_lease: int = (
        DEFAULT_MAX_LEASE  # a NAT-PMP/PCP grant longer than this is taken as this (and renewed accordingly)
    )
    ipv6: bool = False
    ipv6_protocol: PinholeProtocolName = "auto"
    ipv6_gateway: str | None = None
    ipv6_address: str | None = None
