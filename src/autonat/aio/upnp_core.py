"""The UPnP IGD client's decisions, sans-IO: one copy for the asyncio client and the blocking one.

No sockets, no asyncio, no clock: `now` is passed in. The shells (aio/upnp.py `UpnpClient`, aio/blocking_upnp.py
`BlockingUpnp`) move bytes; everything they do with what the router says is here:

- discovery (UPnP DA 1.1 §1.3 search, §2 description): what a search reply offers (`Offers`: at most
  `MAX_LOCATIONS_PER_RESPONDER` LOCATIONs per host and `MAX_CANDIDATES` in all, each checked by
  `proto.ssdp.validate_location`), which candidate wins and how long others may still answer (`Discovery`),
  and what one IGD is worth (`inspect`, a generator yielding the fetches and SOAP calls it needs as batches,
  which the asyncio shell runs at once and the blocking one in turn);
- port mappings (WANIPConnection:1/:2 §2.4): AddPortMapping with its error matrix and alternative ports,
  delete by internal port with the shortcut for a mapping this client made, DeletePortMapping,
  GetSpecificPortMappingEntry, GetExternalIPAddress, the table listing (`Mappings`, generators yielding an
  `igd.SoapRequest` and sent its outputs, or thrown the `igd.UpnpError` / RouterRefused / RouterTimeout the
  call ended in).

Router-facing rules, each from a quirk seen in the field; docs/QUIRKS.md names the routers and the sources
(IDs in brackets):

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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, TypeVar

from autonat.addresses import is_public
from autonat.errors import NotPublic, ProtocolUnavailable, RouterRefused, RouterTimeout, RouterUnreachable
from autonat.mapper import Mapping, MappingRequest
from autonat.proto import igd, pinhole, ssdp
from autonat.proto.errors import DecodeError
from autonat.proto.httpwire import DONE, FAILED, Progress
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
# A real IGD serves one root description (miniupnpd answers every search target with rootDesc.xml);
# a host offering more is probing us. Each LOCATION handed on costs the caller a connection.
MAX_LOCATIONS_PER_RESPONDER = 4
MAX_CANDIDATES = 16  # fetched or refused, in all: source addresses of UDP replies are easily forged
SHOWN_LOCATION = 100  # characters of a refused LOCATION quoted in a report
# When to (re)send the search burst, in seconds from the start; unicast replies come back in ~1 ms.
SEARCH_SCHEDULE = (0.0, 0.1, 0.3, 0.7, 1.5)  # the first burst goes out at once
MULTICAST_TTL = 2  # one router hop beyond us is plenty; never flood further (UPnP DA §1.1.2 suggests 2)

# What became of a discovery candidate.
INSPECTING, USABLE, FAILED_OUTCOME, REFUSED, UNFINISHED = "inspecting", "usable", "failed", "refused", "unfinished"

T = TypeVar("T")
Soap = Generator[igd.SoapRequest, dict[str, str], T]
"""A mapping operation: yields each SOAP request for the IGD's chosen service, is sent its outputs
(or thrown what the call ended in), returns the result."""


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
    trace: list[Progress] = field(default_factory=list)

    def settle(self, outcome: str, reason: str) -> None:
        self.outcome, self.reason = outcome, reason

    def unfinished(self, now: float) -> None:
        """Cut off by the deadline (or the window after another candidate settled)."""
        if self.outcome != INSPECTING:
            return
        stalled = next((p for p in self.trace if p.phase not in (DONE, FAILED)), None)
        where = self.location if stalled is None else f"{stalled.url}: {stalled.stalled()}"
        self.settle(UNFINISHED, f"{where}, unfinished after {now - self.started:.1f} s")

    def line(self) -> str:
        if self.outcome == REFUSED:
            return f"{self.responder} offered LOCATION {self.location}, refused: {self.reason}"
        return self.reason if self.location in self.reason else f"{self.location}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"location": self.location, "responder": self.responder, "outcome": self.outcome, "reason": self.reason}


def reasons(candidates: list[Candidate]) -> str:
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
            return f"{self.service.service_type}, {firewall_text(self.firewall)}"
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


def firewall_text(status: pinhole.FirewallStatus | None) -> str:
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


def refusal(error: igd.UpnpError, what: str) -> RouterRefused:
    return RouterRefused(f"router refused {what}: {error}", protocol=NAME, code=error.code)


def soap_outputs(
    parse: Callable[[bytes, igd.SoapRequest, int], dict[str, str]],
    body: bytes,
    request: igd.SoapRequest,
    status: int,
    codes: Counter[int],
) -> dict[str, str]:
    """A SOAP reply's out arguments (UPnP DA 1.1 §3.2.2), read by `parse`; its fault as igd.UpnpError
    (§3.2.2, counted in `codes`, at most MAX_CODES distinct ones), a malformed reply as RouterRefused."""
    try:
        return parse(body, request, status)
    except igd.UpnpError as error:
        if error.code in codes or len(codes) < MAX_CODES:
            codes[error.code] += 1
        raise
    except DecodeError as exc:
        raise RouterRefused(
            f"router's {request.action} reply is malformed: {exc.reason}", protocol=NAME, code=status
        ) from None


# --- discovery ---------------------------------------------------------------------------------------


def printable(text: str, limit: int = SHOWN_LOCATION) -> str:
    """Untrusted text fit for a one-line report: at most `limit` characters, no line breaks
    (Latin-1 decoding can yield U+0085, which `str.splitlines` breaks on) or other controls."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")


