"""What the SIP shell hands the call core and shows of calls: the address decision (autonat.sip.core.Addresses over
the profile manager and the engine) and `autonat calls`' view of a call (the core's state plus the media counters).
"""

from __future__ import annotations

from typing import Any

from autonat.addresses import IPAddress
from autonat.engine.engine import NatEngine
from autonat.service.media import ProbeMedia, RtpEcho, RtpRelay
from autonat.service.profiles import ProfileManager
from autonat.sip.dialog import Call

__all__ = ["CallView", "CoreAddresses"]


class CoreAddresses:
    """autonat.sip.core.Addresses: the per-peer decision of the profile manager, the engine's external address.
    `local` holds each started profile's local address (its sip-ip, or the route's); the IPv6 address of a
    dual-stack one is the profile manager's (`ipv6_address`)."""

    def __init__(self, profiles: ProfileManager, engine: NatEngine) -> None:
        self._profiles, self._engine = profiles, engine
        self.local: dict[str, IPAddress] = {}

    def sip_address(self, profile: str, peer_ip: str) -> IPAddress:
        return self._profiles.advertise(profile, peer_ip, media=False)

    def media_address(self, profile: str, peer_ip: str) -> IPAddress:
        return self._profiles.advertise(profile, peer_ip, media=True)

    def rtp_local(self, profile: str, peer_ip: str) -> IPAddress:
        if self._profiles.serves_over_ipv6(profile, peer_ip):
            address = self._profiles.ipv6_address(profile)
            assert address is not None  # a profile that serves IPv6 peers has an IPv6 address
            return address
        return self._profiles.get(profile).addressing.rtp_ip or self.local[profile]

    def pinhole(self, profile: str, peer_ip: str) -> bool:
        return self._profiles.pinhole(profile, peer_ip)

    def external_known(self) -> bool:
        return self._engine.external_ip is not None


class CallView:
    """A call as `autonat calls` shows it (`describe()`, what the control channel calls)."""

    def __init__(self, call: Call, media: RtpEcho | RtpRelay | ProbeMedia | None, now: float) -> None:
        self.call, self._media, self._now = call, media, now

    def describe(self) -> dict[str, Any]:
        described = self.call.describe(self._now)
        media = self._media
        if isinstance(media, RtpEcho):
            described["rtp"] = {"received": media.stats.received, "sent": media.stats.sent}
        elif isinstance(media, RtpRelay):
            described["rtp"] = {"a_received": media.a.received, "b_received": media.b.received}
        elif isinstance(media, ProbeMedia):  # the test call: its signal, and the echo of it
            described["rtp"] = {"sent": media.signal.sent, "received": media.signal.received}
        else:
            described["rtp"] = {}
        return described
