"""UPnP IGD v1/v2 client: discovery, inspection and the AddPortMapping error matrix.

The wire formats live in `autonat.proto.ssdp` and `autonat.proto.igd`; this module decides what to do
with what the router says. Router-facing rules, each from a quirk seen in the field; docs/QUIRKS.md
names the routers and the sources (IDs in brackets):

- InternalClient is always our own address (the one the router sees us as); never another host
  (miniupnpd's secure_mode refuses any other, [U11]).
- Leases are finite. A router that insists on permanent mappings (725 from MikroTik RouterOS, Netgear
  R7000P, ZyXEL VMG1312 [U1]; 402 on a finite lease from ARRIS NVG578LX [U2]) gets one only after its
  external address checked out as public, and the mapping reports lease 0 so the caller knows it must
  delete it itself.
- Conflicts (718/729 [U5], and 501 once, which miniupnpd built with CHECK_PORTINUSE sends for a port in
  use on the router itself [U4]) move to the next port of a sequence derived from the host secret, so a
  restart asks for the same ports in the same order.
- 725 to a permanent lease as well is final at once (no router named yet: docs/QUIRKS.md G11); asking
  again could only loop.

Every UPnP error code the router answers, handled or final, is counted in `UpnpClient.router_codes`
(the metrics' `autonat_router_errors_total`, and `autonat doctor`, read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from autonat.addresses import is_public
from autonat.aio import http
from autonat.aio.route import RouterLocation
from autonat.aio.ssdp import Found, Refused, Unreachable, search
from autonat.errors import NotPublic, ProtocolUnavailable, RouterRefused, RouterTimeout, RouterUnreachable
from autonat.mapper import Mapping, MappingRequest, ProtocolStatus
from autonat.proto import igd, pinhole, ssdp
from autonat.proto.errors import DecodeError
from autonat.proto.types import Transport
from autonat.state import derive_nonce

NAME = "upnp"
PERMANENT_FALLBACK_LEASE = 604800  # IGD:2 §2.3.13: what a "permanent" lease means there
MAX_ATTEMPTS = 8  # distinct external ports tried on conflicts before giving up
MAX_LISTED = 4096  # GetGenericPortMappingEntry walk bound, whatever the router claims
COLLECT_WINDOW = 0.15  # after the first usable IGD, how long other (better ranked) ones may answer
FAILED_WINDOW = 0.5  # after the first unusable IGD, how long another one may still turn up
# After the gateway's ICMP port unreachable for the unicast search: a stack bound to the multicast group
# only (not to the unicast address) refuses the unicast search but answers the multicast one, sent in the
# same burst, within milliseconds; this grace lets that answer in and still fails fast.
UNREACHABLE_GRACE = 0.05
SHOWN_REASONS = 3  # candidates named in the one-line error; `probe --json` lists them all
MAX_REMEMBERED = 4096  # mappings made by one client remembered for a one-call delete
MAX_CODES = 32  # distinct error codes counted per client: a router picks its own, the count stays bounded

# What became of a discovery candidate.
INSPECTING, USABLE, FAILED, REFUSED, UNFINISHED = "inspecting", "usable", "failed", "refused", "unfinished"


@dataclass(slots=True)
class Candidate:
    """One IGD candidate of a discovery and what became of it, so that a discovery that found
    nothing usable can say why: a refused LOCATION, an oversized or malformed reply, a hang, a drip.
    `trace` collects the HTTP exchanges made for it, to tell where an unfinished one stalled."""

    location: str
    responder: str
    started: float
    outcome: str = INSPECTING
    reason: str = ""
    trace: list[http.Progress] = field(default_factory=list)

    def settle(self, outcome: str, reason: str) -> None:
        self.outcome, self.reason = outcome, reason

    def unfinished(self, now: float) -> None:
        """Cut off by the deadline (or the window after another candidate settled)."""
        if self.outcome != INSPECTING:
            return
        stalled = next((p for p in self.trace if p.phase not in (http.DONE, http.FAILED)), None)
        where = self.location if stalled is None else f"{stalled.url}: {stalled.stalled()}"
        self.settle(UNFINISHED, f"{where}, unfinished after {now - self.started:.1f} s")

    def line(self) -> str:
        if self.outcome == REFUSED:
            return f"{self.responder} offered LOCATION {self.location}, refused: {self.reason}"
        return self.reason if self.location in self.reason else f"{self.location}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"location": self.location, "responder": self.responder, "outcome": self.outcome, "reason": self.reason}


def _reasons(candidates: list[Candidate]) -> str:
    """` (first reason; second; and N more)` for the one-line error, or nothing."""
    failed = [candidate.line() for candidate in candidates if candidate.outcome != USABLE]
    if not failed:
        return ""
    more = f"; and {len(failed) - SHOWN_REASONS} more" if len(failed) > SHOWN_REASONS else ""
    return f" ({'; '.join(failed[:SHOWN_REASONS])}{more})"


@dataclass(frozen=True, slots=True)
class Igd:
    """A usable Internet Gateway Device: its description, chosen connection service and state."""

    root_url: str
    responder: str
    description: igd.DeviceDescription
    service: igd.Service
    actions: frozenset[str]
    external_ip: IPv4Address | None
    status: igd.StatusInfo | None
    # Better-ranked connection services passed over because they were not connected (docs/QUIRKS.md U12):
    # (service type, its connection status).
    skipped: tuple[tuple[str, str], ...] = ()
    # An IPv6 firewall control service (`service` is WANIPv6FirewallControl): its GetFirewallStatus,
    # None when that was not answered; `pinholes` True for such an IGD.
    firewall: pinhole.FirewallStatus | None = None
    pinholes: bool = False

    @property
    def connected(self) -> bool:
        # Only "Connected": Tailscale also takes "Up" (no router named; docs/QUIRKS.md, not handled yet).
        return self.status is None or self.status.connection_status.lower() == "connected"

    @property
    def pinholes_allowed(self) -> bool:
        """The firewall lets us open pinholes (unknown counts as yes: AddPinhole will tell)."""
        return self.firewall is None or self.firewall.inbound_pinhole_allowed

    def rank(self, gateway: str) -> tuple[int, int]:
        """Lower is better: connected with a public address, then connected, then the rest;
        ties go to the device on the default gateway. For pinholes: a firewall that allows them first."""
        if self.pinholes:
            quality = 0 if self.pinholes_allowed else 2
        elif self.connected and self.external_ip is not None and is_public(self.external_ip):
            quality = 0
        elif self.connected:
            quality = 1
        else:
            quality = 2
        return quality, 0 if self.responder == gateway else 1

    def summary(self) -> str:
        if self.pinholes:
            return f"{self.service.service_type}, {_firewall_text(self.firewall)}"
        state = "connection status unknown" if self.status is None else self.status.connection_status
        return f"{self.service.service_type}, {state}, external address {self.external_ip or 'unknown'}"

    def details(self) -> dict[str, Any]:
        root = self.description.root
        return {
            "root_url": self.root_url,
            "friendly_name": root.friendly_name,
            "manufacturer": root.manufacturer,
            "model_name": root.model_name,
            "model_number": root.model_number,
            "service_type": self.service.service_type,
            "control_url": self.service.control_url,
            "connection_status": None if self.status is None else self.status.connection_status,
            "skipped_services": [{"service_type": kind, "connection_status": state} for kind, state in self.skipped],
            **(
                {
                    "firewall_enabled": None if self.firewall is None else self.firewall.enabled,
                    "inbound_pinhole_allowed": None if self.firewall is None else self.firewall.inbound_pinhole_allowed,
                }
                if self.pinholes
                else {}
            ),
        }


def _firewall_text(status: pinhole.FirewallStatus | None) -> str:
    if status is None:
        return "firewall status unknown"
    if not status.enabled:
        return "firewall off"
    return "firewall on, " + ("inbound pinholes allowed" if status.inbound_pinhole_allowed else "NO inbound pinholes")


def alternative_ports(secret: bytes, transport: Transport, internal_port: int) -> Iterator[int]:
    """Where to go on a conflict: the same sequence after a restart, different per mapping and host.
    Lazy: a keyed hash per port, computed only when a conflict asks for one."""
    seen: set[int] = {internal_port}
    for attempt in range(1, MAX_ATTEMPTS * 4):
        digest = derive_nonce(secret, "upnp-port", transport, internal_port, attempt, size=4)
        port = 1024 + int.from_bytes(digest, "big") % (65536 - 1024)
        if port not in seen:
            seen.add(port)
            yield port


def _refusal(error: igd.UpnpError, what: str) -> RouterRefused:
    return RouterRefused(f"router refused {what}: {error}", protocol=NAME, code=error.code)


class IgdClient:
    """What every UPnP client of an IGD shares: finding the best IGD (SSDP or a given root URL, within one
    deadline, every candidate's fate kept), fetching its documents and calling its SOAP actions.

    Subclasses say what makes an IGD usable for them (`_inspect`): `UpnpClient` wants a connected WAN
    connection service (IPv4 port mappings), `UpnpPinholeClient` the IPv6 firewall control service."""

    name = NAME

    def __init__(
        self,
        location: RouterLocation,
        secret: bytes,
        *,
        deadline: float,
        root_url: str | None = None,
        connections: http.Connections | None = None,
    ) -> None:
        self._location = location
        self._secret = secret
        self._deadline = deadline
        self._root_url = root_url
        self._igd: Igd | None = None
        self.drops: dict[str, int] = {}
        self.candidates: list[Candidate] = []  # of the last discovery
        # Kept alive where the router keeps them (not miniupnpd).
        self._connections = connections if connections is not None else http.Connections()
        # Every UPnP error code the router answered (handled or final), at most MAX_CODES distinct ones.
        self.router_codes: Counter[int] = Counter()

    # The SOAP answers' reader; the firewall control service names its fault codes its own way.
    _parse_response = staticmethod(igd.parse_soap_response)

    def close(self) -> None:
        """Close the connections kept alive; the client stays usable (it opens new ones)."""
        self._connections.close()

    # --- discovery ---------------------------------------------------------------------------------

    async def _fetch(self, url: str, limit: int, trace: list[http.Progress] | None = None) -> bytes:
        reply = await http.request(
            "GET", url, max_body=limit, deadline=self._deadline, trace=trace, connections=self._connections
        )
        if reply.status != 200:
            raise RouterRefused(f"router answered HTTP {reply.status} for {url}", protocol=NAME, code=reply.status)
        return reply.body

    async def soap(
        self, service: igd.Service, request: igd.SoapRequest, *, trace: list[http.Progress] | None = None
    ) -> dict[str, str]:
        """One SOAP action; UpnpError for a fault, RouterRefused/RouterTimeout for transport trouble."""
        reply = await http.request(
            "POST",
            service.control_url,
            max_body=igd.MAX_SOAP_SIZE,
            deadline=self._deadline,
            headers=request.headers(),
            content=request.body(),
            trace=trace,
            connections=self._connections,
        )
        try:
            return self._parse_response(reply.body, request, reply.status)
        except igd.UpnpError as error:
            if error.code in self.router_codes or len(self.router_codes) < MAX_CODES:
                self.router_codes[error.code] += 1
            raise
        except DecodeError as exc:
            raise RouterRefused(
                f"router's {request.action} reply is malformed: {exc.reason}", protocol=NAME, code=reply.status
            ) from None

    async def discover(self) -> Igd:
        """The best IGD: `root_url` if given, else SSDP, returning once the best one is certain.

        Within the deadline in all. What became of every candidate (refused LOCATION, failed or
        unfinished inspection) is kept in `candidates`, and the error names the first few.
        """
        if self._igd is not None:
            return self._igd
        self.candidates = []
        if self._root_url is not None:
            self._igd = await self._inspect_root(self._given_root())
        else:
            self._igd = await self._search()
        return self._igd

    def _given_root(self) -> Found:
        try:
            location = ssdp.validate_location(
                self._root_url or "",
                responder=self._location.gateway,
                gateway=self._location.gateway,
                local_network=self._location.local_network,
            )
        except DecodeError as exc:
            raise ProtocolUnavailable(f"--root-url refused: {exc.reason}") from None
        return Found(location, self._location.gateway, "root-url", None)

    async def _inspect_root(self, found: Found) -> Igd:
        loop = asyncio.get_running_loop()
        candidate = Candidate(found.location.url, str(found.responder), loop.time())
        self.candidates.append(candidate)
        try:
            async with asyncio.timeout(self._deadline):
                igd_found = await self._inspect(found, candidate.trace)
        except TimeoutError:
            candidate.unfinished(loop.time())
            raise RouterTimeout(
                f"no usable IGD answered {self._root_url} within {self._deadline:g} s ({candidate.line()})"
            ) from None
        except (RouterRefused, RouterTimeout, ProtocolUnavailable) as exc:
            candidate.settle(FAILED, str(exc))
            raise
        candidate.settle(USABLE, igd_found.summary())
        return igd_found

    async def _search(self) -> Igd:
        gateway = str(self._location.gateway)
        usable: list[Igd] = []
        inspections: dict[asyncio.Future[Igd], Candidate] = {}
        loop = asyncio.get_running_loop()
        end = loop.time() + self._deadline
        window_end = end  # the deadline, or sooner once a candidate settled (see the windows above)
        unreachable = False
        async with search(self._location) as searching:
            next_found: asyncio.Future[Found | Refused | Unreachable] = asyncio.ensure_future(searching.found.get())
            try:
                while True:
                    waiting: set[asyncio.Future[Any]] = {next_found, *inspections}
                    timeout = max(0.0, window_end - loop.time())
                    done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    if not done:
                        break  # the collection window closed, or the deadline came
                    for task in done:
                        if task is next_found:
                            offered = next_found.result()
                            next_found = asyncio.ensure_future(searching.found.get())
                            if isinstance(offered, Unreachable):
                                # The gateway says no SSDP server listens (aio/ssdp.py): end now,
                                # unless a candidate is being inspected already.
                                unreachable = True
                                grace = FAILED_WINDOW if inspections else UNREACHABLE_GRACE
                                window_end = min(window_end, loop.time() + grace)
                                continue
                            if isinstance(offered, Refused):
                                self.candidates.append(
                                    Candidate(
                                        offered.location, str(offered.responder), loop.time(), REFUSED, offered.reason
                                    )
                                )
                                window_end = min(window_end, loop.time() + FAILED_WINDOW)
                                continue
                            candidate = Candidate(offered.location.url, str(offered.responder), loop.time())
                            self.candidates.append(candidate)
                            inspections[asyncio.ensure_future(self._inspect(offered, candidate.trace))] = candidate
                            continue
                        candidate = inspections.pop(task)
                        try:
                            found: Igd = task.result()
                        except (RouterRefused, RouterTimeout, ProtocolUnavailable) as exc:
                            # A broken IGD need not cost the whole deadline: others get a window.
                            candidate.settle(FAILED, str(exc))
                            window_end = min(window_end, loop.time() + FAILED_WINDOW)
                            continue
                        candidate.settle(USABLE, found.summary())
                        if found.rank(gateway) == (0, 0):
                            return found  # cannot be beaten: stop at once
                        usable.append(found)
                        window_end = min(window_end, loop.time() + COLLECT_WINDOW)
            finally:
                next_found.cancel()
                now = loop.time()
                for task, candidate in inspections.items():
                    task.cancel()
                    candidate.unfinished(now)
                self.drops = dict(searching.drops)
        if usable:
            return min(usable, key=lambda candidate: candidate.rank(gateway))
        reasons = _reasons(self.candidates)
        if unreachable and not self.candidates:
            raise RouterUnreachable(
                f"UPnP: the gateway {gateway} answered SSDP with ICMP port unreachable: no IGD listens there"
            )
        if loop.time() >= end:
            raise RouterTimeout(f"no usable IGD answered SSDP within {self._deadline:g} s{reasons}")
        raise ProtocolUnavailable(f"no usable IGD answered SSDP{reasons}")

    async def _inspect(self, found: Found, trace: list[http.Progress]) -> Igd:
        """The IGD behind `found`, usable for this client (its description, service and state), or
        RouterRefused / RouterTimeout / ProtocolUnavailable saying why not."""
        raise NotImplementedError

    async def _description(self, found: Found, trace: list[http.Progress]) -> igd.DeviceDescription:
        try:
            return igd.parse_device_description(
                await self._fetch(found.location.url, igd.MAX_DESCRIPTION_SIZE, trace), found.location.url
            )
        except DecodeError as exc:
            raise RouterRefused(f"router's description is unusable: {exc.reason}", protocol=NAME, code=0) from None

    async def _actions(self, service: igd.Service, trace: list[http.Progress]) -> frozenset[str]:
        """The actions `service`'s SCPD lists; none when it has no SCPD or an unreadable one (which only
        costs the IGD:2 extras)."""
        if not service.scpd_url:
            return frozenset()
        try:
            return igd.parse_scpd(await self._fetch(service.scpd_url, igd.MAX_DESCRIPTION_SIZE, trace))
        except (DecodeError, RouterRefused, RouterTimeout):
            return frozenset()

    def _candidates(self) -> dict[str, Any]:
        return {"candidates": [candidate.to_dict() for candidate in self.candidates]}

    def _not_found(self, exc: Exception, started: float) -> ProtocolStatus:
        """`probe`'s answer when discovery found no usable IGD: why, and every candidate seen."""
        elapsed = (time.perf_counter() - started) * 1000
        return ProtocolStatus(NAME, available=False, reason=str(exc), elapsed_ms=elapsed, details=self._candidates())


