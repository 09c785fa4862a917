"""UPnP IGD without an event loop: discovery and port mappings on blocking sockets.

The decisions are the asyncio client's own, sans-IO in `autonat.aio.upnp_core` (the best IGD and every
candidate's fate, the AddPortMapping error matrix with its router quirks, the one-call delete of a mapping
this client made); HTTP is `autonat.aio.blocking_http` (the caps and the one deadline of aio/http.py). This
shell only moves bytes: an SSDP M-SEARCH (UPnP DA 1.1 §1.3.2) on a blocking UDP socket, sent unicast to
the gateway and to the multicast group at once, each LOCATION inspected as it arrives (one request after
the other where the asyncio client asks three at once), and one SOAP request (§3.2) per call, built once
where it never changes. A given root URL (`root_url`) skips SSDP.

Importing it loads neither asyncio nor logging (logging only when a hole is opened or closed), so a
one-shot script pays for the interpreter, httptools and the XML parser, and a warm request costs about
what the exchange costs.

    with BlockingUpnp(locate_router(), host_secret(), deadline=2.0) as upnp:
        mapping = upnp.add(MappingRequest(Transport.UDP, 5060, lifetime=3600))
        upnp.remove(mapping)

A stopped UPnP daemon is known at once: the unicast search draws an ICMP port unreachable (read from the
socket's error queue, Linux IP_RECVERR), a refused or reset TCP connection is a one-line RouterRefused;
silence waits for the deadline (RouterTimeout).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from ipaddress import IPv4Address

from autonat.aio import blocking_http
from autonat.aio.route import RouterLocation
from autonat.aio.ssdp_socket import gateway_refused, offer_of, search_burst, search_socket
from autonat.aio.upnp_core import FAILED_OUTCOME as FAILED
from autonat.aio.upnp_core import (
    NAME,
    SEARCH_SCHEDULE,
    UNFINISHED,
    USABLE,
    Call,
    Candidate,
    Discovery,
    Fetch,
    Igd,
    Inspection,
    Mappings,
    Offer,
    Offers,
    RefusedOffer,
    Soap,
    inspect,
    refusal,
    soap_outputs,
)
from autonat.errors import ProtocolUnavailable, RouterRefused, RouterTimeout
from autonat.mapper import Mapping, MappingRequest, hole_logger
from autonat.proto import igd, ssdp
from autonat.proto.errors import DecodeError
from autonat.proto.httpwire import HttpTimeout, Progress

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, TypeVar

    from autonat.proto.types import Transport

    T = TypeVar("T")

MAX_PREPARED = 16  # SOAP requests kept serialized (argument-free ones: GetExternalIPAddress, GetStatusInfo)
_TRACE_MODULE = "autonat.aio.trace"
_ERRORS = (igd.UpnpError, RouterRefused, RouterTimeout, DecodeError)


def _wiretrace() -> Any:
    """The wire trace when it is on, else None; looked up, never imported (it loads logging)."""
    module = sys.modules.get(_TRACE_MODULE)
    return module if module is not None and module.ON else None


class _Cut(Exception):
    """The discovery's time ran out while a candidate was being inspected."""