@dataclass(frozen=True, slots=True)
class Offer:
    """A safe LOCATION from a search response (or a given root URL), and who offered it."""

    location: ssdp.Location
    responder: IPv4Address | IPv6Address
    search_target: str
    server: str | None


@dataclass(frozen=True, slots=True)
class RefusedOffer:
    """A search response whose LOCATION was refused (never fetched), and why."""

    location: str  # as received, shortened and made printable: it is untrusted text
    responder: IPv4Address | IPv6Address
    reason: str


class Offers:
    """What the search replies offer (UPnP DA 1.1 §1.3.3), under caps: anything on the LAN can answer.

    `received` reads one datagram: a new, safe LOCATION is an `Offer`, an unsafe one a `RefusedOffer`
    (so that a discovery that found nothing can say why), anything else None, counted in `drops`."""

    def __init__(
        self,
        gateway: IPv4Address | IPv6Address,
        local_network: IPv4Network | IPv6Network,
        pinned: bool = False,
    ) -> None:
        self.gateway, self.local_network, self.pinned = gateway, local_network, pinned
        self.seen: set[tuple[str, str]] = set()  # (responder, LOCATION as received)
        self.urls: set[str] = set()  # validated LOCATIONs handed on: each is fetched once
        self.per_responder: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()

    def received(self, data: bytes, responder: IPv4Address | IPv6Address) -> Offer | RefusedOffer | None:
        try:
            message = ssdp.parse_datagram(data)
            if not isinstance(message, ssdp.SearchResponse):
                raise DecodeError("a NOTIFY, not a search response")
        except (DecodeError, ValueError) as exc:
            self.drops[str(exc)] += 1
            return None
        key = (str(responder), message.location)
        if key in self.seen:
            return None  # every search target draws the same answer again: not news
        if len(self.seen) >= MAX_CANDIDATES or self.per_responder[key[0]] >= MAX_LOCATIONS_PER_RESPONDER:
            self.drops["too many LOCATIONs offered; the rest ignored"] += 1
            return None
        self.seen.add(key)
        self.per_responder[key[0]] += 1
        try:
            location = ssdp.validate_location(
                message.location,
                responder=responder,
                gateway=self.gateway,
                local_network=self.local_network,
                pinned=self.pinned,
            )
        except (DecodeError, ValueError) as exc:
            self.drops[str(exc)] += 1
            return RefusedOffer(printable(message.location), responder, str(exc))
        if location.url in self.urls:
            return None
        self.urls.add(location.url)
        return Offer(location, responder, message.search_target, message.server)