class UpnpClient(IgdClient):
    """Implements `PortMapper` with UPnP IGD (WANIPConnection / WANPPPConnection)."""

    def __init__(
        self,
        location: RouterLocation,
        secret: bytes,
        *,
        deadline: float,
        root_url: str | None = None,
    ) -> None:
        super().__init__(location, secret, deadline=deadline, root_url=root_url)
        self.tag = derive_nonce(secret, "upnp-tag", size=4).hex()
        # Mappings this client made: (transport, internal port) -> (external port, lease end or None),
        # so that deleting one takes one DeletePortMapping instead of a lookup first.
        self._made: dict[tuple[Transport, int], tuple[int, float | None]] = {}
        self._external_ip_request: igd.SoapRequest | None = None

    async def _inspect(self, found: Found, trace: list[http.Progress]) -> Igd:
        """Description -> connection services (best first) -> the first connected one, with its SCPD.
        (An IGD may list several WAN services, not all connected: docs/QUIRKS.md U12.)"""
        description = await self._description(found, trace)
        services = description.connection_services()
        if not services:
            raise ProtocolUnavailable(f"{found.location.url} describes no WAN connection service")
        best: Igd | None = None
        skipped: list[tuple[str, str]] = []
        for service in services:
            candidate = await self._inspect_service(found, description, service, trace)
            if candidate.connected:
                return replace(candidate, skipped=tuple(skipped))
            best = best or candidate
            state = "unknown" if candidate.status is None else candidate.status.connection_status
            skipped.append((service.service_type, state))
        assert best is not None
        return best

    async def _inspect_service(
        self, found: Found, description: igd.DeviceDescription, service: igd.Service, trace: list[http.Progress]
    ) -> Igd:
        async def status() -> igd.StatusInfo | None:
            try:
                return igd.status_info_from(
                    await self.soap(service, igd.get_status_info(service.service_type), trace=trace)
                )
            except (igd.UpnpError, DecodeError, RouterRefused):
                return None

        async def external() -> IPv4Address | None:
            try:
                outputs = await self.soap(service, igd.get_external_ip_address(service.service_type), trace=trace)
                return igd.external_ip_from(outputs)
            except (igd.UpnpError, DecodeError):
                return None

        supported, state, address = await asyncio.gather(self._actions(service, trace), status(), external())
        return Igd(found.location.url, str(found.responder), description, service, supported, address, state)

    async def probe(self) -> ProtocolStatus:
        started = time.perf_counter()
        try:
            found = await self.discover()
        except (RouterRefused, RouterTimeout, ProtocolUnavailable, DecodeError) as exc:
            return self._not_found(exc, started)
        elapsed = (time.perf_counter() - started) * 1000
        candidates = self._candidates()
        # miniupnpd behind another NAT answers an empty address, others 0.0.0.0 (docs/QUIRKS.md U8).
        if found.external_ip is None or not found.connected:
            state = found.status.connection_status if found.status else "unknown"
            return ProtocolStatus(
                NAME,
                available=False,
                reason=f"IGD found but it has no usable WAN address (status {state}: not connected or double NAT)",
                elapsed_ms=elapsed,
                details=found.details() | candidates,
            )
        return ProtocolStatus(
            NAME,
            available=True,
            reason=f"IGD answered ({found.service.service_type.rsplit(':', 2)[-2]})",
            external_ip=found.external_ip,
            elapsed_ms=elapsed,
            details=found.details() | candidates,
        )

    # --- mappings ----------------------------------------------------------------------------------

    def description_for(self, transport: Transport, internal_port: int) -> str:
        """Carries our instance tag so our own mappings are recognised in the router's table."""
        return f"autonat:{self.tag} {internal_port}/{transport}"

    def _require_public(self, found: Igd, why: str) -> None:
        if found.external_ip is None or not is_public(found.external_ip):
            raise NotPublic(
                f"router {why}, and its external address {found.external_ip or 'is unknown'}"
                " is not public: refusing to leave a permanent mapping for nothing"
            )

    async def add(self, request: MappingRequest) -> Mapping:
        found = await self.discover()
        service, st = found.service, found.service.service_type
        lease = request.lifetime
        external = request.external_port or request.internal_port
        alternatives = alternative_ports(self._secret, request.transport, request.internal_port)
        used_any = conflict_501 = same_port = False
        for _ in range(MAX_ATTEMPTS * 2):
            arguments: dict[str, Any] = {
                "external_port": external,
                "transport": request.transport,
                "internal_port": request.internal_port,
                "internal_client": str(self._location.local_address),
                "description": self.description_for(request.transport, request.internal_port),
                "lease": lease,
            }
            try:
                if used_any:
                    external = igd.reserved_port_from(
                        await self.soap(service, igd.add_port_mapping(st, any_port=True, **arguments))
                    )
                else:
                    await self.soap(service, igd.add_port_mapping(st, **arguments))
            except igd.UpnpError as error:
                code = error.code
                if code == 402 and lease != 0:  # ARRIS NVG578LX: 402 where 725 is meant (docs/QUIRKS.md U2)
                    self._require_public(found, "rejects finite leases (UPnP error 402)")
                    lease = 0
                elif code == 402:  # a router that caps leases at a week refuses 0 too (docs/QUIRKS.md U3)
                    lease = PERMANENT_FALLBACK_LEASE
                elif code == 725 and lease == 0:
                    # 725 to a permanent lease too: nothing left to ask (no router named: docs/QUIRKS.md G11).
                    raise RouterRefused(
                        f"router answers {error} even to a permanent lease: UPnP mappings are impossible here",
                        protocol=NAME,
                        code=code,
                    ) from None
                elif code == 725:  # MikroTik RouterOS, Netgear R7000P, ZyXEL VMG1312 (docs/QUIRKS.md U1)
                    self._require_public(found, "only supports permanent leases (UPnP error 725)")
                    lease = 0
                # 501 once: miniupnpd with CHECK_PORTINUSE, port in use on the router (docs/QUIRKS.md U4)
                elif code in (718, 729) or (code == 501 and not conflict_501):
                    conflict_501 = conflict_501 or code == 501
                    if "AddAnyPortMapping" in found.actions and not used_any:
                        used_any = True
                    else:
                        external = next(alternatives)
                elif code == 724 and not same_port:
                    same_port, external = True, request.internal_port
                elif code in (716, 727):
                    raise RouterRefused(
                        f"router only maps wildcard external ports ({error}): a fixed port is impossible via UPnP",
                        protocol=NAME,
                        code=code,
                    ) from None
                elif code == 606:
                    raise RouterRefused(
                        f"router's policy forbids this mapping ({error}); check its UPnP permission rules",
                        protocol=NAME,
                        code=code,
                    ) from None
                elif code == 728:
                    raise RouterRefused(
                        f"router's mapping table is full ({error}); try again later", protocol=NAME, code=code
                    ) from None
                else:
                    raise _refusal(error, f"AddPortMapping {request.transport} {external}") from None
                continue
            if len(self._made) < MAX_REMEMBERED:
                self._made[(request.transport, request.internal_port)] = (
                    external,
                    None if lease == 0 else time.monotonic() + lease,
                )
            return Mapping(
                protocol=NAME,
                transport=request.transport,
                internal_address=self._location.local_address,
                internal_port=request.internal_port,
                external_ip=found.external_ip,
                external_port=external,
                lifetime=lease,
            )
        raise RouterRefused(
            f"router refused every external port tried for {request.transport} {request.internal_port}",
            protocol=NAME,
            code=718,
        )

    async def delete_external(self, transport: Transport, external_port: int) -> None:
        """DeletePortMapping; 714 (no such entry, miniupnpd's answer: docs/QUIRKS.md U10) means it is
        already gone, which is success."""
        found = await self.discover()
        request = igd.delete_port_mapping(found.service.service_type, external_port=external_port, transport=transport)
        for key, (made_port, _) in list(self._made.items()):
            if key[0] == transport and made_port == external_port:
                del self._made[key]
        try:
            await self.soap(found.service, request)
        except igd.UpnpError as error:
            if error.code not in (714, 730):
                raise _refusal(error, f"DeletePortMapping {transport} {external_port}") from None

    async def entry(self, transport: Transport, external_port: int) -> igd.PortMappingEntry | None:
        """GetSpecificPortMappingEntry: the router's view of one mapping; None when it has none (714)."""
        found = await self.discover()
        request = igd.get_specific_port_mapping_entry(
            found.service.service_type, external_port=external_port, transport=transport
        )
        try:
            outputs = await self.soap(found.service, request)
        except igd.UpnpError as error:
            if error.code in (714, 730):
                return None
            raise _refusal(error, f"GetSpecificPortMappingEntry {transport} {external_port}") from None
        try:
            return igd.specific_entry_from(outputs, external_port, transport)
        except DecodeError as exc:
            raise RouterRefused(f"router's mapping entry is malformed: {exc.reason}", protocol=NAME, code=0) from None

    async def external_ip(self) -> IPv4Address | None:
        """GetExternalIPAddress on the chosen service, asked again (not the discovery-time answer)."""
        found = await self.discover()
        request = self._external_ip_request
        if request is None or request.service_type != found.service.service_type:
            request = self._external_ip_request = igd.get_external_ip_address(found.service.service_type)
        try:
            outputs = await self.soap(found.service, request)
            return igd.external_ip_from(outputs)
        except igd.UpnpError as error:
            raise _refusal(error, "GetExternalIPAddress") from None
        except DecodeError as exc:
            raise RouterRefused(
                f"router's external address is malformed: {exc.reason}", protocol=NAME, code=0
            ) from None

    async def delete(self, transport: Transport, internal_port: int) -> None:
        """Delete every mapping of ours (InternalClient = us) for `internal_port`.

        A mapping this client made, whose lease has not run out, is deleted by its external port in
        one call; otherwise the router's table is looked up first (another process made it, or it may
        have expired and the external port been given to another host since)."""
        made = self._made.get((transport, internal_port))
        if made is not None and (made[1] is None or time.monotonic() < made[1]):
            await self.delete_external(transport, made[0])
            return
        found = await self.discover()
        mine = str(self._location.local_address)
        with contextlib.suppress(igd.UpnpError, RouterRefused):
            entry = igd.specific_entry_from(
                await self.soap(
                    found.service,
                    igd.get_specific_port_mapping_entry(
                        found.service.service_type, external_port=internal_port, transport=transport
                    ),
                ),
                internal_port,
                transport,
            )
            if entry.internal_client == mine and entry.internal_port == internal_port:
                await self.delete_external(transport, internal_port)
                return
        for entry in await self.list_mappings():
            if entry.transport == transport and entry.internal_client == mine and entry.internal_port == internal_port:
                await self.delete_external(transport, entry.external_port)

    async def _listing(self, service: igd.Service, transport: Transport) -> list[igd.PortMappingEntry]:
        request = igd.get_list_of_port_mappings(service.service_type, transport=transport, count=MAX_LISTED)
        try:
            return igd.port_listing_from(await self.soap(service, request))
        except igd.UpnpError as error:
            if error.code in (714, 730):  # an empty table for this transport
                return []
            raise

    async def list_mappings(self) -> list[igd.PortMappingEntry]:
        """The router's whole table, ours or not (like `upnpc -l`)."""
        found = await self.discover()
        st = found.service.service_type
        if "GetListOfPortMappings" in found.actions:
            with contextlib.suppress(DecodeError, igd.UpnpError):  # else walk the table one by one
                entries: list[igd.PortMappingEntry] = []
                for transport in Transport:
                    entries += await self._listing(found.service, transport)
                return sorted(entries, key=lambda e: (e.external_port, e.transport))
        walked: list[igd.PortMappingEntry] = []
        for index in range(MAX_LISTED):
            try:
                outputs = await self.soap(found.service, igd.get_generic_port_mapping_entry(st, index))
            except igd.UpnpError:
                break  # miniupnpd: 713 past the end (docs/QUIRKS.md U9); any other fault ends it too
            try:
                walked.append(igd.generic_entry_from(outputs))
            except DecodeError:
                continue
        return walked


