"""UPnP IGD v1/v2 client on asyncio: discovery, inspection and port mappings.

The wire formats live in `autonat.proto.ssdp` and `autonat.proto.igd`; what to do with what the router
says (the best IGD, the AddPortMapping error matrix and its router quirks, the one-call delete) lives in
`autonat.aio.upnp_core`, sans-IO, shared with the blocking client (`autonat.aio.blocking_upnp`). This
module moves the bytes: SSDP through aio/ssdp.py, HTTP through aio/http.py, several requests at once
where they are independent.

Every UPnP error code the router answers, handled or final, is counted in `UpnpClient.router_codes`
(the metrics' `autonat_router_errors_total`, and `autonat doctor`, read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Generator
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar

from autonat.aio import http
from autonat.aio.route import RouterLocation
from autonat.aio.ssdp import Found, Refused, Unreachable, search
from autonat.aio.upnp_core import (
    COLLECT_WINDOW,
    FAILED_WINDOW,
    INSPECTING,
    MAX_ATTEMPTS,
    MAX_CODES,
    MAX_LISTED,
    MAX_REMEMBERED,
    NAME,
    PERMANENT_FALLBACK_LEASE,
    REFUSED,
    SHOWN_REASONS,
    UNFINISHED,
    UNREACHABLE_GRACE,
    USABLE,
    Call,
    Candidate,
    Discovery,
    Fetch,
    Igd,
    Mappings,
    Offer,
    RefusedOffer,
    Soap,
    alternative_ports,
    firewall_text,
    inspect,
    reasons,
    refusal,
    soap_outputs,
)
from autonat.aio.upnp_core import FAILED_OUTCOME as FAILED
from autonat.errors import ProtocolUnavailable, RouterRefused, RouterTimeout
from autonat.mapper import Mapping, MappingRequest, ProtocolStatus
from autonat.proto import igd, pinhole, ssdp
from autonat.proto.errors import DecodeError
from autonat.proto.types import Transport

# The decisions moved to aio/upnp_core.py; their names stay importable from here.
__all__ = [
    "COLLECT_WINDOW",
    "FAILED",
    "FAILED_WINDOW",
    "INSPECTING",
    "MAX_ATTEMPTS",
    "MAX_CODES",
    "MAX_LISTED",
    "MAX_REMEMBERED",
    "NAME",
    "PERMANENT_FALLBACK_LEASE",
    "REFUSED",
    "SHOWN_REASONS",
    "UNFINISHED",
    "UNREACHABLE_GRACE",
    "USABLE",
    "Candidate",
    "IgdClient",
    "Igd",
    "SourceBound",
    "UpnpClient",
    "UpnpPinholeClient",
    "alternative_ports",
]
_firewall_text = firewall_text
_refusal = refusal
_reasons = reasons
T = TypeVar("T")


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
        return soap_outputs(self._parse_response, reply.body, request, reply.status, self.router_codes)

    async def _run(self, service: igd.Service, steps: Soap[T]) -> T:
        """Drive a sans-IO mapping operation (aio/upnp_core.py `Mappings`): each SOAP request it yields
        goes to `service`; its outputs go back, or the error the call ended in is thrown in."""
        try:
            request = next(steps)
            while True:
                try:
                    outputs = await self.soap(service, request)
                except (igd.UpnpError, RouterRefused, RouterTimeout, DecodeError) as exc:
                    request = steps.throw(exc)
                else:
                    request = steps.send(outputs)
        except StopIteration as stop:
            result: T = stop.value
            return result

    async def _step(self, step: Fetch | Call, trace: list[http.Progress]) -> Any:
        try:
            if isinstance(step, Fetch):
                return await self._fetch(step.url, step.limit, trace)
            return await self.soap(step.service, step.request, trace=trace)
        except (igd.UpnpError, RouterRefused, RouterTimeout, DecodeError) as exc:
            return exc

    async def _inspect_steps(
        self, steps: Generator[tuple[Fetch | Call, ...], tuple[Any, ...], Igd], trace: list[http.Progress]
    ) -> Igd:
        """Drive a sans-IO inspection (aio/upnp_core.py `inspect`): each batch it yields at once."""
        try:
            batch = next(steps)
            while True:
                results = await asyncio.gather(*(self._step(step, trace) for step in batch))
                batch = steps.send(tuple(results))
        except StopIteration as stop:
            found: Igd = stop.value
            return found

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
        loop = asyncio.get_running_loop()
        discovery = Discovery(str(self._location.gateway), loop.time(), self._deadline)
        self.candidates = discovery.candidates
        inspections: dict[asyncio.Future[Igd], Candidate] = {}
        async with search(self._location) as searching:
            next_found: asyncio.Future[Found | Refused | Unreachable] = asyncio.ensure_future(searching.found.get())
            try:
                while discovery.best is None:
                    waiting: set[asyncio.Future[Any]] = {next_found, *inspections}
                    timeout = max(0.0, discovery.window_end - loop.time())
                    done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    if not done:
                        break  # the collection window closed, or the deadline came
                    for task in done:
                        if task is next_found:
                            offered = next_found.result()
                            next_found = asyncio.ensure_future(searching.found.get())
                            if isinstance(offered, Unreachable):
                                # The gateway says no SSDP server listens (aio/ssdp.py): end soon.
                                discovery.gateway_unreachable(loop.time())
                            elif isinstance(offered, Refused):
                                discovery.refused(
                                    RefusedOffer(offered.location, offered.responder, offered.reason), loop.time()
                                )
                            else:
                                candidate = discovery.offered(
                                    Offer(offered.location, offered.responder, offered.search_target, offered.server),
                                    loop.time(),
                                )
                                inspections[asyncio.ensure_future(self._inspect(offered, candidate.trace))] = candidate
                            continue
                        candidate = inspections.pop(task)
                        try:
                            found: Igd = task.result()
                        except (RouterRefused, RouterTimeout, ProtocolUnavailable) as exc:
                            discovery.failed(candidate, exc, loop.time())
                            continue
                        if discovery.found(candidate, found, loop.time()):
                            break  # cannot be beaten: stop at once
            finally:
                next_found.cancel()
                for task in inspections:
                    task.cancel()
                self.drops = dict(searching.drops)
        return discovery.result(loop.time())

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
    """Implements `PortMapper` with UPnP IGD (WANIPConnection / WANPPPConnection). The decisions are
    aio/upnp_core.py's (`inspect`, `Mappings`); this drives them over asyncio."""

    def __init__(
        self,
        location: RouterLocation,
        secret: bytes,
        *,
        deadline: float,
        root_url: str | None = None,
    ) -> None:
        super().__init__(location, secret, deadline=deadline, root_url=root_url)
        self._mappings = Mappings(secret, location.local_address)
        self.tag = self._mappings.tag

    @property
    def _made(self) -> dict[tuple[Transport, int], tuple[int, float | None]]:
        """Mappings this client made: (transport, internal port) -> (external port, lease end or None)."""
        return self._mappings.made

    async def _inspect(self, found: Found, trace: list[http.Progress]) -> Igd:
        """Description -> connection services (best first) -> the first connected one, with its SCPD
        (aio/upnp_core.py `inspect`; its SCPD, status and address asked at once)."""
        return await self._inspect_steps(inspect(found.location.url, str(found.responder)), trace)

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
        return self._mappings.description_for(transport, internal_port)

    async def add(self, request: MappingRequest) -> Mapping:
        found = await self.discover()
        return await self._run(found.service, self._mappings.add(found, request, time.monotonic()))

    async def delete_external(self, transport: Transport, external_port: int) -> None:
        """DeletePortMapping; 714 (no such entry, miniupnpd's answer: docs/QUIRKS.md U10) means it is
        already gone, which is success."""
        found = await self.discover()
        await self._run(found.service, self._mappings.delete_external(found, transport, external_port))

    async def entry(self, transport: Transport, external_port: int) -> igd.PortMappingEntry | None:
        """GetSpecificPortMappingEntry: the router's view of one mapping; None when it has none (714)."""
        found = await self.discover()
        return await self._run(found.service, self._mappings.entry(found, transport, external_port))

    async def external_ip(self) -> IPv4Address | None:
        """GetExternalIPAddress on the chosen service, asked again (not the discovery-time answer)."""
        found = await self.discover()
        request = self._mappings.external_ip_request(found)
        try:
            outputs = await self.soap(found.service, request)
        except igd.UpnpError as error:
            raise refusal(error, "GetExternalIPAddress") from None
        return Mappings.read_external_ip(outputs)

    async def delete(self, transport: Transport, internal_port: int) -> None:
        """Delete every mapping of ours (InternalClient = us) for `internal_port`.

        A mapping this client made, whose lease has not run out, is deleted by its external port in
        one call; otherwise the router's table is looked up first (another process made it, or it may
        have expired and the external port been given to another host since)."""
        found = await self.discover()
        await self._run(found.service, self._mappings.delete(found, transport, internal_port, time.monotonic()))

    async def list_mappings(self) -> list[igd.PortMappingEntry]:
        """The router's whole table, ours or not (like `upnpc -l`)."""
        found = await self.discover()
        return await self._run(found.service, self._mappings.list_mappings(found))


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
