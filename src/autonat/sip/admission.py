"""Which new calls the SIP service takes on, sans-IO (`now` passed in): the caps that keep a flood of
INVITEs from turning into holes in the router.

A profile's SIP port is on the internet from the first minute, and scanners sweep port 5060 all day
(sipvicious and its kin: an INVITE flood at 1,000/s is a normal day). Every answered call from outside
costs two router mappings (RTP and RTCP), so each cap here bounds the holes a flood can open:

- `max_calls`: calls at once, all profiles (the old `max-calls`).
- `source_rate` / `source_burst`: new calls a second from one source address (a token bucket per
  address, at most `max_sources` addresses remembered; see autonat.limits.BucketTable).
- `source_calls`: calls at once from one source address, so one address can never fill the global
  caps and lock out everybody else.
- `max_media_calls`: calls at once whose media ports are mapped on the router (all profiles), and the
  same per profile (`profile_cap` of `admit_media`).

Those caps bound the holes, but one source at its own call rate could still take every mapped pair the
router's `map_rate` and the RTP pool can give, so a caller arriving during the flood would find none. So a
ticket says whether its call may use the **reserve** (`Ticket.reserve`: the last ready pool pair and the
last pair's worth of `map_rate`, autonat.engine.pool): only a call from a source that holds no mapped call
and has used less than half its call burst, which a flooding source never is and a person dialling is.

A call over a cap is refused before it costs a mapping: the service answers 503 with Retry-After
(RFC 3261 §21.5.4). Refusals are counted per cap (`refused`, for the status and the closing figures)
and summed up in one log line per `summary_interval` (`summary()`), never one line per packet.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field

from autonat.limits import BucketTable


class Refusal(enum.StrEnum):
    CALLS = "max-calls"
    SOURCE_RATE = "source-call-rate"
    SOURCE_CALLS = "source-max-calls"
    MEDIA_CALLS = "max-media-calls"
    PROFILE_MEDIA_CALLS = "profile-max-media-calls"
    NO_MAPPING = "no-rtp-mapping"  # the router's mapping rate (or the port range) allows no new pair now

    @property
    def retry_after(self) -> int:
        """Seconds a caller is told to wait (Retry-After): long enough to matter to a flood, short enough
        that a person redialling is not turned away for long."""
        return 2 if self is Refusal.SOURCE_RATE else 5


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_calls: int = 1000
    max_media_calls: int = 64
    source_rate: float = 5.0  # new calls a second from one address (0: no limit)
    source_burst: float = 10.0
    source_calls: int = 16
    max_sources: int = 10_000
    summary_interval: float = 10.0


@dataclass(eq=False, slots=True)
class Ticket:
    """One admitted call: what it holds, so `release` gives exactly that back."""

    source: str
    profile: str
    media: bool = False
    released: bool = False
    reserve: bool = False  # may use the pair held back for callers that are not flooding (set by admit_media)


@dataclass
class Admission:
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    calls: int = 0
    media_calls: int = 0
    refused: collections.Counter[Refusal] = field(default_factory=collections.Counter)
    _per_source: collections.Counter[str] = field(default_factory=collections.Counter)
    _per_source_media: collections.Counter[str] = field(default_factory=collections.Counter)
    _per_profile_media: collections.Counter[str] = field(default_factory=collections.Counter)
    _window: collections.Counter[Refusal] = field(default_factory=collections.Counter)
    _window_sources: collections.Counter[str] = field(default_factory=collections.Counter)
    _window_started: float | None = None
    _rates: BucketTable | None = None

    def __post_init__(self) -> None:
        limits = self.limits
        self._rates = BucketTable(limits.source_rate, limits.source_burst, limits.max_sources)

    def admit(self, source: str, profile: str, now: float) -> Ticket | Refusal:
        """A new call (an INVITE outside a dialog) from `source` (an IP address) to `profile`."""
        assert self._rates is not None
        limits = self.limits
        refusal: Refusal | None = None
        if self.calls >= limits.max_calls:
            refusal = Refusal.CALLS
        elif self._per_source[source] >= limits.source_calls:
            refusal = Refusal.SOURCE_CALLS
        elif not self._rates.take(source, now):
            refusal = Refusal.SOURCE_RATE
        if refusal is not None:
            return self._refuse(refusal, source, now)
        self.calls += 1
        self._per_source[source] += 1
        return Ticket(source, profile)

    def admit_media(self, ticket: Ticket, profile_cap: int | None, now: float) -> Refusal | None:
        """The call needs media ports mapped on the router: within `max_media_calls` (and the profile's cap)?
        Idempotent per ticket (a bridged call maps two legs but counts once)."""
        if ticket.media or ticket.released:
            return None
        if self.media_calls >= self.limits.max_media_calls:
            return self._refuse(Refusal.MEDIA_CALLS, ticket.source, now)
        if profile_cap is not None and self._per_profile_media[ticket.profile] >= profile_cap:
            return self._refuse(Refusal.PROFILE_MEDIA_CALLS, ticket.source, now)
        ticket.media = True
        ticket.reserve = self._calm(ticket.source, now)
        self.media_calls += 1
        self._per_profile_media[ticket.profile] += 1
        self._per_source_media[ticket.source] += 1
        return None

    def _calm(self, source: str, now: float) -> bool:
        """May a new mapped call from `source` use the reserve? Not while it holds another mapped call, nor
        once it has spent half its call burst (with `source_rate` 0, the first test alone)."""
        assert self._rates is not None
        if self._per_source_media[source]:
            return False
        return self._rates.level(source, now) >= self.limits.source_burst / 2

    def no_mapping(self, ticket: Ticket, now: float) -> Refusal:
        """The call was admitted but no RTP mapping could be had (map rate, range): count it like a cap."""
        return self._refuse(Refusal.NO_MAPPING, ticket.source, now)

    def release(self, ticket: Ticket) -> None:
        """The call ended (or was refused after admission); idempotent."""
        if ticket.released:
            return
        ticket.released = True
        self.calls -= 1
        self._per_source[ticket.source] -= 1
        if self._per_source[ticket.source] <= 0:
            del self._per_source[ticket.source]  # the table holds live sources only: bounded by max_calls
        if ticket.media:
            self.media_calls -= 1
            for table, key in ((self._per_profile_media, ticket.profile), (self._per_source_media, ticket.source)):
                table[key] -= 1
                if table[key] <= 0:
                    del table[key]  # live keys only: bounded by max_media_calls

    def profile_media_calls(self, profile: str) -> int:
        return self._per_profile_media[profile]

    def _refuse(self, refusal: Refusal, source: str, now: float) -> Refusal:
        self.refused[refusal] += 1
        self._window[refusal] += 1
        if len(self._window_sources) < 1000 or source in self._window_sources:  # the top sources, bounded
            self._window_sources[source] += 1
        if self._window_started is None:
            self._window_started = now
        return refusal

    def timer(self) -> float | None:
        """When the pending summary is due (None: nothing refused since the last one)."""
        return None if self._window_started is None else self._window_started + self.limits.summary_interval

    def summary(self, now: float) -> str | None:
        """One line about the calls refused since the last summary, at most one per `summary_interval`
        (None when nothing was refused or the interval is not over)."""
        if self._window_started is None or now - self._window_started < self.limits.summary_interval:
            return None
        total = sum(self._window.values())
        caps = ", ".join(f"{refusal} {count}" for refusal, count in self._window.most_common())
        top = ", ".join(f"{source} {count}" for source, count in self._window_sources.most_common(3))
        line = f"refused {total} call(s) in the last {now - self._window_started:.0f} s ({caps}); top sources: {top}"
        self._window.clear()
        self._window_sources.clear()
        self._window_started = None
        return line
