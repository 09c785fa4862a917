"""The values every port-mapping protocol speaks in: what we ask for, what the router granted.

The one small interface the protocols sit behind is `autonat.portmapper.PortMapper`. These values are
`Record`s, not dataclasses: a one-shot blocking request loads this module, and `dataclasses` alone would
cost it more than the request (autonat.proto.record).
"""

from __future__ import annotations

import functools
from ipaddress import IPv4Address, IPv6Address

from autonat.addresses import uri_host
from autonat.proto.record import Record, init_fields
from autonat.proto.types import Transport

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

IPAddress = IPv4Address | IPv6Address

DEFAULT_LIFETIME = 7200  # RFC 6886 §3.3 recommends 7200 s; finite leases always (never "permanent")
MAX_LIFETIME = 604800  # one week: longer than any router grants; beyond it a typo, not a wish
MAX_GRANTED_LIFETIME = 86400
"""Longest NAT-PMP/PCP grant believed (the default `max_lifetime`): a day. RFC 6886 §3.3 and RFC 6887
§15 let the server pick the lifetime; a 4,294,967,295 s grant would never be renewed (§11.2.1 renews
at half of it) and would outlive, on paper, a router that forgot it long ago."""

HOLES_LOGGER = "autonat.holes"  # every hole opened or closed; logging is imported only when one is logged


class MappingRequest(Record):
    """What we ask for: forward `external_port` (0 = any) on the router to our `internal_port`."""

    _fields = ("transport", "internal_port", "external_port", "lifetime")
    __slots__ = _fields
    transport: Transport
    internal_port: int
    external_port: int
    lifetime: int

    def __init__(
        self, transport: Transport, internal_port: int, external_port: int = 0, lifetime: int = DEFAULT_LIFETIME
    ) -> None:
        if not 1 <= internal_port <= 65535:
            raise ValueError(f"internal port must be 1-65535, not {internal_port}")
        if not 0 <= external_port <= 65535:
            raise ValueError(f"external port must be 0-65535, not {external_port}")
        if not 1 <= lifetime <= MAX_LIFETIME:
            raise ValueError(f"lifetime must be 1-{MAX_LIFETIME} s (finite leases only), not {lifetime}")
        init_fields(self, transport, internal_port, external_port, lifetime)


class Mapping(Record):
    """What the router granted.

    For an IPv6 internal address it is a firewall *pinhole*, not a translation: the router lets inbound
    traffic reach our own address and port, so `external_ip` and `external_port` are the internal ones
    (RFC 6887 §11.1 on a firewall; WANIPv6FirewallControl:1). `unique_id` is the UniqueID a UPnP IGD:2
    router gave the pinhole (UpdatePinhole and DeletePinhole name it so), None otherwise.
    """

    _fields = (
        "protocol",
        "transport",
        "internal_address",
        "internal_port",
        "external_ip",
        "external_port",
        "lifetime",
        "epoch",
        "unique_id",
    )
    __slots__ = _fields
    protocol: str
    transport: Transport
    internal_address: IPAddress
    internal_port: int
    external_ip: IPAddress | None
    external_port: int
    lifetime: int
    epoch: int | None
    unique_id: int | None

    def __init__(
        self,
        protocol: str,
        transport: Transport,
        internal_address: IPAddress,
        internal_port: int,
        external_ip: IPAddress | None,
        external_port: int,
        lifetime: int,
        epoch: int | None = None,
        unique_id: int | None = None,
    ) -> None:
        init_fields(
            self, protocol, transport, internal_address, internal_port, external_ip, external_port, lifetime, epoch,
            unique_id,
        )  # fmt: skip

    @property
    def family(self) -> int:
        """4 for a port mapping of an IPv4 address, 6 for a pinhole of an IPv6 one."""
        return self.internal_address.version

    def describe(self) -> str:
        internal = f"{uri_host(self.internal_address)}:{self.internal_port}"
        if self.family == 6:
            pinhole = "" if self.unique_id is None else f" (UniqueID {self.unique_id})"
            return f"{self.transport} pinhole to {internal}{pinhole} via {self.protocol}, lease {self.lifetime} s"
        external = f"{self.external_ip or '?'}:{self.external_port}"
        return f"{self.transport} {external} -> {internal} via {self.protocol}, lease {self.lifetime} s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "family": self.family,
            "transport": str(self.transport),
            "internal_address": str(self.internal_address),
            "internal_port": self.internal_port,
            "external_ip": None if self.external_ip is None else str(self.external_ip),
            "external_port": self.external_port,
            "lifetime": self.lifetime,
            "epoch": self.epoch,
            "unique_id": self.unique_id,
        }


class ProtocolStatus(Record):
    """One protocol's answer to a probe: does it work here, and if not, why."""

    _fields = ("protocol", "available", "reason", "external_ip", "epoch", "elapsed_ms", "details")
    __slots__ = _fields
    protocol: str
    available: bool
    reason: str
    external_ip: IPAddress | None
    epoch: int | None
    elapsed_ms: float | None
    details: dict[str, Any]

    def __init__(
        self,
        protocol: str,
        available: bool,
        reason: str,
        external_ip: IPAddress | None = None,
        epoch: int | None = None,
        elapsed_ms: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        init_fields(
            self, protocol, available, reason, external_ip, epoch, elapsed_ms, {} if details is None else details
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "external_ip": None if self.external_ip is None else str(self.external_ip),
            "epoch": self.epoch,
            "elapsed_ms": None if self.elapsed_ms is None else round(self.elapsed_ms, 3),
            **self.details,
        }


@functools.cache
def _holes() -> Any:
    import logging  # on the first hole opened or closed: a one-shot request that opens none never loads it

    return logging.getLogger(HOLES_LOGGER)


def hole_logger() -> Any:
    """The `autonat.holes` logger when it logs INFO, else None (then a line is not even formatted): the
    blocking clients ask once per hole opened or closed."""
    logger = _holes()
    return logger if logger.isEnabledFor(20) else None  # 20: logging.INFO


def check_max_lifetime(max_lifetime: int) -> int:
    """`max_lifetime` as given, or ValueError: a cap below one second is a caller bug."""
    if isinstance(max_lifetime, bool) or not isinstance(max_lifetime, int) or max_lifetime < 1:
        raise ValueError(f"max_lifetime must be a positive number of seconds, not {max_lifetime!r}")
    return max_lifetime


def cap_grant(mapping: Mapping, max_lifetime: int) -> Mapping:
    """A NAT-PMP/PCP grant longer than `max_lifetime` is treated as `max_lifetime`, so it is renewed
    on that schedule; logged as a warning, since the router still holds it for what it said."""
    if mapping.lifetime <= max_lifetime:
        return mapping
    import logging

    logging.getLogger(HOLES_LOGGER).warning(
        "router granted a %d s lease for %s %s:%d via %s; treating it as %d s (renewed accordingly)",
        mapping.lifetime,
        mapping.transport,
        mapping.external_ip or "?",
        mapping.external_port,
        mapping.protocol,
        max_lifetime,
    )
    return mapping.replace(lifetime=max_lifetime)
