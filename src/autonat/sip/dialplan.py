"""The dialplan and the gateways of a SIP profile, as values the call core reads (FreeSWITCH's extensions and
sofia's <gateway>). The daemon's config (autonat.daemon.config) builds them; autonat.service.settings names
them again for it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

import re2

__all__ = ["DEFAULT_DIALPLAN", "Action", "Extension", "GatewaySettings", "Pattern", "compile_pattern"]


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