# --- IPv6 firewall pinholes (IGD:2 WANIPv6FirewallControl:1) ----------------------------------------------

PINHOLE_GONE = (704, 402)  # NoSuchEntry, and miniupnpd 2.3.1's answer for a UniqueID it does not hold (U18)
# UpdatePinhole of an ID that now names another host's pinhole (a restarted router numbers from 1 again)
# is refused 606 by miniupnpd 2.3.1 (U18): ours is gone just the same.
UPDATE_GONE = (*PINHOLE_GONE, 606)
PINHOLE_MIN_LEASE = 1  # LeaseTime's lower bound (§2.3.7): what a pinhole asked for only to learn its ID gets


class SourceBound(http.Connections):
    """HTTP connections to the router that leave from one address of ours (the stable IPv6 address).

    An IGD:2 router opens a pinhole only for the address the request comes from (docs/QUIRKS.md U16),
    and on a host with privacy addresses the kernel would pick a temporary one. `aio/http.py` asks its
    `Connections` for a kept connection before it opens one of its own; this one always has one: a kept
    connection the router left open, else a fresh one bound to `source` whose connect is under way
    (the HTTP layer sends once it is writable, within the request's one deadline). What this cannot
    cover: a connection the router closes before it answers is retried by the HTTP layer on a new,
    unbound connection, from the kernel's choice of source; a pinhole request on it is refused (606),
    never granted for another address.
    """

    def __init__(self, source: IPv4Address | IPv6Address) -> None:
        super().__init__()
        self.source = source

    def take(self, address: tuple[str, int], now: float) -> socket.socket | None:
        kept = super().take(address, now)
        return kept if kept is not None else self._connect(address)

    def _connect(self, address: tuple[str, int]) -> socket.socket:
        host = address[0].replace("%25", "%")  # a link-local URL's zone, RFC 6874 (proto/ssdp.py)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind((str(self.source), 0))
            with contextlib.suppress(BlockingIOError):
                sock.connect((host, address[1]))
        except BaseException:
            sock.close()
            raise
        return sock


