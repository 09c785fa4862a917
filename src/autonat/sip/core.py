"""The SIP service's call control as a sans-IO core, in aioquic's shape: no sockets, no clock, no tasks.

Only four things drive it, each with the caller's clock `now`:

- `receive(profile, message, peer, now)`: a parsed message (or a `BadRequest`) from a transport;
- the shell reporting on what the core asked of it: `ports_ready` (media ports taken from the RTP pool or the
  port range), `media_started` (the sockets are bound, or could not be), `media_ended` (RTP silence or maximum
  duration), `send_failed` (a stream could not be opened), `address_changed` (the router's address is known or
  changed);
- `place_probe` / `abort_probe`: the test call from our side (`autonat call`), asked for on the control channel;
- `handle_timer(now)` when `timer()` is due: one deadline for everything (transactions, 2xx retransmissions,
  session timers, gateway registrations, registration expiry, the admission summary, the ban list);
- `start`, `stop`.

Each returns a list of actions for the shell to perform, in order: `Send` a message to a peer, `AcquirePorts`,
`StartEcho` / `StartRelay` / `StartProbe` / `UpdateMedia` / `ReleaseMedia` for the RTP side, `DropRtcp` (rtcp-mux
made a mapping useless), `ProbeAnswered` / `ProbeEnded` for the test call's signal and result, `Publish` an
event, `AuthFailed` (the fail2ban line). The shell decides nothing: it binds,
sends and reports back. All state of a call is its `Call` (autonat.sip.dialog); all state of the service is here.

What the core does (RFC 3261 unless named): a UAS and a B2BUA for three dialplan actions (the echo test, a
registered user rung with media relayed through us, a call out through a gateway), a UAC for the test call (one
at a time: it places a call exactly as a phone behind the NAT would, with the SDP address and router-mapped
RTP ports the profile advertises to that peer, plays its signal for the asked seconds and hangs up; the signal
and the figures are autonat.sip.probecall's), a registrar (§10.3, with
digest authentication and the guard against guessing), gateway registrations (§10.2), and the checks of §8.2
on every request before any work: 501/405 for methods (§8.2.1), 416 for URI schemes (§8.2.2.1), 482 (§8.2.2.2),
420 with Unsupported (§8.2.2.3), 415 with Accept (§8.2.3), 406 when the caller accepts no SDP, 483 at
Max-Forwards 0, 400/505/513 for requests that do not parse (autonat.sip.message.BadRequest).

Offer/answer (RFC 3264, RFC 6337): an offer in the INVITE is answered in the 200; an INVITE without one (a late
offer) gets ours in the 200 and the answer is taken from the ACK, and an ACK without a usable answer ends the
call (BYE). re-INVITE and UPDATE (RFC 3311) with an offer are answered with the direction §6.1 asks (hold:
sendonly is answered recvonly, and the echo stops sending); in a bridged call the offer goes on to the other leg
and its answer comes back, so hold and resume reach the other phone. One exchange at a time per dialog: a new
offer while one is pending gets 491 (glare, §14.1), a second re-INVITE before the first is answered 500 with
Retry-After (§14.2). An SRTP-only offer (RTP/SAVP) gets 488 (we answer no keys); optional SRTP is answered
with plain RTP. An offer with ICE is answered as an ICE-lite agent.

Session timers (RFC 4028): a Session-Expires below our Min-SE gets 422; an interval is agreed with every phone
that supports it (the caller refreshes when it can: its refreshes keep its NAT binding open); when we are the
refresher we send UPDATE (re-INVITE to a peer without UPDATE) at half the interval, and when the peer is and
stays silent the call ends with BYE at the interval minus min(32, interval/3).

The NAT rules of the service stay as they were: responses go to the packet's source (`reply_to_source`) or the
connection, our BYE goes where the peer's packets came from, every 2xx to an INVITE is resent until its ACK and
a missing ACK ends the call (§13.3.1.4), and the admission caps, the auth-calls rules and the ban list of
autonat.sip.admission / autonat.sip.guard decide before anything is spent on a call.
"""

from __future__ import annotations

import collections
import logging
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from autonat.addresses import IPAddress, is_public, uri_host
from autonat.proto.errors import DecodeError
from autonat.sip import client as sipclient
from autonat.sip import probecall
from autonat.sip.admission import Admission, Refusal, Ticket
from autonat.sip.client import (
    ClientTransactionTable,
    DeliverResponse,
    OutboundRegistration,
    RegistrationConfig,
    SendRequest,
    TimedOut,
    TransportError,
)
from autonat.sip.dialog import BTarget, Call, Leg, MediaPorts, Ports, safe_call_id, uri_of, user_of
from autonat.sip.dialplan import Action as Route
from autonat.sip.dialplan import Extension, GatewaySettings
from autonat.sip.digest import client_authorization, parse_challenge
from autonat.sip.guard import AuthGuard, source_key
from autonat.sip.ice import new_credentials
from autonat.sip.message import BadRequest, Request, Response, make_response, with_received
from autonat.sip.peer import Peer
from autonat.sip.probecall import Outcome, ProbeTarget
from autonat.sip.registrar import AuthFailure, Registrar
from autonat.sip.session import (
    Candidate,
    Description,
    IceLocal,
    anchor_sdp,
    candidate_priority,
    describe,
    echo_answer,
    echo_offer,
)
from autonat.sip.timerheap import TimerHeap
from autonat.sip.transaction import AckTimeout, Deliver, Timers, TransactionTable, Transmit, Uas2xxRetransmitter

__all__ = [
    "ALLOW",
    "AcquirePorts",
    "Action",
    "Addresses",
    "AuthFailed",
    "CoreConfig",
    "DropRtcp",
    "PROBE",
    "ProbeAnswered",
    "ProbeEnded",
    "ProfileConfig",
    "Publish",
    "ReleaseMedia",
    "Send",
    "SipCore",
    "StartEcho",
    "StartProbe",
    "StartRelay",
    "UpdateMedia",
]