class Discovery:
    """Which IGD a search ends with, and when (sans-IO; the shells feed it what happens).

    It returns as soon as the best IGD is certain: a connected one with a public address on the gateway
    itself wins at once; after the first usable one, better-ranked ones get `COLLECT_WINDOW`; after the
    first failure or refused LOCATION, others get `FAILED_WINDOW`; after the gateway's ICMP port
    unreachable, `UNREACHABLE_GRACE` (`FAILED_WINDOW` if a candidate is being inspected). `window_end`
    is when the shell stops waiting; `result` then names the best or says why each candidate failed."""

    def __init__(self, gateway: str, now: float, deadline: float) -> None:
        self.gateway = gateway
        self.deadline = deadline
        self.end = now + deadline
        self.window_end = self.end
        self.candidates: list[Candidate] = []
        self.usable: list[Igd] = []
        self.unreachable = False
        self.best: Igd | None = None  # set once certain

    def _window(self, now: float, length: float) -> None:
        self.window_end = min(self.window_end, now + length)

    def gateway_unreachable(self, now: float) -> None:
        """The gateway answered the unicast search with ICMP port unreachable: no SSDP server there."""
        self.unreachable = True
        inspecting = any(candidate.outcome == INSPECTING for candidate in self.candidates)
        self._window(now, FAILED_WINDOW if inspecting else UNREACHABLE_GRACE)

    def refused(self, offer: RefusedOffer, now: float) -> None:
        self.candidates.append(Candidate(offer.location, str(offer.responder), now, REFUSED, offer.reason))
        self._window(now, FAILED_WINDOW)

    def offered(self, offer: Offer, now: float) -> Candidate:
        """A candidate to inspect (with `inspect`); report its fate to `failed` or `found`."""
        candidate = Candidate(offer.location.url, str(offer.responder), now)
        self.candidates.append(candidate)
        return candidate

    def failed(self, candidate: Candidate, error: Exception, now: float) -> None:
        # A broken IGD need not cost the whole deadline: others get a window.
        candidate.settle(FAILED_OUTCOME, str(error))
        self._window(now, FAILED_WINDOW)

    def found(self, candidate: Candidate, found: Igd, now: float) -> bool:
        """A usable IGD; True when it cannot be beaten (the search is over: `best`)."""
        candidate.settle(USABLE, found.summary())
        if found.rank(self.gateway) == (0, 0):
            self.best = found
            return True
        self.usable.append(found)
        self._window(now, COLLECT_WINDOW)
        return False

    def result(self, now: float) -> Igd:
        """The best IGD once the search ended at `now`, else the one-line error saying why."""
        for candidate in self.candidates:
            candidate.unfinished(now)
        if self.best is not None:
            return self.best
        if self.usable:
            return min(self.usable, key=lambda candidate: candidate.rank(self.gateway))
        why = reasons(self.candidates)
        if self.unreachable and not self.candidates:
            raise RouterUnreachable(
                f"UPnP: the gateway {self.gateway} answered SSDP with ICMP port unreachable: no IGD listens there"
            )
        if now >= self.end:
            raise RouterTimeout(f"no usable IGD answered SSDP within {self.deadline:g} s{why}")
        raise ProtocolUnavailable(f"no usable IGD answered SSDP{why}")


@dataclass(frozen=True, slots=True)
class Fetch:
    """GET a document of the IGD (UPnP DA 1.1 §2.1): the reply's body, at most `limit` bytes, HTTP 200."""

    url: str
    limit: int


@dataclass(frozen=True, slots=True)
class Call:
    """One SOAP action on `service` (§3.2): its out arguments."""

    service: igd.Service
    request: igd.SoapRequest


Step = Fetch | Call
Inspection = Generator[tuple[Step, ...], tuple[Any, ...], Igd]
"""Yields batches of steps, independent of each other (the asyncio shell runs a batch at once); is sent
each step's result in order: the body (bytes) or the outputs, or the exception the step ended in."""


def _description(url: str, body: Any) -> igd.DeviceDescription:
    if isinstance(body, Exception):
        raise body
    try:
        return igd.parse_device_description(body, url)
    except DecodeError as exc:
        raise RouterRefused(f"router's description is unusable: {exc.reason}", protocol=NAME, code=0) from None


def inspect(location_url: str, responder: str) -> Inspection:
    """The IGD at `location_url` usable for IPv4 port mappings: description -> connection services (best
    first) -> the first connected one, with its SCPD (IGD:2 extras), GetStatusInfo and GetExternalIPAddress
    asked at once. (An IGD may list several WAN services, not all connected: docs/QUIRKS.md U12.)
    RouterRefused / RouterTimeout / ProtocolUnavailable saying why not."""
    (body,) = yield (Fetch(location_url, igd.MAX_DESCRIPTION_SIZE),)
    description = _description(location_url, body)
    services = description.connection_services()
    if not services:
        raise ProtocolUnavailable(f"{location_url} describes no WAN connection service")
    best: Igd | None = None
    skipped: list[tuple[str, str]] = []
    for service in services:
        st = service.service_type
        steps: tuple[Step, ...] = (
            Call(service, igd.get_status_info(st)),
            Call(service, igd.get_external_ip_address(st)),
        )
        if service.scpd_url:
            steps += (Fetch(service.scpd_url, igd.MAX_DESCRIPTION_SIZE),)
        results = yield steps
        candidate = Igd(
            location_url,
            responder,
            description,
            service,
            _actions(results[2] if len(results) > 2 else frozenset()),
            _external(results[1]),
            _status(results[0]),
        )
        if candidate.connected:
            return replace(candidate, skipped=tuple(skipped))
        best = best or candidate
        state = "unknown" if candidate.status is None else candidate.status.connection_status
        skipped.append((service.service_type, state))
    assert best is not None
    return best


