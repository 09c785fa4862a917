"""Settings of the SIP service: the `[sip]` table, `[[user]]`s, and each profile's listeners, dialplan and
gateways (`[[profile.extension]]`, `[[profile.gateway]]`). Validated by autonat.daemon.config."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import re2


class Action(enum.StrEnum):
    ECHO = "echo"  # the 9196 echo test: RTP goes back where it came from
    USER = "user"  # ring the registered user named by the number (or the first group)
    GATEWAY = "gateway"  # call out through a gateway


class Pattern(Protocol):
    """A compiled dialplan pattern (google-re2's `_Regexp`)."""

    @property
    def pattern(self) -> str: ...

    @property
    def groups(self) -> int: ...

    def fullmatch(self, text: str) -> Any: ...


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is our one-line config error, not a line on stderr
_RE2_OPTIONS.max_mem = 1 << 20  # a pattern whose automaton needs more than 1 MiB is refused


def compile_pattern(text: str) -> Pattern:
    """A dialplan pattern, compiled by RE2: matching takes time linear in the number's length whatever the
    pattern (a number is untrusted input, and `(a+)+$` must not be a way to stall the service). Patterns
    RE2 cannot run in linear time (backreferences, lookaround) are refused: ValueError, one line."""
    try:
        compiled: Pattern = re2.compile(text, options=_RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        if "escape" in reason or "perl operator" in reason:
            reason += " (patterns run on RE2, in linear time: no backreferences, no lookaround)"
        raise ValueError(reason) from None
    return compiled


@dataclass(frozen=True, slots=True)
class Extension:
    """FreeSWITCH-style: the destination number must match `pattern` (a regular expression, whole number);
    the number dialled onwards is the first group when there is one, else the number."""

    pattern: Pattern
    action: Action
    gateway: str | None = None

    def target(self, number: str) -> str | None:
        match = self.pattern.fullmatch(number)
        if match is None:
            return None
        first = match.group(1) if self.pattern.groups else None
        return first if isinstance(first, str) else number


DEFAULT_DIALPLAN = (
    Extension(compile_pattern("9196"), Action.ECHO),
    Extension(compile_pattern(r"[A-Za-z0-9_.\-]{1,64}"), Action.USER),
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
    max_media_calls: int | None = None  # calls at once with mapped media on this profile (None: the global cap)
    auth_calls: bool = True  # INVITEs to users and gateways need digest auth of a [[user]] (FreeSWITCH's auth-calls)
    auth_echo: bool = False  # the echo test needs it too (it is open by default: the test call from anywhere)


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
