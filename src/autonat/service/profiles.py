"""SIP profiles in the daemon: their ext-sip-ip / ext-rtp-ip follow the engine, with no restart.

`auto-nat` and `autonat:IP` are read from the engine's current external address at every question, so
an address change reaches every profile the moment the engine learns it. `stun:` and `host:` values
are looked up at start, when the external address changes, and every `LOOKUP_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from autonat.acl import AclSet
from autonat.addresses import IPAddress
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
from autonat.aio.route import locate_router
from autonat.aio.stun import parse_stun_target, resolve_server, stun_binding
from autonat.engine.engine import NatEngine
from autonat.engine.events import EventKind
from autonat.errors import AutonatError

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
        """The address profile `name` puts in SIP (or, with `media`, SDP) for a peer at `destination`."""
        profile = self.get(name).addressing
        local = (profile.rtp_ip if media else None) or profile.sip_ip or self.local_address()
        external = self._resolve(profile.ext_rtp_ip if media else profile.ext_sip_ip, local).address
        acl = profile.local_network_acl
        in_acl = None if acl is None else (lambda peer: self.acls.lookup(peer, acl))
        return choose(destination, local=local, external=external, is_local_network=in_acl)