def _actions(result: Any) -> frozenset[str]:
    """The actions the SCPD lists; none when it has none or an unreadable one (which only costs the
    IGD:2 extras)."""
    if isinstance(result, frozenset):
        return result
    if isinstance(result, (DecodeError, RouterRefused, RouterTimeout)):
        return frozenset()
    if isinstance(result, Exception):
        raise result
    try:
        return igd.parse_scpd(result)
    except DecodeError:
        return frozenset()


def _status(result: Any) -> igd.StatusInfo | None:
    if isinstance(result, (igd.UpnpError, DecodeError, RouterRefused)):
        return None
    if isinstance(result, Exception):
        raise result
    try:
        return igd.status_info_from(result)
    except DecodeError:
        return None


def _external(result: Any) -> IPv4Address | None:
    if isinstance(result, (igd.UpnpError, DecodeError)):
        return None
    if isinstance(result, Exception):
        raise result
    try:
        return igd.external_ip_from(result)
    except DecodeError:
        return None


# --- port mappings ------------------------------------------------------------------------------------


class Mappings:
    """Port mappings on an IGD's connection service (WANIPConnection:1/:2 §2.4), for one host.

    Each operation is a generator (`Soap`): the shell sends each yielded `igd.SoapRequest` to the IGD's
    `service`, sends the outputs back or throws in what the call ended in. The mappings this client made
    are remembered (`made`: (transport, internal port) -> (external port, lease end or None)), so that
    deleting one takes one DeletePortMapping instead of a lookup first."""

    def __init__(self, secret: bytes, local_address: IPv4Address | IPv6Address) -> None:
        self.secret = secret
        self.local_address = local_address
        self._client = str(local_address)  # NewInternalClient of every request (str() is dear for an address)
        self.tag = derive_nonce(secret, "upnp-tag", size=4).hex()
        self.made: dict[tuple[Transport, int], tuple[int, float | None]] = {}
        self._external_ip_request: igd.SoapRequest | None = None

    def description_for(self, transport: Transport, internal_port: int) -> str:
        """Carries our instance tag so our own mappings are recognised in the router's table."""
        return f"autonat:{self.tag} {internal_port}/{transport}"

    @staticmethod
    def _require_public(found: Igd, why: str) -> None:
        if found.external_ip is None or not is_public(found.external_ip):
            raise NotPublic(
                f"router {why}, and its external address {found.external_ip or 'is unknown'}"
                " is not public: refusing to leave a permanent mapping for nothing"
            )

    def add(self, found: Igd, request: MappingRequest, now: float) -> Soap[Mapping]:
        """AddPortMapping (AddAnyPortMapping on a conflict where the IGD:2 SCPD lists it), through the
        error matrix of the module docstring. `now` starts the lease kept for a one-call delete."""
        st = found.service.service_type
        lease = request.lifetime
        external = request.external_port or request.internal_port
        alternatives = alternative_ports(self.secret, request.transport, request.internal_port)
        used_any = conflict_501 = same_port = False
        client = self._client
        description = self.description_for(request.transport, request.internal_port)
        for _ in range(MAX_ATTEMPTS * 2):
            arguments: dict[str, Any] = {
                "external_port": external,
                "transport": request.transport,
                "internal_port": request.internal_port,
                "internal_client": client,
                "description": description,
                "lease": lease,
            }
            try:
                if used_any:
                    external = igd.reserved_port_from((yield igd.add_port_mapping(st, any_port=True, **arguments)))
                else:
                    yield igd.add_port_mapping(st, **arguments)
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
                    raise refusal(error, f"AddPortMapping {request.transport} {external}") from None
                continue
            key = (request.transport, request.internal_port)
            if key in self.made or len(self.made) < MAX_REMEMBERED:
                self.made[key] = (external, None if lease == 0 else now + lease)
            return Mapping(
                protocol=NAME,
                transport=request.transport,
                internal_address=self.local_address,
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

    def delete_external(self, found: Igd, transport: Transport, external_port: int) -> Soap[None]:
        """DeletePortMapping; 714 (no such entry, miniupnpd's answer: docs/QUIRKS.md U10) means it is
        already gone, which is success."""
        request = igd.delete_port_mapping(found.service.service_type, external_port=external_port, transport=transport)
        for key, (made_port, _) in list(self.made.items()):
            if key[0] == transport and made_port == external_port:
                del self.made[key]
        try:
            yield request
        except igd.UpnpError as error:
            if error.code not in (714, 730):
                raise refusal(error, f"DeletePortMapping {transport} {external_port}") from None

    def entry(self, found: Igd, transport: Transport, external_port: int) -> Soap[igd.PortMappingEntry | None]:
        """GetSpecificPortMappingEntry: the router's view of one mapping; None when it has none (714)."""
        request = igd.get_specific_port_mapping_entry(
            found.service.service_type, external_port=external_port, transport=transport
        )
        try:
            outputs = yield request
        except igd.UpnpError as error:
            if error.code in (714, 730):
                return None
            raise refusal(error, f"GetSpecificPortMappingEntry {transport} {external_port}") from None
        try:
            return igd.specific_entry_from(outputs, external_port, transport)
        except DecodeError as exc:
            raise RouterRefused(f"router's mapping entry is malformed: {exc.reason}", protocol=NAME, code=0) from None

    def external_ip_request(self, found: Igd) -> igd.SoapRequest:
        """GetExternalIPAddress for the chosen service, built once (the same bytes every time)."""
        request = self._external_ip_request
        if request is None or request.service_type != found.service.service_type:
            request = self._external_ip_request = igd.get_external_ip_address(found.service.service_type)
        return request

    def external_ip(self, found: Igd) -> Soap[IPv4Address | None]:
        """GetExternalIPAddress on the chosen service, asked again (not the discovery-time answer)."""
        try:
            outputs = yield self.external_ip_request(found)
        except igd.UpnpError as error:
            raise refusal(error, "GetExternalIPAddress") from None
        return self.read_external_ip(outputs)

    @staticmethod
    def read_external_ip(outputs: dict[str, str]) -> IPv4Address | None:
        try:
            return igd.external_ip_from(outputs)
        except DecodeError as exc:
            raise RouterRefused(
                f"router's external address is malformed: {exc.reason}", protocol=NAME, code=0
            ) from None

    def delete(self, found: Igd, transport: Transport, internal_port: int, now: float) -> Soap[None]:
        """Delete every mapping of ours (InternalClient = us) for `internal_port`.

        A mapping this client made, whose lease has not run out at `now`, is deleted by its external
        port in one call; otherwise the router's table is looked up first (another process made it, or
        it may have expired and the external port been given to another host since)."""
        made = self.made.get((transport, internal_port))
        if made is not None and (made[1] is None or now < made[1]):
            yield from self.delete_external(found, transport, made[0])
            return
        mine = self._client
        try:
            entry = igd.specific_entry_from(
                (
                    yield igd.get_specific_port_mapping_entry(
                        found.service.service_type, external_port=internal_port, transport=transport
                    )
                ),
                internal_port,
                transport,
            )
            if entry.internal_client == mine and entry.internal_port == internal_port:
                yield from self.delete_external(found, transport, internal_port)
                return
        except (igd.UpnpError, RouterRefused):
            pass
        for entry in (yield from self.list_mappings(found)):
            if entry.transport == transport and entry.internal_client == mine and entry.internal_port == internal_port:
                yield from self.delete_external(found, transport, entry.external_port)

    def _listing(self, found: Igd, transport: Transport) -> Soap[list[igd.PortMappingEntry]]:
        request = igd.get_list_of_port_mappings(found.service.service_type, transport=transport, count=MAX_LISTED)
        try:
            return igd.port_listing_from((yield request))
        except igd.UpnpError as error:
            if error.code in (714, 730):  # an empty table for this transport
                return []
            raise

    def list_mappings(self, found: Igd) -> Soap[list[igd.PortMappingEntry]]:
        """The router's whole table, ours or not (like `upnpc -l`): GetListOfPortMappings (IGD:2) where
        the SCPD lists it, else GetGenericPortMappingEntry by index up to MAX_LISTED."""
        st = found.service.service_type
        if "GetListOfPortMappings" in found.actions:
            try:
                entries: list[igd.PortMappingEntry] = []
                for transport in Transport:
                    entries += yield from self._listing(found, transport)
                return sorted(entries, key=lambda e: (e.external_port, e.transport))
            except (DecodeError, igd.UpnpError):
                pass  # walk the table one by one instead
        walked: list[igd.PortMappingEntry] = []
        for index in range(MAX_LISTED):
            try:
                outputs = yield igd.get_generic_port_mapping_entry(st, index)
            except igd.UpnpError:
                break  # miniupnpd: 713 past the end (docs/QUIRKS.md U9); any other fault ends it too
            try:
                walked.append(igd.generic_entry_from(outputs))
            except DecodeError:
                continue
        return walked
