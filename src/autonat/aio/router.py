"""A session with the home router: locate it, probe every protocol in one burst, pick one, map.

    async with await RouterSession.open() as router:
        result = await router.probe()
        mapping = await router.add(MappingRequest(Transport.UDP, 5060))
        await router.remove(mapping)

The UPnP client (and with it the HTTP and XML modules) is built, and imported, only when UPnP is
used: a session that maps through PCP or NAT-PMP never loads it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from autonat.addresses import IPAddress, classify, is_public
from autonat.aio.channel import DatagramChannel
from autonat.aio.natpmp import NatPmpClient
from autonat.aio.pcp import PcpClient
from autonat.aio.pinhole import PinholeProbe, PinholeSession, burst
from autonat.aio.route import RouterLocation, locate_router
from autonat.errors import ProtocolUnavailable, RouterNotFound
from autonat.mapper import (
    MAX_GRANTED_LIFETIME,
    Mapping,
    MappingRequest,
    ProtocolStatus,
    check_max_lifetime,
)
from autonat.portmapper import PortMapper
from autonat.proto import natpmp, pcp
from autonat.proto.exchange import DEFAULT_DEADLINE
from autonat.proto.natpmp import SERVER_PORT
from autonat.proto.types import Transport
from autonat.state import host_secret

if TYPE_CHECKING:
    from autonat.aio.upnp import UpnpClient

ProtocolChoice = Literal["auto", "pcp", "natpmp", "upnp"]
PREFERENCE = ("pcp", "natpmp", "upnp")  # among those that work, the first wins
# Once one protocol has answered, the others get this long to answer too: a live server on the same
# box answers in milliseconds, and 250 ms still lets one lost datagram be retransmitted (RFC 6886 §3.1).
PROBE_GRACE = 0.25
# How long a probe's choice of protocol is trusted for the same gateway and local address, by later
# sessions of this process (Tailscale's portmapper likewise keeps its probe results in memory only).
# Deliberately not persisted: each `autonat` command probes afresh. That costs one burst, a few ms when
# every protocol answers and PROBE_GRACE more when one stays silent (252 ms measured against a PCP +
# NAT-PMP router without UPnP); a file shared between processes would be one more piece of state to
# lock, and to distrust once the router has changed. Pinned by tests/unit/test_claims.py.
PROBE_TRUST = 30.0
_probe_cache: dict[tuple[str, str], tuple[float, ProbeResult]] = {}

holes = logging.getLogger("autonat.holes")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe found: every protocol's answer, the one selected, the external address."""

    location: RouterLocation
    protocols: dict[str, ProtocolStatus]
    selected: str | None
    external_ip: IPAddress | None
    double_nat: bool
    elapsed_ms: float
    dropped: dict[str, int]
    # IPv6 (a session opened with ipv6=True): the pinhole probe made in the same burst, or why there is none.
    ipv6: PinholeProbe | None = None
    ipv6_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "gateway": str(self.location.gateway),
            "local_address": str(self.location.local_address),
            "interface": self.location.interface,
            "external_ip": None if self.external_ip is None else str(self.external_ip),
            "external_ip_kind": None if self.external_ip is None else str(classify(self.external_ip)),
            "selected": self.selected,
            "double_nat": self.double_nat,
            "protocols": {name: status.to_dict() for name, status in self.protocols.items()},
            "elapsed_ms": round(self.elapsed_ms, 3),
            "dropped": self.dropped,
        }
        if self.ipv6 is not None:
            data["ipv6"] = self.ipv6.to_dict()
        elif self.ipv6_error is not None:
            data["ipv6"] = {"error": self.ipv6_error}
        return data


def reply_key(data: bytes) -> Hashable | None:
    """NAT-PMP and PCP share the server port and our socket: key a reply by its own protocol."""
    return pcp.reply_key(data) if data[:1] == b"\x02" else natpmp.reply_key(data)


