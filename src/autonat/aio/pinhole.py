"""IPv6 firewall pinholes with the home router: PCP and UPnP IGD:2, from the host's stable address.

    async with await PinholeSession.open() as router:      # the IPv6 default route's gateway
        probe = await router.probe()                        # PCP and UPnP at once
        pinhole = await router.add(MappingRequest(Transport.UDP, 5060, lifetime=3600))
        await router.remove(pinhole)

On IPv6 nothing is translated: a pinhole lets inbound traffic reach our own address and port through
the router's firewall. PCP does it with a MAP for an IPv6 internal address (RFC 6887 §11 on a firewall),
UPnP with WANIPv6FirewallControl:1's AddPinhole; NAT-PMP is IPv4 only (RFC 6886 §1). Pinholes are for
the host's *stable* address (`aio/route.py` `locate_router6`): a temporary one (RFC 8981) is gone within
a day, and the router grants a pinhole only for the address the request comes from (docs/QUIRKS.md
U16), so the PCP socket and the UPnP connections are bound to the stable address too; the kernel would
pick the temporary one (`RouterLocation.kernel_source`).

The session mirrors `RouterSession`: one socket for PCP connected to the gateway (an ICMP port
unreachable ends a request at once), the UPnP client made on first use, a probe of both in one burst
that keeps the best that answers (PCP > UPnP), `add` / `delete` / `remove`, and the error codes counted
for the metrics. A PCP delete the router refuses (miniupnpd 2.3.1: docs/QUIRKS.md P8) falls back to
UPnP's DeletePinhole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import TYPE_CHECKING, Any, Literal, cast

from autonat.aio.channel import DatagramChannel
from autonat.aio.pcp import PcpPinholeClient
from autonat.aio.route import RouterLocation, locate_router6
from autonat.errors import ProtocolUnavailable
from autonat.mapper import MAX_GRANTED_LIFETIME, Mapping, MappingRequest, ProtocolStatus, check_max_lifetime
from autonat.portmapper import PortMapper
from autonat.proto import pcp
from autonat.proto.exchange import DEFAULT_DEADLINE
from autonat.proto.types import Transport
from autonat.state import host_secret

if TYPE_CHECKING:
    from autonat.aio.upnp import UpnpPinholeClient

PinholeChoice = Literal["auto", "pcp", "upnp"]
PREFERENCE = ("pcp", "upnp")  # among those that work, the first wins (as RouterSession: PCP first)
PROBE_GRACE = 0.25  # as aio/router.py: once one protocol answered, how long the other may take

holes = logging.getLogger("autonat.holes")


def _reply_key(data: bytes) -> tuple[str, int, bytes | None] | None:
    return pcp.reply_key(data)


@dataclass(frozen=True, slots=True)
class PinholeProbe:
    """What an IPv6 probe found: the gateway, our stable address (and the one the kernel would pick),
    each protocol's answer and the one selected."""

    location: RouterLocation
    protocols: dict[str, ProtocolStatus]
    selected: str | None
    elapsed_ms: float

    def to_dict(self) -> dict[str, Any]:
        location = self.location
        return {
            "gateway": str(location.gateway),
            "local_address": str(location.local_address),
            "kernel_source": None if location.kernel_source is None else str(location.kernel_source),
            "interface": location.interface,
            "network": None if location.network is None else str(location.network),
            "selected": self.selected,
            "protocols": {name: status.to_dict() for name, status in self.protocols.items()},
            "elapsed_ms": round(self.elapsed_ms, 3),
        }


async def burst(clients: MappingABC[str, PortMapper], grace: float) -> dict[str, ProtocolStatus]:
    """Every client's `probe()` at once; return soon after the first one that works (`grace` more for
    the others, whose status then says they did not answer in time)."""
    tasks: dict[asyncio.Future[ProtocolStatus], str] = {
        asyncio.ensure_future(client.probe()): name for name, client in clients.items()
    }
    pending: set[asyncio.Future[ProtocolStatus]] = set(tasks)
    statuses: dict[str, ProtocolStatus] = {}
    first_answer: str | None = None
    while pending and first_answer is None:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            status = task.result()
            statuses[tasks[task]] = status
            if status.available and first_answer is None:
                first_answer = tasks[task]
    if pending:
        done, pending = await asyncio.wait(pending, timeout=grace)
        for task in done:
            statuses[tasks[task]] = task.result()
        for task in pending:
            task.cancel()
            statuses[tasks[task]] = ProtocolStatus(
                tasks[task],
                available=False,
                reason=f"no answer within {grace * 1000:.0f} ms after {first_answer} answered",
            )
    return statuses