class BlockingUpnp:
    """A UPnP IGD client (WANIPConnection / WANPPPConnection) for one gateway, without an event loop.

    `deadline` bounds each request (connect, send and every read) and the discovery in all. Errors are
    one line: RouterRefused (with the UPnP error code), RouterTimeout, RouterUnreachable,
    ProtocolUnavailable, NotPublic. Use it as a context manager (or call `close`), which closes any HTTP
    connection the router kept open; mappings stay on the router until deleted or expired.
    """

    name = NAME

    def __init__(
        self, location: RouterLocation, secret: bytes, *, deadline: float, root_url: str | None = None
    ) -> None:
        self.location = location
        self.deadline = deadline
        self._root_url = root_url
        self._igd: Igd | None = None
        self._mappings = Mappings(secret, location.local_address)
        self._connections = blocking_http.Connections()
        self._prepared: dict[tuple[str, str, str], blocking_http.Prepared] = {}
        self.candidates: list[Candidate] = []  # of the last discovery
        self.drops: dict[str, int] = {}
        # Every UPnP error code the router answered (handled or final), at most MAX_CODES distinct ones.
        self.router_codes: Counter[int] = Counter()

    def close(self) -> None:
        """Close the connections kept alive; idempotent, and the client stays usable."""
        self._connections.close()

    def __enter__(self) -> BlockingUpnp:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    @property
    def tag(self) -> str:
        """This host's instance tag, carried in our mappings' descriptions."""
        return self._mappings.tag

    # --- HTTP and SOAP --------------------------------------------------------------------------------

    def _fetch(self, url: str, limit: int, trace: list[Progress], deadline: float) -> bytes:
        reply = blocking_http.request(
            "GET", url, max_body=limit, deadline=deadline, trace=trace, connections=self._connections
        )
        if reply.status != 200:
            raise RouterRefused(f"router answered HTTP {reply.status} for {url}", protocol=NAME, code=reply.status)
        return reply.body

    def soap(
        self,
        service: igd.Service,
        request: igd.SoapRequest,
        *,
        deadline: float | None = None,
        trace: list[Progress] | None = None,
    ) -> dict[str, str]:
        """One SOAP action; igd.UpnpError for a fault, RouterRefused/RouterTimeout for transport trouble."""
        prepared: blocking_http.Prepared | None
        if request.arguments:
            prepared = blocking_http.prepare("POST", service.control_url, request.headers(), request.body())
        else:  # the same bytes every time: built once
            key = (service.control_url, request.action, request.service_type)  # strings: their hashes are kept
            prepared = self._prepared.get(key)
            if prepared is None:
                prepared = blocking_http.prepare("POST", service.control_url, request.headers(), request.body())
                if len(self._prepared) < MAX_PREPARED:
                    self._prepared[key] = prepared
        reply = blocking_http.send(
            prepared,
            max_body=igd.MAX_SOAP_SIZE,
            deadline=self.deadline if deadline is None else deadline,
            trace=trace,
            connections=self._connections,
        )
        return soap_outputs(igd.parse_soap_response, reply.body, request, reply.status, self.router_codes)

    def _run(self, service: igd.Service, steps: Soap[T]) -> T:
        """Drive a sans-IO mapping operation: each SOAP request it yields goes to `service`; its outputs
        go back, or the error the call ended in is thrown in."""
        soap = self.soap
        try:
            request = next(steps)
            while True:
                try:
                    outputs = soap(service, request)
                except _ERRORS as exc:
                    request = steps.throw(exc)
                else:
                    request = steps.send(outputs)
        except StopIteration as stop:
            result: T = stop.value
            return result

    # --- discovery ------------------------------------------------------------------------------------

    def discover(self) -> Igd:
        """The best IGD: `root_url` if given, else SSDP, returning once the best one is certain; kept.

        Within the deadline in all. What became of every candidate (refused LOCATION, failed or
        unfinished inspection) is kept in `candidates`, and the error names the first few."""
        if self._igd is not None:
            return self._igd
        self.candidates = []
        self._igd = self._inspect_root() if self._root_url is not None else self._search()
        return self._igd

    def _inspect(self, candidate: Candidate, end: float) -> Igd:
        """Run the sans-IO inspection of `candidate`, one request after the other, all before `end`."""
        steps: Inspection = inspect(candidate.location, candidate.responder)
        try:
            batch = next(steps)
            while True:
                batch = steps.send(tuple(self._step(step, candidate.trace, end) for step in batch))
        except StopIteration as stop:
            found: Igd = stop.value
            return found

    def _step(self, step: Fetch | Call, trace: list[Progress], end: float) -> Any:
        left = end - time.monotonic()
        if left <= 0:
            raise _Cut(step.url if isinstance(step, Fetch) else step.service.control_url)
        deadline = min(self.deadline, left)
        try:
            if isinstance(step, Fetch):
                return self._fetch(step.url, step.limit, trace, deadline)
            return self.soap(step.service, step.request, deadline=deadline, trace=trace)
        except HttpTimeout as exc:
            if deadline < self.deadline:  # the discovery's time, not the request's, ran out
                raise _Cut(f"{exc.url}: {exc.stalled}") from None
            return exc
        except _ERRORS as exc:
            return exc

    def _settle(self, candidate: Candidate, discovery: Discovery | None) -> Igd | None:
        end = discovery.window_end if discovery is not None else time.monotonic() + self.deadline
        try:
            found = self._inspect(candidate, end)
        except _Cut as cut:
            candidate.settle(UNFINISHED, f"{cut}, unfinished after {time.monotonic() - candidate.started:.1f} s")
            return None
        except (RouterRefused, RouterTimeout, ProtocolUnavailable) as exc:
            if discovery is None:
                candidate.settle(FAILED, str(exc))
                raise
            discovery.failed(candidate, exc, time.monotonic())
            return None
        if discovery is None:
            candidate.settle(USABLE, found.summary())
        else:
            discovery.found(candidate, found, time.monotonic())
        return found

    def _given_root(self) -> str:
        """The root URL given, checked as a LOCATION from the gateway would be (proto/ssdp.py)."""
        where = self.location
        try:
            location = ssdp.validate_location(
                self._root_url or "", responder=where.gateway, gateway=where.gateway, local_network=where.local_network
            )
        except DecodeError as exc:
            raise ProtocolUnavailable(f"--root-url refused: {exc.reason}") from None
        return location.url

    def _inspect_root(self) -> Igd:
        candidate = Candidate(self._given_root(), str(self.location.gateway), time.monotonic())
        self.candidates.append(candidate)
        found = self._settle(candidate, None)
        if found is None:
            raise RouterTimeout(
                f"no usable IGD answered {self._root_url} within {self.deadline:g} s ({candidate.line()})"
            )
        return found

    def _search(self) -> Igd:
        where = self.location
        started = time.monotonic()
        discovery = Discovery(str(where.gateway), started, self.deadline)
        self.candidates = discovery.candidates
        offers = Offers(where.gateway, where.local_network, where.pinned)
        try:
            sock, recverr = search_socket(where)  # not connected to the gateway: docs/QUIRKS.md S2
        except OSError as exc:
            raise ProtocolUnavailable(
                f"cannot open the SSDP search socket on {where.local_address}: {exc.strerror or exc}"
            ) from None
        trace = _wiretrace()
        messages = search_burst(where)
        schedule = iter(SEARCH_SCHEDULE)
        next_send = started
        try:
            while discovery.best is None:
                now = time.monotonic()
                if now >= next_send:
                    for message, peer in messages:
                        if trace is not None:
                            trace.ssdp_sent(message, peer)
                        try:
                            sock.sendto(message, peer)
                        except OSError:  # lost, or an ICMP error of an earlier datagram reported here
                            if recverr and gateway_refused(sock, where, offers.drops, trace):
                                discovery.gateway_unreachable(time.monotonic())
                    next_send = started + next(schedule, float("inf"))
                    if next_send <= now:
                        next_send = started + next(schedule, float("inf"))
                if now >= discovery.window_end:
                    break
                sock.settimeout(max(min(discovery.window_end, next_send) - now, 0.0001))
                try:
                    data, addr = sock.recvfrom(65536)
                except TimeoutError:
                    continue
                except OSError:
                    if recverr and gateway_refused(sock, where, offers.drops, trace):
                        discovery.gateway_unreachable(time.monotonic())
                    continue
                if trace is not None:
                    trace.ssdp_received(data, addr)
                offer = offer_of(offers, data, addr)
                if isinstance(offer, RefusedOffer):
                    discovery.refused(offer, time.monotonic())
                elif isinstance(offer, Offer):
                    self._settle(discovery.offered(offer, time.monotonic()), discovery)
        finally:
            sock.close()
            self.drops = dict(offers.drops)
        return discovery.result(time.monotonic())

    # --- port mappings (WANIPConnection §2.4) -----------------------------------------------------------

    def external_ip(self) -> IPv4Address | None:
        """GetExternalIPAddress on the chosen service, asked again (not the discovery-time answer)."""
        found = self._igd or self.discover()
        try:
            outputs = self.soap(found.service, self._mappings.external_ip_request(found))
        except igd.UpnpError as error:
            raise refusal(error, "GetExternalIPAddress") from None
        return Mappings.read_external_ip(outputs)

    def add(self, request: MappingRequest) -> Mapping:
        """AddPortMapping for our own address, conflicts moved to ports derived from the host secret,
        permanent-lease routers handled (aio/upnp_core.py). Logs the hole on the `autonat.holes` logger."""
        found = self._igd or self.discover()
        mapping = self._run(found.service, self._mappings.add(found, request, time.monotonic()))
        holes = hole_logger()
        if holes is not None:
            holes.info("opened %s", mapping.describe())
        return mapping

    def delete_external(self, transport: Transport, external_port: int) -> None:
        """DeletePortMapping of `external_port`; one the router does not hold (714) is success."""
        found = self._igd or self.discover()
        self._run(found.service, self._mappings.delete_external(found, transport, external_port))
        holes = hole_logger()
        if holes is not None:
            holes.info("closed %s external port %d via upnp", transport, external_port)

    def delete(self, transport: Transport, internal_port: int) -> None:
        """Delete every mapping of ours (InternalClient = us) for `internal_port`: one call for a mapping
        this client made and whose lease runs, else the router's table is looked up first."""
        found = self._igd or self.discover()
        self._run(found.service, self._mappings.delete(found, transport, internal_port, time.monotonic()))
        holes = hole_logger()
        if holes is not None:
            holes.info("closed %s %s:%d via upnp", transport, self.location.local_address, internal_port)

    def remove(self, mapping: Mapping) -> None:
        """Delete a mapping `add` returned: by its external port, one call."""
        if mapping.protocol != NAME:
            raise ValueError(f"not a UPnP mapping: protocol {mapping.protocol!r}")
        self.delete_external(mapping.transport, mapping.external_port)

    def entry(self, transport: Transport, external_port: int) -> igd.PortMappingEntry | None:
        """GetSpecificPortMappingEntry: the router's view of one mapping; None when it has none (714)."""
        found = self._igd or self.discover()
        return self._run(found.service, self._mappings.entry(found, transport, external_port))

    def list_mappings(self) -> list[igd.PortMappingEntry]:
        """The router's whole table, ours or not (like `upnpc -l`)."""
        found = self._igd or self.discover()
        return self._run(found.service, self._mappings.list_mappings(found))
