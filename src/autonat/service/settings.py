"""Settings of the SIP service: the `[sip]` table and `[[user]]`s, and the one settings type of a profile
(`[[profile]]` with its addressing, listeners, dialplan and gateways: `[[profile.extension]]`,
`[[profile.gateway]]`). Validated by autonat.daemon.config."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from pathlib import Path

from autonat.advertise import Addressing
from autonat.engine.settings import NatSettings
from autonat.sip.core import CoreConfig, ProfileConfig
from autonat.sip.dialplan import (
    DEFAULT_DIALPLAN,
    Action,
    Extension,
    GatewaySettings,
    Pattern,
    compile_pattern,
)
from autonat.sip.transaction import Timers

__all__ = [
    "DEFAULT_DIALPLAN",
    "Action",
    "Extension",
    "GatewaySettings",
    "Pattern",
    "ProfileSettings",
    "ProfileSip",
    "SipSettings",
    "compile_pattern",
    "core_config",
]


@dataclass(frozen=True, slots=True)
class ProfileSip:
    """A profile's SIP service: its listeners, dialplan, gateways and call rules."""

    listen: bool = True
    tcp: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    dialplan: tuple[Extension, ...] = DEFAULT_DIALPLAN
    gateways: tuple[GatewaySettings, ...] = ()
    max_media_calls: int | None = None  # calls at once with mapped media on this profile (None: the global cap)
    auth_calls: bool = True  # INVITEs to users and gateways need digest auth of a [[user]] (FreeSWITCH's auth-calls)
    auth_echo: bool = False  # the echo test needs it too (it is open by default: the test call from anywhere)
    ipv6: bool = False  # `sip-ipv6`: listen on IPv6 too (dual-stack): UDP/TCP/TLS on `sip_ip6`, IPv6 peers' media
    sip_ip6: IPv6Address | None = None  # `sip-ip6`: the IPv6 address to listen on; None: our stable global one


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """One `[[profile]]`, the only settings type of a profile: every part that reads it (the advertised
    addresses in autonat.service.profiles, the SIP service, the status) gets this object, not a join by name."""

    name: str
    addressing: Addressing = field(default_factory=Addressing)
    sip: ProfileSip = field(default_factory=ProfileSip)


@dataclass(frozen=True, slots=True)
class SipSettings:
    """The `[sip]` table: shared by every profile."""

    realm: str = "autonat"
    users: tuple[tuple[str, str], ...] = ()  # (name, password)
    rtp_start_port: int = 16384
    rtp_end_port: int = 32767
    pool_size: int = 4  # RTP/RTCP pairs mapped ahead of calls; 0: mapped on demand (answering waits)
    t1: float = 0.5
    t2: float = 4.0
    inactivity: float = 30.0  # RTP silence that ends a call (lost BYE)
    max_duration: float = 4 * 3600.0
    max_calls: int = 1000
    max_media_calls: int = 64  # calls at once whose RTP ports are mapped on the router (2 holes each, 4 bridged)
    source_call_rate: float = 5.0  # new calls a second from one source address (0: no limit) ...
    source_call_burst: float = 10.0  # ... with up to this many at once
    source_max_calls: int = 16  # calls at once from one source address
    pool_refill_rate: float = 2.0  # RTP pairs a second mapped to refill the pool
    auth_failures: int = 5  # failed authentications from one source within auth_window that ban it ...
    auth_window: float = 60.0
    auth_ban: float = 60.0  # ... for this long, doubling with each ban after it ...
    auth_max_ban: float = 3600.0  # ... up to this
    reply_to_source: bool = True  # NAT rule: answer the packet's source even without rport
    min_expires: int = 60
    max_expires: int = 3600
    session_expires: int = 1800  # RFC 4028 session interval proposed to phones that support timers (FreeSWITCH's)
    min_se: int = 90  # shortest session interval accepted; shorter ones get 422 (RFC 4028 §4: at least 90)
    register_wait: float = 10.0  # a gateway's first REGISTER waits this long for the external address


def core_config(settings: SipSettings, profiles: Iterable[ProfileSettings], nat: NatSettings) -> CoreConfig:
    """The call core's configuration: the `[sip]` table and each listening profile's. A profile maps media for
    peers outside when its ext-rtp-ip follows the router and the engine maps (not --nonat/--nonatmap), and its
    gateways wait for the router's address when its ext-sip-ip follows the router."""
    configs = []
    for profile in (p for p in profiles if p.sip.listen):
        addressing, more = profile.addressing, profile.sip
        sip_auto, rtp_auto = (
            v is not None and v.from_router and nat.enabled for v in (addressing.ext_sip_ip, addressing.ext_rtp_ip)
        )
        configs.append(
            ProfileConfig(
                profile.name, addressing.sip_port, addressing.tls_sip_port if more.tls_cert else None, more.dialplan,
                more.gateways,
                more.auth_calls, more.auth_echo, more.max_media_calls, external_media=rtp_auto and nat.mapping,
                external_sip=sip_auto,
            )
        )  # fmt: skip
    timers = Timers(t1=settings.t1, t2=max(settings.t1, settings.t2))
    return CoreConfig(tuple(configs), timers, settings.reply_to_source, settings.session_expires, settings.min_se,
                      settings.register_wait)  # fmt: skip
