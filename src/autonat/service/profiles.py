"""SIP profiles in the daemon: their ext-sip-ip / ext-rtp-ip follow the engine, with no restart.

`auto-nat` and `autonat:IP` are read from the engine's current external address at every question, so
an address change reaches every profile the moment the engine learns it. `stun:` and `host:` values
are looked up at start, when the external address changes, and every `LOOKUP_INTERVAL`.

Dual-stack profiles (`sip-ipv6`, `sip-ip6`): the decision is made per family. An IPv6 peer of such a
profile is told our global IPv6 address, in SIP and SDP alike (RFC 5118: there is no NAT to see through on
IPv6, so no ext-sip-ip / ext-rtp-ip rewriting); what it needs instead is a firewall pinhole for our media
ports, when it is outside the local network (`pinhole`). An IPv4 peer gets exactly what it got before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from ipaddress import IPv6Address
from typing import TYPE_CHECKING, Any

from autonat.acl import AclSet
from autonat.addresses import IPAddress, parse_address
from autonat.advertise import (
    ExtKind,
    ExtValue,
    ProfileStatus,
    Resolved,
    choose,
    profile_status,
    resolve,
)
from autonat.aio.interfaces import host_networks
from autonat.aio.route import locate_router, locate_router6
from autonat.aio.stun import parse_stun_target, resolve_server, stun_binding
from autonat.engine.engine import NatEngine
from autonat.engine.events import EventKind
from autonat.errors import AutonatError, RouterNotFound

if TYPE_CHECKING:
    from autonat.service.settings import ProfileSettings

log = logging.getLogger("autonat.profiles")
LOOKUP_INTERVAL = 300.0
ACL_REFRESH_INTERVAL = 30.0  # interfaces come and go (VPNs, DHCP): the .auto lists follow them
LOOKUP_TIMEOUT = 3.0


class ProfileError(AutonatError):
    exit_code = 8


class ProfileManager:
    def __init__(self, profiles: tuple[ProfileSettings, ...], acls: AclSet, engine: NatEngine) -> None:
        self.profiles = {profile.name: profile for profile in profiles}
        self.acls = acls
        self.engine = engine
        self._looked_up: dict[str, IPAddress | None] = {}  # str(ExtValue) -> last lookup result
        self._tasks: list[asyncio.Task[None]] = []
        self._route_local: IPAddress | None = None  # our address towards the router, with no engine session
        self._route_local6: IPv6Address | None = None  # our stable IPv6 address, with no IPv6 engine session
        self.bound6: dict[str, IPv6Address] = {}  # the IPv6 address each started dual-stack profile listens on

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if any(self._lookup_values()):
            self._tasks.append(loop.create_task(self._lookups(), name="lookups"))
        self._tasks.append(loop.create_task(self._refresh_acls()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refresh_acls(self) -> None:
        while True:
            await asyncio.sleep(ACL_REFRESH_INTERVAL)
            self._route_local = None  # looked up again at the next question: interfaces may have changed
            self._route_local6 = None
            try:
                self.acls.refresh(host_networks())
            except OSError as exc:
                log.warning("cannot read the interfaces for the .auto ACL lists: %s", exc)

    def _lookup_values(self) -> list[ExtValue]:
        values = [
            v
            for p in self.profiles.values()
            for v in (p.addressing.ext_sip_ip, p.addressing.ext_rtp_ip)
            if v is not None
        ]
        return [value for value in values if value.needs_lookup]

    async def _lookups(self) -> None:
        events = self.engine.events.subscribe()
        next_event: asyncio.Future[Any] = asyncio.ensure_future(anext(events))
        try:
            while True:
                await self.lookup_all()
                # Again when the address changes (the reflexive address changed with it), or later.
                await asyncio.wait({next_event}, timeout=LOOKUP_INTERVAL)
                while next_event.done():
                    kind = next_event.result().kind
                    next_event = asyncio.ensure_future(anext(events))
                    if kind in (EventKind.EXTERNAL_ADDRESS_CHANGE, EventKind.DISCOVERED):
                        break
        finally:
            next_event.cancel()
            await events.aclose()

    async def lookup_all(self) -> None:
        for value in {str(v): v for v in self._lookup_values()}.values():
            self._looked_up[str(value)] = await self._lookup(value)

    async def _lookup(self, value: ExtValue) -> IPAddress | None:
        assert value.host is not None
        try:
            if value.kind is ExtKind.STUN:
                host, port = parse_stun_target(str(value))
                address, _ = await stun_binding((host, port), local_address=self._local_v4(), deadline=LOOKUP_TIMEOUT)
                return address
            return await resolve_server(value.host, 0, timeout=LOOKUP_TIMEOUT)
        except AutonatError as exc:
            log.warning("%s: %s", value, exc)
            return None

    def _local_v4(self) -> Any:
        local = self.local_address()
        return local if local.version == 4 else None

    def local_address(self) -> IPAddress:
        """Our address towards the router: the engine's, else one kernel route lookup (netlink), kept until
        the next interface refresh, so answering a call never makes a blocking lookup (under --nonat every
        call asked the kernel before)."""
        session = self.engine.session
        if session is not None:
            return session.location.local_address
        if self._route_local is None:
            settings = self.engine.settings
            self._route_local = locate_router(settings.gateway, settings.interface).local_address
        return self._route_local

    def local_address6(self) -> IPv6Address:
        """Our stable global IPv6 address: the engine's (the address its pinholes are for), else one kernel
        route lookup with the same choice (autonat.proto.netlink.stable_ipv6: never a temporary address, which
        the kernel prefers as a source and which is gone within a day), kept until the next interface refresh.
        ProfileError (one line) when the host has no IPv6 default route or no stable global address."""
        known = self.engine.ipv6_local_address
        if known is not None:
            return IPv6Address(known.partition("%")[0])
        if self._route_local6 is None:
            settings = self.engine.settings
            try:
                location = locate_router6(settings.ipv6_gateway, settings.interface, settings.ipv6_address)
            except RouterNotFound as exc:
                raise ProfileError(f"no IPv6 address to listen on: {exc} (set sip-ip6)") from None
            local = location.local_address
            assert isinstance(local, IPv6Address)
            self._route_local6 = local
        return self._route_local6

    def ipv6_address(self, name: str) -> IPv6Address | None:
        """The IPv6 address profile `name` listens on (the one it bound; before that its `sip-ip6`, else our
        stable one); None when it does not listen on IPv6. ProfileError when it should and the host has none."""
        sip = self.get(name).sip
        if not sip.ipv6:
            return None
        return self.bound6.get(name) or sip.sip_ip6 or self.local_address6()

    def serves_over_ipv6(self, name: str, destination: str) -> bool:
        """Whether profile `name` talks to a peer at `destination` over IPv6 (a dual-stack profile, an IPv6 peer)."""
        return self._v6_peer(name, destination) is not None

    def _v6_peer(self, name: str, destination: str | IPAddress) -> IPv6Address | None:
        """`destination` as an IPv6 address when profile `name` serves it over IPv6 (an IPv4-mapped address
        is an IPv4 peer, as the ACLs judge it); else None."""
        if not self.get(name).sip.ipv6:
            return None
        try:
            peer = parse_address(str(destination).partition("%")[0])
        except ValueError:
            return None
        if not isinstance(peer, IPv6Address) or peer.ipv4_mapped is not None:
            return None
        return peer

    def pinhole(self, name: str, destination: str) -> bool:
        """Whether media for a peer at `destination` needs IPv6 firewall pinholes: an IPv6 peer of a dual-stack
        profile, outside the local network (not loopback, not link-local, not in `local-network-acl`: those are
        on our side of the router's firewall), and the engine keeps pinholes (`[nat] ipv6`, mapping on) with an
        IPv6 router it found: until then (or with a router that offers none) a call goes ahead without, as an
        IPv4 call is answered with the local address while the router's external one is unknown."""
        peer = self._v6_peer(name, destination)
        nat = self.engine.settings
        if peer is None or not (nat.enabled and nat.mapping and nat.ipv6):
            return False
        if self.engine.ipv6_local_address is None:
            return False
        if peer.is_loopback or peer.is_link_local:
            return False
        acl = self.get(name).addressing.local_network_acl
        return acl is None or not self.acls.lookup(peer, acl)

    def _resolve(self, value: ExtValue | None, local: IPAddress) -> Resolved:
        looked_up = None if value is None else self._looked_up.get(str(value))
        return resolve(value, router_external=self.engine.external_ip, local=local, looked_up=looked_up)

    def update(self, profiles: tuple[ProfileSettings, ...]) -> list[str]:
        """A reload: the profiles become `profiles` at once (every answer reads them: added ones answer, removed
        ones are unknown); returns the names of those that stayed and whose addressing (ext-sip-ip,
        ext-rtp-ip, local-network-acl...) changed."""
        changed = [
            p.name for p in profiles if p.name in self.profiles and self.profiles[p.name].addressing != p.addressing
        ]
        self.profiles = {profile.name: profile for profile in profiles}
        if self._tasks and any(str(v) not in self._looked_up for v in self._lookup_values()):  # started, new values
            loop = asyncio.get_running_loop()
            self._tasks = [task for task in self._tasks if not task.done()]
            if any(task.get_name() == "lookups" for task in self._tasks):
                self._tasks.append(loop.create_task(self.lookup_all(), name="lookup-now"))
            else:
                self._tasks.append(loop.create_task(self._lookups(), name="lookups"))
        return changed

    def get(self, name: str) -> ProfileSettings:
        profile = self.profiles.get(name)
        if profile is None:
            known = ", ".join(sorted(self.profiles)) or "none configured"
            raise ProfileError(f"no profile named {name!r} (profiles: {known})")
        return profile

    def status(self, name: str) -> ProfileStatus:
        profile = self.get(name).addressing
        local = profile.sip_ip or self.local_address()
        rtp_local = profile.rtp_ip or local
        auto_nat = any(v is not None and v.from_router for v in (profile.ext_sip_ip, profile.ext_rtp_ip))
        return profile_status(
            name,
            profile,
            local=local,
            sip=self._resolve(profile.ext_sip_ip, local),
            rtp=self._resolve(profile.ext_rtp_ip, rtp_local),
            auto_nat=auto_nat and self.engine.external_ip is not None,
        )

    def advertise(self, name: str, destination: str, media: bool) -> IPAddress:
        """The address profile `name` puts in SIP (or, with `media`, SDP) for a peer at `destination`: for an
        IPv6 peer of a dual-stack profile our global IPv6 address as it is (RFC 5118 §4: no NAT, nothing to
        rewrite), else the ext-sip-ip / ext-rtp-ip decision."""
        if self._v6_peer(name, destination) is not None:
            address = self.ipv6_address(name)
            assert address is not None
            return address
        profile = self.get(name).addressing
        local = (profile.rtp_ip if media else None) or profile.sip_ip or self.local_address()
        external = self._resolve(profile.ext_rtp_ip if media else profile.ext_sip_ip, local).address
        acl = profile.local_network_acl
        in_acl = None if acl is None else (lambda peer: self.acls.lookup(peer, acl))
        return choose(destination, local=local, external=external, is_local_network=in_acl)
