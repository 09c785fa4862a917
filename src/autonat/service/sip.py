"""The SIP service: the asyncio shell around the call core (autonat.sip.core), in the shape of aioquic's
asyncio/protocol.py: messages from the transports go into the core, what the core returns is performed, and one
timer follows `core.timer()`. No protocol decision is made here; the shell binds sockets, takes and releases
RTP ports (autonat.engine.pool), runs the media (autonat.service.media) and reports back to the core.

At start each listening profile binds UDP and TCP (TLS with a certificate) on its sip-ip:sip-port, and when its
ext-sip-ip follows the router the engine maps those ports (owner "sip:<profile>", removed at stop). The address
decision the core needs comes from autonat.service.profiles.

A dual-stack profile (`sip-ipv6`) binds the same listeners on its IPv6 address too, and with `[nat] ipv6` the
engine opens firewall pinholes for them (`family` 6, the same owner), as it maps the IPv4 ports; IPv6 calls take
their RTP pairs from a second pool whose pairs are pinholes (autonat.service.pinholes).

`test_call` is `autonat call`: the core places the call, the media plays autonat.sip.probecall's signal, and the
answer (the verdict and the figures, `probecall.report`) comes once the call is over and its ports are back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from dataclasses import replace
from typing import Any

from autonat.engine.engine import NatEngine, Wanted
from autonat.engine.events import EventKind
from autonat.engine.pool import PortPairs, RtpPool
from autonat.errors import AutonatError
from autonat.proto.types import Transport
from autonat.service.calls import CallView, CoreAddresses
from autonat.service.media import CallMedia, ProbeMedia
from autonat.service.pinholes import pinhole_pool
from autonat.service.profiles import ProfileError, ProfileManager
from autonat.service.settings import ProfileSettings, SipSettings, core_config
from autonat.service.transport import SipTransport
from autonat.sip import core, probecall
from autonat.sip.admission import Admission, AdmissionLimits
from autonat.sip.digest import DigestServer
from autonat.sip.guard import AuthGuard, failure_line
from autonat.sip.message import Request, Response
from autonat.sip.peer import Peer
from autonat.sip.registrar import Registrar

__all__ = ["CallView", "SipError", "SipService"]

log = logging.getLogger("autonat.sip")
auth_log = logging.getLogger("autonat.auth")  # one line per failed authentication: fail2ban's input
RELEASE_WAIT = 2.0  # at stop, for the media of the calls just hung up to give their ports back
PROBE_GRACE = 10.0  # beyond its own deadlines (the core's), what a test call may take before it counts as stuck


class SipError(AutonatError):
    exit_code = 9


class SipService:
    """Every profile's listeners, and the one call core they share with the registrar, the RTP range and pool."""

    def __init__(
        self,
        settings: SipSettings,
        profiles: ProfileManager,
        engine: NatEngine,
        secret: bytes,
    ) -> None:
        """`profiles` holds every profile's settings; those with `sip.listen` get listeners and calls."""
        self.settings, self.profiles, self.engine = settings, profiles, engine
        self.listening = [name for name, profile in profiles.profiles.items() if profile.sip.listen]
        self.registrar = Registrar(dict(settings.users), DigestServer(settings.realm, secret),
                                   min_expires=settings.min_expires, max_expires=settings.max_expires)  # fmt: skip
        self.admission = Admission(AdmissionLimits(
            max_calls=settings.max_calls, max_media_calls=settings.max_media_calls,
            source_rate=settings.source_call_rate, source_burst=settings.source_call_burst,
            source_calls=settings.source_max_calls,
        ))  # fmt: skip
        self.guard = AuthGuard(threshold=settings.auth_failures, window=settings.auth_window, ban=settings.auth_ban,
                               max_ban=max(settings.auth_ban, settings.auth_max_ban))  # fmt: skip
        self.pairs = PortPairs(range(settings.rtp_start_port, settings.rtp_end_port + 1))
        self.pool: RtpPool | None = None
        self.pool6: RtpPool | None = None  # RTP pairs with IPv6 pinholes, once a dual-stack profile needs them
        config = core_config(settings, profiles.profiles.values(), engine.settings)
        self.addresses = CoreAddresses(profiles, engine)
        self.core = core.SipCore(config, self.addresses, registrar=self.registrar, admission=self.admission,
                                 guard=self.guard)  # fmt: skip
        self.media = CallMedia(self.core, self.pairs, engine, inactivity=settings.inactivity,
                               max_duration=settings.max_duration, report=self._perform, spawn=self._spawn)  # fmt: skip
        self.transports: dict[str, SipTransport] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # By profile: the SIP ports we mapped (family 4) or opened pinholes for (family 6).
        self._sip_mappings: dict[str, list[tuple[Transport, int, int]]] = {}
        self._events: asyncio.Task[None] | None = None
        # The test call in progress: its call id, and where its outcome and figures go when it ends.
        self._probe: tuple[str, asyncio.Future[tuple[probecall.Outcome, probecall.Figures | None]]] | None = None

    # ------------------------------------------------------------------------------------- what others read
    @property
    def active_calls(self) -> int:
        return self.admission.calls

    @property
    def dropped_banned(self) -> int:
        return self.core.dropped_banned

    @property
    def calls(self) -> list[CallView]:
        now = self._now()
        return [CallView(call, self.media.media.get(call.id), now) for call in self.core.calls]

    def status(self, name: str) -> dict[str, Any]:
        transport = self.transports.get(name)
        if transport is None:
            return {}
        stats = transport.stats
        dual_stack = {} if transport.host6 is None else {"SIP-IP6": transport.host6}  # IPv4 profiles: as before
        return {
            **self.core.status(name, self._now()),
            "Transports": ",".join(transport.transports),
            **dual_stack,
            "SIP-Messages": {"received": stats.received, "sent": stats.sent, "malformed": stats.malformed},
        }

    def registrations(self) -> list[dict[str, Any]]:
        return self.core.registrations(self._now())

    # ------------------------------------------------------------------------------------- the test call
    async def test_call(
        self,
        profile: str | None,
        uri: str,
        seconds: float = probecall.DEFAULT_SECONDS,
        *,
        answer_timeout: float = probecall.ANSWER_TIMEOUT,
    ) -> dict[str, Any]:
        """`autonat call`: `profile` (default: the first listening one) calls `uri` as a phone behind the NAT,
        plays the signal for `seconds` once answered and hangs up (autonat.sip.core.SipCore.place_probe); the
        answer is `probecall.report`'s object, given once the call's ports are back (its router mappings gone).
        SipError (one line) when the call cannot be placed: no such profile, a malformed URI, `seconds` out of
        range, a test call already running."""
        name = profile if profile is not None else next(iter(self.listening), None)
        if name is None:
            raise SipError("call: this daemon has no SIP profile to call from (add a [[profile]])")
        if name not in self.transports:
            raise SipError(f"call: no SIP profile {name!r} (this daemon has: {', '.join(self.listening) or 'none'})")
        try:
            target = probecall.parse_target(uri)
            call_id, actions = self.core.place_probe(name, target, seconds, self._now(), answer_timeout=answer_timeout)
        except ValueError as exc:
            raise SipError(f"call: {exc}") from None
        ended: asyncio.Future[tuple[probecall.Outcome, probecall.Figures | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._probe = (call_id, ended)
        try:
            self._perform(actions)
            # The core ends the call by its own deadlines; this bound only turns a bug into an error line.
            async with asyncio.timeout(answer_timeout + seconds + probecall.DRAIN + PROBE_GRACE):
                outcome, figures = await ended
        except BaseException as exc:  # cancelled (the daemon stops) or stuck: the call must not outlive this
            self._perform(self.core.abort_probe(self._now()))
            if isinstance(exc, TimeoutError):
                raise SipError("call: the test call did not end in time (see the daemon log)") from None
            raise
        finally:
            self._probe = None
        releasing = [task for task in self._tasks if task.get_name() == f"release {call_id}"]
        if releasing:
            await asyncio.wait(releasing, timeout=RELEASE_WAIT)
        return probecall.report(outcome, figures)

    def _probe_ended(self, action: core.ProbeEnded) -> None:
        """The test call is over: its signal stops, and the waiting `test_call` gets the outcome and figures."""
        media = self.media.media.get(action.call)
        figures = None
        if isinstance(media, ProbeMedia):
            media.stop_sending()
            figures = media.signal.figures()
        if self._probe is not None and self._probe[0] == action.call and not self._probe[1].done():
            self._probe[1].set_result((action.outcome, figures))

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Bind every profile (an OSError names the profile), then map SIP ports and fill the pool in the
        background: a profile answers at once with its local address and picks up the external one when
        discovery completes."""
        try:
            for name in self.listening:
                await self._listen(name)
        except SipError:
            for transport in self.transports.values():
                await transport.stop()
            raise
        await self._start_helpers()
        self._perform(self.core.start(self._now()))

    async def _start_helpers(self) -> None:
        """The RTP pool once a profile maps media, the address follower once a profile has gateways (at start,
        or when a reload adds such a profile)."""
        nat = self.engine.settings
        wants_pool = nat.enabled and nat.mapping and any(c.external_media for c in self.core.config.profiles)
        if self.pool is None and wants_pool:
            self.pool = RtpPool(
                self.engine, self.pairs, size=self.settings.pool_size, refill_rate=self.settings.pool_refill_rate
            )
            self.media.pool = self.pool
            await self.pool.start()
        if self.pool6 is None and self._pinholes() and any(self.profiles.get(n).sip.ipv6 for n in self.listening):
            self.pool6 = pinhole_pool(
                self.engine, self.pairs, size=self.settings.pool_size, refill_rate=self.settings.pool_refill_rate
            )
            self.media.pool6 = self.pool6
            await self.pool6.start()
        if self._events is None and any(c.gateways for c in self.core.config.profiles):
            self._events = asyncio.get_running_loop().create_task(self._follow_address())

    def _pinholes(self) -> bool:
        """Does the engine open IPv6 pinholes (`[nat] ipv6`, and neither --nonat nor --nonatmap)?"""
        nat = self.engine.settings
        return nat.enabled and nat.mapping and nat.ipv6

    async def _listen(self, name: str) -> None:
        settings = self.profiles.get(name)
        profile, extra = settings.addressing, settings.sip
        local = profile.sip_ip or self.profiles.local_address()
        self.addresses.local[name] = local
        try:
            local6 = self.profiles.ipv6_address(name)
        except ProfileError as exc:
            raise SipError(f"profile {name}: {exc}") from None
        context = None
        if profile.tls_sip_port and extra.tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(str(extra.tls_cert), str(extra.tls_key) if extra.tls_key else None)
            except (OSError, ssl.SSLError) as exc:
                raise SipError(f"profile {name}: TLS certificate {extra.tls_cert}: {exc}") from None
        transport = SipTransport(
            str(local),
            profile.sip_port,
            lambda message, peer: self._perform(self.core.receive(name, message, peer, self._now())),
            tcp=extra.tcp,
            tls_port=profile.tls_sip_port,
            tls=context,
            host6=None if local6 is None else str(local6),
        )
        where = f"{local}:{profile.sip_port}" + ("" if local6 is None else f" and [{local6}]:{profile.sip_port}")
        try:
            await transport.start()
        except (OSError, ssl.SSLError) as exc:
            raise SipError(f"profile {name}: cannot listen on {where}: {exc.strerror or exc}") from None
        self.transports[name] = transport
        if local6 is not None:
            self.profiles.bound6[name] = local6
        log.info("profile %s listening on %s (%s)", name, where, ",".join(transport.transports))
        nat, ext = self.engine.settings, profile.ext_sip_ip
        families = [4] if nat.enabled and nat.mapping and ext is not None and ext.from_router else []
        if local6 is not None and self._pinholes():
            families.append(6)  # no NAT on IPv6, but the router's firewall: ext-sip-ip has no say in it
        for family in families:
            for kind_name in transport.transports:
                port = profile.tls_sip_port if kind_name == "tls" else profile.sip_port
                kind = Transport.UDP if kind_name == "udp" else Transport.TCP
                if port is None or self.engine.lookup((kind, port), family) is not None:
                    continue  # a [[mapping]] of the user's own: keep its settings, and leave it at stop
                self._sip_mappings.setdefault(name, []).append((kind, port, family))
                self._spawn(self.engine.add(Wanted(kind, port, owner=f"sip:{name}", family=family)))

    async def reload(
        self,
        settings: SipSettings,
        profiles: tuple[ProfileSettings, ...],
    ) -> tuple[list[str], list[str]]:
        """A reload, no call of a profile that stays dropped: users, each profile's addressing, dialplan,
        auth-calls/auth-echo, media cap and gateways change live; a profile added starts listening (its SIP
        ports mapped), one removed hangs up its calls, un-registers and stops listening (its SIP mappings
        deleted), one whose listeners changed (sip-ip, ports, tcp, TLS files) is both. The rest of [sip]
        (the RTP range, caps, timers, realm) is named as needing a restart. Returns (applied, needing a
        restart); a profile that cannot listen is named in the second list, the others go on."""
        changes: list[str] = []
        restart = [
            f"[sip] {key}"
            for key in ("realm", "rtp_start_port", "rtp_end_port", "pool_size", "max_calls", "max_media_calls",
                        "source_call_rate", "source_call_burst", "source_max_calls", "auth_failures", "auth_window",
                        "auth_ban", "auth_max_ban", "t1", "t2", "inactivity", "max_duration", "min_expires",
                        "max_expires", "pool_refill_rate")
            if getattr(settings, key) != getattr(self.settings, key)
        ]  # fmt: skip
        if settings.users != self.settings.users:
            dropped = self.registrar.set_users(dict(settings.users))
            changes.append("users" + (f" (bindings of {', '.join(dropped)} dropped)" if dropped else ""))
        old = {name: self.profiles.get(name) for name in self.listening}
        new = {profile.name: profile for profile in profiles if profile.sip.listen}
        moved = {name for name, profile in new.items() if name in old and _listeners(profile) != _listeners(old[name])}
        stopping = [name for name in old if name not in new or name in moved]
        starting = [name for name in new if name not in old or name in moved]
        staying = [profile for name, profile in new.items() if name in old and name not in moved]
        changes += [f"addressing of {name}" for name in self.profiles.update(profiles) if name not in moved]
        # First the profiles that keep their listeners (removed and moved ones leave the core: calls end with
        # BYE, gateways un-register), then the new listeners, then the core takes the profiles that started.
        actions, applied, needed = self.core.reconfigure(
            core_config(settings, staying, self.engine.settings), self._now()
        )
        self._perform(actions)
        changes += [change for change in applied if not change.startswith("-profile")]
        restart += needed
        self.listening = [name for name in self.listening if name not in stopping]
        for name in stopping:
            await self._unlisten(name)
            changes.append(f"-profile {name}" if name not in new else f"profile {name} listeners")
        started = []
        for name in starting:
            try:
                await self._listen(name)
            except SipError as exc:
                log.error("reload: %s", exc)
                restart.append(f"profile {name} ({exc})")
                continue
            started.append(new[name])
            if name not in old:
                changes.append(f"+profile {name}")
        self.listening += [profile.name for profile in started]
        if started:
            actions, _, _ = self.core.reconfigure(
                core_config(settings, staying + started, self.engine.settings), self._now()
            )
            self._perform(actions)
        await self._start_helpers()
        self.settings = replace(self.settings, users=settings.users, session_expires=settings.session_expires,
                                min_se=settings.min_se, register_wait=settings.register_wait)  # fmt: skip
        return changes, restart

    async def _unlisten(self, name: str) -> None:
        """A profile a reload removed (or moved): its listener closes and the SIP ports it mapped are deleted."""
        await asyncio.sleep(0.05)  # the BYEs and un-REGISTERs the core just sent leave first
        transport = self.transports.pop(name, None)
        if transport is not None:
            await transport.stop()
        self.addresses.local.pop(name, None)
        self.profiles.bound6.pop(name, None)
        for kind, port, family in self._sip_mappings.pop(name, []):
            with contextlib.suppress(Exception):
                await self.engine.delete(kind, port, family)
        log.info("profile %s stopped listening", name)

    async def stop(self) -> None:
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
        self._perform(self.core.stop(self._now()))  # BYE to every call, un-REGISTER every gateway
        await asyncio.sleep(0.05)  # let them leave
        releasing = [task for task in self._tasks if task.get_name().startswith("release")]
        if releasing:
            await asyncio.wait(releasing, timeout=RELEASE_WAIT)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._timer is not None:
            self._timer.cancel()
        for transport in self.transports.values():
            await transport.stop()
        for kind, port, family in [mapping for mappings in self._sip_mappings.values() for mapping in mappings]:
            with contextlib.suppress(Exception):
                await self.engine.delete(kind, port, family)
        self._sip_mappings.clear()
        if self.admission.timer() is not None:
            line = self.admission.summary(float("inf"))  # what was refused since the last summary
            if line is not None:
                log.warning("%s", line)
        for pool in (self.pool, self.pool6):
            if pool is not None:
                await pool.stop()

    async def _follow_address(self) -> None:
        """A new external address reaches the gateways' Contact at once (no restart, no dropped call)."""
        events = self.engine.events.subscribe()
        try:
            async for event in events:
                if event.kind in (EventKind.EXTERNAL_ADDRESS_CHANGE, EventKind.DISCOVERED):
                    self._perform(self.core.address_changed(self._now()))
        finally:
            await events.aclose()

    # ------------------------------------------------------------------------------------- driving the core
    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _spawn(self, coroutine: Any, name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("SIP service: %s", task.exception(), exc_info=task.exception())

    def _perform(self, actions: list[core.Action]) -> None:
        """Perform the core's actions in order; what the shell learns at once goes back into the queue."""
        queue: deque[core.Action] = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, core.Send):
                self._send(action)
            elif isinstance(action, core.AcquirePorts):
                queue.extend(self.media.acquire(action))
            elif isinstance(action, core.StartEcho | core.StartRelay | core.StartProbe):
                queue.extend(self.media.start(action))
            elif isinstance(action, core.ProbeAnswered):
                self.media.play(action)
            elif isinstance(action, core.ProbeEnded):
                self._probe_ended(action)
            elif isinstance(action, core.UpdateMedia):
                self.media.update(action)
            elif isinstance(action, core.ReleaseMedia):
                self._spawn(self.media.release(action), f"release {action.call}")
            elif isinstance(action, core.DropRtcp):
                self.media.drop_rtcp(action)
            elif isinstance(action, core.Publish):
                self.engine.events.publish(EventKind(action.kind), **action.data)
            elif isinstance(action, core.AuthFailed):
                failure, peer = action.failure, action.peer
                line = failure_line(wall=time.time(), ip=peer.ip, port=peer.port, method=failure.method,
                                    reason=str(failure.reason), user=failure.user)  # fmt: skip
                auth_log.warning("%s", line)
        self._rearm()

    def _rearm(self) -> None:
        """The one timer: at the core's next deadline."""
        when = self.core.timer()
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, when
        if when is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(max(when, loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._perform(self.core.handle_timer(self._now()))

    def _send(self, action: core.Send) -> None:
        transport, message, peer = self.transports.get(action.profile), action.message, action.peer
        if transport is None:
            return
        if peer.reliable and peer.connection == 0:
            self._spawn(self._connect_and_send(action.profile, transport, message, peer))
        elif not transport.send(message, peer) and isinstance(message, Request):
            self._perform(self.core.send_failed(action.profile, message, self._now()))

    async def _connect_and_send(
        self, profile: str, transport: SipTransport, message: Request | Response, peer: Peer
    ) -> None:
        if isinstance(message, Request) and await transport.send_request(message, peer.transport, peer.ip, peer.port):
            return
        self._perform(self.core.send_failed(profile, message, self._now()))


def _listeners(profile: ProfileSettings) -> tuple[object, ...]:
    """What a profile's sockets depend on: a change here means new listeners (and new SIP mappings)."""
    a, sip = profile.addressing, profile.sip
    return (a.sip_ip, a.sip_port, a.tls_sip_port, a.ext_sip_ip, sip.tcp, sip.tls_cert, sip.tls_key, sip.ipv6,
            sip.sip_ip6)  # fmt: skip
