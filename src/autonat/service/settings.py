"""Settings of the SIP service: the `[sip]` table, `[[user]]`s, and each profile's listeners, dialplan and
gateways (`[[profile.extension]]`, `[[profile.gateway]]`). Validated by autonat.daemon.config."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path


class Action(enum.StrEnum):
    ECHO = "echo"  # the 9196 echo test: RTP goes back where it came from
    USER = "user"  # ring the registered user named by the number (or the first group)
    GATEWAY = "gateway"  # call out through a gateway


@dataclass(frozen=True, slots=True)
class Extension:
    """FreeSWITCH-style: the destination number must match `pattern` (a regular expression, searched with
    re.fullmatch); the number dialled onwards is the first group when there is one, else the number."""

    pattern: re.Pattern[str]
    action: Action
    gateway: str | None = None

    def target(self, number: str) -> str | None:
        match = self.pattern.fullmatch(number)
        if match is None:
            return None
        return match.group(1) if match.re.groups and match.group(1) is not None else number


DEFAULT_DIALPLAN = (
    Extension(re.compile("9196"), Action.ECHO),
    Extension(re.compile(r"[A-Za-z0-9_.\-]{1,64}"), Action.USER),
)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """An outbound registration and call route to another server (sofia's <gateway>)."""

    name: str
    host: str  # IP literal of the proxy/registrar
    port: int = 5060
    transport: str = "udp"
    username: str = ""
    password: str = field(default="", repr=False)
    domain: str | None = None  # the AOR's domain; None: the proxy's host
    register: bool = True
    expires: int = 600
    retry: float = 30.0


@dataclass(frozen=True, slots=True)
class SipProfileSettings:
    listen: bool = True
    tcp: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    dialplan: tuple[Extension, ...] = DEFAULT_DIALPLAN
    gateways: tuple[GatewaySettings, ...] = ()


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
    reply_to_source: bool = True  # NAT rule: answer the packet's source even without rport
    min_expires: int = 60
    max_expires: int = 3600
