"""The SIP service: one `SipProfile` per configured profile, the asyncio shell around the sans-IO cores.

What each profile does (issue "The test call"):
- listens on UDP and TCP (TLS with a certificate) at its sip-ip:sip-port; at start the engine maps the
  SIP ports (static mappings, owner "sip:<profile>"), removed at stop;
- answers from the dialplan: `echo` (the 9196 echo test), `user` (ring a registered user, media relayed
  through us), `gateway` (call out through an outbound registration);
- a registrar with digest authentication for the `[[user]]`s;
- NAT rules: replies go to the packet's source (or the same connection), RFC 3581 received/rport, our
  Via/Contact/SDP carry the address the advertise decision picks for that peer, in-dialog requests we
  send (BYE) go to where the peer's packets came from, and the 2xx is retransmitted until the ACK; with
  no ACK after 64*T1 we send BYE and release the call (§13.3.1.4).

Media ports for a peer outside come from the RTP pool (mapped ahead, so the 200 OK never waits on the
router); peers on the local network get an unmapped pair from the same range.

Bounded under a flood (autonat.sip.admission): a new call is admitted within the global, per-source and
per-profile caps, or refused with 503 + Retry-After before it costs a mapping; refusals are summed up in
one log line per interval.

Guessing passwords does not pay (autonat.sip.guard): REGISTERs, and INVITEs to users and gateways
(`auth-calls`; the echo test with `auth-echo`), need digest authentication; every failure is logged in
one line fail2ban reads ("autonat.auth"), and a source that keeps failing is banned: its requests that
would start something new are dropped unanswered, for longer each time. Unknown users and wrong
passwords get the same 403, and an unknown callee the same 404 as an offline one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

from autonat.addresses import IPAddress, uri_host
from autonat.advertise import ProfileSettings
from autonat.engine.engine import NatEngine, Wanted
from autonat.engine.events import EventKind
from autonat.engine.pool import PortPairs, RtpPool
from autonat.errors import AutonatError
from autonat.proto.errors import DecodeError
from autonat.proto.types import Transport
from autonat.service.calls import Call, Leg, MediaPorts, safe_call_id, uri_of, user_of
from autonat.service.media import RtpEcho, RtpRelay
from autonat.service.profiles import ProfileManager
from autonat.service.settings import Action, GatewaySettings, SipProfileSettings, SipSettings
from autonat.service.transport import Peer, SipTransport
from autonat.sip import client as sipclient
from autonat.sip.admission import Admission, AdmissionLimits, Refusal, Ticket
from autonat.sip.client import (
    ClientTransactionTable,
    DeliverResponse,
    OutboundRegistration,
    RegistrationConfig,
    SendRequest,
    TimedOut,
)
from autonat.sip.digest import DigestServer, client_authorization, parse_challenge
from autonat.sip.guard import AuthGuard, failure_line, source_key
from autonat.sip.message import Request, Response, make_response, with_received
from autonat.sip.registrar import AuthFailure, Registrar
from autonat.sip.session import anchor_sdp, echo_answer, first_audio
from autonat.sip.transaction import (
    AckTimeout,
    Deliver,
    Timers,
    TransactionTable,
    Transmit,
    Uas2xxRetransmitter,
)

log = logging.getLogger("autonat.sip")
auth_log = logging.getLogger("autonat.auth")  # one line per failed authentication: fail2ban's input

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, REGISTER, INFO, UPDATE"
SERVER = "autonat"
MAX_DESTINATIONS = 20_000


class SipError(AutonatError):
    exit_code = 9


class _Clock:
    """One asyncio timer following a sans-IO object's `timer()`."""

    def __init__(self, when: Callable[[], float | None], fire: Callable[[float], None]) -> None:
        self._when = when
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def update(self) -> None:
        when = self._when()
        if when == self._at and self._handle is not None:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = when
        if when is not None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_at(max(when, loop.time()), self._run)

    def _run(self) -> None:
        self._handle = None
        self._at = None
        self._fire(asyncio.get_running_loop().time())
        self.update()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class SipService:
    """Every profile's listeners plus what they share: the registrar, the RTP range and pool."""

    def __init__(
        self,
        settings: SipSettings,
        profiles: ProfileManager,
        engine: NatEngine,
        profile_settings: dict[str, SipProfileSettings],
        secret: bytes,
    ) -> None:
        self.settings = settings
        self.profiles = profiles
        self.engine = engine
        self.timers = Timers(t1=settings.t1, t2=max(settings.t1, settings.t2))
        self.digest = DigestServer(settings.realm, secret)
        self.registrar = Registrar(
            dict(settings.users),
            self.digest,
            min_expires=settings.min_expires,
            max_expires=settings.max_expires,
        )
        self.pairs = PortPairs(range(settings.rtp_start_port, settings.rtp_end_port + 1))
        self.pool: RtpPool | None = None
        self.admission = Admission(
            AdmissionLimits(
                max_calls=settings.max_calls,
                max_media_calls=settings.max_media_calls,
                source_rate=settings.source_call_rate,
                source_burst=settings.source_call_burst,
                source_calls=settings.source_max_calls,
            )
        )
        self._admission_clock: _Clock | None = None
        self.guard = AuthGuard(
            threshold=settings.auth_failures,
            window=settings.auth_window,
            ban=settings.auth_ban,
            max_ban=max(settings.auth_ban, settings.auth_max_ban),
        )
        self._guard_clock: _Clock | None = None
        self.dropped_banned = 0  # requests from banned sources, dropped unanswered
        self.sip_profiles: dict[str, SipProfile] = {}
        for name, extra in profile_settings.items():
            if extra.listen:
                self.sip_profiles[name] = SipProfile(self, profiles.get(name), extra)
        self._registrar_clock: _Clock | None = None

    @property
    def active_calls(self) -> int:
        return self.admission.calls

    @property
    def calls(self) -> list[Call]:
        return [call for profile in self.sip_profiles.values() for call in profile.calls.values()]

    def _wants_pool(self) -> bool:
        return self.engine.settings.enabled and any(p.external_media for p in self.sip_profiles.values())

    async def start(self) -> None:
        """Bind every profile (an OSError names the profile), then map SIP ports and fill the pool in the
        background: a profile answers at once with its local address and picks up the external one when
        discovery completes."""
        started: list[SipProfile] = []
        try:
            for profile in self.sip_profiles.values():
                await profile.start()
                started.append(profile)
        except SipError:
            for profile in started:
                await profile.stop()
            raise
        if self._wants_pool() and self.engine.settings.mapping:
            self.pool = RtpPool(
                self.engine, self.pairs, size=self.settings.pool_size, refill_rate=self.settings.pool_refill_rate
            )
            await self.pool.start()
        self._registrar_clock = _Clock(self.registrar.timer, self._expire_registrations)
        self._registrar_clock.update()
        self._admission_clock = _Clock(self.admission.timer, self._log_refusals)
        self._guard_clock = _Clock(self.guard.timer, self.guard.expire)
        self._guard_clock.update()

    def _log_refusals(self, now: float) -> None:
        line = self.admission.summary(now)
        if line is not None:
            log.warning("%s", line)

    def refused(self, now: float) -> None:
        """A call was refused by a cap: the summary of refusals goes out at the end of its interval."""
        if self._admission_clock is not None:
            self._admission_clock.update()

    def _expire_registrations(self, now: float) -> None:
        for binding in self.registrar.expire(now):
            log.info("registration of %s (%s) expired", binding.user, binding.contact)

    async def stop(self) -> None:
        for profile in self.sip_profiles.values():
            await profile.stop()
        if self._registrar_clock is not None:
            self._registrar_clock.cancel()
        if self._admission_clock is not None:
            self._log_refusals(float("inf"))  # what was refused since the last summary
            self._admission_clock.cancel()
        if self._guard_clock is not None:
            self._guard_clock.cancel()
        if self.pool is not None:
            await self.pool.stop()

    def auth_failed(self, failure: AuthFailure, peer: Peer, now: float) -> None:
        """One failed authentication: its log line (for fail2ban), counted against the source and the user."""
        auth_log.warning(
            "%s",
            failure_line(
                wall=time.time(),
                ip=peer.ip,
                port=peer.port,
                method=failure.method,
                reason=str(failure.reason),
                user=failure.user,
            ),
        )
        ban = self.guard.failed(peer.ip, failure.user, now)
        if ban is not None:
            log.warning(
                "banned %s for %.0f s after failed authentications (strike %d%s)",
                ban.source,
                ban.seconds,
                ban.strike,
                ", a targeted user" if ban.targeted else "",
            )
        if self._guard_clock is not None:
            self._guard_clock.update()

    def status(self, name: str) -> dict[str, Any]:
        profile = self.sip_profiles.get(name)
        if profile is None:
            return {}
        return profile.status()

    def registrations(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        return [
            {"user": b.user, "contact": b.contact, "expires": b.remaining(now), "source": str(b.source)}
            for b in self.registrar.bindings(now)
        ]


class SipProfile:
    def __init__(self, service: SipService, settings: ProfileSettings, extra: SipProfileSettings) -> None:
        self.service = service
        self.settings = settings
        self.extra = extra
        self.name = settings.name
        self.server = TransactionTable(timers=service.timers)
        self.client = ClientTransactionTable()
        self.calls: dict[str, Call] = {}  # by leg Call-ID (both legs of a bridged call)
        self.calls_in = 0
        self.calls_out = 0
        self.failed_calls = 0
        self._destinations: collections.OrderedDict[str, Peer] = collections.OrderedDict()
        self._server_clock = _Clock(self.server.timer, self._server_timer)
        self._client_clock = _Clock(self.client.timer, self._client_timer)
        self._retransmitters: dict[tuple[str, int], tuple[Uas2xxRetransmitter, _Clock]] = {}  # (Call-ID, CSeq)
        self._registrations: dict[str, tuple[GatewaySettings, OutboundRegistration]] = {}  # by Call-ID
        self._registration_clocks: dict[str, _Clock] = {}  # by gateway name
        self._b_gateways: dict[str, GatewaySettings | None] = {}  # b-leg Call-ID -> its gateway
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sip_mappings: list[tuple[Transport, int]] = []
        self._events: asyncio.Task[None] | None = None
        self.transport: SipTransport | None = None
        self.local_ip: IPAddress | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    def _tls_context(self) -> ssl.SSLContext | None:
        if not (self.settings.tls_sip_port and self.extra.tls_cert):
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(str(self.extra.tls_cert), str(self.extra.tls_key) if self.extra.tls_key else None)
        except (OSError, ssl.SSLError) as exc:
            raise SipError(f"profile {self.name}: TLS certificate {self.extra.tls_cert}: {exc}") from None
        return context

    async def start(self) -> None:
        self.local_ip = self.service.profiles.local_address() if self.settings.sip_ip is None else self.settings.sip_ip
        tls = self._tls_context()
        self.transport = SipTransport(
            str(self.local_ip),
            self.settings.sip_port,
            self._on_message,
            tcp=self.extra.tcp,
            tls_port=self.settings.tls_sip_port,
            tls=tls,
        )
        try:
            await self.transport.start()
        except (OSError, ssl.SSLError) as exc:
            raise SipError(
                f"profile {self.name}: cannot listen on {self.local_ip}:{self.settings.sip_port}: {exc.strerror or exc}"
            ) from None
        log.info(
            "profile %s listening on %s:%d (%s)",
            self.name,
            self.local_ip,
            self.settings.sip_port,
            ",".join(self.transport.transports),
        )
        engine = self.service.engine
        ext_sip = self.settings.ext_sip_ip
        if engine.settings.enabled and engine.settings.mapping and ext_sip is not None and ext_sip.from_router:
            for transport in self.transport.transports:
                port = self.settings.tls_sip_port if transport == "tls" else self.settings.sip_port
                assert port is not None
                kind = Transport.UDP if transport == "udp" else Transport.TCP
                if (kind, port) in engine.mappings:
                    continue  # a [[mapping]] of the user's own: keep its settings, and leave it at stop
                self._sip_mappings.append((kind, port))
                self._spawn(engine.add(Wanted(kind, port, owner=f"sip:{self.name}")))
        for gateway in self.extra.gateways:
            if gateway.register:
                self._start_registration(gateway)
        if self._registrations:  # only gateway registrations follow the address (calls read it per call)
            self._events = asyncio.get_running_loop().create_task(self._follow_address())

    async def stop(self) -> None:
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
        for gateway, registration in list(self._registrations.values()):
            self._send_registration(gateway, registration.stop(self._now()))
        for call in list(self.calls.values()):
            self._hangup(call, "shutdown", send_bye=True)
        await asyncio.sleep(0.05)  # let the BYEs and un-REGISTERs leave
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._server_clock.cancel()
        self._client_clock.cancel()
        for clock in [*(c for _, c in self._retransmitters.values()), *self._registration_clocks.values()]:
            clock.cancel()
        if self.transport is not None:
            await self.transport.stop()
        for kind, port in self._sip_mappings:
            with contextlib.suppress(Exception):
                await self.service.engine.delete(kind, port)
        self._sip_mappings.clear()

    async def _follow_address(self) -> None:
        """A new external address reaches gateways' Contact at once (no restart, no dropped call)."""
        events = self.service.engine.events.subscribe()
        try:
            async for event in events:
                if event.kind in (EventKind.EXTERNAL_ADDRESS_CHANGE, EventKind.DISCOVERED):
                    for gateway, registration in list(self._registrations.values()):
                        via_host, contact = self._registration_contact(gateway)
                        actions = registration.update_contact(
                            self._now(), via_host=via_host, via_port=self.settings.sip_port, contact=contact
                        )
                        self._send_registration(gateway, actions)
        finally:
            await events.aclose()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("profile %s: %s", self.name, task.exception(), exc_info=task.exception())

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    # ------------------------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        assert self.transport is not None
        live = {id(c): c for c in self.calls.values()}
        return {
            "CALLS-IN": self.calls_in,
            "FAILED-CALLS-IN": self.failed_calls,
            "CALLS-OUT": self.calls_out,
            "Live-Calls": len(live),
            "Registrations": self.service.registrar.count(self._now()),
            "Gateways": {
                gateway.name: {"state": str(reg.state), "status": reg.last_status}
                for gateway, reg in self._registrations.values()
            },
            "Transports": ",".join(self.transport.transports),
            "Media-Calls": self.service.admission.profile_media_calls(self.name),
            "Auth": {**self.service.guard.stats.as_dict(), "dropped_banned": self.service.dropped_banned},
            "Refused-Calls": {str(refusal): count for refusal, count in self.service.admission.refused.items()},
            "SIP-Messages": {
                "received": self.transport.stats.received,
                "sent": self.transport.stats.sent,
                "malformed": self.transport.stats.malformed,
            },
        }

    # ------------------------------------------------------------------------------------- addressing
    def _sip_address(self, peer_ip: str) -> IPAddress:
        return self.service.profiles.advertise(self.name, peer_ip, media=False)

    def _contact_uri(self, address: IPAddress, user: str, transport: str) -> str:
        port = self.settings.tls_sip_port if transport == "tls" else self.settings.sip_port
        suffix = "" if transport == "udp" else f";transport={transport}"
        return f"sip:{user}@{uri_host(address)}:{port}{suffix}"

    def _contact(self, address: IPAddress, user: str, transport: str) -> str:
        """The Contact header value: our URI for that peer, in brackets."""
        return f"<{self._contact_uri(address, user, transport)}>"

    def _rtp_ip(self) -> IPAddress:
        local = self.settings.rtp_ip or self.local_ip
        assert local is not None, "the profile is not started"
        return local

    @property
    def external_media(self) -> bool:
        """ext-rtp-ip takes the router's address, so media ports for peers outside are mapped on it."""
        ext = self.settings.ext_rtp_ip
        return ext is not None and ext.from_router

    async def _media_for(self, call: Call, peer_ip: str, call_id: str) -> MediaPorts | None:
        """Ports for one leg: from the pool (mapped) when the peer gets our external address and the
        router is ours to map, else an unmapped pair. None when no ports can be had; `call.refusal` then
        says which cap refused them (the call is answered 503 with Retry-After)."""
        service = self.service
        advertised = service.profiles.advertise(self.name, peer_ip, media=True)
        if advertised != self._rtp_ip() and self.external_media and service.pool is not None:
            assert call.ticket is not None
            now = self._now()
            call.refusal = service.admission.admit_media(call.ticket, self.extra.max_media_calls, now)
            if call.refusal is not None:
                return None
            ports = service.pool.take(call_id) or await service.pool.map_now(call_id)
            if ports is None:
                call.refusal = service.admission.no_mapping(call.ticket, now)
                return None
            address = ports.external_ip or advertised
            return MediaPorts(ports.rtp, address, ports.external_rtp, ports.external_rtcp, ports)
        port = service.pairs.acquire()
        if port is None:
            return None
        return MediaPorts(port, advertised, port, port + 1)

    async def _release_media(self, media: MediaPorts | None) -> None:
        if media is None:
            return
        if media.mapped is not None and self.service.pool is not None:
            await self.service.pool.release(media.mapped)
        else:
            self.service.pairs.release(media.local_port)

    # ------------------------------------------------------------------------------------- sending
    def _perform(self, actions: Iterable[Any], source: Peer | None = None) -> None:
        """Server-transaction actions; `source` is the peer of the request being received (a Deliver
        only ever comes from receiving one)."""
        assert self.transport is not None
        for action in actions:
            if isinstance(action, Transmit):
                peer = action.destination
                if isinstance(peer, Peer):
                    self.transport.send(action.response, self._response_peer(action.response, peer))
            elif isinstance(action, Deliver) and source is not None:
                self._deliver(action.request, source)
            # AckTimeout of a non-2xx final response and Terminated need nothing from us.
        self._server_clock.update()

    def _response_peer(self, response: Response, peer: Peer) -> Peer:
        """NAT rule "reply to the source" (on by default); off: §18.2.2 / RFC 3581 §4 from the Via."""
        if self.service.settings.reply_to_source or peer.reliable:
            return peer
        try:
            via = response.top_via()
        except DecodeError:
            return peer
        host = via.received or via.host
        rport = via.rport
        port = rport if isinstance(rport, int) else (via.port or 5060)
        return Peer("udp", host.strip("[]"), port)

    def _respond(self, request: Request, response: Response) -> None:
        try:
            actions = self.server.send_response(request, response, self._now())
        except KeyError:
            return  # the transaction is gone (timed out, or a CANCEL raced the answer)
        self._perform(actions)

    def _reply(self, request: Request, status: int, reason: str | None = None, **kw: Any) -> None:
        self._respond(request, make_response(request, status, reason, **kw))

    def _run_client(self, actions: Iterable[Any], peer: Peer | None = None) -> None:
        """Perform client-transaction actions: send (to `peer`, or where that branch went before) and hand
        responses and timeouts to `_client_event`."""
        assert self.transport is not None
        handed: list[Response | TimedOut] = []
        for action in actions:
            if isinstance(action, SendRequest):
                branch = action.request.top_via().branch or ""
                destination = peer or self._destinations.get(branch)
                if peer is not None:
                    self._destinations[branch] = peer
                    while len(self._destinations) > MAX_DESTINATIONS:
                        self._destinations.popitem(last=False)
                if destination is not None:
                    self.transport.send(action.request, destination)
            elif isinstance(action, DeliverResponse):
                handed.append(action.response)
            elif isinstance(action, TimedOut):
                handed.append(action)
        self._client_clock.update()
        for item in handed:
            self._client_event(item)

    def _start_request(self, request: Request, peer: Peer) -> None:
        self._run_client(self.client.start(request, self._now(), reliable=peer.reliable), peer)

    # ------------------------------------------------------------------------------------- timers
    def _server_timer(self, now: float) -> None:
        self._perform(self.server.handle_timer(now))

    def _client_timer(self, now: float) -> None:
        self._run_client(self.client.handle_timer(now))

    # ------------------------------------------------------------------------------------- receiving
    def _on_message(self, message: Request | Response, peer: Peer) -> None:
        if isinstance(message, Response):
            registration = self._registrations.get(safe_call_id(message) or "")
            if registration is not None:
                gateway, machine = registration
                self._send_registration(gateway, machine.receive_response(message, self._now()))
                return
            try:
                actions = self.client.receive_response(message, self._now())
            except DecodeError:
                return
            self._run_client(actions)
            return
        request = message
        try:
            if self._banned(request, peer):
                return
            if peer.transport == "udp":
                request = with_received(request, peer.ip, peer.port)
            forwards = request.max_forwards()
            if forwards == 0 and request.method not in ("ACK", "OPTIONS") and self.transport is not None:
                self.transport.send(make_response(request, 483), peer)
                return
            self._perform(
                self.server.receive_request(request, self._now(), reliable=peer.reliable, destination=peer), peer
            )
        except DecodeError as exc:
            log.debug("dropping a request from %s: %s", peer, exc)

    def _banned(self, request: Request, peer: Peer) -> bool:
        """A banned source starts nothing new: its requests outside a dialog are dropped unanswered (an
        answer would only tell a password guesser to move on), before any parsing or transaction. ACK and
        CANCEL still pass, so what it started before the ban ends cleanly."""
        if request.method in ("ACK", "CANCEL"):
            return False
        if self.service.guard.refused(peer.ip, self._now()) is None:
            return False
        if request.to_tag() is not None and safe_call_id(request) in self.calls:
            return False  # in a dialog it already had
        self.service.dropped_banned += 1
        return True

    def _deliver(self, request: Request, peer: Peer) -> None:
        method = request.method
        if method == "ACK":
            self._on_ack(request)
        elif method == "INVITE":
            if request.to_tag() is None:
                self._new_call(request, peer)
            else:
                self._on_reinvite(request)
        elif method == "BYE":
            self._on_bye(request)
        elif method == "CANCEL":
            self._on_cancel(request)
        elif method == "REGISTER":
            now = self._now()
            outcome = self.service.registrar.handle(request, now, peer, to_tag=sipclient.new_tag(), client=peer.ip)
            response = outcome.response
            if outcome.failure is not None:
                self.service.auth_failed(outcome.failure, peer, now)
            elif outcome.user is not None:
                self.service.guard.succeeded(peer.ip, outcome.user, now)
            if response.status == 200:
                user = user_of(uri_of(request.headers.get("To") or ""))
                log.info("REGISTER %s from %s: 200", user, peer)
                self.service.engine.events.publish(
                    EventKind.SIP_REGISTER, profile=self.name, user=user, source=str(peer)
                )
            self._respond(request, response)
            if self.service._registrar_clock is not None:
                self.service._registrar_clock.update()
        elif method == "OPTIONS":
            self._reply(request, 200, extra_headers=[("Allow", ALLOW), ("Accept", "application/sdp")])
        elif method in ("INFO", "UPDATE", "NOTIFY", "MESSAGE") and safe_call_id(request) in self.calls:
            self._reply(request, 200)
        else:
            self._reply(request, 405, extra_headers=[("Allow", ALLOW)])

    # ------------------------------------------------------------------------------------- calls
    def _new_call(self, invite: Request, peer: Peer) -> None:
        self.calls_in += 1
        to_tag = sipclient.new_tag()
        call_id = invite.call_id()
        if call_id in self.calls:
            self._reply(invite, 482, to_tag=to_tag)  # §8.2.2.2: a merged request (a loop or a fork)
            return
        admission = self.service.admission
        # Per source as the guard counts one: an IPv6 host picks any address of its /64 at will.
        ticket = admission.admit(source_key(peer.ip), self.name, self._now())
        if isinstance(ticket, Refusal):
            self._refuse(invite, ticket, to_tag)
            return
        admitted = False
        try:
            admitted = self._start_call(invite, peer, to_tag, ticket)
        finally:
            if not admitted:
                admission.release(ticket)

    def _refuse(self, invite: Request, refusal: Refusal, to_tag: str) -> None:
        """A cap said no: 503 with Retry-After (RFC 3261 §21.5.4), costing no mapping and no log line of its
        own (the admission summary counts it)."""
        self.failed_calls += 1
        self._reply(invite, 503, to_tag=to_tag, extra_headers=[("Retry-After", str(refusal.retry_after))])
        self.service.refused(self._now())

    def _start_call(self, invite: Request, peer: Peer, to_tag: str, ticket: Ticket) -> bool:
        """Route the admitted INVITE; True once a call holds the ticket (released at its hang-up)."""
        call_id = invite.call_id()
        number = user_of(invite.uri) or ""
        route = None
        for extension in self.extra.dialplan:
            target = extension.target(number)
            if target is not None:
                route = (extension, target)
                break
        if route is None:
            self.failed_calls += 1
            self._reply(invite, 404, to_tag=to_tag)
            return False
        if first_audio(invite.body.decode("utf-8", "replace")) is None:
            self.failed_calls += 1
            self._reply(invite, 488, to_tag=to_tag)  # no offer (or no audio): we answer offers only
            return False
        extension, target = route
        if not self._authorized(invite, peer, extension.action, to_tag):
            return False
        leg = Leg.from_invite(invite, peer, to_tag, self._sip_address(peer.ip))
        call = Call(kind=str(extension.action), number=number, a=leg, profile=self.name, ticket=ticket)
        self.calls[call_id] = call
        self.service.engine.events.publish(
            EventKind.CALL_START, profile=self.name, call=call.id, number=number, app=call.kind, source=str(peer)
        )
        if extension.action is Action.ECHO:
            self._spawn(self._answer_echo(call))
        elif extension.action is Action.USER:
            self._spawn(self._bridge_user(call, target))
        else:
            self._spawn(self._bridge_gateway(call, target, extension.gateway or ""))
        return True

    def _authorized(self, invite: Request, peer: Peer, action: Action, to_tag: str) -> bool:
        """FreeSWITCH's `auth-calls`: an INVITE ringing a user or leaving through a gateway must carry
        digest credentials of a [[user]] (407 challenge, §22.3); the echo test too with `auth-echo`. Every
        such INVITE is challenged whether or not the callee exists, so the answer tells nothing about
        user names. False when the INVITE was answered here (challenge or 403)."""
        needed = self.extra.auth_echo if action is Action.ECHO else self.extra.auth_calls
        if not needed:
            return True
        now = self._now()
        outcome = self.service.registrar.authenticate(invite, now, to_tag=to_tag, client=peer.ip)
        if outcome.ok:
            assert outcome.user is not None
            self.service.guard.succeeded(peer.ip, outcome.user, now)
            return True
        if outcome.failure is not None:
            self.service.auth_failed(outcome.failure, peer, now)
        assert outcome.response is not None
        self.failed_calls += 1
        self._respond(invite, outcome.response)
        return False

    async def _answer_echo(self, call: Call) -> None:
        leg = call.a
        media = await self._media_for(call, leg.peer.ip, leg.call_id)
        if call.ended:  # cancelled while the router mapped the ports
            await self._release_media(media)
            return
        if media is None:
            self._fail(call, 503, "no RTP ports free" if call.refusal is None else f"over {call.refusal}")
            return
        leg.media = media
        echo = RtpEcho(
            self._rtp_ip(),
            media.local_port,
            inactivity=self.service.settings.inactivity,
            max_duration=self.service.settings.max_duration,
        )
        try:
            await echo.start()
        except OSError as exc:
            self._fail(call, 503, f"RTP port {media.local_port}: {exc}")
            return
        if call.ended:
            await echo.close()
            return
        call.media = echo
        self._watch_media(call, echo.ended)
        sdp = echo_answer(
            leg.remote_sdp.decode("utf-8", "replace"),
            address=media.advertised,
            port=media.advertised_port,
            rtcp_port=media.advertised_rtcp,
            session_id=abs(hash(call.id)) % 10**9,
        )
        if sdp is None:
            self._fail(call, 488, None)
            return
        self._answer(call, sdp.encode())

    def _answer(self, call: Call, sdp: bytes) -> None:
        """The 200 OK on leg a, retransmitted until the ACK (§13.3.1.4)."""
        leg = call.a
        if call.ended or leg.invite is None:
            return
        contact = self._contact(leg.sip_address, call.number or "autonat", leg.peer.transport)
        response = make_response(
            leg.invite,
            200,
            to_tag=leg.local_tag,
            extra_headers=[
                ("Contact", contact),
                ("Allow", ALLOW),
                ("Server", SERVER),
                ("Content-Type", "application/sdp"),
            ],
            body=sdp,
        )
        leg.local_sdp = sdp
        leg.answered = True
        call.answered_at = time.time()
        self._respond(leg.invite, response)
        self._retransmit_2xx(call, leg, leg.invite, response)

    def _retransmit_2xx(self, call: Call, leg: Leg, invite: Request, response: Response) -> None:
        """§13.3.1.4, for the initial INVITE and every re-INVITE alike: resend our 2xx until the ACK;
        none after 64*T1 -> BYE and release the call."""
        retransmitter = Uas2xxRetransmitter(
            invite, response, self._now(), reliable=leg.peer.reliable, timers=self.service.timers, destination=leg.peer
        )
        key = (leg.call_id, invite.cseq()[0])
        clock = _Clock(retransmitter.timer, lambda now: self._retransmit(call, leg, key, now))
        self._retransmitters[key] = (retransmitter, clock)
        clock.update()

    def _stop_retransmitting(self, key: tuple[str, int]) -> None:
        entry = self._retransmitters.pop(key, None)
        if entry is not None:
            entry[1].cancel()

    def _retransmit(self, call: Call, leg: Leg, key: tuple[str, int], now: float) -> None:
        assert self.transport is not None
        retransmitter, _ = self._retransmitters[key]
        for action in retransmitter.handle_timer(now):
            if isinstance(action, Transmit):
                self.transport.send(action.response, leg.peer)
            elif isinstance(action, AckTimeout):
                log.warning(
                    "call %s: no ACK for our 200 OK from %s after %g s: BYE",
                    call.id,
                    leg.peer,
                    self.service.timers.timeout,
                )
                self._hangup(call, "ack timeout", send_bye=True)
        if retransmitter.done:
            self._stop_retransmitting(key)

    def _on_ack(self, ack: Request) -> None:
        try:
            key = (ack.call_id(), ack.cseq()[0])
        except DecodeError:
            return
        entry = self._retransmitters.get(key)
        if entry is not None and entry[0].receive_ack(ack):
            self._stop_retransmitting(key)
            call = self.calls.get(key[0])
            if call is not None and key[0] == call.a.call_id:
                call.a.acked = True

    def _on_reinvite(self, invite: Request) -> None:
        call = self.calls.get(safe_call_id(invite) or "")
        if call is None:
            self._reply(invite, 481)
            return
        leg = call.a if invite.call_id() == call.a.call_id else call.b
        assert leg is not None
        # Media stays anchored where it is: answer with what we offered before (session refresh, hold).
        contact = self._contact(leg.sip_address, call.number or "autonat", leg.peer.transport)
        headers = [("Contact", contact)] + ([("Content-Type", "application/sdp")] if leg.local_sdp else [])
        response = make_response(invite, 200, to_tag=leg.local_tag, extra_headers=headers, body=leg.local_sdp)
        self._respond(invite, response)
        self._retransmit_2xx(call, leg, invite, response)

    def _on_bye(self, bye: Request) -> None:
        call = self.calls.get(safe_call_id(bye) or "")
        if call is None:
            self._reply(bye, 481)
            return
        self._reply(bye, 200)
        came_from_a = bye.call_id() == call.a.call_id
        self._hangup(
            call,
            "bye from " + ("caller" if came_from_a else "callee"),
            send_bye=True,
            skip=call.a if came_from_a else call.b,
        )

    def _on_cancel(self, cancel: Request) -> None:
        tx = self.server.find_invite_for_cancel(cancel)
        if tx is None:
            self._reply(cancel, 481)
            return
        self._reply(cancel, 200)
        call = self.calls.get(safe_call_id(cancel) or "")
        if call is not None and not call.a.answered:
            self._reply(tx.request, 487, to_tag=call.a.local_tag)
            self._hangup(call, "cancelled", send_bye=False)
            if call.b is not None and call.b.invite is not None and not call.b.answered:
                self._send_cancel(call.b)

    def _fail(self, call: Call, status: int, reason: str | None) -> None:
        self.failed_calls += 1
        if call.a.invite is not None and not call.a.answered:
            extra = [] if call.refusal is None else [("Retry-After", str(call.refusal.retry_after))]
            self._reply(call.a.invite, status, reason, to_tag=call.a.local_tag, extra_headers=extra)
        if call.refusal is not None:
            self.service.refused(self._now())
        self._hangup(call, reason or f"failed {status}", send_bye=False)

    def _hangup(self, call: Call, reason: str, *, send_bye: bool, skip: Leg | None = None) -> None:
        if call.ended:
            return
        call.ended = True
        call.end_reason = reason
        if call.ticket is not None:
            self.service.admission.release(call.ticket)
        for leg in call.legs():
            self.calls.pop(leg.call_id, None)
            self._b_gateways.pop(leg.call_id, None)
            if leg is skip:
                continue
            if send_bye and leg.answered:
                self._send_bye(leg)  # an established dialog (our 2xx sent, or theirs received)
            elif not leg.uas and leg.invite is not None and not leg.answered:
                self._send_cancel(leg)  # still ringing: §9.1
        legs = {leg.call_id for leg in call.legs()}
        for key in [key for key in self._retransmitters if key[0] in legs]:
            self._stop_retransmitting(key)
        log.info("call %s (%s %s) ended: %s", call.id, call.kind, call.number, reason)
        self.service.engine.events.publish(EventKind.CALL_END, profile=self.name, call=call.id, reason=reason)
        self._spawn(self._release(call))

    async def _release(self, call: Call) -> None:
        if call.media is not None:
            await call.media.close()
        await asyncio.gather(*(self._release_media(leg.media) for leg in call.legs()))

    def _watch_media(self, call: Call, ended: asyncio.Event) -> None:
        async def watch() -> None:
            await ended.wait()
            reason = getattr(call.media, "reason", None) or getattr(getattr(call.media, "stats", None), "reason", None)
            if not call.ended and reason in ("inactivity", "max duration"):
                self._hangup(call, f"media {reason}", send_bye=True)

        self._spawn(watch())

    def _in_dialog(self, leg: Leg, method: str, cseq: int | None = None) -> Request:
        return sipclient.make_request(
            method,
            leg.remote_target,
            from_uri=leg.local_uri,
            from_tag=leg.local_tag,
            to_uri=leg.remote_uri,
            to_tag=leg.remote_tag,
            call_id=leg.call_id,
            cseq=cseq if cseq is not None else leg.next_cseq(),
            via_host=str(leg.sip_address),
            via_port=self.settings.sip_port,
            transport=leg.peer.transport,
            route=leg.route_set,
        )

    def _send_bye(self, leg: Leg) -> None:
        """Our BYE goes to where the peer's packets came from (its Contact may be private)."""
        self._start_request(self._in_dialog(leg, "BYE"), leg.peer)

    def _send_cancel(self, leg: Leg) -> None:
        """§9.1: the client table holds the CANCEL back until the INVITE got a provisional response."""
        assert leg.invite is not None
        self._run_client(self.client.cancel(leg.invite, self._now()), leg.peer)

    # ------------------------------------------------------------------------------------- bridging
    async def _bridge_user(self, call: Call, user: str) -> None:
        bindings = self.service.registrar.lookup(user, self._now())
        if not bindings:
            # The same answer for a user who does not exist and one who is offline (as FreeSWITCH answers
            # USER_NOT_REGISTERED): anything else lets a caller enumerate the user names.
            self._fail(call, 404, None)
            return
        binding = bindings[0]
        peer = binding.source if isinstance(binding.source, Peer) else None
        if peer is None:
            self._fail(call, 480, None)
            return
        await self._place_b_leg(call, peer, binding.contact, to_uri=f"sip:{user}@{peer.ip}", from_user=None)

    async def _bridge_gateway(self, call: Call, number: str, name: str) -> None:
        gateway = next((g for g in self.extra.gateways if g.name == name), None)
        if gateway is None:
            self._fail(call, 503, f"no gateway {name}")
            return
        assert self.transport is not None
        try:
            peer = await self.transport.connect(gateway.transport, gateway.host, gateway.port)
        except (OSError, TimeoutError):
            self._fail(call, 503, f"gateway {name} unreachable")
            return
        domain = gateway.domain or gateway.host
        target = f"sip:{number}@{gateway.host}:{gateway.port}"
        self.calls_out += 1
        await self._place_b_leg(
            call, peer, target, to_uri=f"sip:{number}@{domain}", from_user=gateway.username, gateway=gateway
        )

    async def _place_b_leg(
        self,
        call: Call,
        peer: Peer,
        target: str,
        *,
        to_uri: str,
        from_user: str | None,
        gateway: GatewaySettings | None = None,
    ) -> None:
        media_a = await self._media_for(call, call.a.peer.ip, call.a.call_id)
        media_b = None if media_a is None else await self._media_for(call, peer.ip, call.a.call_id + "-b")
        if call.ended:  # cancelled while the router mapped the ports
            await self._release_media(media_a)
            await self._release_media(media_b)
            return
        if media_a is None or media_b is None:
            await self._release_media(media_a)
            await self._release_media(media_b)
            self._fail(call, 503, "no RTP ports free" if call.refusal is None else f"over {call.refusal}")
            return
        call.a.media = media_a
        local_rtp = self._rtp_ip()
        relay = RtpRelay(
            local_rtp,
            media_a.local_port,
            local_rtp,
            media_b.local_port,
            inactivity=self.service.settings.inactivity,
            max_duration=self.service.settings.max_duration,
        )
        try:
            await relay.start()
        except OSError as exc:
            await self._release_media(media_b)
            self._fail(call, 503, f"RTP relay: {exc}")
            return
        if call.ended:  # hung up meanwhile: its leg-a ports are already released
            await relay.close()
            await self._release_media(media_b)
            return
        call.media = relay
        self._watch_media(call, relay.ended)
        offer = first_audio(call.a.remote_sdp.decode("utf-8", "replace"))
        if offer is not None and offer.address is not None:
            relay.set_peer("a", (str(offer.address), offer.port))
        sdp = anchor_sdp(
            call.a.remote_sdp.decode("utf-8", "replace"),
            address=media_b.advertised,
            port=media_b.advertised_port,
            rtcp_port=media_b.advertised_rtcp,
        )
        if sdp is None or call.ended:
            await self._release_media(media_b)
            self._fail(call, 488, None)
            return
        sip_address = self._sip_address(peer.ip)
        caller = user_of(call.a.remote_uri) or "autonat"
        from_user = from_user or caller
        host = uri_host(sip_address)
        leg = Leg(
            peer=peer,
            call_id=sipclient.new_call_id(host),
            local_tag=sipclient.new_tag(),
            local_uri=f"sip:{from_user}@{host}"
            if gateway is None
            else f"sip:{from_user}@{gateway.domain or gateway.host}",
            remote_uri=to_uri,
            remote_target=target,
            uas=False,
            sip_address=sip_address,
            local_cseq=0,
            media=media_b,
            local_sdp=sdp.encode(),
        )
        call.b = leg
        self.calls[leg.call_id] = call
        self._b_gateways[leg.call_id] = gateway
        self._send_invite(call, leg)

    def _send_invite(self, call: Call, leg: Leg, authorization: tuple[str, str] | None = None) -> None:
        extra = [("Allow", ALLOW)]
        if authorization is not None:
            extra.append(authorization)
        invite = sipclient.make_request(
            "INVITE",
            leg.remote_target,
            from_uri=leg.local_uri,
            from_tag=leg.local_tag,
            to_uri=leg.remote_uri,
            call_id=leg.call_id,
            cseq=leg.next_cseq(),
            via_host=str(leg.sip_address),
            via_port=self.settings.sip_port,
            transport=leg.peer.transport,
            contact=self._contact_uri(leg.sip_address, user_of(leg.local_uri) or "autonat", leg.peer.transport),
            extra_headers=extra,
            body=leg.local_sdp,
            content_type="application/sdp",
        )
        leg.invite = invite
        self._start_request(invite, leg.peer)

    def _client_event(self, item: Response | TimedOut) -> None:
        message = item if isinstance(item, Response) else item.request
        call_id = safe_call_id(message)
        if call_id is None:
            return
        call = self.calls.get(call_id)
        if call is None or call.b is None or call.b.call_id != call_id:
            return
        try:
            method = message.cseq()[1]
        except DecodeError:
            return
        if method != "INVITE":
            return
        if isinstance(item, TimedOut):
            self._fail(call, 408, "callee did not answer")
            return
        self._on_b_response(call, call.b, item)

    def _on_b_response(self, call: Call, leg: Leg, response: Response) -> None:
        status = response.status
        if status < 200:
            if status in (180, 183) and not call.a.answered and call.a.invite is not None and not call.ended:
                contact = self._contact(call.a.sip_address, call.number or "autonat", call.a.peer.transport)
                self._reply(call.a.invite, 180, to_tag=call.a.local_tag, extra_headers=[("Contact", contact)])
            return
        if status < 300:
            assert leg.invite is not None and self.transport is not None
            first = not leg.answered
            if first:
                leg.confirm_uac(response)
                leg.answered = True
            ack = sipclient.ack_for_2xx(leg.invite, response, branch=sipclient.new_branch())
            self.transport.send(ack, leg.peer)
            leg.acked = True
            if not first or call.ended:
                if call.ended and first:
                    self._send_bye(leg)
                return
            answer = first_audio(leg.remote_sdp.decode("utf-8", "replace"))
            relay = call.media
            if answer is not None and answer.address is not None and isinstance(relay, RtpRelay):
                relay.set_peer("b", (str(answer.address), answer.port))
            media_a = call.a.media
            assert media_a is not None
            sdp = anchor_sdp(
                leg.remote_sdp.decode("utf-8", "replace"),
                address=media_a.advertised,
                port=media_a.advertised_port,
                rtcp_port=media_a.advertised_rtcp,
            )
            if sdp is None:
                self._send_bye(leg)
                self._fail(call, 488, "callee answered without audio")
                return
            self._answer(call, sdp.encode())
            return
        gateway = self._b_gateways.get(leg.call_id)
        if status in (401, 407) and gateway is not None and not call.auth_tried and leg.invite is not None:
            call.auth_tried = True
            header = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
            value = response.headers.get(header)
            if value:
                try:
                    challenge = parse_challenge(value)
                except DecodeError:
                    challenge = None
                if challenge is not None:
                    credentials = client_authorization(
                        challenge,
                        method="INVITE",
                        uri=leg.remote_target,
                        username=gateway.username,
                        password=gateway.password,
                        cnonce=sipclient.new_tag(),
                    )
                    name = "Authorization" if status == 401 else "Proxy-Authorization"
                    self._send_invite(call, leg, (name, credentials))
                    return
        self._fail(call, status if status < 700 else 500, response.reason or None)

    # ------------------------------------------------------------------------------------- gateways
    def _registration_contact(self, gateway: GatewaySettings) -> tuple[str, str]:
        address = self._sip_address(gateway.host)
        return str(address), self._contact_uri(address, gateway.username or "autonat", gateway.transport)

    def _start_registration(self, gateway: GatewaySettings) -> None:
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
            value = response.headers.get("WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate")
            if not value:
                return None
            try:
                challenge = parse_challenge(value)
            except DecodeError:
                return None
            return client_authorization(
                challenge,
                method=method,
                uri=uri,
                username=gateway.username,
                password=gateway.password,
                cnonce=sipclient.new_tag(),
            )

        machine = OutboundRegistration(config, authorize=authorize, timers=self.service.timers)
        self._registration_clocks[gateway.name] = _Clock(
            machine.timer, lambda now: self._send_registration(gateway, machine.handle_timer(now))
        )
        self._registrations[machine.call_id] = (gateway, machine)
        via_host, contact = self._registration_contact(gateway)
        self._send_registration(
            gateway, machine.start(self._now(), via_host=via_host, via_port=self.settings.sip_port, contact=contact)
        )

    def _send_registration(self, gateway: GatewaySettings, actions: Iterable[Any]) -> None:
        assert self.transport is not None
        for action in actions:
            if isinstance(action, SendRequest):
                self._spawn(self.transport.send_request(action.request, gateway.transport, gateway.host, gateway.port))
        clock = self._registration_clocks.get(gateway.name)
        if clock is not None:
            clock.update()