class PinholeSession:
    """The IPv6 gateway, our stable IPv6 address, and a PCP socket bound to it and connected to the
    gateway. Open it with `await PinholeSession.open()`; as an async context manager it closes its
    socket (pinholes stay until deleted or expired)."""

    def __init__(
        self,
        location: RouterLocation,
        channel: DatagramChannel,
        deadline: float,
        *,
        root_url: str | None = None,
        server_port: int = pcp.SERVER_PORT,
        max_lifetime: int = MAX_GRANTED_LIFETIME,
    ) -> None:
        self.location = location
        self.channel = channel
        self.deadline = deadline
        self._secret = secret = host_secret()
        self._root_url = root_url
        self.pcp = PcpPinholeClient(
            channel,
            location.gateway,
            location.local_address,
            secret,
            deadline=deadline,
            port=server_port,
            max_lifetime=max_lifetime,
        )
        self.pcp.fallback_delete = self._upnp_delete
        self._fell_back: set[tuple[Transport, int]] = set()  # deletes PCP handed to UPnP, until reported
        self._upnp: UpnpPinholeClient | None = None
        self.last_probe: PinholeProbe | None = None

    @classmethod
    async def open(
        cls,
        gateway: str | None = None,
        interface: str | None = None,
        deadline: float = DEFAULT_DEADLINE,
        root_url: str | None = None,
        *,
        local_address: str | None = None,
        max_lifetime: int = MAX_GRANTED_LIFETIME,
    ) -> PinholeSession:
        """Locate the IPv6 gateway and our stable address (`locate_router6`; `local_address` picks another
        of the host's addresses) and open the PCP socket. RouterNotFound (one line) without an IPv6 route."""
        check_max_lifetime(max_lifetime)
        location = locate_router6(gateway, interface, local_address)
        channel = await DatagramChannel.open(
            location.local_address, _reply_key, remote=(location.gateway, pcp.SERVER_PORT)
        )
        return cls(location, channel, deadline, root_url=root_url, max_lifetime=max_lifetime)

    @property
    def upnp(self) -> UpnpPinholeClient:
        """The IGD:2 firewall control client, made (and its modules imported) on first use."""
        if self._upnp is None:
            from autonat.aio.upnp import UpnpPinholeClient

            self._upnp = UpnpPinholeClient(self.location, self._secret, deadline=self.deadline, root_url=self._root_url)
        return self._upnp

    @property
    def local_address(self) -> IPv6Address:
        address = self.location.local_address
        assert isinstance(address, IPv6Address)
        return address

    async def __aenter__(self) -> PinholeSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and any kept HTTP connection; idempotent."""
        self.channel.close()
        if self._upnp is not None:
            self._upnp.close()

    def router_errors(self) -> dict[tuple[str, int], int]:
        """Every error code the router answered, handled or final, by (protocol, code)."""
        clients: list[tuple[str, MappingABC[int, int]]] = [("pcp", self.pcp.router_codes)]
        if self._upnp is not None:
            clients.append(("upnp", self._upnp.router_codes))
        return {(name, code): count for name, codes in clients for code, count in codes.items()}

    def _client(self, name: str) -> PortMapper:
        if name == "pcp":
            return self.pcp
        if name == "upnp":
            return self.upnp
        raise ValueError(f"IPv6 pinholes are made with pcp or upnp (NAT-PMP is IPv4 only), not {name!r}")

    async def probe(self, only: str = "auto") -> PinholeProbe:
        """Ask PCP (an ANNOUNCE, RFC 6887 §14.1) and UPnP (SSDP on FF02::C and FF05::C, then the IGD's
        firewall control service) at once; `only` "pcp" or "upnp" asks that one."""
        started = time.perf_counter()
        names = PREFERENCE if only == "auto" else (only,)
        statuses = await burst({name: self._client(name) for name in names}, PROBE_GRACE)
        ordered = {name: statuses[name] for name in PREFERENCE if name in statuses}
        selected = next((name for name, status in ordered.items() if status.available), None)
        result = PinholeProbe(self.location, ordered, selected, (time.perf_counter() - started) * 1000)
        self.last_probe = result
        return result

    async def mapper(self, choice: PinholeChoice = "auto") -> PortMapper:
        """The client for `choice`; "auto" probes (once per session) and takes the best that works."""
        if choice != "auto":
            return self._client(choice)
        probe = self.last_probe or await self.probe()
        if probe.selected is None:
            reasons = "; ".join(f"{name}: {status.reason}" for name, status in probe.protocols.items())
            raise ProtocolUnavailable(f"no pinhole protocol works with {self.location.gateway} ({reasons})")
        return self._client(probe.selected)

    async def add(self, request: MappingRequest, choice: PinholeChoice = "auto") -> Mapping:
        """Open a pinhole for our stable address and `request.internal_port`; logs it on `autonat.holes`."""
        mapping = await (await self.mapper(choice)).add(request)
        if holes.isEnabledFor(logging.INFO):
            holes.info("opened %s", mapping.describe())
        return mapping

    async def delete(
        self, transport: Transport, internal_port: int, choice: PinholeChoice = "auto", unique_id: int | None = None
    ) -> str:
        """Close our pinhole of `internal_port`; one that is not there is success. A UPnP pinhole is
        named by `unique_id` when known (the journal keeps it). Returns the protocol used."""
        mapper = await self.mapper(choice)
        if mapper.name == "upnp" and unique_id is not None:
            await self.upnp.delete_pinhole(unique_id)
        else:
            await mapper.delete(transport, internal_port)
        used = mapper.name
        if (transport, internal_port) in self._fell_back:  # PCP handed it to UPnP (P8): say so
            self._fell_back.discard((transport, internal_port))
            used = "upnp"
        if holes.isEnabledFor(logging.INFO):
            holes.info("closed %s pinhole to [%s]:%d via %s", transport, self.local_address, internal_port, used)
        return used

    async def remove(self, mapping: Mapping) -> None:
        """Close a pinhole `add` returned, through the protocol that made it."""
        if mapping.protocol not in PREFERENCE:
            raise ValueError(f"not a pinhole made by a PinholeSession: protocol {mapping.protocol!r}")
        choice = cast(PinholeChoice, mapping.protocol)
        await self.delete(mapping.transport, mapping.internal_port, choice, mapping.unique_id)

    async def _upnp_delete(self, transport: Transport, internal_port: int) -> None:
        """PCP's fallback for a delete the router refuses (docs/QUIRKS.md P8): the same pinhole, by UPnP."""
        await self.upnp.delete(transport, internal_port)
        self._fell_back.add((transport, internal_port))