class UpnpPinholeClient(IgdClient):
    """Implements `PortMapper` for IPv6 with IGD:2's WANIPv6FirewallControl:1: a mapping is a pinhole to
    our own (stable) address, `external` = internal, named by the UniqueID the router gives it.

    Every request leaves from `location.local_address` (`SourceBound`), and the pinhole is for that
    address. Renewal is UpdatePinhole by UniqueID (AddPinhole again when the router no longer knows it);
    `check` is CheckPinholeWorking, where 709 NoTrafficReceived still means "it exists" (U18). Leases are
    capped at 86400 s, the service's maximum (§2.3.7)."""

    _parse_response = staticmethod(pinhole.parse_response)

    def __init__(
        self, location: RouterLocation, secret: bytes, *, deadline: float, root_url: str | None = None
    ) -> None:
        if not isinstance(location.local_address, IPv6Address):
            raise ValueError(f"pinholes are for an IPv6 address, not {location.local_address}")
        super().__init__(
            location, secret, deadline=deadline, root_url=root_url, connections=SourceBound(location.local_address)
        )
        self._local: IPv6Address = IPv6Address(location.local_address.packed)
        # Pinholes this client made or renewed: (transport, internal port) -> UniqueID.
        self._made: dict[tuple[Transport, int], int] = {}

    async def _inspect(self, found: Found, trace: list[http.Progress]) -> Igd:
        """Description -> the WANIPv6FirewallControl service, its SCPD and GetFirewallStatus, at once."""
        description = await self._description(found, trace)
        service = pinhole.firewall_service(description)
        if service is None:
            raise ProtocolUnavailable(
                f"{found.location.url} describes no IPv6 firewall control (WANIPv6FirewallControl): no pinholes"
            )

        async def status() -> pinhole.FirewallStatus | None:
            try:
                outputs = await self.soap(service, pinhole.get_firewall_status(service.service_type), trace=trace)
                return pinhole.firewall_status_from(outputs)
            except (igd.UpnpError, DecodeError, RouterRefused):
                return None

        supported, firewall = await asyncio.gather(self._actions(service, trace), status())
        return Igd(
            found.location.url,
            str(found.responder),
            description,
            service,
            supported,
            None,
            None,
            firewall=firewall,
            pinholes=True,
        )

    async def probe(self) -> ProtocolStatus:
        """The IGD's firewall control service answers, and allows inbound pinholes (GetFirewallStatus)."""
        started = time.perf_counter()
        try:
            found = await self.discover()
        except (RouterRefused, RouterTimeout, ProtocolUnavailable, DecodeError) as exc:
            return self._not_found(exc, started)
        details = found.details() | self._candidates()
        elapsed = (time.perf_counter() - started) * 1000
        kind = found.service.service_type.rsplit(":", 2)[-2]
        if not found.pinholes_allowed:
            reason = f"IGD answered ({kind}) but its firewall allows no inbound pinholes"
            return ProtocolStatus(NAME, available=False, reason=reason, elapsed_ms=elapsed, details=details)
        return ProtocolStatus(
            NAME,
            available=True,
            reason=f"IGD answered ({kind}, {_firewall_text(found.firewall)})",
            external_ip=self._local,
            elapsed_ms=elapsed,
            details=details,
        )

    def known(self, transport: Transport, internal_port: int) -> int | None:
        """The UniqueID of our pinhole of `internal_port`, if this client made or renewed it."""
        return self._made.get((transport, internal_port))

    def _mapping(self, request: MappingRequest, unique_id: int, lease: int) -> Mapping:
        return Mapping(
            protocol=NAME,
            transport=request.transport,
            internal_address=self._local,
            internal_port=request.internal_port,
            external_ip=self._local,
            external_port=request.internal_port,
            lifetime=lease,
            unique_id=unique_id,
        )

    async def add(self, request: MappingRequest, unique_id: int | None = None) -> Mapping:
        """Open (or renew) the pinhole of `request.internal_port` for our address. `unique_id`, or the
        one this client already holds, is renewed with UpdatePinhole; a router that no longer knows it
        (704, or 402 from miniupnpd; 606 when the ID now names another host's pinhole: U18) gets
        AddPinhole, as a first request does."""
        found = await self.discover()
        service = found.service
        lease = min(request.lifetime, pinhole.MAX_LEASE)
        key = (request.transport, request.internal_port)
        known = unique_id if unique_id is not None else self._made.get(key)
        if known is not None:
            try:
                await self.soap(service, pinhole.update_pinhole(service.service_type, unique_id=known, lease=lease))
            except igd.UpnpError as error:
                if error.code not in UPDATE_GONE:
                    raise self._refused(error, f"UpdatePinhole {known}") from None
                self._made.pop(key, None)
            else:
                self._remember(key, known)
                return self._mapping(request, known, lease)
        created = await self._add(service, request, lease)
        self._remember(key, created)
        return self._mapping(request, created, lease)

    async def _add(self, service: igd.Service, request: MappingRequest, lease: int) -> int:
        action = pinhole.add_pinhole(
            service.service_type,
            internal_client=self._local,
            internal_port=request.internal_port,
            transport=request.transport,
            lease=lease,
        )
        try:
            return pinhole.unique_id_from(await self.soap(service, action))
        except DecodeError as exc:
            raise RouterRefused(
                f"router's AddPinhole answer is malformed: {exc.reason}", protocol=NAME, code=0
            ) from None
        except igd.UpnpError as error:
            raise self._refused(error, f"AddPinhole {request.transport} {request.internal_port}") from None

    def _refused(self, error: igd.UpnpError, what: str) -> RouterRefused:
        if error.code == 606:
            # miniupnpd: only for the requester's own address, and internal ports >= 1024 (U16).
            return RouterRefused(
                f"router's policy forbids this pinhole ({error}): it opens them only for the address a request"
                f" comes from ({self._local} here) and, often, only for ports 1024 and up",
                protocol=NAME,
                code=error.code,
            )
        if error.code in (702, 703):
            return RouterRefused(
                f"router refused {what}: {error}; its firewall takes no pinholes", protocol=NAME, code=error.code
            )
        return _refusal(error, what)

    def _remember(self, key: tuple[Transport, int], unique_id: int) -> None:
        if key in self._made or len(self._made) < MAX_REMEMBERED:
            self._made[key] = unique_id

    async def delete_pinhole(self, unique_id: int) -> None:
        """DeletePinhole; one the router does not hold (704, or 402 from miniupnpd: U18) is gone already."""
        found = await self.discover()
        for key, made in list(self._made.items()):
            if made == unique_id:
                del self._made[key]
        try:
            await self.soap(found.service, pinhole.delete_pinhole(found.service.service_type, unique_id=unique_id))
        except igd.UpnpError as error:
            if error.code not in PINHOLE_GONE:
                raise self._refused(error, f"DeletePinhole {unique_id}") from None

    async def delete(self, transport: Transport, internal_port: int) -> None:
        """Delete our pinhole of `internal_port`. Without its UniqueID (made by another process whose
        answer was lost), the ID is asked for with an AddPinhole of the same pinhole for the shortest lease:
        miniupnpd answers one it holds with that pinhole's ID (docs/QUIRKS.md U19); a router that makes a
        second one instead gets that one deleted, and the first ends with its own lease."""
        unique_id = self._made.get((transport, internal_port))
        if unique_id is None:
            found = await self.discover()
            unique_id = await self._add(found.service, MappingRequest(transport, internal_port), PINHOLE_MIN_LEASE)
        await self.delete_pinhole(unique_id)

    async def check(self, unique_id: int) -> bool:
        """Does the router still hold pinhole `unique_id`? CheckPinholeWorking: an answer, or 709
        NoTrafficReceived (miniupnpd counts no packets on its nftables rules: U18), means yes; 704 (402
        from miniupnpd) means no. Other refusals are RouterRefused."""
        found = await self.discover()
        try:
            await self.soap(
                found.service, pinhole.check_pinhole_working(found.service.service_type, unique_id=unique_id)
            )
        except igd.UpnpError as error:
            if error.code == 709:
                return True
            if error.code in PINHOLE_GONE:
                return False
            raise self._refused(error, f"CheckPinholeWorking {unique_id}") from None
        return True

    async def packets(self, unique_id: int) -> int:
        """GetPinholePackets: how many packets went through pinhole `unique_id`."""
        found = await self.discover()
        try:
            outputs = await self.soap(
                found.service, pinhole.get_pinhole_packets(found.service.service_type, unique_id=unique_id)
            )
            return pinhole.pinhole_packets_from(outputs)
        except igd.UpnpError as error:
            raise self._refused(error, f"GetPinholePackets {unique_id}") from None
        except DecodeError as exc:
            raise RouterRefused(
                f"router's pinhole packet count is malformed: {exc.reason}", protocol=NAME, code=0
            ) from None

    async def outbound_timeout(
        self, transport: Transport, internal_port: int, remote_host: IPv6Address | None = None, remote_port: int = 0
    ) -> int:
        """GetOutboundPinholeTimeout: how long the firewall keeps an outbound flow from our address's
        `internal_port` open without traffic (miniupnpd 2.3.1 answers 501: docs/QUIRKS.md U17)."""
        found = await self.discover()
        request = pinhole.get_outbound_pinhole_timeout(
            found.service.service_type,
            remote_host=remote_host,
            remote_port=remote_port,
            internal_client=self._local,
            internal_port=internal_port,
            transport=transport,
        )
        try:
            return pinhole.outbound_timeout_from(await self.soap(found.service, request))
        except igd.UpnpError as error:
            raise self._refused(error, "GetOutboundPinholeTimeout") from None
        except DecodeError as exc:
            raise RouterRefused(
                f"router's outbound pinhole timeout is malformed: {exc.reason}", protocol=NAME, code=0
            ) from None

    async def firewall_status(self) -> pinhole.FirewallStatus:
        """GetFirewallStatus, asked again."""
        found = await self.discover()
        try:
            return pinhole.firewall_status_from(
                await self.soap(found.service, pinhole.get_firewall_status(found.service.service_type))
            )
        except igd.UpnpError as error:
            raise self._refused(error, "GetFirewallStatus") from None
        except DecodeError as exc:
            raise RouterRefused(f"router's firewall status is malformed: {exc.reason}", protocol=NAME, code=0) from None