log = logging.getLogger("autonat.sip")

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, REGISTER, INFO, UPDATE"
SUPPORTED = frozenset({"timer"})  # RFC 4028; 100rel (RFC 3262) and precondition (RFC 3312) are not
SERVER = "autonat"
_ALLOWED = frozenset(ALLOW.split(", "))
_KNOWN = _ALLOWED | {"PRACK", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER"}  # known, not served: 405
_IN_DIALOG_ONLY = frozenset({"INFO", "NOTIFY", "MESSAGE"})  # answered 200 inside a call (DTMF, REFER progress)
_SCHEMES = ("sip", "sips")
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
MAX_DESTINATIONS = 20_000  # where our client requests went, by branch (their retransmissions go the same way)
_SEPARATOR = "\x1f"  # between a profile and a gateway name in a timer key (neither can contain it)
GLARE_MIN, GLARE_MAX = 2.1, 4.0  # §14.1: how long the owner of the Call-ID waits before trying again
PROBE = "probe"  # the kind of the test call (`place_probe`), beside the dialplan's echo, user and gateway
PROBE_SOURCE = "control"  # the admission's source of the test call: the control channel, not an address


# --------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` from `profile`'s transport to `peer` (a stream with no connection yet: open one)."""

    profile: str
    message: Request | Response
    peer: Peer


@dataclass(frozen=True, slots=True)
class AcquirePorts:
    """Media ports for one leg: `mapped` from the RTP pool (or mapped now), else a pair of the port range.
    Answer with `ports_ready(call, leg, ports or None, now)`; `owner` labels the router mappings. `family` 6 with
    `mapped`: the holes are IPv6 firewall pinholes (an IPv6 peer outside; the pool of pinholes). `reserve`: the
    call may use the pair held back for callers that are not flooding (`Ticket.reserve`, sip/admission.py)."""

    call: str
    leg: str
    mapped: bool
    owner: str
    family: int = 4
    reserve: bool = False


@dataclass(frozen=True, slots=True)
class DropRtcp:
    """rtcp-mux was agreed (RFC 5761): the RTCP port's router mapping serves nothing, remove it."""

    ports: Ports


@dataclass(frozen=True, slots=True)
class StartEcho:
    """Bind the echo on `local`:`port` (and `port + 1` unless rtcp-mux): answer with `media_started`."""

    call: str
    local: IPAddress
    port: int
    rtcp: bool
    ice: tuple[str, str] | None  # (ufrag, pwd): answer ICE checks
    sending: bool
    hold: bool


@dataclass(frozen=True, slots=True)
class StartRelay:
    """Bind a relay between leg a (`local`:`port_a`) and leg b (`local_b`:`port_b`; None: `local`, the legs'
    families alike): answer with `media_started`. A dual-stack profile bridges an IPv6 phone to an IPv4 one."""

    call: str
    local: IPAddress
    port_a: int
    port_b: int
    ice_a: tuple[str, str] | None
    peer_a: tuple[str, int] | None
    local_b: IPAddress | None = None


@dataclass(frozen=True, slots=True)
class StartProbe:
    """Bind the test call's media on `local`:`port` (and `port + 1` for RTCP), ready to play a signal of
    `seconds` (autonat.sip.probecall.Signal): answer with `media_started`."""

    call: str
    local: IPAddress
    port: int
    seconds: float


@dataclass(frozen=True, slots=True)
class ProbeAnswered:
    """The test call is answered (and ACKed): play the signal to `remote` with `payload_type` from now on."""

    call: str
    remote: tuple[str, int]
    payload_type: int


@dataclass(frozen=True, slots=True)
class ProbeEnded:
    """The test call is over (its `ReleaseMedia`, if any, came first): `outcome` is its signalling and media
    plan; the figures are the signal's."""

    call: str
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class UpdateMedia:
    """Change a running echo or relay: where to send to `leg` (relay), whether to send (echo), on hold."""

    call: str
    leg: str | None = None
    peer: tuple[str, int] | None = None
    sending: bool | None = None
    hold: bool | None = None
    ice: tuple[str, str] | None = None  # leg a of a relay now answers ICE checks


@dataclass(frozen=True, slots=True)
class ReleaseMedia:
    """The call is over: close its echo or relay (if any), then give the ports back (unmapping them)."""

    call: str
    ports: tuple[Ports, ...]


@dataclass(frozen=True, slots=True)
class Publish:
    """An event for the engine's bus: `kind` is an EventKind value ("call-start", "call-end", "sip-register")."""

    kind: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """A failed digest attempt: the shell writes the fail2ban line (with the wall clock)."""

    failure: AuthFailure
    peer: Peer


Action = (
    Send
    | AcquirePorts
    | DropRtcp
    | StartEcho
    | StartRelay
    | StartProbe
    | ProbeAnswered
    | ProbeEnded
    | UpdateMedia
    | ReleaseMedia
    | Publish
    | AuthFailed
)


# --------------------------------------------------------------------------------------------- configuration


class Addresses(Protocol):
    """The address decision, from the layer that owns it (autonat.service.profiles through the shell)."""

    def sip_address(self, profile: str, peer_ip: str) -> IPAddress:
        """Our address in Via/Contact for a peer at `peer_ip`."""
        ...

    def media_address(self, profile: str, peer_ip: str) -> IPAddress:
        """Our address in SDP for a peer at `peer_ip` (of the peer's family on a dual-stack profile)."""
        ...

    def rtp_local(self, profile: str, peer_ip: str) -> IPAddress:
        """The local address the media sockets for a peer at `peer_ip` bind (the profile's IPv6 address for an
        IPv6 peer of a dual-stack profile)."""
        ...

    def pinhole(self, profile: str, peer_ip: str) -> bool:
        """Whether media for an IPv6 peer at `peer_ip` needs firewall pinholes (the peer is outside the local
        network and the engine keeps pinholes): there is no NAT on IPv6, only the router's firewall."""
        ...

    def external_known(self) -> bool:
        """Whether the router's external address is known."""
        ...


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    name: str
    sip_port: int
    tls_port: int | None = None
    dialplan: tuple[Extension, ...] = ()
    gateways: tuple[GatewaySettings, ...] = ()
    auth_calls: bool = True
    auth_echo: bool = False
    max_media_calls: int | None = None
    external_media: bool = False  # ext-rtp-ip follows the router and its pool can map ports
    external_sip: bool = False  # ext-sip-ip follows the router (a gateway's first REGISTER may wait for it)


@dataclass(frozen=True, slots=True)
class CoreConfig:
    profiles: tuple[ProfileConfig, ...]
    timers: Timers = field(default_factory=Timers)
    reply_to_source: bool = True
    session_expires: int = 1800
    min_se: int = 90
    register_wait: float = 10.0


@dataclass(eq=False, slots=True)
class _Gateway:
    settings: GatewaySettings
    machine: OutboundRegistration | None = None  # None while the first REGISTER waits for the address


@dataclass(eq=False, slots=True)
class _Profile:
    config: ProfileConfig
    server: TransactionTable
    client: ClientTransactionTable
    calls: dict[str, Call] = field(default_factory=dict)  # by leg Call-ID (both legs of a bridged call)
    destinations: collections.OrderedDict[str, Peer] = field(default_factory=collections.OrderedDict)
    gateways: dict[str, _Gateway] = field(default_factory=dict)  # by gateway name
    registrations: dict[str, _Gateway] = field(default_factory=dict)  # by REGISTER Call-ID
    wait_until: float | None = None  # the first REGISTERs wait for the external address until then
    calls_in: int = 0
    calls_out: int = 0
    failed_calls: int = 0

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(eq=False, slots=True)
class _Probe:
    """The test call in progress: what its outcome will say. Its one deadline (the answer's, then the hang-up's)
    is the timer ("probe", call)."""

    call: str  # Call.id
    target: ProbeTarget
    seconds: float
    invited_at: float | None = None  # (answered: the Call's answered_at)
    status: int | None = None  # the final response to our INVITE
    phrase: str = ""
    answer: probecall.Answer | None = None


class _SessionExpires:
    """A Session-Expires header (RFC 4028 §4): delta-seconds and the refresher parameter, if any."""

    __slots__ = ("interval", "refresher")

    def __init__(self, interval: int, refresher: str | None) -> None:
        self.interval = interval
        self.refresher = refresher

    @classmethod
    def of(cls, message: Request | Response) -> _SessionExpires | None:
        value = message.headers.get("Session-Expires")
        if value is None:
            return None
        number, *params = value.split(";")
        number = number.strip()
        if not number.isdigit() or len(number) > 10:
            raise DecodeError("Session-Expires is not a number of seconds")
        refresher = None
        for param in params:
            name, _, content = param.partition("=")
            if name.strip().lower() == "refresher":
                refresher = content.strip().lower()
                if refresher not in ("uac", "uas"):
                    raise DecodeError("Session-Expires refresher is neither uac nor uas")
        return cls(int(number), refresher)


def _tokens(message: Request | Response, name: str) -> list[str]:
    return [token.strip() for value in message.headers.get_all(name) for token in value.split(",") if token.strip()]


def _supports_timer(message: Request | Response) -> bool:
    return any(token.lower() == "timer" for token in _tokens(message, "Supported") + _tokens(message, "Require"))


def _media_type(message: Request | Response) -> str | None:
    value = message.headers.get("Content-Type")
    return None if value is None else value.split(";", 1)[0].strip().lower()


# --------------------------------------------------------------------------------------------- the core


class SipCore:
    """Every profile's SIP signalling and call control; see the module docstring."""

    def __init__(
        self,
        config: CoreConfig,
        addresses: Addresses,
        *,
        registrar: Registrar,
        admission: Admission,
        guard: AuthGuard,
        rand: random.Random | None = None,
    ) -> None:
        self.config = config
        self.addresses = addresses
        self.registrar = registrar
        self.admission = admission
        self.guard = guard
        self.timers = config.timers
        self._random = rand or random.Random()  # glare back-off and SDP session ids: nothing secret
        self.profiles: dict[str, _Profile] = {
            p.name: _Profile(p, TransactionTable(timers=config.timers), ClientTransactionTable(timers=config.timers))
            for p in config.profiles
        }
        self._calls: dict[str, Call] = {}  # by Call.id
        self._heap: TimerHeap[tuple[str, str]] = TimerHeap()
        self._out: list[Action] = []
        self._now = 0.0
        self.dropped_banned = 0  # requests from banned sources, dropped unanswered
        self._probe: _Probe | None = None  # the test call: one at a time (it takes router mappings)

    # ================================================================================ the public interface

    @property
    def calls(self) -> list[Call]:
        return list(self._calls.values())

    def call(self, call_id: str) -> Call | None:
        return self._calls.get(call_id)

    def timer(self) -> float | None:
        return self._heap.next()

    def start(self, now: float) -> list[Action]:
        """Gateway registrations begin; one towards a public registrar waits (at most `register_wait`) for the
        router's external address, so its first Contact is not a private one."""
        self._now = now
        for p in self.profiles.values():
            for gateway in p.config.gateways:
                if not gateway.register:
                    continue
                entry = p.gateways[gateway.name] = _Gateway(gateway)
                if self._waits_for_address(p, gateway):
                    p.wait_until = now + self.config.register_wait
                    self._heap.set(("wait", p.name), p.wait_until)
                else:
                    self._start_registration(p, entry)
        return self._flush()

    def reconfigure(self, config: CoreConfig, now: float) -> tuple[list[Action], list[str], list[str]]:
        """A reload (`autonat reload`, SIGHUP): what a profile answers with changes at once (dialplan,
        auth-calls/auth-echo, its media cap), calls in progress go on under their old decisions, and gateways
        added, removed or changed register, un-register (Expires: 0) or both. A profile removed hangs up its
        calls (BYE) and un-registers its gateways; one added starts (its gateways register); one on another
        port is both (the caller moves its listener). Other timers are named, not applied. Returns the
        actions, the changes applied and those that need a restart."""
        self._now = now
        changes: list[str] = []
        restart: list[str] = []
        new = {profile.name: profile for profile in config.profiles}
        if (config.timers, config.reply_to_source) != (self.config.timers, self.config.reply_to_source):
            restart.append("[sip] t1/t2/reply-to-source")
        for name in [name for name in self.profiles if name not in new]:
            self._retire(name, "profile removed")
            changes.append(f"-profile {name}")
        added = [profile for name, profile in new.items() if name not in self.profiles]
        for name, p in list(self.profiles.items()):
            wanted = new[name]
            if wanted == p.config:
                continue
            if (wanted.sip_port, wanted.tls_port) != (p.config.sip_port, p.config.tls_port):
                self._retire(name, "profile moved to another port")  # its calls end; it starts again below
                added.append(wanted)
                continue
            old_gateways = {g.name: g for g in p.config.gateways}
            p.config = wanted
            changes.append(f"profile {name}")
            for gateway in wanted.gateways:
                if old_gateways.pop(gateway.name, None) == gateway:
                    continue
                entry = p.gateways.pop(gateway.name, None)
                if entry is not None and entry.machine is not None:
                    self._run_registration(p, entry, entry.machine.stop(now))
                if gateway.register:
                    entry = p.gateways[gateway.name] = _Gateway(gateway)
                    self._start_registration(p, entry)
                changes.append(f"gateway {gateway.name}")
            for gone in old_gateways:
                entry = p.gateways.pop(gone, None)
                if entry is not None and entry.machine is not None:
                    self._run_registration(p, entry, entry.machine.stop(now))
                changes.append(f"-gateway {gone}")
        for wanted in added:
            p = self.profiles[wanted.name] = _Profile(
                wanted, TransactionTable(timers=self.timers), ClientTransactionTable(timers=self.timers)
            )
            changes.append(f"+profile {wanted.name}")
            for gateway in wanted.gateways:
                if gateway.register:
                    entry = p.gateways[gateway.name] = _Gateway(gateway)
                    self._start_registration(p, entry)
        self.config = CoreConfig(
            tuple(p.config for p in self.profiles.values()),
            self.config.timers,
            self.config.reply_to_source,
            config.session_expires,
            config.min_se,
            config.register_wait,
        )
        return self._flush(), changes, restart

    def _retire(self, name: str, reason: str) -> None:
        """A profile leaves (a reload): its calls end with BYE, its gateways un-register (Expires: 0), and then
        it is gone; what it still hears is dropped and its timers are skipped."""
        p = self.profiles[name]
        for call in {id(call): call for call in p.calls.values()}.values():
            self._hangup(call, reason, bye=True)
        for entry in p.gateways.values():
            if entry.machine is not None:
                self._run_registration(p, entry, entry.machine.stop(self._now))
        for kind in ("server", "client", "wait"):  # the BYEs and un-REGISTERs are sent once, not retransmitted:
            self._heap.set((kind, name), None)  # the listener closes right after
        for gateway in p.gateways:
            self._heap.set(("reg", f"{name}{_SEPARATOR}{gateway}"), None)
        del self.profiles[name]

    def stop(self, now: float) -> list[Action]:
        """Remove every registration (Expires: 0) and hang up every call with BYE."""
        self._now = now
        for p in self.profiles.values():
            for entry in p.gateways.values():
                if entry.machine is not None:
                    self._run_registration(p, entry, entry.machine.stop(now))
        for call in list(self._calls.values()):
            self._hangup(call, "shutdown", bye=True)
        return self._flush()

    def address_changed(self, now: float) -> list[Action]:
        """The router's external address became known or changed: waiting registrations go, the others
        re-register at once with the Contact the decision now picks (the old one removed, §10.2.2)."""
        self._now = now
        for p in self.profiles.values():
            waiting = p.wait_until is not None
            p.wait_until = None
            self._heap.set(("wait", p.name), None)
            for entry in p.gateways.values():
                if entry.machine is None:
                    if waiting:
                        self._start_registration(p, entry)
                    continue
                via_host, contact = self._registration_contact(p, entry.settings)
                actions = entry.machine.update_contact(
                    now, via_host=via_host, via_port=p.config.sip_port, contact=contact
                )
                self._run_registration(p, entry, actions)
        return self._flush()

    def receive(self, profile: str, message: Request | Response | BadRequest, peer: Peer, now: float) -> list[Action]:
        self._now = now
        p = self.profiles.get(profile)
        if p is None:
            return []  # a profile a reload removed: its listener is closing, what it still hears is dropped
        if isinstance(message, BadRequest):
            self._bad_request(p, message, peer)
        elif isinstance(message, Response):
            self._on_response(p, message)
        else:
            try:
                self._on_request(p, message, peer)
            except DecodeError as exc:  # a value only the TU reads (the codec checked the rest)
                log.debug("dropping a request from %s: %s", peer, exc)
        self._sync(p)
        return self._flush()

    def ports_ready(self, call_id: str, leg: str, ports: Ports | None, now: float) -> list[Action]:
        """The answer to `AcquirePorts`: the ports, or None when none could be had (a cap or the router)."""
        self._now = now
        call = self._calls.get(call_id)
        if call is None or call.ended:
            if ports is not None:
                self._emit(ReleaseMedia(call_id, (ports,)))
            return self._flush()
        target = call.a if leg == "a" else call.b
        if ports is None or target is None:
            if ports is not None:
                self._emit(ReleaseMedia(call_id, (ports,)))
            if call.refusal is None and call.ticket is not None and ports is None and self._mapped_for(call, leg):
                call.refusal = self.admission.no_mapping(call.ticket, now)
            self._fail(call, 503, "no RTP ports free" if call.refusal is None else f"over {call.refusal}")
            return self._flush()
        profile = call.profile
        advertised = target.media_address or self.addresses.media_address(profile, target.peer.ip)
        local = self.addresses.rtp_local(profile, target.peer.ip)
        if ports.mapped and ports.external_ip is not None:
            media = MediaPorts(ports, local, ports.external_ip, ports.external_rtp, ports.external_rtcp)
        elif ports.mapped:
            media = MediaPorts(ports, local, advertised, ports.external_rtp, ports.external_rtcp)
        else:
            media = MediaPorts(ports, local, advertised, ports.local, ports.local + 1)
        target.media = media
        if all(leg_.media is not None for leg_ in self._media_legs(call)):
            self._start_media(call)
        return self._flush()

    def media_started(self, call_id: str, error: str | None, now: float) -> list[Action]:
        self._now = now
        call = self._calls.get(call_id)
        if call is None or call.ended:
            return self._flush()
        if error is not None:
            self._fail(call, 503, f"RTP: {error}")
            return self._flush()
        call.media = "up"
        p = self.profiles[call.profile]
        if call.kind == PROBE:
            self._invite_probe(p, call)
        elif call.kind == Route.ECHO:
            self._answer_echo(p, call)
        else:
            self._place_b_leg(p, call)
        self._sync(p)
        return self._flush()

    def media_ended(self, call_id: str, reason: str, now: float) -> list[Action]:
        """The echo or relay ended itself (RTP silence: a lost BYE; the maximum duration; a socket failure).
        "closed" is the shell closing it for a call already over."""
        self._now = now
        call = self._calls.get(call_id)
        if call is not None and not call.ended and reason != "closed":
            self._hangup(call, f"media {reason}", bye=True)
            self._sync(self.profiles[call.profile])
        return self._flush()

    def send_failed(self, profile: str, message: Request | Response, now: float) -> list[Action]:
        """A stream to the peer could not be opened for `message` (§17.1.4: a request's transaction ends)."""
        self._now = now
        p = self.profiles.get(profile)
        if p is None:
            return []
        if isinstance(message, Request):
            self._run_client(p, p.client.transport_error(message, "connection failed"))
        self._sync(p)
        return self._flush()

    def place_probe(
        self,
        profile: str,
        target: ProbeTarget,
        seconds: float,
        now: float,
        *,
        answer_timeout: float = probecall.ANSWER_TIMEOUT,
    ) -> tuple[str, list[Action]]:
        """The test call (`autonat call`): `profile` calls `target` as a phone behind the NAT would, with the
        Via/Contact and SDP addresses its decision gives that peer and RTP ports from the pool when they are
        advertised outside (within the media caps, like any call). The INVITE leaves once the media is bound;
        without a 2xx within `answer_timeout` (from now) the call is cancelled ("no answer"); once answered and
        ACKed the shell plays the signal (`ProbeAnswered`) and the call ends with BYE after `seconds` plus
        probecall.DRAIN. `ProbeEnded` always comes, whatever ends it. Returns the call's id and the actions.

        ValueError (one line) when it cannot start: an unknown profile, `seconds` out of range, a test call
        already running (one at a time: it takes router mappings), a cap of the admission."""
        self._now = now
        p = self.profiles.get(profile)
        if p is None:
            raise ValueError(f"no SIP profile {profile!r}")
        seconds = probecall.check_seconds(seconds)
        if not 0 < answer_timeout < float("inf"):
            raise ValueError("the answer timeout must be a positive number of seconds")
        if self._probe is not None:
            raise ValueError("a test call is already running (one at a time: it uses router mappings)")
        ticket = self.admission.admit(PROBE_SOURCE, p.name, now)
        if isinstance(ticket, Refusal):
            raise ValueError(f"the SIP service is over {ticket}: try again later")
        sip_address = self.addresses.sip_address(p.name, target.peer.ip)
        host = uri_host(sip_address)
        leg = Leg(
            role="a",
            peer=target.peer,
            call_id=sipclient.new_call_id(host),
            local_tag=sipclient.new_tag(),
            local_uri=f"sip:autonat@{host}",
            remote_uri=target.uri,
            remote_target=target.uri,
            uas=False,
            sip_address=sip_address,
            session_id=self._random.randrange(1, 2**31),  # an SDP session id (RFC 8866 §5.2), not a secret
        )
        call = Call(p.name, PROBE, target.user or "", leg, now, ticket=ticket)
        p.calls[leg.call_id] = call
        self._calls[call.id] = call
        p.calls_out += 1
        self._probe = _Probe(call.id, target, seconds)
        self._heap.set(("probe", call.id), now + answer_timeout)
        self._emit(
            Publish(
                "call-start",
                {"profile": p.name, "call": call.id, "number": call.number, "app": PROBE, "source": PROBE_SOURCE},
            )
        )
        self._want_ports(p, call, leg)
        return call.id, self._flush()

    def abort_probe(self, now: float) -> list[Action]:
        """Whoever asked for the test call is gone (the daemon stops it): hang it up now (BYE, or CANCEL)."""
        self._now = now
        call = None if self._probe is None else self._calls.get(self._probe.call)
        if call is not None:
            self._hangup(call, "aborted", bye=True)
            self._sync(self.profiles[call.profile])
        return self._flush()

    def handle_timer(self, now: float) -> list[Action]:
        self._now = now
        touched: set[str] = set()
        while (key := self._heap.pop_due(now)) is not None:
            kind, name = key
            if kind in ("server", "client", "reg", "wait") and name.partition(_SEPARATOR)[0] not in self.profiles:
                continue  # the timer of a profile a reload removed
            if kind == "server":
                p = self.profiles[name]
                self._perform_server(p, p.server.handle_timer(now))
                touched.add(name)
            elif kind == "client":
                p = self.profiles[name]
                self._run_client(p, p.client.handle_timer(now))
                touched.add(name)
            elif kind == "call":
                call = self._calls.get(name)
                if call is not None:
                    self._call_timer(call)
                    touched.add(call.profile)
            elif kind == "reg":
                profile, _, gateway = name.partition(_SEPARATOR)
                p = self.profiles[profile]
                entry = p.gateways.get(gateway)
                if entry is not None and entry.machine is not None:
                    self._run_registration(p, entry, entry.machine.handle_timer(now))
            elif kind == "wait":
                p = self.profiles[name]
                if p.wait_until is not None:
                    p.wait_until = None
                    for entry in p.gateways.values():
                        if entry.machine is None:
                            log.warning(
                                "gateway %s: the external address is still unknown after %g s, registering with %s",
                                entry.settings.name,
                                self.config.register_wait,
                                self.addresses.sip_address(p.name, entry.settings.host),
                            )
                            self._start_registration(p, entry)
            elif kind == "registrar":
                for binding in self.registrar.expire(now):
                    log.info("registration of %s (%s) expired", binding.user, binding.contact)
                self._sync_registrar()
            elif kind == "admission":
                line = self.admission.summary(now)
                if line is not None:
                    log.warning("%s", line)
            elif kind == "guard":
                self.guard.expire(now)
            elif kind == "probe":
                call = self._calls.get(name)
                probe = self._probe
                if call is not None and probe is not None and probe.call == name:
                    if call.a.answered:
                        reason = "test call done"
                    else:
                        reason = "no answer" if probe.invited_at is not None else "no RTP ports in time"
                    self._hangup(call, reason, bye=True)
                    touched.add(call.profile)
        for name in touched:
            if name in self.profiles:
                self._sync(self.profiles[name])
        return self._flush()

    # ================================================================================ status

    def status(self, profile: str, now: float) -> dict[str, Any]:
        p = self.profiles.get(profile)
        if p is None:
            return {}
        live = {id(c) for c in p.calls.values()}
        return {
            "CALLS-IN": p.calls_in,
            "FAILED-CALLS-IN": p.failed_calls,
            "CALLS-OUT": p.calls_out,
            "Live-Calls": len(live),
            "Registrations": self.registrar.count(now),
            "Gateways": {
                name: {
                    "state": "WAIT-ADDRESS" if entry.machine is None else str(entry.machine.state),
                    "status": None if entry.machine is None else entry.machine.last_status,
                }
                for name, entry in p.gateways.items()
            },
            "Media-Calls": self.admission.profile_media_calls(profile),
            "Auth": {**self.guard.stats.as_dict(), "dropped_banned": self.dropped_banned},
            "Refused-Calls": {str(refusal): count for refusal, count in self.admission.refused.items()},
        }

    def registrations(self, now: float) -> list[dict[str, Any]]:
        return [
            {"user": b.user, "contact": b.contact, "expires": b.remaining(now), "source": str(b.source)}
            for b in self.registrar.bindings(now)
        ]

    # ================================================================================ plumbing

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _flush(self) -> list[Action]:
        self._sync_shared()  # a refusal (the admission summary) or a failure (the guard) may have happened
        out, self._out = self._out, []
        return out

    def _sync(self, p: _Profile) -> None:
        self._heap.set(("server", p.name), p.server.timer())
        self._heap.set(("client", p.name), p.client.timer())

    def _sync_shared(self) -> None:
        """The shared tables' deadlines: the admission summary's and the guard's are O(1) to read, the
        registrar's (the earliest of all bindings) is read only when a REGISTER or an expiry changed it."""
        self._heap.set(("admission", ""), self.admission.timer())
        self._heap.set(("guard", ""), self.guard.timer())

    def _sync_registrar(self) -> None:
        self._heap.set(("registrar", ""), self.registrar.timer())

    def _sync_call(self, call: Call) -> None:
        self._heap.set(("call", call.id), None if call.ended else call.deadline())

    def _send(self, p: _Profile, message: Request | Response, peer: Peer) -> None:
        self._emit(Send(p.name, message, peer))

    def _response_peer(self, response: Response, peer: Peer) -> Peer:
        """NAT rule "reply to the source" (on by default); off: §18.2.2 / RFC 3581 §4 from the Via."""
        if self.config.reply_to_source or peer.reliable:
            return peer
        try:
            via = response.top_via()
        except DecodeError:
            return peer
        host = via.received or via.host
        rport = via.rport
        port = rport if isinstance(rport, int) else (via.port or 5060)
        return Peer("udp", host.strip("[]"), port)

    def _perform_server(self, p: _Profile, actions: Iterable[object], source: Peer | None = None) -> None:
        for action in actions:
            if isinstance(action, Transmit):
                peer = action.destination
                if isinstance(peer, Peer):
                    self._send(p, action.response, self._response_peer(action.response, peer))
            elif isinstance(action, Deliver) and source is not None:
                self._deliver(p, action.request, source)
            # AckTimeout of a non-2xx final response and Terminated need nothing from us.

    def _respond(self, p: _Profile, request: Request, response: Response) -> None:
        try:
            actions = p.server.send_response(request, response, self._now)
        except KeyError:
            return  # the transaction is gone (timed out, or a CANCEL raced the answer)
        self._perform_server(p, actions)

    def _reply(
        self,
        p: _Profile,
        request: Request,
        status: int,
        reason: str | None = None,
        *,
        to_tag: str | None = None,
        extra: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> None:
        tag = to_tag if to_tag is not None or status == 100 else sipclient.new_tag()
        self._respond(
            p, request, make_response(request, status, reason, to_tag=tag, extra_headers=extra or [], body=body)
        )

    def _run_client(self, p: _Profile, actions: Iterable[object], peer: Peer | None = None) -> None:
        """Perform client-transaction actions: send (to `peer`, or where that branch went before) and hand
        responses and timeouts to `_client_event`."""
        handed: list[Response | TimedOut] = []
        for action in actions:
            if isinstance(action, SendRequest):
                branch = action.request.top_via().branch or ""
                destination = peer or p.destinations.get(branch)
                if peer is not None:
                    p.destinations[branch] = peer
                    while len(p.destinations) > MAX_DESTINATIONS:
                        p.destinations.popitem(last=False)
                if destination is not None:
                    self._send(p, action.request, destination)
            elif isinstance(action, DeliverResponse):
                handed.append(action.response)
            elif isinstance(action, TimedOut):
                handed.append(action)
        for item in handed:
            self._client_event(p, item)

    def _start_request(self, p: _Profile, request: Request, peer: Peer) -> None:
        self._run_client(p, p.client.start(request, self._now, reliable=peer.reliable), peer)

    # ================================================================================ addressing

    def _contact_uri(self, p: _Profile, address: IPAddress, user: str, transport: str) -> str:
        port = p.config.tls_port if transport == "tls" and p.config.tls_port else p.config.sip_port
        suffix = "" if transport == "udp" else f";transport={transport}"
        return f"sip:{user}@{uri_host(address)}:{port}{suffix}"

    def _contact(self, p: _Profile, leg: Leg, user: str) -> str:
        return f"<{self._contact_uri(p, leg.sip_address, user, leg.peer.transport)}>"

    def _waits_for_address(self, p: _Profile, gateway: GatewaySettings) -> bool:
        """A registrar on the internet would be given our local address because the router's is not known yet."""
        if not p.config.external_sip or self.addresses.external_known():
            return False
        try:
            if not is_public(gateway.host):
                return False
        except ValueError:
            return False
        return not is_public(self.addresses.sip_address(p.name, gateway.host))

    # ================================================================================ requests

    def _banned(self, p: _Profile, request: Request, peer: Peer) -> bool:
        """A banned source starts nothing new: its requests outside a dialog are dropped unanswered (an
        answer would only tell a password guesser to move on), before any parsing or transaction. ACK and
        CANCEL still pass, so what it started before the ban ends cleanly."""
        if request.method in ("ACK", "CANCEL"):
            return False
        if self.guard.refused(peer.ip, self._now) is None:
            return False
        if request.to_tag() is not None and safe_call_id(request) in p.calls:
            return False  # in a dialog it already had
        self.dropped_banned += 1
        return True

    def _bad_request(self, p: _Profile, bad: BadRequest, peer: Peer) -> None:
        """A request the codec could not parse but can answer (400, 505, 501, 513), statelessly: its
        retransmissions get the same answer again."""
        if self.guard.refused(peer.ip, self._now) is not None:
            self.dropped_banned += 1
            return
        response = bad.response(to_tag=sipclient.new_tag())
        self._send(p, response, peer)

    def _on_request(self, p: _Profile, request: Request, peer: Peer) -> None:
        if self._banned(p, request, peer):
            return
        if peer.transport == "udp":
            request = with_received(request, peer.ip, peer.port)
        forwards = request.max_forwards()
        if forwards == 0 and request.method not in ("ACK", "OPTIONS"):
            # §16.3 is a proxy's rule; a B2BUA would forward this request, and it can go no further.
            self._send(p, make_response(request, 483, to_tag=sipclient.new_tag()), peer)
            return
        actions = p.server.receive_request(request, self._now, reliable=peer.reliable, destination=peer)
        self._perform_server(p, actions, peer)

    def _precheck(self, p: _Profile, request: Request) -> tuple[int, str | None, list[tuple[str, str]]] | None:
        """§8.2.1-§8.2.3, in that order: what a request that cannot be served gets (status, reason, headers)."""
        method = request.method
        if method not in _ALLOWED and not (method in _IN_DIALOG_ONLY and request.to_tag() is not None):
            return (405 if method in _KNOWN else 501), None, [("Allow", ALLOW)]
        scheme = request.uri.partition(":")[0].lower()
        if scheme not in _SCHEMES:
            return 416, None, []
        if "?" in request.uri:
            return 400, "Bad Request: headers in the Request-URI", []  # §19.1.5 / RFC 4475 §3.1.2.11
        required = _tokens(request, "Require")
        if not all(_TOKEN.fullmatch(token) for token in required):
            return 400, "Bad Request: malformed Require header", []
        unsupported = [token for token in required if token.lower() not in SUPPORTED]
        if unsupported and method != "REGISTER":  # the registrar answers its own Require (after auth)
            return 420, None, [("Unsupported", ", ".join(unsupported))]
        if method in ("INVITE", "UPDATE") and request.body:
            kind = _media_type(request)
            if kind is None:
                return 400, "Bad Request: a body without Content-Type", []
            if kind != "application/sdp":
                return 415, None, [("Accept", "application/sdp")]
            encoding = request.headers.get("Content-Encoding")
            if encoding is not None and encoding.strip().lower() not in ("", "identity"):
                return 415, None, [("Accept-Encoding", "identity")]
        if method == "INVITE" and request.headers.get("Accept") is not None:
            accepted = {token.split(";")[0].strip().lower() for token in _tokens(request, "Accept")}
            if accepted and not accepted & {"application/sdp", "application/*", "*/*"}:
                return 406, None, [("Accept", "application/sdp")]
        return None

    def _deliver(self, p: _Profile, request: Request, peer: Peer) -> None:
        method = request.method
        if method == "ACK":
            self._on_ack(p, request)
            return
        if method == "CANCEL":
            self._on_cancel(p, request)
            return
        refusal = self._precheck(p, request)
        if refusal is not None:
            status, reason, extra = refusal
            self._reply(p, request, status, reason, extra=extra)
            return
        in_dialog = request.to_tag() is not None
        if method == "INVITE" and not in_dialog:
            self._new_call(p, request, peer)
        elif method == "REGISTER":
            self._register(p, request, peer)
        elif method == "OPTIONS" and not in_dialog:
            self._reply(p, request, 200, extra=self._capabilities())
        elif in_dialog:
            self._in_dialog(p, request, peer)
        else:
            # BYE, UPDATE, INFO ... outside any dialog (§12.2.2)
            self._reply(p, request, 481)

    @staticmethod
    def _capabilities() -> list[tuple[str, str]]:
        """§11.2: what an OPTIONS answer lists."""
        return [
            ("Allow", ALLOW),
            ("Accept", "application/sdp"),
            ("Supported", ", ".join(sorted(SUPPORTED))),
            ("Server", SERVER),
        ]

    def _register(self, p: _Profile, request: Request, peer: Peer) -> None:
        now = self._now
        outcome = self.registrar.handle(request, now, peer, to_tag=sipclient.new_tag(), client=peer.ip)
        if outcome.failure is not None:
            self._auth_failed(outcome.failure, peer)
        elif outcome.user is not None:
            self.guard.succeeded(peer.ip, outcome.user, now)
        if outcome.response.status == 200:
            user = user_of(uri_of(request.headers.get("To") or ""))
            log.info("REGISTER %s from %s: 200", user, peer)
            self._emit(Publish("sip-register", {"profile": p.name, "user": user, "source": str(peer)}))
        self._respond(p, request, outcome.response)
        self._sync_registrar()

    def _auth_failed(self, failure: AuthFailure, peer: Peer) -> None:
        """One failed authentication: its log line (the shell writes it), counted against source and user."""
        self._emit(AuthFailed(failure, peer))
        ban = self.guard.failed(peer.ip, failure.user, self._now)
        if ban is not None:
            log.warning(
                "banned %s for %.0f s after failed authentications (strike %d%s)",
                ban.source,
                ban.seconds,
                ban.strike,
                ", a targeted user" if ban.targeted else "",
            )

    # ================================================================================ new calls

    def _new_call(self, p: _Profile, invite: Request, peer: Peer) -> None:
        p.calls_in += 1
        to_tag = sipclient.new_tag()
        call_id = invite.call_id()
        if call_id in p.calls:
            self._reply(p, invite, 482, to_tag=to_tag)  # §8.2.2.2: a merged request (a loop or a fork)
            return
        expires = _SessionExpires.of(invite)
        if expires is not None and expires.interval < self.config.min_se:
            p.failed_calls += 1
            self._reply(p, invite, 422, to_tag=to_tag, extra=[("Min-SE", str(self.config.min_se))])  # RFC 4028 §8.1
            return
        # Per source as the guard counts one: an IPv6 host picks any address of its /64 at will.
        ticket = self.admission.admit(source_key(peer.ip), p.name, self._now)
        if isinstance(ticket, Refusal):
            self._refuse(p, invite, ticket, to_tag)
            return
        admitted = False
        try:
            admitted = self._start_call(p, invite, peer, to_tag, ticket, expires)
        finally:
            if not admitted:
                self.admission.release(ticket)

    def _refuse(self, p: _Profile, invite: Request, refusal: Refusal, to_tag: str) -> None:
        """A cap said no: 503 with Retry-After (§21.5.4), costing no mapping and no log line of its own (the
        admission summary counts it)."""
        p.failed_calls += 1
        self._reply(p, invite, 503, to_tag=to_tag, extra=[("Retry-After", str(refusal.retry_after))])

    def _start_call(
        self, p: _Profile, invite: Request, peer: Peer, to_tag: str, ticket: Ticket, expires: _SessionExpires | None
    ) -> bool:
        """Route the admitted INVITE; True once a call holds the ticket (released at its hang-up)."""
        number = user_of(invite.uri) or ""
        route: tuple[Extension, str] | None = None
        for extension in p.config.dialplan:
            target = extension.target(number)
            if target is not None:
                route = (extension, target)
                break
        if route is None:
            p.failed_calls += 1
            self._reply(p, invite, 404, to_tag=to_tag)
            return False
        offer: Description | None = None
        if invite.body:
            offer = describe(invite.body)
            if offer is None or offer.srtp:
                # No audio we can use, or SRTP only (RTP/SAVP needs keys we never answer): §13.3.1.3.
                p.failed_calls += 1
                warning = [("Warning", '399 autonat "SRTP is not supported"')] if offer is not None else []
                self._reply(p, invite, 488, to_tag=to_tag, extra=warning)
                return False
        extension, target = route
        if not self._authorized(p, invite, peer, extension.action, to_tag):
            return False
        leg = Leg.from_invite(invite, peer, to_tag, self.addresses.sip_address(p.name, peer.ip))
        leg.remote = offer
        leg.session_id = self._random.randrange(1, 2**31)  # an SDP session id (RFC 8866 §5.2), not a secret
        if offer is not None and offer.ice:
            leg.ice = new_credentials()
        self._agree_session_timer(leg, invite, expires)
        call = Call(p.name, str(extension.action), number, leg, self._now, ticket=ticket, late=offer is None)
        p.calls[leg.call_id] = call
        self._calls[call.id] = call
        self._emit(
            Publish(
                "call-start",
                {"profile": p.name, "call": call.id, "number": number, "app": call.kind, "source": str(peer)},
            )
        )
        if extension.action is Route.ECHO:
            self._want_ports(p, call, leg)
        elif extension.action is Route.USER:
            self._bridge_user(p, call, target)
        else:
            self._bridge_gateway(p, call, target, extension.gateway or "")
        return True

    def _authorized(self, p: _Profile, invite: Request, peer: Peer, action: Route, to_tag: str) -> bool:
        """FreeSWITCH's `auth-calls`: an INVITE ringing a user or leaving through a gateway must carry digest
        credentials of a [[user]] (407 challenge, §22.3); the echo test too with `auth-echo`. Every such INVITE
        is challenged whether or not the callee exists, so the answer tells nothing about user names. False
        when the INVITE was answered here (challenge or 403)."""
        needed = p.config.auth_echo if action is Route.ECHO else p.config.auth_calls
        if not needed:
            return True
        now = self._now
        outcome = self.registrar.authenticate(invite, now, to_tag=to_tag, client=peer.ip)
        if outcome.ok:
            assert outcome.user is not None
            self.guard.succeeded(peer.ip, outcome.user, now)
            return True
        if outcome.failure is not None:
            self._auth_failed(outcome.failure, peer)
        assert outcome.response is not None
        p.failed_calls += 1
        self._respond(p, invite, outcome.response)
        return False

    def _agree_session_timer(self, leg: Leg, invite: Request, expires: _SessionExpires | None) -> None:
        """RFC 4028 §9 as the UAS: the caller's interval (422 already refused short ones), or ours when it
        supports timers; the caller refreshes unless it said we should or cannot refresh at all."""
        supports = _supports_timer(invite)
        if expires is not None:
            leg.se_interval = expires.interval
            refresher = expires.refresher or ("uac" if supports else "uas")
        elif supports:
            leg.se_interval = self.config.session_expires
            refresher = "uac"
        else:
            return
        leg.se_refresher_us = refresher == "uas"

    def _mapped_for(self, call: Call, role: str) -> bool:
        return self._holes_for(call, role) != 0

    def _holes_for(self, call: Call, role: str) -> int:
        """Which holes `role`'s media ports need in the router: 4 when its peer is told our external address (a
        port mapping), 6 when it is an IPv6 peer outside told our global address (firewall pinholes: no NAT on
        IPv6), 0 for none. The address decision is kept on the leg: `ports_ready` advertises what it decided."""
        leg = call.a if role == "a" else call.b
        if leg is None:
            return 0
        p = self.profiles[call.profile]
        if leg.media_address is None:
            leg.media_address = self.addresses.media_address(p.name, leg.peer.ip)
        if leg.media_address.version == 6 and self.addresses.pinhole(p.name, leg.peer.ip):
            return 6
        mapped = p.config.external_media and leg.media_address != self.addresses.rtp_local(p.name, leg.peer.ip)
        return 4 if mapped else 0

    def _want_ports(self, p: _Profile, call: Call, leg: Leg) -> bool:
        """Ask the shell for `leg`'s media ports: mapped ones (within the media caps) when the peer is told our
        external address, pinholed ones (the same caps) for an IPv6 peer outside, else a local pair. False when a
        cap refused (the call was failed)."""
        holes = self._holes_for(call, leg.role)
        mapped = holes != 0
        if mapped:
            assert call.ticket is not None
            call.refusal = self.admission.admit_media(call.ticket, p.config.max_media_calls, self._now)
            if call.refusal is not None:
                self._fail(call, 503, f"over {call.refusal}")
                return False
        owner = call.a.call_id if leg.role == "a" else call.a.call_id + "-b"
        reserve = mapped and call.ticket is not None and call.ticket.reserve
        self._emit(AcquirePorts(call.id, leg.role, mapped, owner, 6 if holes == 6 else 4, reserve))
        return True

    def _media_legs(self, call: Call) -> list[Leg]:
        return call.legs() if call.kind != Route.ECHO else [call.a]

    def _bridge_user(self, p: _Profile, call: Call, user: str) -> None:
        bindings = self.registrar.lookup(user, self._now)
        source = bindings[0].source if bindings else None
        if not isinstance(source, Peer):
            # The same answer for a user who does not exist and one who is offline (as FreeSWITCH answers
            # USER_NOT_REGISTERED): anything else lets a caller enumerate the user names.
            self._fail(call, 404, None)
            return
        call.target = BTarget(source, bindings[0].contact, f"sip:{user}@{source.ip}", None)
        self._prepare_b(p, call)

    def _bridge_gateway(self, p: _Profile, call: Call, number: str, name: str) -> None:
        gateway = next((g for g in p.config.gateways if g.name == name), None)
        if gateway is None:
            self._fail(call, 503, f"no gateway {name}")
            return
        domain = gateway.domain or gateway.host
        peer = Peer(gateway.transport, gateway.host, gateway.port)
        uri = f"sip:{number}@{gateway.host}:{gateway.port}"
        call.target = BTarget(peer, uri, f"sip:{number}@{domain}", gateway.username, gateway)
        p.calls_out += 1
        self._prepare_b(p, call)

    def _prepare_b(self, p: _Profile, call: Call) -> None:
        """The b leg exists from now on (its ports are asked for with a's); its INVITE waits for the relay."""
        target = call.target
        assert target is not None
        sip_address = self.addresses.sip_address(p.name, target.peer.ip)
        caller = user_of(call.a.remote_uri) or "autonat"
        from_user = target.from_user or caller
        host = uri_host(sip_address)
        gateway = target.gateway
        local_uri = (
            f"sip:{from_user}@{host}" if gateway is None else f"sip:{from_user}@{gateway.domain or gateway.host}"
        )
        call.b = Leg(
            role="b",
            peer=target.peer,
            call_id=sipclient.new_call_id(host),
            local_tag=sipclient.new_tag(),
            local_uri=local_uri,
            remote_uri=target.to_uri,
            remote_target=target.uri,
            uas=False,
            sip_address=sip_address,
            session_id=self._random.randrange(1, 2**31),
        )
        p.calls[call.b.call_id] = call
        if self._want_ports(p, call, call.a):
            self._want_ports(p, call, call.b)

    # ================================================================================ media and answers

    def _start_media(self, call: Call) -> None:
        if call.media != "none":
            return
        call.media = "starting"
        leg = call.a
        assert leg.media is not None
        if call.kind == PROBE:
            assert self._probe is not None
            self._emit(StartProbe(call.id, leg.media.local_address, leg.media.local_port, self._probe.seconds))
            return
        if call.kind == Route.ECHO:
            mux = leg.remote is not None and leg.remote.rtcp_mux
            if mux and leg.media.ports.mapped:
                self._emit(DropRtcp(leg.media.ports))
            sending = leg.remote is None or _we_send(leg.remote)
            held = leg.remote is not None and leg.remote.held
            self._emit(
                StartEcho(call.id, leg.media.local_address, leg.media.local_port, not mux, leg.ice, sending, held)
            )
            return
        b = call.b
        assert b is not None and b.media is not None
        peer_a = None
        if leg.remote is not None and leg.remote.audio.address is not None:
            peer_a = (str(leg.remote.audio.address), leg.remote.audio.port)
        local_b = b.media.local_address if b.media.local_address != leg.media.local_address else None
        self._emit(
            StartRelay(
                call.id, leg.media.local_address, leg.media.local_port, b.media.local_port, leg.ice, peer_a, local_b
            )
        )

    def _ice(self, leg: Leg) -> IceLocal | None:
        """Our ICE-lite attributes for `leg`'s answer: host candidates on the local address and, when it
        differs, the advertised (router) one, which a peer outside should prefer."""
        if leg.ice is None or leg.media is None:
            return None
        media = leg.media
        mux = leg.remote is not None and leg.remote.rtcp_mux
        outside = media.advertised != media.local_address
        candidates = []
        for component, local_port, advertised_port in (
            (1, media.local_port, media.advertised_port),
            (2, media.local_port + 1, media.advertised_rtcp),
        ):
            if component == 2 and mux:
                continue
            candidates.append(
                Candidate(
                    "1",
                    component,
                    candidate_priority(component, 65535 if not outside else 32767),
                    media.local_address,
                    local_port,
                )
            )
            if outside:
                candidates.append(
                    Candidate("2", component, candidate_priority(component, 65535), media.advertised, advertised_port)
                )
        return IceLocal(leg.ice[0], leg.ice[1], tuple(candidates))

    def _echo_sdp(self, leg: Leg) -> bytes | None:
        """Our description for an echo leg: the answer to its last offer, or our offer (late offer)."""
        media = leg.media
        assert media is not None
        if leg.remote is None:
            text = echo_offer(
                address=media.advertised,
                port=media.advertised_port,
                rtcp_port=media.advertised_rtcp,
                session_id=leg.session_id,
                version=leg.sdp_version or leg.session_id,
            )
        else:
            answer = echo_answer(
                leg.remote,
                address=media.advertised,
                port=media.advertised_port,
                rtcp_port=media.advertised_rtcp,
                session_id=leg.session_id,
                version=leg.sdp_version or leg.session_id,
                ice=self._ice(leg),
            )
            if answer is None:
                return None
            text = answer
        return self._versioned(leg, text.encode())

    @staticmethod
    def _versioned(leg: Leg, sdp: bytes) -> bytes:
        """RFC 3264 §8: the o= version goes up by one when our description changes, and stays when it does not."""
        if not leg.sdp_version:
            match = _ORIGIN.search(sdp)
            fields = match.group(0).split(b" ") if match else []
            leg.sdp_version = int(fields[2]) if len(fields) >= 6 and fields[2].isdigit() and len(fields[2]) < 19 else 1
            return _with_version(sdp, leg.sdp_version)
        if leg.local_sdp and _without_origin(sdp) == _without_origin(leg.local_sdp):
            return leg.local_sdp
        leg.sdp_version += 1
        return _with_version(sdp, leg.sdp_version)

    def _answer_echo(self, p: _Profile, call: Call) -> None:
        leg = call.a
        sdp = self._echo_sdp(leg)
        if sdp is None:
            self._fail(call, 488, None)
            return
        if call.late:
            leg.awaiting_answer = leg.invite.cseq()[0] if leg.invite is not None else None
        self._answer_a(p, call, sdp)

    def _timer_headers(self, leg: Leg, *, uas: bool) -> list[tuple[str, str]]:
        """RFC 4028 §9: Session-Expires with the refresher in a 2xx; Require: timer when the refresher is the
        UAC of that transaction (it must know it refreshes)."""
        if leg.se_interval is None:
            return []
        refresher_is_uac = (not leg.se_refresher_us) if uas else leg.se_refresher_us
        headers = [("Session-Expires", f"{leg.se_interval};refresher={'uac' if refresher_is_uac else 'uas'}")]
        if refresher_is_uac and uas:
            headers.append(("Require", "timer"))
        return headers

    def _answer_a(self, p: _Profile, call: Call, sdp: bytes) -> None:
        """The 200 OK on leg a, retransmitted until the ACK (§13.3.1.4)."""
        leg = call.a
        if call.ended or leg.invite is None:
            return
        extra = [
            ("Contact", self._contact(p, leg, call.number or "autonat")),
            ("Allow", ALLOW),
            ("Supported", ", ".join(sorted(SUPPORTED))),
            ("Server", SERVER),
            *self._timer_headers(leg, uas=True),
            ("Content-Type", "application/sdp"),
        ]
        response = make_response(leg.invite, 200, to_tag=leg.local_tag, extra_headers=extra, body=sdp)
        leg.local_sdp = sdp
        leg.answered = True
        call.answered_at = self._now
        self._arm_session_timer(leg)
        self._respond(p, leg.invite, response)
        self._retransmit_2xx(call, leg, leg.invite, response)

    def _retransmit_2xx(self, call: Call, leg: Leg, invite: Request, response: Response) -> None:
        """§13.3.1.4, for the initial INVITE and every re-INVITE alike: resend our 2xx until the ACK."""
        leg.retransmitters[invite.cseq()[0]] = Uas2xxRetransmitter(
            invite, response, self._now, reliable=leg.peer.reliable, timers=self.timers, destination=leg.peer
        )
        self._sync_call(call)

    def _arm_session_timer(self, leg: Leg) -> None:
        interval = leg.se_interval
        if interval is None:
            leg.se_at = None
        elif leg.se_refresher_us:
            leg.se_at = self._now + interval / 2  # §10: refresh at half the interval
        else:
            leg.se_at = self._now + interval - min(32.0, interval / 3)  # §10: BYE then, if no refresh came

    # ================================================================================ leg b

    def _place_b_leg(self, p: _Profile, call: Call) -> None:
        b, a = call.b, call.a
        assert b is not None and b.media is not None
        if a.remote is not None:
            sdp = anchor_sdp(
                a.remote.text,
                address=b.media.advertised,
                port=b.media.advertised_port,
                rtcp_port=b.media.advertised_rtcp,
            )
            if sdp is None:
                self._fail(call, 488, None)
                return
            b.local_sdp = self._versioned(b, sdp.encode())
        self._send_b_invite(p, call, b)

    def _send_b_invite(self, p: _Profile, call: Call, leg: Leg, headers: Iterable[tuple[str, str]] = ()) -> None:
        extra = [
            ("Allow", ALLOW),
            ("Supported", ", ".join(sorted(SUPPORTED))),
            ("Session-Expires", str(self.config.session_expires)),
            ("Min-SE", str(self.config.min_se)),
            *headers,
        ]
        invite = self._request(
            p, leg, "INVITE", leg.next_cseq(), in_dialog=False, contact=True, extra_headers=extra, body=leg.local_sdp
        )
        leg.invite = invite
        self._start_request(p, invite, leg.peer)

    def _client_event(self, p: _Profile, item: Response | TimedOut) -> None:
        message = item if isinstance(item, Response) else item.request
        call_id = safe_call_id(message)
        call = p.calls.get(call_id or "")
        if call is None:
            return
        leg = call.a if call.a.call_id == call_id else call.b
        if leg is None:
            return
        try:
            cseq, method = message.cseq()
        except DecodeError:
            return
        if call.ended:
            self._after_end(p, leg, item, method, cseq)
            return
        if not leg.uas and leg.invite is not None and method == "INVITE" and cseq == leg.invite.cseq()[0]:
            if call.kind == PROBE:
                self._on_probe_response(p, call, leg, item)
            elif isinstance(item, TimedOut):
                status = 503 if isinstance(item, TransportError) else 408
                self._fail(call, status, "callee did not answer" if status == 408 else "callee unreachable")
            else:
                self._on_b_response(p, call, leg, item)
        elif leg.out is not None and method == leg.out.method and cseq == leg.out.cseq()[0]:
            self._on_out_response(p, call, leg, item)
        self._sync_call(call)

    def _after_end(self, p: _Profile, leg: Leg, item: Response | TimedOut, method: str, cseq: int) -> None:
        """Leg b's INVITE outlives its call when the caller cancelled (or the call failed) while b was still
        ringing: a 2xx that crosses our CANCEL is ACKed and ended with BYE (§9.1, §13.2.2.4). The leg is
        forgotten at the INVITE's final response or timeout (Timer C bounds it)."""
        if leg.invite is None or method != "INVITE" or cseq != leg.invite.cseq()[0]:
            return
        if isinstance(item, Response) and item.status < 200:
            return
        p.calls.pop(leg.call_id, None)
        if isinstance(item, Response) and item.status < 300:
            leg.confirm_uac(item)
            leg.answered = True
            self._send_ack(p, leg, leg.invite, item)
            self._send_bye(p, leg)

    def _on_b_response(self, p: _Profile, call: Call, leg: Leg, response: Response) -> None:
        status = response.status
        if status < 200:
            a = call.a
            if status in (180, 183) and not a.answered and a.invite is not None and not call.ended:
                contact = self._contact(p, a, call.number or "autonat")
                self._reply(p, a.invite, 180, to_tag=a.local_tag, extra=[("Contact", contact)])
            return
        if status < 300:
            self._on_b_answered(p, call, leg, response)
            return
        if status in (401, 407) and call.target is not None and call.target.gateway is not None and not leg.auth_tried:
            leg.auth_tried = True
            credentials = self._gateway_credentials(call.target.gateway, response, "INVITE", leg.remote_target)
            if credentials is not None:
                self._send_b_invite(p, call, leg, [credentials])
                return
        if self._retry_interval(p, call, leg, response):
            return
        self._fail(call, status if status < 700 else 500, response.reason or None)

    def _retry_interval(self, p: _Profile, call: Call, leg: Leg, response: Response) -> bool:
        """RFC 4028 §8.1: a 422 to our INVITE names its Min-SE; the INVITE goes again, once, with that interval."""
        if response.status != 422 or leg.se_retried:
            return False
        leg.se_retried = True
        minimum = (response.headers.get("Min-SE") or "").split(";")[0].strip()
        if not minimum.isdigit():
            return False
        self._send_b_invite(p, call, leg, [("Session-Expires", minimum)])
        return True

    def _gateway_credentials(
        self, gateway: GatewaySettings, response: Response, method: str, uri: str
    ) -> tuple[str, str] | None:
        header = "WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate"
        value = response.headers.get(header)
        if not value:
            return None
        try:
            challenge = parse_challenge(value)
        except DecodeError:
            return None
        credentials = client_authorization(
            challenge,
            method=method,
            uri=uri,
            username=gateway.username,
            password=gateway.password,
            cnonce=sipclient.new_tag(),
        )
        return ("Authorization" if response.status == 401 else "Proxy-Authorization", credentials)

    def _confirm_answer(self, leg: Leg, response: Response) -> bool:
        """A 2xx to the INVITE we placed on `leg`: the first one makes the dialog (§12.1.2) and its session
        timer (RFC 4028 §9); True for that first one, False for a retransmission."""
        if leg.answered:
            return False
        leg.confirm_uac(response)
        leg.answered = True
        expires = _safe_expires(response)
        if expires is not None:
            leg.se_interval = expires.interval
            leg.se_refresher_us = expires.refresher != "uas"  # we are the UAC of this INVITE
            self._arm_session_timer(leg)
        return True

    def _on_b_answered(self, p: _Profile, call: Call, leg: Leg, response: Response) -> None:
        assert leg.invite is not None
        if not self._confirm_answer(leg, response):
            if leg.late_ack is None:
                self._send_ack(p, leg, leg.invite, response)  # a retransmitted 2xx: its ACK again (§13.2.2.4)
            return
        described = describe(response.body) if response.body else None
        a = call.a
        assert a.media is not None and leg.media is not None
        if described is None or described.srtp:
            self._send_ack(p, leg, leg.invite, response)
            self._send_bye(p, leg)
            self._fail(call, 488, "callee answered without audio")
            return
        leg.remote = described
        if described.audio.address is not None:
            self._emit(UpdateMedia(call.id, leg="b", peer=(str(described.audio.address), described.audio.port)))
        sdp = anchor_sdp(
            described.text,
            address=a.media.advertised,
            port=a.media.advertised_port,
            rtcp_port=a.media.advertised_rtcp,
            ice=self._ice(a),
        )
        assert sdp is not None
        if call.late:
            # Late offer through the bridge: b offered in its 2xx; its ACK carries a's answer (§13.2.2.4),
            # so it waits for a's ACK. b resends its 2xx meanwhile, and Timer M keeps the transaction.
            leg.late_ack = response
            a.awaiting_answer = a.invite.cseq()[0] if a.invite is not None else None
        else:
            self._send_ack(p, leg, leg.invite, response)
        self._answer_a(p, call, self._versioned(a, sdp.encode()))

    def _send_ack(self, p: _Profile, leg: Leg, invite: Request, response: Response, body: bytes = b"") -> None:
        """The ACK of a 2xx to our `invite` (§13.2.2.4), a transaction of its own, sent where the peer is. The
        first one builds the dialog's route from the 2xx (§12.1.2); a re-INVITE's uses the dialog (§12.2.1.1)."""
        content_type = "application/sdp" if body else None
        if invite is leg.invite:
            ack = sipclient.ack_for_2xx(
                invite, response, branch=sipclient.new_branch(), body=body, content_type=content_type
            )
        else:
            ack = self._request(p, leg, "ACK", invite.cseq()[0], body=body)
        leg.acked = True
        self._send(p, ack, leg.peer)

    # ================================================================================ the test call

    def _invite_probe(self, p: _Profile, call: Call) -> None:
        """The test call's media is bound: our offer (G.711 only: the signal is PCMU or PCMA) at the address
        and ports the decision advertises to the peer, in an INVITE like leg b's."""
        leg, probe = call.a, self._probe
        assert leg.media is not None and probe is not None
        media = leg.media
        offer = echo_offer(
            address=media.advertised,
            port=media.advertised_port,
            rtcp_port=media.advertised_rtcp,
            session_id=leg.session_id,
            version=leg.session_id,
            formats=probecall.OFFERED,
        )
        leg.local_sdp = self._versioned(leg, offer.encode())
        probe.invited_at = self._now
        self._send_b_invite(p, call, leg)

    def _on_probe_response(self, p: _Profile, call: Call, leg: Leg, item: Response | TimedOut) -> None:
        probe = self._probe
        if probe is None or probe.call != call.id:
            return
        if isinstance(item, TimedOut):
            self._hangup(call, "peer unreachable" if isinstance(item, TransportError) else "no answer", bye=False)
            return
        status = item.status
        if status < 200:
            return
        if status < 300:
            self._probe_answered(p, call, leg, item, probe)
            return
        if self._retry_interval(p, call, leg, item):
            return
        probe.status, probe.phrase = status, item.reason
        self._hangup(call, f"refused {status} {item.reason}".rstrip(), bye=False)

    def _probe_answered(self, p: _Profile, call: Call, leg: Leg, response: Response, probe: _Probe) -> None:
        """ACK the 2xx; with an answer the signal can use, play it for the asked seconds, else hang up."""
        assert leg.invite is not None
        first = self._confirm_answer(leg, response)
        self._send_ack(p, leg, leg.invite, response)  # a retransmitted 2xx is ACKed again (§13.2.2.4)
        if not first:
            return
        probe.status, probe.phrase = response.status, response.reason
        call.answered_at = self._now
        body = response.body if _media_type(response) in (None, "application/sdp") else b""
        leg.remote = describe(body) if body else None
        answer = probecall.choose_answer(leg.remote)
        if isinstance(answer, str):
            self._hangup(call, answer, bye=True)
            return
        probe.answer = answer
        self._heap.set(("probe", call.id), self._now + probe.seconds + probecall.DRAIN)
        self._emit(ProbeAnswered(call.id, answer.remote, answer.payload_type))

    def _probe_outcome(self, call: Call, probe: _Probe, reason: str) -> Outcome:
        leg, media, answer = call.a, call.a.media, probe.answer
        invited, answered = probe.invited_at, call.answered_at
        mapping = None
        if media is not None and media.ports.mapped and media.ports.external_ip is not None:
            mapping = (str(media.ports.external_ip), media.ports.external_rtp)
        return Outcome(
            uri=probe.target.uri,
            profile=call.profile,
            call_id=leg.call_id,
            seconds=probe.seconds,
            answered=leg.answered,
            status=probe.status,
            phrase=probe.phrase,
            reason=reason,
            setup=None if answered is None or invited is None else answered - invited,
            duration=None if answered is None else self._now - answered,
            local=None if media is None else (str(media.local_address), media.local_port),
            advertised=None if media is None else (str(media.advertised), media.advertised_port),
            mapping=mapping,
            remote=None if answer is None else answer.remote,
            codec=None if answer is None else answer.codec,
        )

    # ================================================================================ in-dialog requests

    def _leg_of(self, p: _Profile, request: Request) -> tuple[Call, Leg] | None:
        """The dialog a request belongs to (§12.2.2: Call-ID, the To tag ours, the From tag the peer's)."""
        call = p.calls.get(safe_call_id(request) or "")
        if call is None:
            return None
        leg = call.a if request.call_id() == call.a.call_id else call.b
        if leg is None or request.to_tag() != leg.local_tag:
            return None
        if leg.remote_tag is not None and request.from_tag() != leg.remote_tag:
            return None
        return call, leg

    def _in_dialog(self, p: _Profile, request: Request, peer: Peer) -> None:
        found = self._leg_of(p, request)
        if found is None:
            self._reply(p, request, 481)
            return
        call, leg = found
        cseq = request.cseq()[0]
        if leg.remote_cseq is not None and cseq <= leg.remote_cseq:
            # §12.2.2: lower or equal remote CSeq: out of order (a retransmission never gets here).
            self._reply(p, request, 500, "Out of Order", extra=[("Retry-After", "1")])
            return
        leg.remote_cseq = cseq
        method = request.method
        if method == "BYE":
            self._reply(p, request, 200)
            self._hangup(call, "bye from " + ("caller" if leg.uas else "callee"), bye=True, skip=leg)
        elif method in ("INVITE", "UPDATE"):
            self._offer_in(p, call, leg, request)
        elif method == "OPTIONS":
            self._reply(p, request, 200, extra=self._capabilities())
        else:
            self._reply(p, request, 200)  # INFO (DTMF), NOTIFY, MESSAGE inside the call
        self._sync_call(call)

    def _offer_in(self, p: _Profile, call: Call, leg: Leg, request: Request) -> None:
        """A re-INVITE or UPDATE (RFC 3311): a session refresh, and an offer when it has a body."""
        try:
            expires = _SessionExpires.of(request)
        except DecodeError as exc:
            self._reply(p, request, 400, f"Bad Request: {exc.reason}")
            return
        if expires is not None and expires.interval < self.config.min_se:
            self._reply(p, request, 422, extra=[("Min-SE", str(self.config.min_se))])
            return
        invite = request.method == "INVITE"
        if invite and leg.offer_in is not None and leg.offer_in.method == "INVITE":
            self._reply(p, request, 500, extra=[("Retry-After", str(self._random.randint(0, 10)))])  # §14.2
            return
        if leg.busy and (request.body or invite):
            self._reply(p, request, 491)  # §14.1 glare: an exchange of ours is under way on this dialog
            return
        if expires is not None:
            leg.se_interval = expires.interval
            leg.se_refresher_us = expires.refresher == "uas"
        self._arm_session_timer(leg)  # any refresh request restarts the interval (RFC 4028 §10)
        if not request.body:
            if not invite:
                self._reply_offer(p, call, leg, request, b"")  # UPDATE as a plain refresh
                return
            # A re-INVITE without an offer: ours goes in the 200, the answer comes in the ACK (§14.2).
            leg.awaiting_answer = request.cseq()[0]
            self._reply_offer(p, call, leg, request, leg.local_sdp)
            return
        offer = describe(request.body)
        if offer is None or offer.srtp:
            self._reply(p, request, 488)  # the session stays as it was (§14.2)
            return
        if offer.ice and leg.ice is None:
            leg.ice = new_credentials()
        other = call.other(leg)
        if call.kind == Route.ECHO or other is None:
            leg.remote = offer
            sdp = self._echo_sdp(leg)
            if sdp is None:
                self._reply(p, request, 488)
                return
            self._emit(UpdateMedia(call.id, sending=_we_send(offer), hold=offer.held, ice=leg.ice))
            self._reply_offer(p, call, leg, request, sdp)
            return
        if other.busy or not other.answered or other.media is None:
            self._reply(p, request, 491)
            return
        # A bridged call: the offer goes on to the other phone, and its answer comes back (hold reaches it).
        leg.remote = offer
        leg.offer_in = request
        peer = None if offer.audio.address is None else (str(offer.audio.address), offer.audio.port)
        ice = leg.ice if leg.role == "a" else None
        self._emit(UpdateMedia(call.id, leg=leg.role, peer=peer, hold=offer.held, ice=ice))
        anchored = anchor_sdp(
            offer.text,
            address=other.media.advertised,
            port=other.media.advertised_port,
            rtcp_port=other.media.advertised_rtcp,
        )
        assert anchored is not None
        self._send_out(p, call, other, "INVITE", self._versioned(other, anchored.encode()), origin=leg)

    def _reply_offer(self, p: _Profile, call: Call, leg: Leg, request: Request, sdp: bytes) -> None:
        """The 2xx to a re-INVITE or UPDATE, with `sdp` and the session timer headers (RFC 4028 §9)."""
        extra = [("Contact", self._contact(p, leg, call.number or "autonat")), ("Allow", ALLOW)]
        extra += [("Supported", ", ".join(sorted(SUPPORTED))), *self._timer_headers(leg, uas=True)]
        if sdp:
            extra.append(("Content-Type", "application/sdp"))
            leg.local_sdp = sdp
        response = make_response(request, 200, to_tag=leg.local_tag, extra_headers=extra, body=sdp)
        self._respond(p, request, response)
        if request.method == "INVITE":
            self._retransmit_2xx(call, leg, request, response)

    def _send_out(self, p: _Profile, call: Call, leg: Leg, method: str, sdp: bytes, *, origin: Leg | None) -> None:
        """Our re-INVITE or UPDATE on `leg`: an offer (`sdp`), or a bare session refresh."""
        extra = [("Allow", ALLOW), ("Supported", ", ".join(sorted(SUPPORTED))), *self._timer_headers(leg, uas=False)]
        request = self._request(p, leg, method, leg.next_cseq(), contact=True, extra_headers=extra, body=sdp)
        leg.out = request
        leg.out_origin = origin
        if sdp:
            leg.local_sdp = sdp
        self._start_request(p, request, leg.peer)

    def _on_out_response(self, p: _Profile, call: Call, leg: Leg, item: Response | TimedOut) -> None:
        """The answer to our re-INVITE / UPDATE on `leg` (a forwarded offer, or our own refresh)."""
        request = leg.out
        assert request is not None
        if isinstance(item, Response) and item.status < 200:
            return
        origin = leg.out_origin
        leg.out = leg.out_origin = None
        status = 408 if isinstance(item, TimedOut) else item.status
        if isinstance(item, Response) and 200 <= status < 300:
            if request.method == "INVITE":
                self._send_ack(p, leg, request, item)
            expires = _safe_expires(item)
            if expires is not None:
                leg.se_interval = expires.interval
                leg.se_refresher_us = expires.refresher != "uas"
            self._arm_session_timer(leg)
            described = describe(item.body) if item.body else None
            if described is not None:
                leg.remote = described
                if described.audio.address is not None:
                    self._emit(
                        UpdateMedia(call.id, leg=leg.role, peer=(str(described.audio.address), described.audio.port))
                    )
            if origin is not None and origin.offer_in is not None:
                pending = origin.offer_in
                origin.offer_in = None
                if described is None or origin.media is None:
                    self._reply(p, pending, 488)
                    return
                sdp = anchor_sdp(
                    described.text,
                    address=origin.media.advertised,
                    port=origin.media.advertised_port,
                    rtcp_port=origin.media.advertised_rtcp,
                    ice=self._ice(origin),
                )
                assert sdp is not None
                self._reply_offer(p, call, origin, pending, self._versioned(origin, sdp.encode()))
            return
        if origin is not None and origin.offer_in is not None:
            pending = origin.offer_in
            origin.offer_in = None
            self._reply(p, pending, status if status in (491, 488, 500, 503, 480) else 488)
        if status in (408, 481):
            # §14.1 / RFC 4028 §10: the dialog is gone at the far end.
            self._hangup(call, f"{request.method} answered {status}", bye=True)
        elif status == 491 and origin is None:
            # §14.1: the owner of the Call-ID (we made it for the legs we placed) waits 2.1-4 s, the other 0-2 s,
            # so the two sides do not collide again.
            low, high = (GLARE_MIN, GLARE_MAX) if not leg.uas else (0.0, GLARE_MIN - 0.1)
            leg.retry_at = self._now + self._random.uniform(low, high)
        elif origin is None and leg.se_interval is not None:
            leg.se_at = self._now + max(1.0, leg.se_interval / 4)  # the refresh failed for another reason: again later

    def _on_ack(self, p: _Profile, ack: Request) -> None:
        found = self._leg_of(p, ack) if ack.to_tag() is not None else None
        if found is None:
            return
        call, leg = found
        cseq = ack.cseq()[0]
        retransmitter = leg.retransmitters.get(cseq)
        if retransmitter is None or not retransmitter.receive_ack(ack):
            return
        del leg.retransmitters[cseq]
        leg.acked = True
        if leg.awaiting_answer == cseq:
            leg.awaiting_answer = None
            self._answer_in_ack(p, call, leg, ack)
        self._sync_call(call)

    def _answer_in_ack(self, p: _Profile, call: Call, leg: Leg, ack: Request) -> None:
        """Our 2xx carried the offer: the ACK carries the answer (§13.2.1); none or a bad one ends the call."""
        described = describe(ack.body) if ack.body and _media_type(ack) in (None, "application/sdp") else None
        other = call.other(leg)
        if described is None or described.srtp:
            self._hangup(call, "no usable answer in the ACK", bye=True)
            return
        leg.remote = described
        if call.kind == Route.ECHO or other is None:
            self._emit(UpdateMedia(call.id, sending=_we_send(described), hold=described.held))
            return
        if described.audio.address is not None:
            self._emit(UpdateMedia(call.id, leg=leg.role, peer=(str(described.audio.address), described.audio.port)))
        if other.late_ack is not None and other.media is not None:
            sdp = anchor_sdp(
                described.text,
                address=other.media.advertised,
                port=other.media.advertised_port,
                rtcp_port=other.media.advertised_rtcp,
            )
            assert sdp is not None
            response, other.late_ack = other.late_ack, None
            body = self._versioned(other, sdp.encode())
            other.local_sdp = body
            assert other.invite is not None
            self._send_ack(p, other, other.invite, response, body)

    def _on_cancel(self, p: _Profile, cancel: Request) -> None:
        tx = p.server.find_invite_for_cancel(cancel)
        if tx is None:
            self._reply(p, cancel, 481)
            return
        self._reply(p, cancel, 200)  # §9.2: answered whatever becomes of the INVITE
        call = p.calls.get(safe_call_id(cancel) or "")
        invite = tx.request
        if call is None:
            if tx.last_response is None or tx.last_response.status < 200:
                self._reply(p, invite, 487)
            return
        leg = call.a if cancel.call_id() == call.a.call_id else call.b
        if leg is None:
            return
        if leg is call.a and invite is leg.invite and not leg.answered:
            self._reply(p, invite, 487, to_tag=leg.local_tag)
            self._hangup(call, "cancelled", bye=False)
        elif leg.offer_in is not None and leg.offer_in.cseq() == invite.cseq():
            # A forwarded re-INVITE: 487 here, and ours on the other leg is cancelled too (§9.1).
            leg.offer_in = None
            self._reply(p, invite, 487)
            other = call.other(leg)
            if other is not None and other.out is not None and other.out.method == "INVITE":
                self._run_client(p, p.client.cancel(other.out, self._now))

    # ================================================================================ timers of a call

    def _call_timer(self, call: Call) -> None:
        p = self.profiles[call.profile]
        now = self._now
        for leg in call.legs():
            for cseq, retransmitter in list(leg.retransmitters.items()):
                when = retransmitter.timer()
                if when is None or when > now:
                    continue
                for action in retransmitter.handle_timer(now):
                    if isinstance(action, Transmit):
                        self._send(p, action.response, leg.peer)
                    elif isinstance(action, AckTimeout):
                        log.warning(
                            "call %s: no ACK for our 200 OK from %s after %g s: BYE",
                            call.id,
                            leg.peer,
                            self.timers.timeout,
                        )
                        self._hangup(call, "ack timeout", bye=True)
                        return
                if retransmitter.done:
                    leg.retransmitters.pop(cseq, None)
            if leg.se_at is not None and leg.se_at <= now and not call.ended:
                leg.se_at = None
                if leg.se_refresher_us:
                    self._refresh(p, call, leg)
                else:
                    log.info("call %s: no session refresh from %s within %s s: BYE", call.id, leg.peer, leg.se_interval)
                    self._hangup(call, "session timer expired", bye=True)
                    return
            if leg.retry_at is not None and leg.retry_at <= now and not call.ended:
                leg.retry_at = None
                self._refresh(p, call, leg)
        self._sync_call(call)

    def _refresh(self, p: _Profile, call: Call, leg: Leg) -> None:
        """RFC 4028 §7.4/§9: we are the refresher: UPDATE without a body when the peer allows it, else a re-INVITE
        with our last description (unchanged, so its version stays, RFC 3264 §8)."""
        if not leg.answered or leg.busy:
            leg.se_at = self._now + 1.0  # an exchange is under way: refresh right after it
            return
        if leg.allows_update:
            self._send_out(p, call, leg, "UPDATE", b"", origin=None)
        else:
            self._send_out(p, call, leg, "INVITE", leg.local_sdp, origin=None)

    # ================================================================================ ending calls

    def _fail(self, call: Call, status: int, reason: str | None) -> None:
        if call.ended:
            return
        p = self.profiles[call.profile]
        a = call.a
        if a.uas:  # (the test call's leg a is ours: there is no caller to answer)
            p.failed_calls += 1
            if a.invite is not None and not a.answered:
                extra = [] if call.refusal is None else [("Retry-After", str(call.refusal.retry_after))]
                self._reply(p, a.invite, status, reason, to_tag=a.local_tag, extra=extra)
        self._hangup(call, reason or f"failed {status}", bye=False)

    def _hangup(self, call: Call, reason: str, *, bye: bool, skip: Leg | None = None) -> None:
        if call.ended:
            return
        call.ended = True
        call.end_reason = reason
        p = self.profiles[call.profile]
        if call.ticket is not None:
            self.admission.release(call.ticket)
        for leg in call.legs():
            p.calls.pop(leg.call_id, None)
            leg.retransmitters.clear()
            if leg is skip:
                continue
            if leg.late_ack is not None and leg.invite is not None:
                self._send_ack(p, leg, leg.invite, leg.late_ack)  # §13.2.2.4: every 2xx is ACKed, even now
                leg.late_ack = None
            if bye and leg.answered:
                self._send_bye(p, leg)  # an established dialog (our 2xx sent, or theirs received)
            elif not leg.uas and leg.invite is not None and not leg.answered:
                p.calls[leg.call_id] = call  # kept until the INVITE ends: a 2xx crossing the CANCEL is ended
                self._run_client(p, p.client.cancel(leg.invite, self._now))  # still ringing: §9.1
        self._calls.pop(call.id, None)
        self._heap.set(("call", call.id), None)
        ports = tuple(leg.media.ports for leg in call.legs() if leg.media is not None)
        if call.media != "none" or ports:
            self._emit(ReleaseMedia(call.id, ports))
        log.info("call %s (%s %s) ended: %s", call.id, call.kind, call.number, reason)
        self._emit(Publish("call-end", {"profile": call.profile, "call": call.id, "reason": reason}))
        probe = self._probe
        if probe is not None and probe.call == call.id:
            self._probe = None
            self._heap.set(("probe", call.id), None)
            self._emit(ProbeEnded(call.id, self._probe_outcome(call, probe, reason)))

    def _request(
        self,
        p: _Profile,
        leg: Leg,
        method: str,
        cseq: int,
        *,
        in_dialog: bool = True,
        contact: bool = False,
        extra_headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Request:
        """A request of ours on `leg` (§8.1.1), sent where the peer is: within its dialog (§12.2.1.1: the
        remote tag and the route set) or, `in_dialog` False, the dialog-creating INVITE. `contact` adds ours."""
        return sipclient.make_request(
            method,
            leg.remote_target,
            from_uri=leg.local_uri,
            from_tag=leg.local_tag,
            to_uri=leg.remote_uri,
            to_tag=leg.remote_tag if in_dialog else None,
            call_id=leg.call_id,
            cseq=cseq,
            via_host=str(leg.sip_address),
            via_port=p.config.sip_port,
            transport=leg.peer.transport,
            contact=(
                self._contact_uri(p, leg.sip_address, user_of(leg.local_uri) or "autonat", leg.peer.transport)
                if contact
                else None
            ),
            route=leg.route_set if in_dialog else (),
            extra_headers=extra_headers,
            body=body,
            content_type="application/sdp" if body else None,
        )

    def _send_bye(self, p: _Profile, leg: Leg) -> None:
        """Our BYE goes to where the peer's packets came from (its Contact may be private)."""
        self._start_request(p, self._request(p, leg, "BYE", leg.next_cseq()), leg.peer)

    # ================================================================================ responses

    def _on_response(self, p: _Profile, response: Response) -> None:
        entry = p.registrations.get(safe_call_id(response) or "")
        if entry is not None and entry.machine is not None:
            self._run_registration(p, entry, entry.machine.receive_response(response, self._now))
            return
        self._run_client(p, p.client.receive_response(response, self._now))

    # ================================================================================ gateways

    def _registration_contact(self, p: _Profile, gateway: GatewaySettings) -> tuple[str, str]:
        address = self.addresses.sip_address(p.name, gateway.host)
        return str(address), self._contact_uri(p, address, gateway.username or "autonat", gateway.transport)

    def _start_registration(self, p: _Profile, entry: _Gateway) -> None:
        gateway = entry.settings
        domain = gateway.domain or gateway.host
        config = RegistrationConfig(
            registrar_uri=f"sip:{gateway.host}:{gateway.port}",
            aor=f"sip:{gateway.username}@{domain}",
            username=gateway.username,
            password=gateway.password,
            expires=gateway.expires,
            retry=gateway.retry,
            transport=gateway.transport,
        )

        def authorize(response: Response, method: str, uri: str) -> str | None:
            found = self._gateway_credentials(gateway, response, method, uri)
            return None if found is None else found[1]

        machine = OutboundRegistration(config, authorize=authorize, timers=self.timers)
        entry.machine = machine
        p.registrations[machine.call_id] = entry
        via_host, contact = self._registration_contact(p, gateway)
        self._run_registration(
            p, entry, machine.start(self._now, via_host=via_host, via_port=p.config.sip_port, contact=contact)
        )

    def _run_registration(self, p: _Profile, entry: _Gateway, actions: Iterable[object]) -> None:
        gateway = entry.settings
        for action in actions:
            if isinstance(action, SendRequest):
                self._send(p, action.request, Peer(gateway.transport, gateway.host, gateway.port))
        machine = entry.machine
        self._heap.set(("reg", f"{p.name}{_SEPARATOR}{gateway.name}"), None if machine is None else machine.timer())


def _we_send(offer: Description) -> bool:
    """Whether our answer to `offer` lets us send (RFC 3264 §6.1): the peer receives (sendrecv, recvonly)."""
    return offer.direction in ("sendrecv", "recvonly")


def _safe_expires(message: Request | Response) -> _SessionExpires | None:
    try:
        return _SessionExpires.of(message)
    except DecodeError:
        return None


_ORIGIN = re.compile(rb"\r\no=[^\r\n]*")


def _without_origin(sdp: bytes) -> bytes:
    return _ORIGIN.sub(b"", sdp, count=1)


def _with_version(sdp: bytes, version: int) -> bytes:
    """`sdp` with its o= session version set to `version` (RFC 3264 §8)."""

    def replace(match: re.Match[bytes]) -> bytes:
        fields = match.group(0).split(b" ")
        if len(fields) >= 6:
            fields[2] = str(version).encode()
        return b" ".join(fields)

    return _ORIGIN.sub(replace, sdp, count=1)