class RouterSession:
    """One gateway, one local address, one socket shared by the NAT-PMP and PCP clients.

    Open it with `await RouterSession.open()` and use it as an async context manager, which closes
    the socket (and forgets nothing on the router: delete what you mapped, or let the lease run out).
    """

    def __init__(
        self,
        location: RouterLocation,
        channel: DatagramChannel,
        deadline: float,
        server_port: int = SERVER_PORT,
        root_url: str | None = None,
        *,
        max_lifetime: int = MAX_GRANTED_LIFETIME,
        ipv6: PinholeSession | None = None,
        ipv6_error: str | None = None,
    ) -> None:
        self.location = location
        self.channel = channel
        self.deadline = deadline
        # IPv6 pinholes with the IPv6 gateway (aio/pinhole.py), probed in the same burst; or why not.
        self.ipv6 = ipv6
        self.ipv6_error = ipv6_error
        gateway, local = location.gateway, location.local_address
        self._secret = secret = host_secret()
        self._root_url = root_url
        # NAT-PMP/PCP grants above `max_lifetime` are treated as `max_lifetime` (mapper.cap_grant).
        self.natpmp = NatPmpClient(
            channel, gateway, local, deadline=deadline, port=server_port, max_lifetime=max_lifetime
        )
        self.pcp = PcpClient(
            channel, gateway, local, secret, deadline=deadline, port=server_port, max_lifetime=max_lifetime
        )
        self._upnp: UpnpClient | None = None
        self.last_probe: ProbeResult | None = None

    @property
    def upnp(self) -> UpnpClient:
        """The UPnP IGD client, made (and its modules imported) on first use."""
        if self._upnp is None:
            from autonat.aio.upnp import UpnpClient

            self._upnp = UpnpClient(self.location, self._secret, deadline=self.deadline, root_url=self._root_url)
        return self._upnp

    @classmethod
    async def open(
        cls,
        gateway: str | None = None,
        interface: str | None = None,
        deadline: float = DEFAULT_DEADLINE,
        root_url: str | None = None,
        *,
        max_lifetime: int = MAX_GRANTED_LIFETIME,
        ipv6: bool = False,
        ipv6_gateway: str | None = None,
        ipv6_root_url: str | None = None,
        ipv6_local_address: str | None = None,
    ) -> RouterSession:
        """Locate the router (the gateway of the route actually used, unless `gateway` / `interface`
        say otherwise) and open the session's socket, connected to the gateway's NAT-PMP/PCP port so
        that a router without that service is known at once (ICMP port unreachable).

        `deadline`: seconds per request, retransmissions included. `root_url`: the IGD's description
        URL (UPnP without SSDP). `max_lifetime`: the longest NAT-PMP/PCP grant believed; longer ones
        are treated as it. Raises RouterNotFound when there is no gateway to talk to.

        `ipv6`: also open a `PinholeSession` with the IPv6 gateway (`ipv6_gateway`, `ipv6_root_url`,
        `ipv6_local_address` as its `open` takes them), probed in the same burst as the IPv4 protocols;
        a host without an IPv6 route still gets its IPv4 session (`ipv6_error` says why there is none).
        """
        check_max_lifetime(max_lifetime)  # before a socket is opened
        location = locate_router(gateway, interface)
        channel = await DatagramChannel.open(location.local_address, reply_key, remote=(location.gateway, SERVER_PORT))
        pinholes: PinholeSession | None = None
        error: str | None = None
        if ipv6:
            try:
                pinholes = await PinholeSession.open(
                    ipv6_gateway,
                    interface,
                    deadline,
                    ipv6_root_url,
                    local_address=ipv6_local_address,
                    max_lifetime=max_lifetime,
                )
            except RouterNotFound as exc:
                error = str(exc)
        return cls(
            location, channel, deadline, root_url=root_url, max_lifetime=max_lifetime, ipv6=pinholes, ipv6_error=error
        )

    async def __aenter__(self) -> RouterSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def close(self) -> None:
        """Close the socket; idempotent. Mappings stay on the router until deleted or expired."""
        self.channel.close()
        if self._upnp is not None:
            self._upnp.close()
        if self.ipv6 is not None:
            self.ipv6.close()

    async def aclose(self) -> None:
        self.close()

    def router_errors(self) -> dict[tuple[str, int], int]:
        """Every error code the router answered this session, handled or final, by (protocol, code):
        UPnP errors (725, 402, 501 ...) and PCP / NAT-PMP result codes. For the metrics and `doctor`."""
        counts: dict[tuple[str, int], int] = {}
        clients: list[tuple[str, MappingABC[int, int]]] = [
            ("pcp", self.pcp.router_codes),
            ("natpmp", self.natpmp.router_codes),
        ]
        if self._upnp is not None:  # never built just to be asked
            clients.append(("upnp", self._upnp.router_codes))
        for name, codes in clients:
            for code, count in codes.items():
                counts[(name, code)] = count
        if self.ipv6 is not None:
            for key, count in self.ipv6.router_errors().items():
                counts[key] = counts.get(key, 0) + count
        return counts

    def _client(self, name: str) -> PortMapper:
        if name == "pcp":
            return self.pcp
        if name == "natpmp":
            return self.natpmp
        if name == "upnp":
            return self.upnp
        raise ValueError(f"protocol must be one of auto, pcp, natpmp, upnp, not {name!r}")

    def _clients(self) -> dict[str, PortMapper]:
        return {"pcp": self.pcp, "natpmp": self.natpmp, "upnp": self.upnp}

    async def probe(self, only: ProtocolChoice = "auto") -> ProbeResult:
        """Ask every protocol at once; return soon after the first one answers (see PROBE_GRACE). With
        an IPv6 session, its pinhole protocols (PCP, UPnP) are asked in the same burst ("natpmp" asks
        none of them: NAT-PMP is IPv4 only)."""
        started = time.perf_counter()
        clients: dict[str, PortMapper] = self._clients() if only == "auto" else {str(only): self._client(only)}
        pinholes: asyncio.Future[PinholeProbe] | None = None
        if self.ipv6 is not None and only != "natpmp":
            pinholes = asyncio.ensure_future(self.ipv6.probe(only))
        try:
            statuses = await burst(clients, PROBE_GRACE)
            ipv6 = None if pinholes is None else await pinholes
        finally:
            if pinholes is not None and not pinholes.done():
                pinholes.cancel()
        ordered = {name: statuses[name] for name in PREFERENCE if name in statuses}
        selected = next((name for name, status in ordered.items() if status.available), None)
        external = next((s.external_ip for s in ordered.values() if s.external_ip is not None), None)
        result = ProbeResult(
            location=self.location,
            protocols=ordered,
            selected=selected,
            external_ip=external,
            double_nat=external is not None and not is_public(external),
            elapsed_ms=(time.perf_counter() - started) * 1000,
            dropped={**self.channel.drops, **(self._upnp.drops if self._upnp is not None else {})},
            ipv6=ipv6,
            ipv6_error=self.ipv6_error,
        )
        self.last_probe = result
        if only == "auto":
            _probe_cache[self._cache_key] = (time.monotonic(), result)
        return result

    @property
    def _cache_key(self) -> tuple[str, str]:
        return str(self.location.gateway), str(self.location.local_address)

    def _trusted_probe(self) -> ProbeResult | None:
        cached = _probe_cache.get(self._cache_key)
        if cached is None or time.monotonic() - cached[0] > PROBE_TRUST:
            return None
        return cached[1]

    async def mapper(self, choice: ProtocolChoice = "auto") -> PortMapper:
        """The client for `choice`; "auto" probes (once per session) and takes the best that works."""
        if choice != "auto":
            return self._client(choice)
        probe = self.last_probe or self._trusted_probe() or await self.probe()
        if probe.selected is None:
            reasons = "; ".join(f"{name}: {status.reason}" for name, status in probe.protocols.items())
            raise ProtocolUnavailable(f"no port-mapping protocol works with {self.location.gateway} ({reasons})")
        return self._client(probe.selected)

    async def add(self, request: MappingRequest, choice: ProtocolChoice = "auto") -> Mapping:
        """Map `request` with `choice` ("auto": the best protocol a probe found). Logs the hole on
        the `autonat.holes` logger. Raises RouterRefused / RouterTimeout / ProtocolUnavailable."""
        mapper = await self.mapper(choice)
        mapping = await mapper.add(request)
        if holes.isEnabledFor(logging.INFO):
            holes.info("opened %s", mapping.describe())
        return mapping

    async def delete(self, transport: Transport, internal_port: int, choice: ProtocolChoice = "auto") -> str:
        """Delete our mapping of `internal_port`; one that is not there is success. Returns the
        protocol used. UPnP deletes a mapping this session made by its external port in one call."""
        mapper = await self.mapper(choice)
        await mapper.delete(transport, internal_port)
        if holes.isEnabledFor(logging.INFO):
            holes.info("closed %s %s:%d via %s", transport, self.location.local_address, internal_port, mapper.name)
        return mapper.name

    async def remove(self, mapping: Mapping) -> None:
        """Delete a mapping `add` returned, through the protocol that made it."""
        if mapping.protocol not in PREFERENCE:
            raise ValueError(f"not a mapping made by a RouterSession: protocol {mapping.protocol!r}")
        await self.delete(mapping.transport, mapping.internal_port, cast(ProtocolChoice, mapping.protocol))
